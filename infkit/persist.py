"""Saving and loading a fitted analysis (a folder with ``tensors.safetensors`` and ``analysis.json``), checked
against the fingerprints (:mod:`infkit.fingerprint`) that tie a fit to its model, train data and task.

* The JSON holds the settings, the damping used per layer, the fingerprints (the whole model's state hashed, the
  tracked layers' shapes, the task's settings, train data size and a content hash), the sha256 of the tensor
  file, and a sha256 of itself.
* A save writes a hidden folder beside the target and renames it into place, holding a lock file so that saves to
  one path run one after the other (:mod:`infkit.savefolder`). A save interrupted or killed at any point leaves the
  previous save loadable (renamed back by the next save or load if the kill fell between the two renames) and
  never leaves a half-written save at the target; the next save deletes what killed saves left. A save replaces
  only a folder infkit wrote: one holding just these two files, with an ``analysis.json`` whose own checksum
  matches; any other non-empty folder is refused and left as it is.
* A load checks both checksums (a truncated or edited file is refused), then the fingerprints against the model
  and data it is given, and says what differs; then that the tensors are the ones the metadata implies (every
  tracked layer's state and train side present, with the shapes of the layers and of the train data, and finite),
  since a file rewritten with fresh checksums passes the first check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infkit import savefolder, shards, store
from infkit._version import __version__
from infkit.errors import InfkitError
from infkit.fingerprint import describe_mismatch, fingerprint

FORMAT = 1
TENSORS = "tensors.safetensors"
META = "analysis.json"


# -- files --------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (saves and the demos' weights are checked with it)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _self_checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def foreign(folder: Path) -> str | None:
    """Why ``folder`` is not a save infkit wrote, in a few words; None when it is (then a save may replace it)."""
    others = sorted(p.name for p in folder.iterdir() if p.name not in (META, TENSORS))
    if others:
        more = ", ..." if len(others) > 5 else ""
        return f"it holds files infkit does not write: {', '.join(others[:5])}{more}"
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        return f"it has no {META}"
    except (OSError, ValueError):
        return f"its {META} is not one infkit wrote"
    if not isinstance(meta, dict) or "format" not in meta or meta.get("meta_sha256") != _self_checksum(meta):
        return f"its {META} is not one infkit wrote, or it was edited (delete the folder yourself to save there)"
    return None


def save(analysis, path: str | os.PathLike) -> Path:
    if not analysis.fitted:
        raise InfkitError("save() needs a fitted analysis: call an.fit() first")
    if analysis.world.active:  # several processes: a save per rank and a manifest (infkit.shards)
        return shards.save(analysis, Path(path), _save_one)
    return _save_one(analysis, path)


def _save_one(analysis, path: str | os.PathLike) -> Path:
    tensors = {f"factors/{k}": v for k, v in analysis.estimator.saved_state().items()}
    cache = analysis.cache
    if cache is not None and cache.train_side is not None and cache.folder is None:  # on disk: the save points to it
        tensors.update({f"train/{k}": v for k, v in cache.train_side.items()})
    if analysis._self_influence is not None:
        tensors["self_influence"] = analysis._self_influence
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    damping = analysis.estimator.damping
    meta = {
        "format": FORMAT,
        "infkit": __version__,
        "estimator": analysis.estimator.name,
        "settings": {
            "damping": damping,
            "batch_size": analysis.batch_size,
            "seed": analysis.seed,
            "fisher": analysis.fisher,
            "fisher_default": not analysis.fisher_given,
            "fisher_samples": analysis.fisher_samples,
            "cache_dtype": str(analysis.cache_dtype).replace("torch.", ""),
            "estimator_options": analysis.estimator_options,
            "store": analysis.store.kind,
            "projection": analysis.store.rank,
            "store_shapes": {name: list(shape) for name, shape in analysis.store.shapes.items()},
            "store_dir": str(analysis.store.folder.absolute()) if analysis.store.folder is not None else None,
            "store_fit_id": cache.fit_id if cache is not None else None,
            "memory_budget": analysis.memory_budget,
            "fit_examples": analysis.n_fit,  # differs from n_train when the curvature was fitted on fit_data
        },
        "damping_used": analysis.estimator.damping_used,
        "fingerprint": cache.fingerprint if cache is not None else {},
        "timings": analysis.timings,
    }

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / TENSORS))
        meta["tensors_sha256"] = sha256_file(folder / TENSORS)
        meta["meta_sha256"] = _self_checksum(meta)
        (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True))

    return savefolder.replace(Path(path), write, foreign)


def _identity(folder: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a save, after checking both checksums. A save killed between its renames is
    recovered first; a folder replaced by a concurrent save while it was read is read again."""
    folder = Path(path)
    for attempt in range(3):
        savefolder.recover(folder)
        seen = _identity(folder)
        try:
            result = _read_once(folder)
        except InfkitError:  # missing, or mixed files: retried if a save replaced the folder meanwhile
            if attempt == 2 or (seen is not None and _identity(folder) == seen):
                raise
            continue
        if _identity(folder) == seen:
            return result
    raise InfkitError(f"{folder} was replaced by other saves while it was read, three times; load it again")


