"""The train-side store: every train example's train side, full or projected, in memory or memory-mapped on disk.

What is stored per layer is [n_train, k_out, k_in]: the estimator's train side of each example — full
(k = d: the d_out x d_in gradient, for EK-FAC rotated and divided by Λ + λ) or projected (:mod:`infkit.projection`).
:func:`choose` decides, from the plan's sizes and the memory budget:

* **full**, in memory, when it fits the budget (the default when it does: scores are then the estimator's own);
* **projected**, in memory, at the largest projection of :data:`PROJECTIONS` that fits (or the one asked for);
* **on disk**, when even that exceeds the budget or ``store_dir=`` asks for it: one ``.npy`` memory map per layer
  in a folder, written during the fit's pass, flushed and fsync'd, with ``store.json`` holding the shapes, the
  fingerprint of the model and data, and a sha256 per file. Scoring streams it to the device in chunks of rows;
* **stream** (no store), when asked (``store="stream"``) or when the estimator has no projected store and the full
  one does not fit: every ``scores()`` call passes over the train data again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infkit.errors import InfkitError

STORES = ("auto", "full", "projected", "stream")
#: Projection sizes (dimensions kept per side) tried from the largest down, when the full store does not fit.
PROJECTIONS = (1024, 512, 256, 128, 64, 32, 16, 8, 4)
#: The largest projection of an on-disk store chosen when nothing fits in memory and none was asked for (the
#: largest that also leaves half the disk free, if smaller).
DISK_PROJECTION = 64
MANIFEST = "store.json"
FORMAT = 1
#: Seconds after which a leftover staging folder (a killed fit's) is deleted by the next store written beside it.
STALE_PARTIAL = 24 * 3600.0


@dataclass(frozen=True)
class StoreChoice:
    """Where and how the train side is kept: kind ("full", "projected", "stream"), the projection size (dims per
    side, None for full), the (k_out, k_in) per layer, the bytes, and the folder of an on-disk store."""

    kind: str
    rank: int | None
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    bytes: int = 0
    folder: Path | None = None
    reason: str = ""

    @property
    def on_disk(self) -> bool:
        return self.folder is not None


def format_bytes(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"]:
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def store_bytes(n: int, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    return n * sum(k_out * k_in for k_out, k_in in shapes.values()) * element_size(dtype)


def full_shapes(layers) -> dict[str, tuple[int, int]]:
    return {name: (layer.d_out, layer.d_in) for name, layer in layers.items()}


def projected_shapes(layers, rank: int) -> dict[str, tuple[int, int]]:
    """(k_out, k_in) per layer for at most ``rank`` dimensions per side."""
    return {name: (min(layer.d_out, rank), min(layer.d_in, rank)) for name, layer in layers.items()}


def choose(n: int, layers, dtype: torch.dtype, budget: int, store: str, rank: int | None, store_dir, can_project: bool,
           default_folder) -> StoreChoice:
    """The store for n examples of ``layers``: see the module docstring. ``default_folder()`` names the folder of
    an on-disk store when ``store_dir`` is None."""
    full = full_shapes(layers)
    full_bytes = store_bytes(n, full, dtype)

    def on_disk(kind: str, shapes, k, reason: str) -> StoreChoice:
        folder = Path(store_dir) if store_dir is not None else default_folder(kind, k)
        return StoreChoice(kind, k, shapes, store_bytes(n, shapes, dtype), folder, reason)

    if store == "stream":
        return StoreChoice("stream", None, reason="store='stream' (or cache=False): every scores() call streams the "
                                                  "train data again")
    if store == "full" or (store == "auto" and rank is None and (full_bytes <= budget or not can_project)):
        if full_bytes <= budget and store_dir is None:
            return StoreChoice("full", None, full, full_bytes, reason="fits the memory budget")
        if store == "full" or store_dir is not None:
            where = "store_dir= given" if store_dir is not None else "above the memory budget"
            return on_disk("full", full, None, f"{where}: memory-mapped on disk")
        return StoreChoice("stream", None, reason=f"the full train-side store of {format_bytes(full_bytes)} exceeds "
                                                  f"the memory budget of {format_bytes(budget)}, and this estimator "
                                                  "has no projected store: every scores() call streams the train "
                                                  "data again")
    if not can_project:
        raise InfkitError("this estimator has no projected store (its curvature is not diagonal in any "
                          "projection); use store='full' (memory-mapped on disk above the budget) or store='stream'")
    if rank is not None:
        shapes = projected_shapes(layers, rank)
        if store_bytes(n, shapes, dtype) <= budget and store_dir is None:
            return StoreChoice("projected", rank, shapes, store_bytes(n, shapes, dtype), reason="as asked")
        where = "store_dir= given" if store_dir is not None else "above the memory budget"
        return on_disk("projected", shapes, rank, f"as asked; {where}: memory-mapped on disk")
    for k in PROJECTIONS:
        shapes = projected_shapes(layers, k)
        if store_bytes(n, shapes, dtype) <= budget:
            if store_dir is not None:
                return on_disk("projected", shapes, k, "the largest projection that fits the memory budget; "
                                                       "store_dir= given: memory-mapped on disk")
            return StoreChoice("projected", k, shapes, store_bytes(n, shapes, dtype),
                               reason="the largest projection that fits the memory budget")
    folder = Path(store_dir) if store_dir is not None else default_folder("projected", DISK_PROJECTION)
    free = free_bytes(folder)
    fitting = [k for k in PROJECTIONS if k <= DISK_PROJECTION and store_bytes(n, projected_shapes(layers, k), dtype)
               <= free // 2]
    k = fitting[0] if fitting else PROJECTIONS[-1]
    return on_disk("projected", projected_shapes(layers, k), k,
                   f"no projection fits the memory budget: memory-mapped on disk, at the largest of up to "
                   f"{DISK_PROJECTION} dimensions per side that leaves half the disk free")


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds (or will hold) ``folder``."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


# -- on disk ------------------------------------------------------------------------------------------------------
def _file(index: int) -> str:
    return f"layer-{index:04d}.npy"


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float64: np.float64}[dtype]


def _as_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def foreign(folder: Path) -> str | None:
    """Why ``folder`` is not a store infkit wrote (then it is never replaced), or None: it holds only
    ``store.json`` and ``layer-*.npy`` files, or nothing."""
    if not folder.exists():
        return None
    if not folder.is_dir() or folder.is_symlink():
        return "it is not a folder"
    others = sorted(p.name for p in folder.iterdir() if not (p.name == MANIFEST or re.fullmatch(r"layer-\d{4}\.npy",
                                                                                                  p.name)))
    if others:
        return f"it holds files infkit does not write: {', '.join(others[:5])}"
    return None


class DiskStore:
    """An on-disk store being written: memory-mapped tensors in a staging folder beside the target, renamed into
    place by :meth:`finish` once flushed, fsync'd and checksummed. A fit that fails or is interrupted leaves the
    previous store as it was (a killed process leaves its ``.<name>.partial-*`` folder, deleted by the next store
    written there)."""

    def __init__(self, folder: Path, n: int, shapes: dict[str, tuple[int, int]], dtype: torch.dtype):
        self.folder, self.n, self.shapes, self.dtype = Path(folder), n, dict(shapes), dtype
        need = store_bytes(n, shapes, dtype)
        why = foreign(self.folder)
        if why:  # before the fit, not after it
            raise InfkitError(f"store_dir {self.folder} is not an infkit train-side store ({why}); give an empty or "
                              "new folder")
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.parent.glob(f".{self.folder.name}.partial-*"):
            if time.time() - leftover.stat().st_mtime > STALE_PARTIAL:  # a killed fit's, not a running one's
                shutil.rmtree(leftover, ignore_errors=True)
        free = free_bytes(self.folder.parent)
        if need > free:
            raise InfkitError(f"the on-disk train-side store needs {need / 2**30:.1f} GiB, but {self.folder.parent} "
                              f"has {free / 2**30:.1f} GiB free: give store_dir= on a larger disk, or a smaller "
                              "projection=")
        self.staging = self.folder.parent / f".{self.folder.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.arrays = {}
        self.tensors = {}
        for index, (name, (k_out, k_in)) in enumerate(self.shapes.items()):
            array = np.lib.format.open_memmap(self.staging / _file(index), mode="w+", dtype=_numpy_dtype(dtype),
                                              shape=(n, k_out, k_in))
            self.arrays[name] = array
            self.tensors[name] = _as_tensor(array, dtype)

    def finish(self, fingerprint: dict, fit_id: str) -> dict[str, torch.Tensor]:
        """Flush and fsync every file, write ``store.json`` with checksums, the fingerprint and ``fit_id`` (which
        fit wrote it: a save names it, so a store rewritten by another fit is refused), move the folder into place;
        returns the store reopened from its final place."""
        from infkit.persist import sha256_file
        from infkit.savefolder import _fsync

        files = {}
        for index, name in enumerate(self.shapes):
            self.arrays[name].flush()
            path = self.staging / _file(index)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = {"file": _file(index), "sha256": sha256_file(path)}
        del self.arrays, self.tensors
        manifest = {"format": FORMAT, "n": self.n, "dtype": str(self.dtype).replace("torch.", ""),
                    "layers": list(self.shapes), "shapes": {name: list(shape) for name, shape in self.shapes.items()},
                    "files": files, "fingerprint": fingerprint, "fit_id": fit_id}
        with open(self.staging / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _fsync(self.staging)
        why = foreign(self.folder)
        if why:
            raise InfkitError(f"store_dir {self.folder} is not an infkit train-side store ({why}); give an empty or "
                              "new folder")
        old = self.folder.parent / f".{self.folder.name}.old-{uuid.uuid4().hex[:8]}"
        if self.folder.exists():
            self.folder.rename(old)  # two renames: a kill between them leaves the old store beside, not lost
        self.staging.rename(self.folder)
        _fsync(self.folder.parent)
        shutil.rmtree(old, ignore_errors=True)
        return open_store(self.folder, fingerprint, fit_id, verify=False)

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def open_store(folder: Path, fingerprint: dict | None = None, fit_id: str | None = None,
               verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of an on-disk store, memory-mapped (copy-on-write: the files are never changed); refused when a
    file is missing or (``verify``) its checksum differs, or when it was written for another model or data
    (``fingerprint``)."""
    from infkit.fingerprint import describe_mismatch
    from infkit.persist import sha256_file

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, ValueError) as err:
        raise InfkitError(f"{folder} holds no readable train-side store ({MANIFEST}): fit the analysis again") from err
    if fingerprint is not None:
        problems = describe_mismatch(manifest.get("fingerprint", {}), fingerprint)
        if problems:
            raise InfkitError(f"the train-side store in {folder} was written for another model or data: "
                              + "; ".join(problems) + ". Fit the analysis again")
    if fit_id is not None and manifest.get("fit_id") != fit_id:
        raise InfkitError(f"the train-side store in {folder} was rewritten by another fit since this analysis was "
                          "saved (another damping, Fisher or checkpoint?): fit the analysis again")
    dtype = getattr(torch, manifest["dtype"])
    tensors = {}
    for name in manifest.get("layers", manifest["files"]):
        entry = manifest["files"][name]
        path = folder / entry["file"]
        if not path.exists() or (verify and sha256_file(path) != entry["sha256"]):
            raise InfkitError(f"{path} is missing, truncated or was modified (its sha256 differs from the one "
                              "written); fit the analysis again")
        array = np.load(path, mmap_mode="c")  # copy-on-write: the file is never changed
        if list(array.shape) != [manifest["n"], *manifest["shapes"][name]]:
            raise InfkitError(f"{path} has shape {list(array.shape)}, not the one {MANIFEST} gives; fit again")
        tensors[name] = _as_tensor(array, dtype)
    return tensors
