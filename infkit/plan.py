"""Before heavy work: what an analysis will cost (bytes, passes), and the train-side cache it then builds."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from infkit.cache import Cache, data_fingerprint, format_bytes, model_fingerprint, task_fingerprint
from infkit.errors import InfkitError

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCORE_CHUNK = 4096  # train rows per matmul when scoring against the cache (bounds the float32 copy of bf16)


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
        cache_passes=0 if est.fuses_train_side(analysis.fisher) else 1,
        device=str(analysis.device),
        tracked=analysis.tracked if analysis.ordinary_layers else "",
        factor_form=est.describe_factors(),
    )


def build_cache(analysis, plan: Plan) -> Cache:
    """One pass over the train data storing ``estimator.train_side`` of every example (when the plan allows)."""
    est = analysis.estimator
    cache = Cache(device=analysis.device, dtype=analysis.cache_dtype, factors=est.state())
    cache.fingerprint = {
        "model": model_fingerprint(analysis.layers),
        "data": data_fingerprint(analysis.task, analysis.train_data),
        "task": task_fingerprint(analysis.task),
    }
    if not plan.cache_train:
        cache.fallback = plan.fallback
        return cache
    if est.fused_train_side is not None:  # the estimator's fit already filled it
        cache.train_side, est.fused_train_side = est.fused_train_side, None
        return cache
    stored = allocate_train_store(analysis)
    for cb in analysis._train_passes.iterate("true", desc="caching train gradients"):
        index = torch.as_tensor(cb.indices, device=cache.device)
        for name, t in est.train_side_batch(cb).items():
            stored[name][index] = t.to(cache.dtype)
    cache.train_side = stored
    return cache


def allocate_train_store(analysis) -> dict[str, torch.Tensor]:
    return {
        name: torch.empty(analysis.n_train, layer.d_out, layer.d_in, dtype=analysis.cache_dtype, device=analysis.device)
        for name, layer in analysis.layers.items()
    }


def score_against_cache(query_side: dict[str, torch.Tensor], train_side: dict[str, torch.Tensor]):
    """{layer: [n_query, n_train]} = ⟨query side, cached train side⟩, in float32 (chunks over train rows)."""
    per_layer = {}
    for name, cached in train_side.items():
        q = query_side[name].flatten(1).to(device=cached.device, dtype=torch.float32)
        flat = cached.flatten(1)
        if flat.dtype == torch.float32:
            scores = q @ flat.T
        else:
            scores = torch.cat([q @ flat[i : i + SCORE_CHUNK].float().T for i in range(0, len(flat), SCORE_CHUNK)], 1)
        per_layer[name] = scores.cpu()
    return per_layer
