"""Before heavy work: what an analysis will cost (bytes, passes) and whether its train side is cached. It plans
only; :mod:`infkit.cache` builds the cache and :mod:`infkit.scoring` scores."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from infkit.cache import format_bytes
from infkit.errors import InfkitError
from infkit.store import StoreChoice

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_cache_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in CACHE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in CACHE_DTYPES:
        return CACHE_DTYPES[dtype]
    raise InfkitError(f"cache_dtype={dtype!r} is not supported; use one of {list(CACHE_DTYPES)}")


def device_memory(device: torch.device) -> int:
    """The device's memory: a GPU's total memory, or the machine's physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * 2**30


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's memory."""
    return device_memory(device) // 4


def working_bytes(layers, batch_size: int, positions: int) -> int:
    """What one batch's capture holds beside the model's own activations: a and s of every tracked layer in
    float32 (B · T · Σ (d_in + d_out)) and one layer's per-example gradients (B · max d_out · d_in)."""
    captured = batch_size * positions * sum(layer.d_in + layer.d_out for layer in layers.values())
    per_example = batch_size * max(layer.n_params for layer in layers.values())
    return 4 * (captured + per_example)


def check_fits_device(plan: Plan, layers, estimator) -> None:
    """Refuse, before any work, a fit whose factors and working memory exceed the device's memory."""
    need = plan.factor_bytes + plan.working_bytes
    if need <= plan.device_bytes:
        return
    biggest = sorted(layers.values(), key=lambda layer: -layer.n_params)[:3]
    named = ", ".join(f"{layer.name} ({layer.d_out} x {layer.d_in})" for layer in biggest)
    raise InfkitError(
        f"{estimator.name} on {len(layers)} layers needs about {format_bytes(plan.factor_bytes)} of factors and "
        f"{format_bytes(plan.working_bytes)} of working memory per batch, more than the "
        f"{format_bytes(plan.device_bytes)} of {plan.device}. The largest tracked layers: {named}. Track fewer "
        "layers with modules=, lower batch_size=, or (for a LoRA model) use estimator='datainf'"
    )


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
    fisher: str | None = None  # "sampled" / "empirical" as used; None: the estimator has no curvature
    fisher_source: str = ""  # why that Fisher: asked for, or the estimator's default and its reason
    untracked: tuple[str, ...] = ()  # "module: why" for trainable modules left out (tied weights)
    working_bytes: int = 0  # captured tensors of one batch (see working_bytes)
    positions: int = 1  # positions per example in the first batch (for the working-memory estimate)
    batch_size: int = 1
    device_bytes: int = 0
    store: StoreChoice | None = None  # where and how the train side is kept (infkit.store)
    projection: str | None = None  # the estimator's projection kind ("eigenbasis", "random"; infkit.projection)
    batch_seconds: float | None = None  # one measured batch: forward + backward with captures (plan(measure=True))
    fit_examples: int | None = None  # the curvature's examples when fit_data= is given (None: the train data)
    ranks: str = ""  # several processes (infkit.distributed): this rank's share, in words
    n_local: int | None = None  # this rank's train examples (None: one process, all of them)

    @property
    def estimated_seconds(self) -> float | None:
        """Passes x batches x the measured batch (a lower bound: the estimator's own products come on top)."""
        if self.batch_seconds is None:
            return None
        ranks = self.n_train / (self.n_local or self.n_train)  # this rank's share of every data set
        train_batches = -(-(self.n_local or self.n_train) // self.batch_size)
        fit_batches = -(-int(self.fit_examples / ranks) // self.batch_size) if self.fit_examples else train_batches
        cache_batches = (self.cache_passes if self.cache_train else 0) * train_batches
        return (self.fit_passes * fit_batches + cache_batches) * self.batch_seconds

    @property
    def bytes_per_query(self) -> int:
        """What each query adds to a ``scores()`` call: its gradient (P floats) and its scores, per layer and in
        total ((layers + 1) · n floats), in float32."""
        return 4 * (self.n_params + (self.n_layers + 1) * self.n_train)

    @property
    def fallback(self) -> str | None:
        """Why the train side is not stored (then every ``scores()`` call streams the train data), or None."""
        return None if self.cache_train else self.store.reason

    def store_line(self) -> str:
        """The train-side store in words: kind, bytes, where, why, and against the full store."""
        store = self.store
        where = f"on disk in {store.folder}" if store.on_disk else "in memory"
        if store.kind == "full":
            text = f"full, {format_bytes(store.bytes)} {where}"
        else:
            ratio = self.train_cache_bytes / max(store.bytes, 1)
            if self.projection == "eigenbasis":
                pairs = sum(k_out * k_in for k_out, k_in in store.shapes.values())
                what = (f"the {pairs:,} leading eigen-pairs of all layers by K-FAC eigenvalue (as many as "
                        f"{store.rank} x {store.rank} per layer)")
            else:
                what = f"at most {store.rank} dimensions per side of each layer (seeded Gaussian)"
            text = (f"projected to {what}, {format_bytes(store.bytes)} {where}, against "
                    f"{format_bytes(self.train_cache_bytes)} full ({ratio:,.0f}x smaller)")
        # the budget depends on the machine: named only where it decided something
        in_budget = store.kind == "full" and not store.on_disk
        budget = "" if in_budget else f", memory budget {format_bytes(self.memory_budget)}"
        return (f"  train-side store: {text} ({store.reason}{budget}; {self.cache_passes} more pass(es)); each query "
                "then costs one backward + matrix products")

    def summary(self) -> str:
        lines = [
            f"infkit plan: {self.estimator} on {self.n_layers} layers ({self.n_params:,} parameters), "
            f"{self.n_train:,} train examples, device {self.device}",
            *([f"  {self.tracked}"] if self.tracked else []),
            *([f"  {self.ranks}"] if self.ranks else []),
            f"  fit: {self.fit_passes} pass(es) over the "
            + (f"{self.fit_examples:,} examples of fit_data" if self.fit_examples else "train data")
            + f", factors {format_bytes(self.factor_bytes)}"
            + (f" ({self.factor_form})" if self.factor_form else ""),
            *([f"  curvature: {self.fisher} Fisher, {self.fisher_source}"] if self.fisher else []),
            *[f"  not tracked: {line}" for line in self.untracked],
            f"  working memory: ~{format_bytes(self.working_bytes)} per batch of {self.batch_size} x "
            f"{self.positions} positions (captured a and s; the model's own activations come on top); "
            f"scores(): ~{format_bytes(self.bytes_per_query)} per query",
        ]
        if self.batch_seconds is not None:
            lines.append(f"  time: fit and store ~{format_seconds(self.estimated_seconds)} or more (one batch "
                         f"measured: {self.batch_seconds:.2f} s for forward + backward with captures; the estimator's "
                         "products come on top; each pass's progress bar shows its time left)")
        if self.cache_train:
            lines.append(self.store_line())
        else:
            lines.append(f"  fallback: {self.fallback}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def make_plan(analysis, batch_seconds: float | None = None) -> Plan:
    est = analysis.estimator
    n, n_params = analysis.n_train, analysis.n_params
    element = torch.tensor([], dtype=analysis.cache_dtype).element_size()
    local = len(analysis.shard)  # this rank's examples: its store holds them (all of them in one process)
    train_bytes = local * n_params * element
    world = analysis.world
    ranks = ""
    if world.active:
        ranks = (f"several processes: rank {world.rank} of {world.size} holds train examples "
                 f"{analysis.shard.start:,}-{analysis.shard.stop - 1:,} ({local:,}); every rank holds the factors, "
                 "and the store, working memory and time below are per rank")
    positions = analysis.positions_per_example()
    store = analysis.store
    return Plan(
        estimator=est.name,
        n_train=n,
        n_params=n_params,
        n_layers=len(analysis.layers),
        factor_bytes=est.planned_factor_bytes(len(world.shard(analysis.n_fit)) if est.preconditions_with_all_ranks
                                              else analysis.n_fit),
        train_cache_bytes=train_bytes,
        memory_budget=analysis.memory_budget,
        cache_train=store.kind != "stream",
        store=store,
        projection=est.projection_kind,
        fit_passes=est.fit_passes,
        cache_passes=0 if est.fills_train_side(analysis.fisher) and analysis.fit_data is None else 1,
        fit_examples=analysis.n_fit if analysis.fit_data is not None else None,
        device=str(analysis.device),
        tracked=analysis.tracked if analysis.ordinary_layers else "",
        factor_form=est.describe_factors(),
        fisher=analysis.fisher,
        untracked=tuple(f"{name} ({why})" for name, why in analysis.untracked.items()),
        fisher_source="as asked (fisher=)" if analysis.fisher_given else f"{est.name}'s default: {est.fisher_reason}",
        working_bytes=working_bytes(analysis.layers, analysis.batch_size, positions),
        positions=positions,
        batch_size=analysis.batch_size,
        device_bytes=device_memory(analysis.device),
        batch_seconds=batch_seconds,
        ranks=ranks,
        n_local=local if world.active else None,
    )