def _read_once(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = json.loads((folder / META).read_text())
        tensors_sha256 = sha256_file(folder / TENSORS)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise InfkitError(f"{folder} is not a saved infkit analysis (expected {META} and {TENSORS} in it)") from err
    except json.JSONDecodeError as err:
        raise InfkitError(f"{folder / META} is damaged (not valid JSON: {err}); save the analysis again") from err
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _self_checksum(meta):
        raise InfkitError(f"{folder / META} was edited or damaged (its checksum does not match); save it again")
    if tensors_sha256 != meta.get("tensors_sha256"):
        raise InfkitError(
            f"{folder / TENSORS} is truncated or was modified (its sha256 differs from the one saved); "
            "save the analysis again"
        )
    if meta.get("format") != FORMAT:
        raise InfkitError(f"{folder} has save format {meta.get('format')}; this infkit reads format {FORMAT}")
    missing = [key for key in ("estimator", "settings", "damping_used", "fingerprint") if key not in meta]
    layers = meta.get("fingerprint", {}).get("model", {}).get("layers") if not missing else None
    if missing or not isinstance(layers, dict) or not layers:
        what = ", ".join(missing) if missing else "the tracked layers (fingerprint.model.layers)"
        raise InfkitError(f"{folder / META} lacks {what}; fit the analysis and save it again")
    try:
        return meta, load_file(str(folder / TENSORS))
    except FileNotFoundError as err:
        raise InfkitError(f"{folder} is not a saved infkit analysis (expected {TENSORS} in it)") from err


# -- checks of a save against the analysis it is loaded into --------------------------------------------------------
def check_same_model(folder: Path, layer_names: list[str], model) -> None:
    """Refuse, before building the analysis, a save whose tracked layers this model does not have."""
    if not hasattr(model, "named_modules"):
        return  # not a module: the analysis says so
    present = {name for name, _ in model.named_modules()}
    missing = [name for name in layer_names if name not in present]
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        raise InfkitError(
            f"the analysis in {folder} was saved for another model: {len(missing)} of its {len(layer_names)} "
            f"tracked layers are not in this model ({', '.join(map(repr, missing[:3]))}{more}); load it with the "
            "model it was fitted on, or fit a new analysis for this one"
        )


def _finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 24))


