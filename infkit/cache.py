"""Explicit caches: what an analysis keeps on its device after ``fit()``, its cost, and its fingerprint.

Two parts:

* **factors** — the estimator's fitted state (EK-FAC eigenbases and eigenvalues, the dense GGN of "exact", the
  stacked gradients of DataInf, ...), as ``estimator.state()`` reports it;
* **train side** — every train example's gradient in the form that makes a new query cheapest
  (``estimator.train_side``: for EK-FAC rotated into the eigenbasis and divided by Λ + λ; for the others the raw
  per-example gradients), stored per layer as [n_train, d_out, d_in] in ``dtype`` (float32 or bfloat16). With it a
  query costs one forward+backward plus one matrix product per layer.

A fingerprint ties a cache to the tracked parameters (names, shapes, a content hash) and to the train data (size
and a content hash), so a cache from another model or other data is refused with a message saying what differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from infkit.capture import Layer


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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


def _task_text(fingerprint: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v!r}" for k, v in fingerprint["settings"].items())
    return f"{fingerprint['type']}({settings})"


@dataclass
class Cache:
    """What an analysis holds after ``fit()``: device, dtype, bytes per part and the fingerprint."""

    device: torch.device
    dtype: torch.dtype
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    train_side: dict[str, torch.Tensor] | None = None  # {layer: [n_train, d_out, d_in]}
    fingerprint: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None  # why the train side is not cached (memory budget), if it is not

    @property
    def bytes(self) -> dict[str, int]:
        return {
            "factors": tensor_bytes(self.factors),
            "train_side": tensor_bytes(self.train_side) if self.train_side is not None else 0,
        }

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={format_bytes(v)}" for k, v in self.bytes.items())
        train = "cached" if self.train_side is not None else f"streamed ({self.fallback})"
        key = self.fingerprint.get("model", {}).get("params_sha256", "")[:12]
        return f"Cache(device={self.device}, dtype={self.dtype}, {parts}, train side {train}, model {key})"


def format_bytes(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
