"""Saving and loading a fitted analysis (a folder with ``tensors.safetensors`` and ``analysis.json``), and the
fingerprints that tie a fit to its model, train data and task.

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
from infkit.capture import Layer
from infkit.errors import InfkitError

FORMAT = 1
TENSORS = "tensors.safetensors"
META = "analysis.json"


# -- fingerprints -------------------------------------------------------------------------------------------------
def fingerprint(analysis) -> dict[str, Any]:
    """What a fit depends on: the tracked parameters, the train data and the task's settings."""
    return {
        "model": model_fingerprint(analysis.layers),
        "data": data_fingerprint(analysis.task, analysis.train_data),
        "task": task_fingerprint(analysis.task),
    }


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_fingerprint(layers: dict[str, Layer]) -> dict[str, Any]:
    """Tracked parameter names and shapes, and a sha256 of their values."""
    h = hashlib.sha256()
    shapes = {}
    for name, layer in layers.items():
        shapes[name] = [layer.d_out, layer.d_in]
        for p in layer.parameters():
            _hash_tensor(h, p)
    return {"layers": shapes, "params_sha256": h.hexdigest()}


def data_fingerprint(task, data, batch_size: int = 64) -> dict[str, Any]:
    """Train data size and a sha256 of its collated tensors (what the model actually sees)."""
    h = hashlib.sha256()
    n = len(data)
    for start in range(0, n, batch_size):
        batch = task.collate([data[i] for i in range(start, min(start + batch_size, n))])
        for key in sorted(batch):
            if torch.is_tensor(batch[key]):
                h.update(key.encode())
                _hash_tensor(h, batch[key])
    return {"n_train": n, "data_sha256": h.hexdigest()}


def task_fingerprint(task) -> dict[str, Any]:
    """The task's type and its plain settings (numbers, strings, flags: e.g. ``max_length``, a diffusion task's
    ``n_draws`` and ``seed``), which change the losses without changing the collated data."""
    settings = {}
    for name, value in sorted(vars(task).items()):
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)):  # None = a default: left out
            settings[name] = value
    return {"type": type(task).__name__, "settings": settings}


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    problems = []
    saved_layers, current_layers = saved["model"]["layers"], current["model"]["layers"]
    missing = sorted(set(saved_layers) - set(current_layers))
    extra = sorted(set(current_layers) - set(saved_layers))
    if missing:
        problems.append(f"tracked layers in the saved analysis but not in this model: {missing[:5]}")
    if extra:
        problems.append(f"tracked layers in this model but not in the saved analysis: {extra[:5]}")
    for name in sorted(set(saved_layers) & set(current_layers)):
        if list(saved_layers[name]) != list(current_layers[name]):
            problems.append(f"layer {name!r} has shape {current_layers[name]} here, {saved_layers[name]} when saved")
    if not problems and saved["model"]["params_sha256"] != current["model"]["params_sha256"]:
        problems.append("the tracked parameters have other values (the model was trained further or is another one)")
    if saved["data"]["n_train"] != current["data"]["n_train"]:
        n_now, n_saved = current["data"]["n_train"], saved["data"]["n_train"]
        problems.append(f"the train data has {n_now} examples, {n_saved} when saved")
    elif saved["data"]["data_sha256"] != current["data"]["data_sha256"]:
        problems.append("the train data has the same size but other contents (or another order or tokenizer)")
    if "task" in saved and "task" in current and saved["task"] != current["task"]:  # older saves lack it
        problems.append(f"the task is {_task_text(current['task'])} here, {_task_text(saved['task'])} when saved")
    return problems


def _task_text(task_fp: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v!r}" for k, v in task_fp["settings"].items())
    return f"{task_fp['type']}({settings})"


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
