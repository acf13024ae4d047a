"""Explicit caches: what an analysis keeps on its device after ``fit()``, its cost, and its fingerprint.

Two parts:

* **factors** — the estimator's fitted state (EK-FAC eigenbases and eigenvalues, the dense GGN of "exact", the
  stacked gradients of DataInf, ...), as ``estimator.state()`` reports it;
* **train side** — every train example's gradient in the form that makes a new query cheapest
  (``estimator.train_side``: for EK-FAC rotated into the eigenbasis and divided by Λ + λ; for the others the raw
  per-example gradients), stored per layer as [n_train, d_out, d_in] in ``dtype`` (float32 or bfloat16), or
  projected to [n_train, k_out, k_in], in memory or memory-mapped on disk (:mod:`infkit.store`). With it a query
  costs one forward+backward plus one matrix product per layer.

A fingerprint (:func:`infkit.fingerprint.fingerprint`) ties a cache to the model's whole state and the train data,
so a cache from another model or other data is refused with a message saying what differs.

``build`` makes the cache after a fit: from the train side the fit itself produced (``Fitted.train_side``, see
``Estimator.fills_train_side``) or by one more pass over the train data.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infkit.estimators.base import Fitted
from infkit.store import DiskStore, StoreChoice, format_bytes
from infkit.tasks.base import Labels


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Cache:
    """What an analysis holds after ``fit()``: device, dtype, bytes per part, the fingerprint, and where its train
    side is (full or projected, in memory or memory-mapped on disk: :mod:`infkit.store`)."""

    device: torch.device
    dtype: torch.dtype
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    train_side: dict[str, torch.Tensor] | None = None  # {layer: [n_train, k_out, k_in]} (k = d when full)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None  # why the train side is not cached (memory budget), if it is not
    projected: bool = False  # the train side holds projected gradients (infkit.projection)
    folder: Path | None = None  # an on-disk store's folder
    fit_id: str | None = None  # which fit wrote the on-disk store (its store.json says the same)

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
        if self.train_side is None:
            train = f"streamed ({self.fallback})"
        else:
            train = ("projected" if self.projected else "full") + (f", on disk in {self.folder}" if self.folder else "")
        key = self.fingerprint.get("model", {}).get("state_sha256", "")[:12]
        return f"Cache(device={self.device}, dtype={self.dtype}, {parts}, train side {train}, model {key})"


def allocate_train_side(analysis, choice: StoreChoice) -> tuple[dict[str, torch.Tensor], DiskStore | None]:
    """Empty {layer: [n, k_out, k_in]} (n: this rank's train examples, all of them in one process) in the analysis'
    cache dtype: on its device, or memory-mapped in a staging folder on disk (the DiskStore, to finish once
    filled)."""
    if choice.on_disk:
        disk = DiskStore(choice.folder, len(analysis.shard), choice.shapes, analysis.cache_dtype)
        return disk.tensors, disk
    return {name: torch.empty(len(analysis.shard), k_out, k_in, dtype=analysis.cache_dtype, device=analysis.device)
            for name, (k_out, k_in) in choice.shapes.items()}, None


class TrainSideSlots(Mapping):
    """The empty train side {layer: [n_train, k_out, k_in]} a fit fills (``Estimator.fit(keep=...)``), allocated on
    first access: an estimator that chooses its projection during the fit (EK-FAC, after its first pass: the pairs
    kept per layer) gets the shapes it chose. ``choice`` is then the store with those shapes, ``disk`` the on-disk
    store when there is one (None until allocated)."""

    def __init__(self, analysis, choice: StoreChoice):
        self.analysis, self.choice = analysis, choice
        self.tensors: dict[str, torch.Tensor] | None = None
        self.disk: DiskStore | None = None

    def _allocated(self) -> dict[str, torch.Tensor]:
        if self.tensors is None:
            estimator = self.analysis.estimator
            if self.choice.kind == "projected":
                self.choice = dataclasses.replace(self.choice, shapes=dict(estimator.projected_shapes))
            self.tensors, self.disk = allocate_train_side(self.analysis, self.choice)
        return self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._allocated()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._allocated())

    def __len__(self) -> int:
        return len(self.choice.shapes)


def build(analysis, choice: StoreChoice, fitted: Fitted, fingerprint: dict[str, Any],
          disk: DiskStore | None = None) -> Cache:
    """The cache of a fitted analysis: the fit's state, and the train side as ``choice`` says — the one the fit
    produced (in ``disk`` when it is on disk), else ``estimator.train_side`` of every example (projected, for a
    projected store) from one more pass over the train data."""
    cache = Cache(analysis.device, analysis.cache_dtype, fitted.state, fingerprint=fingerprint,
                  projected=choice.kind == "projected", folder=choice.folder)
    if choice.kind == "stream":
        cache.fallback = choice.reason
        return cache
    stored = dict(fitted.train_side) if fitted.train_side is not None else None
    try:
        if stored is None:
            if disk is None:
                stored, disk = allocate_train_side(analysis, choice)
            else:
                stored = disk.tensors
            estimator = analysis.estimator
            side = estimator.projected_train_side_batch if cache.projected else estimator.train_side_batch
            desc = "storing train gradients" + (" (projected)" if cache.projected else "")
            for cb in analysis.train_passes.iterate(Labels.DATA, desc=desc):
                rows = slice(cb.indices[0], cb.indices[-1] + 1)  # batches are consecutive examples
                for name, t in side(cb).items():
                    stored[name][rows] = t.to(device=stored[name].device, dtype=cache.dtype)
        if disk is not None:
            cache.fit_id = uuid.uuid4().hex
            cache.train_side = disk.finish(fingerprint, cache.fit_id)
        else:
            cache.train_side = stored
    except BaseException:
        if disk is not None:
            disk.abandon()
        raise
    return cache
