"""Explicit caches: what an analysis keeps on its device after ``fit()``, its cost, and its fingerprint.

Two parts:

* **factors** — the estimator's fitted state (EK-FAC eigenbases and eigenvalues, the dense GGN of "exact", the
  stacked gradients of DataInf, ...), as ``estimator.state()`` reports it;
* **train side** — every train example's gradient in the form that makes a new query cheapest
  (``estimator.train_side``: for EK-FAC rotated into the eigenbasis and divided by Λ + λ; for the others the raw
  per-example gradients), stored per layer as [n_train, d_out, d_in] in ``dtype`` (float32 or bfloat16). With it a
  query costs one forward+backward plus one matrix product per layer.

A fingerprint (:func:`infkit.fingerprint.fingerprint`) ties a cache to the model's whole state and the train data,
so a cache from another model or other data is refused with a message saying what differs.

``build`` makes the cache after a fit: from the train side the fit itself produced (``Fitted.train_side``, see
``Estimator.fills_train_side``) or by one more pass over the train data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from infkit.estimators.base import Fitted
from infkit.tasks.base import Labels


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
        key = self.fingerprint.get("model", {}).get("state_sha256", "")[:12]
        return f"Cache(device={self.device}, dtype={self.dtype}, {parts}, train side {train}, model {key})"


def format_bytes(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def allocate_train_side(analysis) -> dict[str, torch.Tensor]:
    """Empty {layer: [n_train, d_out, d_in]} in the analysis' cache dtype, on its device."""
    return {
        name: torch.empty(analysis.n_train, layer.d_out, layer.d_in, dtype=analysis.cache_dtype, device=analysis.device)
        for name, layer in analysis.layers.items()
    }


def build(analysis, plan, fitted: Fitted, fingerprint: dict[str, Any]) -> Cache:
    """The cache of a fitted analysis: the fit's state, and the train side when the plan caches it — the one the
    fit produced, else ``estimator.train_side`` of every example from one more pass over the train data."""
    cache = Cache(analysis.device, analysis.cache_dtype, fitted.state, fingerprint=fingerprint)
    if not plan.cache_train:
        cache.fallback = plan.fallback
        return cache
    if fitted.train_side is not None:
        cache.train_side = fitted.train_side
        return cache
    stored = allocate_train_side(analysis)
    for cb in analysis.train_passes.iterate(Labels.DATA, desc="caching train gradients"):
        index = torch.as_tensor(cb.indices, device=cache.device)
        for name, t in analysis.estimator.train_side_batch(cb).items():
            stored[name][index] = t.to(cache.dtype)
    cache.train_side = stored
    return cache
