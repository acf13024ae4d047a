"""Saving and loading a fitted analysis (a folder with ``tensors.safetensors`` and ``analysis.json``), checked
against the fingerprints (:mod:`infkit.fingerprint`) that tie a fit to its model, train data and task.

* The JSON holds the settings, the damping used per layer, the fingerprints (tracked parameter names, shapes and a
  content hash; train data size and a content hash), the sha256 of the tensor file, and a sha256 of itself.
* A save writes a temporary folder beside the target, then renames it into place, so an interrupted save never
  leaves something that loads — and never destroys the previous save.
* A load checks both checksums (a truncated or edited file is refused), then the fingerprints against the model
  and data it is given, and says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def save(analysis, path: str | os.PathLike) -> Path:
    if not analysis.fitted:
        raise InfkitError("save() needs a fitted analysis: call an.fit() first")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"factors/{k}": v for k, v in analysis.estimator.state().items()}
    cache = analysis.cache
    if cache is not None and cache.train_side is not None:
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
        },
        "damping_used": analysis.estimator.damping_used,
        "fingerprint": cache.fingerprint if cache is not None else {},
        "timings": analysis.timings,
    }
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(tensors, str(staging / TENSORS))
        meta["tensors_sha256"] = sha256_file(staging / TENSORS)
        meta["meta_sha256"] = _self_checksum(meta)
        (staging / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder into place; an older save is kept until the new one is there."""
    if not target.exists():
        os.replace(staging, target)
        return
    if not (target / META).exists():
        raise InfkitError(f"{target} exists and is not a saved infkit analysis; choose another path")
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a save, after checking both checksums."""
    folder = Path(path)
    if not (folder / META).exists() or not (folder / TENSORS).exists():
        raise InfkitError(f"{folder} is not a saved infkit analysis (expected {META} and {TENSORS} in it)")
    try:
        meta = json.loads((folder / META).read_text())
    except json.JSONDecodeError as err:
        raise InfkitError(f"{folder / META} is damaged (not valid JSON: {err}); save the analysis again") from err
    if meta.get("meta_sha256") != _self_checksum(meta):
        raise InfkitError(f"{folder / META} was edited or damaged (its checksum does not match); save it again")
    if sha256_file(folder / TENSORS) != meta.get("tensors_sha256"):
        raise InfkitError(
            f"{folder / TENSORS} is truncated or was modified (its sha256 differs from the one saved); "
            "save the analysis again"
        )
    if meta.get("format") != FORMAT:
        raise InfkitError(f"{folder} has save format {meta.get('format')}; this infkit reads format {FORMAT}")
    return meta, load_file(str(folder / TENSORS))


def load(cls, path, model, task, train_data, progress: bool = True):
    """Reopen a saved analysis for ``model`` and ``train_data``; refuses a mismatch with the differences."""
    meta, tensors = read(path)
    settings = meta["settings"]
    layer_names = list(meta["fingerprint"]["model"]["layers"])
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
        **settings["estimator_options"],
    )
    analysis.fisher_given = not settings.get("fisher_default", False)
    current = fingerprint(analysis)
    problems = describe_mismatch(meta["fingerprint"], current)
    if problems:
        raise InfkitError(
            f"the analysis saved in {path} does not match the model and data given:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad it with the model and train data it was fitted on, or fit a new analysis."
        )
    device = analysis.device
    factors = {k[len("factors/") :]: v.to(device) for k, v in tensors.items() if k.startswith("factors/")}
    train = {k[len("train/") :]: v.to(device) for k, v in tensors.items() if k.startswith("train/")}
    analysis.restore(factors, train or None, meta["damping_used"], current, tensors.get("self_influence"))
    analysis.timings.update({f"saved_{k}": v for k, v in meta.get("timings", {}).items()})
    return analysis
