"""Fingerprints: what a fit depends on (the model, the train data, the task), hashed, so that a cache or a save
is never used with another model or data. :func:`describe_mismatch` says, in words, what differs."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from infkit.capture import Layer


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
