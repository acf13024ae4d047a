"""Before heavy work: what an analysis will cost (bytes, passes) and whether its train side is cached. It plans
only; :mod:`infkit.cache` builds the cache and :mod:`infkit.scoring` scores."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from infkit.cache import format_bytes
from infkit.errors import InfkitError

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_cache_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in CACHE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in CACHE_DTYPES:
        return CACHE_DTYPES[dtype]
    raise InfkitError(f"cache_dtype={dtype!r} is not supported; use one of {list(CACHE_DTYPES)}")


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's memory (GPU: its total memory; CPU: physical RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 * 2**30


@dataclass(frozen=True)
class Plan:
    estimator: str
    n_train: int
    n_params: int
    n_layers: int
    factor_bytes: int
    train_cache_bytes: int
    memory_budget: int
    cache_train: bool
    fit_passes: int
    cache_passes: int  # 0 when the estimator's fit fills the cache itself
    device: str
    tracked: str = ""  # what is tracked, in words (LoRA matrices and ordinary layers of a peft model)
    factor_form: str = ""  # the estimator's words on its fitted state (exact: dense or low-rank blocks)

    @property
    def fallback(self) -> str | None:
        if self.cache_train:
            return None
        if self.train_cache_bytes > self.memory_budget:
            return (
                f"train-side cache of {format_bytes(self.train_cache_bytes)} exceeds the memory budget of "
                f"{format_bytes(self.memory_budget)}: every scores() call streams the train data again"
            )
        return "caching disabled (cache=False): every scores() call streams the train data again"

    def summary(self) -> str:
        lines = [
            f"infkit plan: {self.estimator} on {self.n_layers} layers ({self.n_params:,} parameters), "
            f"{self.n_train:,} train examples, device {self.device}",
            *([f"  {self.tracked}"] if self.tracked else []),
            f"  fit: {self.fit_passes} pass(es) over the train data, factors {format_bytes(self.factor_bytes)}"
            + (f" ({self.factor_form})" if self.factor_form else ""),
        ]
        if self.cache_train:
            lines.append(
                f"  train-side cache: {format_bytes(self.train_cache_bytes)} ({self.cache_passes} more pass(es)); "
                "each query then costs one backward + matrix products"
            )
        else:
            lines.append(f"  fallback: {self.fallback}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def make_plan(analysis) -> Plan:
    est = analysis.estimator
    n, n_params = analysis.n_train, analysis.n_params
    element = torch.tensor([], dtype=analysis.cache_dtype).element_size()
    train_bytes = n * n_params * element
    return Plan(
        estimator=est.name,
        n_train=n,
        n_params=n_params,
        n_layers=len(analysis.layers),
        factor_bytes=est.planned_factor_bytes(n),
        train_cache_bytes=train_bytes,
        memory_budget=analysis.memory_budget,
        cache_train=analysis.use_cache and train_bytes <= analysis.memory_budget,
        fit_passes=est.fit_passes,
        cache_passes=0 if est.fills_train_side(analysis.fisher) else 1,
        device=str(analysis.device),
        tracked=analysis.tracked if analysis.ordinary_layers else "",
        factor_form=est.describe_factors(),
    )