def check_tensors(folder: Path, analysis, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a save whose tensors are not the ones its metadata implies for ``analysis``: a tracked layer's state
    or train side missing, a shape that does not fit the layers (d_out, d_in) or the n_train train examples, an
    unexpected tensor, or values that are not finite. The checksums cannot catch a file rewritten with new ones."""
    n, layers = analysis.n_train, analysis.layers
    local = len(analysis.shard)  # this rank's train examples (all of them in one process)
    # examples the fit saw: DataInf keeps this rank's rows, the others' states are the same on every rank
    n_fit = analysis.n_fit
    seen = len(analysis.world.shard(n_fit)) if analysis.estimator.preconditions_with_all_ranks else n_fit
    rows = seen * (analysis.fisher_samples if analysis.fisher == "sampled" else 1)
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    shapes = analysis.estimator.state_shapes(rows)
    if shapes is not None:
        expected.update({f"factors/{k}": (tuple(v), f"{analysis.estimator.name}'s state") for k, v in shapes.items()})
    projected = analysis.estimator.projection_state_shapes()
    expected.update({f"factors/{k}": (tuple(v), "the store's projection") for k, v in projected.items()})
    if any(k.startswith("train/") for k in tensors):
        for name, layer in layers.items():
            k_out, k_in = analysis.store.shapes.get(name, (layer.d_out, layer.d_in))
            note = (f"[n_train, k_out, k_in] with n_train = {local} and layer {name!r} of {layer.d_out} x "
                    f"{layer.d_in}, stored {analysis.store.kind}")
            expected[f"train/{name}"] = ((local, k_out, k_in), note)
    if "self_influence" in tensors:
        expected["self_influence"] = ((n,), f"one value per train example, n_train = {n}")
    problems = []
    for key, (shape, note) in expected.items():
        if key not in tensors:
            problems.append(f"tensor {key!r} is missing")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"tensor {key!r} has shape {list(tensors[key].shape)}, expected {list(shape)} ({note})")
    for key, t in tensors.items():
        known = key in expected or (shapes is None and key.startswith("factors/"))
        if not known:
            problems.append(f"tensor {key!r} is not one this analysis has")
        elif key.startswith("train/") and t.dtype != analysis.cache_dtype:
            problems.append(f"tensor {key!r} is {t.dtype}, expected the cache dtype {analysis.cache_dtype}")
        elif not _finite(t):
            problems.append(f"tensor {key!r} has values that are not finite (NaN or inf)")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InfkitError(
            f"{folder / TENSORS} does not hold what its {META} describes: " + "; ".join(problems[:5]) + more
            + ". It was rewritten or damaged after infkit saved it (its checksums were recomputed): fit the "
            "analysis and save it again"
        )


def load(cls, path, model, task, train_data, progress: bool = True):
    """Reopen a saved analysis for ``model`` and ``train_data``; refuses a mismatch with the differences."""
    from infkit.distributed import resolve_world

    folder = shards.own_save(Path(path), resolve_world(None))  # a job's save: this rank's own
    meta, tensors = read(folder)
    settings = meta["settings"]
    layer_names = list(meta["fingerprint"]["model"]["layers"])
    check_same_model(folder, layer_names, model)
    analysis = cls(
        model,
        task,
        train_data,
        estimator=meta["estimator"],
        damping=settings["damping"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        fisher=settings["fisher"],
        fisher_samples=settings.get("fisher_samples", 1),
        modules=layer_names,
        progress=progress,
        cache_dtype=settings["cache_dtype"],
        # saves from before the compressed store hold the full train side, or none
        store=settings.get("store", "full" if any(k.startswith("train/") for k in tensors) else "stream"),
        projection=settings.get("projection"),
        store_dir=settings.get("store_dir"),
        # a save from before the compressed store keeps its train side in memory, whatever this machine's budget
        memory_budget=settings.get("memory_budget", 2**62),
        **settings["estimator_options"],
    )
    analysis.fisher_given = not settings.get("fisher_default", False)
    analysis.n_fit = settings.get("fit_examples", analysis.n_train)  # fitted on fit_data: its size
    if analysis.store.kind == "projected" and "store_shapes" in settings:  # the fit chose them (eigenbasis pairs)
        analysis.use_store_shapes({name: tuple(shape) for name, shape in settings["store_shapes"].items()})
    current = fingerprint(analysis)
    problems = describe_mismatch(meta["fingerprint"], current)
    if problems:
        raise InfkitError(
            f"the analysis saved in {path} does not match the model and data given:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad it with the model and train data it was fitted on, or fit a new analysis."
        )
    check_tensors(folder, analysis, tensors)
    device = analysis.device
    factors = {k[len("factors/") :]: v.to(device) for k, v in tensors.items() if k.startswith("factors/")}
    train = {k[len("train/") :]: v.to(device) for k, v in tensors.items() if k.startswith("train/")}
    if analysis.store.on_disk:  # the save points to its store: checked against its checksums and fingerprint
        train = store.open_store(analysis.store.folder, current, settings.get("store_fit_id"))
    analysis.restore(factors, train or None, meta["damping_used"], current, tensors.get("self_influence"))
    analysis.cache.fit_id = settings.get("store_fit_id")
    analysis.timings.update({f"saved_{k}": v for k, v in meta.get("timings", {}).items()})
    return analysis
