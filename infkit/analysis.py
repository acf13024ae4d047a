"""The public entry point: an :class:`Analysis` ties a model, a task, train data and an estimator together.

    an = Analysis(model, tasks.CausalLM(tokenizer=tok), train_data, estimator="ekfac")
    an.fit()                      # curvature (progress bar); again: a no-op
    res = an.scores(queries)      # InfluenceResult: res.scores [n_query, n_train], res.per_layer, res.top(q)
    an.self_influence()           # [n_train], >= 0
    an.token_scores(q, i)         # per-token split of res.scores[q, i]

The flow (docs/design.md §3): ``fit`` plans (:mod:`infkit.plan`), fits the estimator on passes over the train data
(:mod:`infkit.passes`, :mod:`infkit.estimators`) and builds the cache (:mod:`infkit.cache`); ``scores`` takes the
query gradients (the measurement) and hands them to a kernel of :mod:`infkit.scoring`. This module only wires them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from infkit import cache as caches
from infkit import persist, scoring
from infkit import store as stores
from infkit.cache import Cache
from infkit.capture import (
    active_adapters,
    find_layers,
    ordinary_layers,
    shared_weights,
    tracked_summary,
    untrained_lora,
)
from infkit.distributed import SINGLE, check_same_everywhere, resolve_world, unwrap_model
from infkit.errors import InfkitError
from infkit.estimators import make_estimator
from infkit.estimators.base import Damping, Grads, plain_number
from infkit.fingerprint import Staleness, fingerprint
from infkit.passes import DataPasses, data_length, is_out_of_memory, model_device
from infkit.plan import Plan, check_fits_device, default_memory_budget, make_plan, resolve_cache_dtype
from infkit.result import InfluenceResult, Ranked, TokenScores, Top
from infkit.shards import shard_folder
from infkit.tasks.base import Labels, Task

FISHER_KINDS = ("sampled", "empirical")


def autograd_allowed(method):
    """Run an analysis method with autograd available even when called under ``torch.inference_mode()`` (or
    ``torch.no_grad()``): influence needs gradients, and the user's mode is back in place afterwards."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return method(*args, **kwargs)

    return run


def whole_number(value: Any, what: str, minimum: int | None = None) -> int:
    """An int (a numpy or 0-d torch integer is accepted as one), refused clearly when it is not a whole number."""
    value = plain_number(value)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # inf/NaN: not whole
    if isinstance(value, bool) or not whole:
        raise InfkitError(f"{what} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InfkitError(f"{what} must be >= {minimum}, got {value!r}")
    return int(value)


class Analysis:
    """Influence of ``train_data`` on queries, for ``model`` under ``task``.

    Args:
        model: a torch module (a transformers model, a peft model, a plain nn.Module).
        task: a :class:`infkit.tasks.Task` (``tasks.CausalLM()``, ``tasks.Classification()`` or your own).
        train_data: a list of examples, a torch Dataset or a ``datasets.Dataset``; the task collates them.
        estimator: "ekfac" (default), "kfac", "identity" (gradient dot product), "exact" (dense, small models),
            "datainf" (LoRA adapters), "lissa" (stochastic recursion). ``infkit.ESTIMATORS`` lists them.
        damping: None for the estimator's heuristic, a float λ for every layer, or {layer name: λ}.
        batch_size: examples per forward/backward pass.
        seed: seeds the sampled Fisher labels, so the same seed gives the same scores.
        fisher: None (default) for the estimator's own, as in its paper: "sampled" for EK-FAC, K-FAC and exact
            (labels drawn from the model: the true Fisher; exact computes its expectation, the GGN), "empirical"
            for DataInf and LiSSA (the data's labels). Give "sampled" or "empirical" to choose; ``an.plan()``
            and ``result.info["fisher"]`` say which was used.
        fisher_samples: with the sampled Fisher, how many label draws per example to average (each costs one more
            forward and backward per pass; EK-FAC, K-FAC, DataInf and LiSSA).
        modules: glob pattern(s) of module names to track; default every Linear/Conv1D with a trainable weight.
        progress: show tqdm progress bars (and the plan at the start of ``fit()``).
        store: where every train example's train side (its gradient, in the estimator's cheapest form) is kept
            after ``fit()``, so each query costs one backward plus matrix products (:mod:`infkit.store`):
            "auto" (default): the full gradients when they fit ``memory_budget``, else projected ones
            (:mod:`infkit.projection`) at the largest ``projection`` that fits, else projected and memory-mapped
            on disk; "full" (memory-mapped on disk above the budget); "projected"; "stream": keep nothing and pass
            over the train data again on every ``scores()`` call (exact, slow). ``an.plan()`` says which and why.
        projection: with a projected store, the dimensions kept per side of each layer (k: a d_out x d_in
            gradient is stored as k_out x k_in = min(d_out, k) x min(d_in, k)); None chooses by the budget.
        store_dir: a folder for the store on disk (memory-mapped ``.npy`` files, checksummed); given, the store
            goes there even when it would fit in memory. Default, when the budget sends it to disk: a folder
            under ``$INFKIT_CACHE_DIR`` (else ``~/.cache/infkit``)/stores.
        cache: False is ``store="stream"`` (kept for older code).
        cache_dtype: "float32" (default) or "bfloat16" for the stored train side (half the bytes, ~3 significant
            digits per entry).
        memory_budget: bytes the train-side store may take in memory; default a quarter of the device's memory.
        fit_data: the data to fit the curvature on, when it is not ``train_data`` (e.g. a large sample of the
            pretraining data, while ``train_data`` is the fine-tuning set whose influence is asked): the estimator
            fits on ``fit_data``, and the store and every score cover ``train_data`` (one more pass). Default: the
            curvature is fitted on ``train_data``.
        distributed: None (default): inside a torchrun job (a ``torch.distributed`` process group initialised),
            each rank takes a contiguous shard of the train data and the ranks combine their statistics and
            scores (:mod:`infkit.distributed`; every rank builds the same Analysis); True: the same, refused without
            a process group; False: this process alone, whatever the job.
        estimator_options: passed to the estimator (e.g. ``block_diagonal=True`` for "exact").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        train_data: Any,
        estimator: str = "ekfac",
        damping: Damping = None,
        batch_size: int = 8,
        seed: int = 0,
        fisher: str | None = None,
        fisher_samples: int = 1,
        modules: str | list[str] | None = None,
        progress: bool = True,
        cache: bool = True,
        cache_dtype: str | torch.dtype = "float32",
        memory_budget: int | None = None,
        store: str = "auto",
        projection: int | None = None,
        store_dir: str | os.PathLike | None = None,
        fit_data: Any = None,
        distributed: bool | None = None,
        **estimator_options: Any,
    ):
        if fisher is not None and fisher not in FISHER_KINDS:
            raise InfkitError(f"fisher={fisher!r} is not one of {FISHER_KINDS} (or None for the estimator's own)")
        batch_size, seed = whole_number(batch_size, "batch_size", minimum=1), whole_number(seed, "seed")
        if memory_budget is not None:
            memory_budget = whole_number(memory_budget, "memory_budget", minimum=0)
        if store not in stores.STORES:
            raise InfkitError(f"store={store!r} is not one of {stores.STORES}")
        if projection is not None:
            projection = whole_number(projection, "projection", minimum=1)
            if store in ("full", "stream"):
                raise InfkitError(f"projection={projection} projects the train-side store, but store={store!r}; "
                                  "drop projection= or use store='projected' (or 'auto')")
        if not isinstance(task, Task):
            raise InfkitError(f"task must be an infkit Task (e.g. infkit.tasks.CausalLM()), got {type(task).__name__}")
        self.world = resolve_world(distributed)
        model = unwrap_model(model)  # a DDP wrapper as its module; FSDP refused
        self.model, self.task, self.train_data = model, task, train_data
        # with several ranks only rank 0 shows progress bars and the plan (the others would print the same)
        self.batch_size, self.seed, self.progress = batch_size, seed, progress and self.world.rank == 0
        self.layers = find_layers(model, modules)
        # trainable modules left out because their weight is tied to another module's (the plan says so)
        self.untracked = {name: f"weight tied to {', '.join(others)}; tied weights are not tracked"
                          for name, others in shared_weights(model).items()
                          if name not in self.layers and model.get_submodule(name).weight.requires_grad}
        self.adapters = active_adapters(model)  # the peft adapter(s) whose modules are tracked; [] without peft
        # with peft: tracked layers that are not LoRA matrices (e.g. a modules_to_save classifier head) -> why
        self.ordinary_layers = ordinary_layers(self.layers, self.adapters)
        if data_length(train_data) == 0:
            raise InfkitError("the train data is empty: influence needs at least one training example")
        if data_length(train_data) < self.world.size:
            raise InfkitError(f"{data_length(train_data)} train examples for {self.world.size} processes: every rank "
                              "needs at least one; run fewer processes (or in one, distributed=False)")
        #: this rank's train examples (all of them in one process); its store holds their rows, in order
        self.shard = self.world.shard(data_length(train_data))
        if fit_data is not None and data_length(fit_data) == 0:
            raise InfkitError("the fit data is empty: give examples to fit the curvature on, or fit_data=None to "
                              "fit it on the train data")
        if fit_data is not None and data_length(fit_data) < self.world.size:
            raise InfkitError(f"fit_data has {data_length(fit_data)} examples for {self.world.size} processes: give "
                              "at least one per rank, or run fewer processes")
        self.fit_data = fit_data
        #: the examples the curvature is fitted on (fit_data's, else the train data's)
        self.n_fit = data_length(fit_data) if fit_data is not None else data_length(train_data)
        self.estimator_options = {k: plain_number(v) for k, v in estimator_options.items()}
        self.estimator = make_estimator(estimator, self.layers, damping, self.estimator_options)
        self.estimator.world = self.world
        #: the Fisher used: the one asked for, else the estimator's own (None: it has no curvature)
        self.fisher = fisher if fisher is not None else self.estimator.default_fisher
        self.fisher_given = fisher is not None
        self.fisher_samples = self._check_fisher_samples(fisher_samples)
        self.estimator.check_fits(self.n_fit, self.fisher)
        self.fitted = False
        self.timings: dict[str, float] = {}
        self._last_result: InfluenceResult | None = None
        if not cache and store not in ("auto", "stream"):
            raise InfkitError(f"cache=False keeps no train-side store, but store={store!r}; give one of them")
        self.use_cache = cache
        self.store_setting = "stream" if not cache else store
        self.projection, self.store_dir = projection, store_dir
        self.cache_dtype = resolve_cache_dtype(cache_dtype)
        self.memory_budget = memory_budget if memory_budget is not None else default_memory_budget(self.device)
        self.cache: Cache | None = None
        self._staleness: Staleness | None = None
        self.train_passes = self._passes(train_data, "train", sharded=True)
        self._positions: int | None = None
        self._prepare_store()
        check_fits_device(self.plan(), self.layers, self.estimator)
        self._self_influence: torch.Tensor | None = None
        check_same_everywhere(self.world, self)

    def _check_fisher_samples(self, k: int) -> int:
        k = whole_number(k, "fisher_samples", minimum=1)
        if k > 1 and self.fisher != "sampled":
            raise InfkitError(f"fisher_samples={k} averages draws of sampled labels, but this analysis uses "
                              f"fisher={self.fisher!r}; drop fisher_samples or use fisher='sampled'")
        if k > 1 and self.estimator.name in ("exact", "identity"):
            why = "computes the GGN itself, with no sampling" if self.estimator.name == "exact" else "has no curvature"
            raise InfkitError(f"fisher_samples={k} has no effect on the {self.estimator.name} estimator (it {why}); "
                              "drop fisher_samples")
        return int(k)

    # -- passes -------------------------------------------------------------------------------------------
    def _passes(self, data: Any, what: str, sharded: bool = False) -> DataPasses:
        """Passes over ``data``; ``sharded``: over this rank's shard of it (all of it in one process), whose
        statistics the estimators sum over the ranks."""
        shard = self.world.shard(data_length(data)) if sharded else None
        return DataPasses(self.model, self.task, data, self.layers, self.batch_size, self.seed, self.fisher,
                          self.progress, what, fisher_samples=self.fisher_samples if what != "query" else 1,
                          shard=shard, world=self.world if sharded else SINGLE)

    @property
    def curvature_passes(self) -> DataPasses:
        """The passes the estimator fits on: over ``fit_data`` when given, else the train passes."""
        if self.fit_data is None:
            return self.train_passes
        return self._passes(self.fit_data, "fit", sharded=True)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def n_train(self) -> int:
        return data_length(self.train_data)

    @property
    def tracked(self) -> str:
        """What is tracked, in words: layer count, or with peft the adapter's LoRA matrices and ordinary layers."""
        return tracked_summary(self.layers, self.adapters)

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers.values())

    def positions_per_example(self) -> int:
        """Positions (tokens) per example of the first train batch, 1 for inputs without positions."""
        if self._positions is None:
            first = self.train_passes.collate(list(range(min(self.batch_size, self.n_train))))
            mask = self.task.token_mask(first)
            self._positions = int(mask.shape[1]) if mask is not None else 1
        return self._positions

    def _prepare_store(self) -> None:
        """Choose the train-side store (:func:`infkit.store.choose`) and, for a projected one, tell the estimator."""
        store_dir = self.store_dir
        own = shard_folder(self.world.rank, self.world.size)
        if store_dir is not None and self.world.active and Path(store_dir).name != own:  # (a load gives its own)
            store_dir = Path(store_dir) / own  # one folder per rank inside the one given
        self.store = stores.choose(
            len(self.shard), self.layers, self.cache_dtype, self.memory_budget, self.store_setting, self.projection,
            store_dir, can_project=self.estimator.projection_kind is not None,
            default_folder=self._default_store_folder)
        if self.store.kind == "projected":
            self.estimator.use_projection(self.store.shapes, self.seed)

    def use_store_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Take the projected store's per-layer shapes a fit chose (a save's), before restoring its tensors."""
        if set(shapes) != set(self.layers):
            raise InfkitError("the saved store's layers are not the tracked layers: fit the analysis again")
        self.store = dataclasses.replace(self.store, shapes=dict(shapes))
        self.estimator.projected_shapes = dict(shapes)

    def _default_store_folder(self, kind: str, rank: int | None, fitted_on: dict | None = None) -> Path:
        """$INFKIT_CACHE_DIR/stores/<estimator>-<kind>[k]-n<n>-<hash of the layers' shapes and the settings>, and
        once fitting, -<hash of the model's state and the data> (so fits of other checkpoints or settings never
        share a folder)."""
        from infkit.demo._weights import cache_root

        shapes = ",".join(f"{name}:{layer.d_out}x{layer.d_in}" for name, layer in self.layers.items())
        settings = json.dumps([shapes, str(self.cache_dtype), self.seed, self.estimator.damping, self.fisher,
                               self.fisher_samples, self.estimator_options], sort_keys=True, default=str)
        key = hashlib.sha256(settings.encode()).hexdigest()[:12]
        if fitted_on is not None:
            state = json.dumps([fitted_on["model"]["state_sha256"], fitted_on["data"]], sort_keys=True)
            key += "-" + hashlib.sha256(state.encode()).hexdigest()[:12]
        folder = cache_root() / "stores" / f"{self.estimator.name}-{kind}{rank or ''}-n{self.n_train}-{key}"
        return folder / shard_folder(self.world.rank, self.world.size) if self.world.active else folder

    def plan(self, measure: bool = False) -> Plan:
        """What ``fit()`` and each query will cost, before any heavy work: bytes, passes over the data, the
        train-side store (full or projected, in memory or on disk) and why. ``measure=True`` also times one batch
        (forward and backward with captures) and estimates the fit's time from it (``fit()`` does so when it shows
        progress)."""
        return make_plan(self, self._batch_seconds() if measure else None)

    @autograd_allowed
    def _batch_seconds(self) -> float | None:
        """Seconds of one train batch's capture (the second of two: the first warms up); None when the batch runs
        out of memory (the fit then splits it, as it says)."""
        indices = list(range(min(self.batch_size, self.n_train)))
        try:
            self.train_passes.capture(indices, Labels.DATA)
            start = time.perf_counter()
            self.train_passes.capture(indices, Labels.DATA)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            return None
        return time.perf_counter() - start

    @autograd_allowed
    def fit(self) -> Analysis:
        """Fit the estimator's curvature on the train data, then cache the train side (once; again: a no-op, unless
        the model or the train data changed since, which refits)."""
        if self.fitted:
            changed = self._staleness.problems(self)
            if not changed:
                return self
            print("infkit: refitting, since the last fit: " + "; ".join(changed))
            self._discard_fit()
        self._check_trained_adapter()
        fitted_on = fingerprint(self)  # before the passes: what this fit sees
        if self.store.on_disk and self.store_dir is None:  # the default folder: named after this model and data too
            self.store = dataclasses.replace(self.store, folder=self._default_store_folder(
                self.store.kind, self.store.rank, fitted_on))
        plan = self.plan(measure=self.progress)
        if self.progress:
            print(plan.summary())
        start = time.perf_counter()
        fills = plan.cache_train and self.fit_data is None and self.estimator.fills_train_side(self.fisher)
        keep = caches.TrainSideSlots(self, self.store) if fills else None
        try:
            fitted = self.estimator.fit(self.curvature_passes, keep=keep)
        except BaseException:
            if keep is not None and keep.disk is not None:
                keep.disk.abandon()
            raise
        if self.store.kind == "projected":  # an eigenbasis projection's pairs per layer are chosen by the fit
            self.store = dataclasses.replace(self.store, shapes=dict(self.estimator.projected_shapes))
        self.timings["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        self.cache = caches.build(self, self.store, fitted, fitted_on, keep.disk if keep is not None else None)
        self.timings["cache"] = time.perf_counter() - start
        self.batch_size = self.train_passes.batch_size  # reduced if a batch ran out of memory
        self._staleness = Staleness(self, fitted_on)
        self.fitted = True
        return self

    def _discard_fit(self) -> None:
        """Forget a fit whose model or data changed: a fresh estimator, no cache, no self-influence."""
        self.estimator = make_estimator(self.estimator.name, self.layers, self.estimator.damping,
                                        self.estimator_options)
        self.estimator.world = self.world
        self.cache, self._self_influence, self._last_result = None, None, None
        self.train_passes = self._passes(self.train_data, "train", sharded=True)
        self._positions = None
        self._prepare_store()
        self.fitted = False

    def _check_trained_adapter(self) -> None:
        """Refuse, before any pass, to fit through LoRA A matrices whose B partner is still all zero."""
        fresh = untrained_lora(self.model, self.layers)
        if fresh:
            raise InfkitError(
                f"the LoRA adapter is untrained: the B matrix beside {len(fresh)} tracked A matri(ces) is all zero "
                f"(as peft initialises it; e.g. {fresh[0]!r}), so the model is still its base model and those A "
                "matrices get no gradient: their influence would be 0/0. Fine-tune the adapter first (influence "
                "explains a trained model), or track only the B matrices (modules='*lora_B*'), which do carry a "
                "gradient"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted analysis (factors, train-side cache, settings, fingerprints) to a folder, atomically."""
        return persist.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model, task: Task, train_data: Any, progress: bool = True) -> Analysis:
        """Reopen a saved analysis for the same model and train data (checked by fingerprint)."""
        return persist.load(cls, path, model, task, train_data, progress=progress)

    def restore(self, factors, train_side, damping_used, fingerprint, self_influence=None) -> None:
        """Install a fitted state (used by ``load``)."""
        self.estimator.load_state(factors, damping_used)
        self.estimator.load_projection_state(factors)
        self.cache = Cache(self.device, self.cache_dtype, dict(factors), train_side, fingerprint,
                           projected=self.store.kind == "projected", folder=self.store.folder)
        self._staleness = Staleness(self, fingerprint)
        if train_side is None:
            self.cache.fallback = "the save holds no train-side cache: every scores() call streams the train data"
        self._self_influence = self_influence
        self.fitted = True

    def _require_fit(self, what: str) -> None:
        """Fit when the estimator needs no fit; refuse an unfitted one, or one whose model or data changed."""
        if not self.fitted:
            if self.estimator.needs_fit:
                raise InfkitError(f"{what} needs a fitted analysis: call an.fit() first")
            self.fit()
        changed = self._staleness.problems(self)
        if changed:
            raise InfkitError(
                f"{what}: the fitted state no longer matches — since fit(): " + "; ".join(changed)
                + ". Scores from it would be stale: call an.fit() again to refit on the current model and data"
            )

    # -- gradients ----------------------------------------------------------------------------------------
    @autograd_allowed
    def query_gradients(self, query_data: Any) -> Grads:
        """∇f(z_q) of each query, {layer: [n_query, d_out, d_in]}."""
        grads: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        for cb in self._passes(query_data, "query").iterate(Labels.MEASUREMENT, desc="query gradients"):
            for name in self.layers:
                grads[name].append(cb.grads(name))
        return {name: torch.cat(parts) for name, parts in grads.items()}

    @autograd_allowed
    def preconditioned_queries(self, query_data: Any) -> Grads:
        """Ṽ = (G + λI)⁻¹ ∇f(z_q) per layer, [n_query, d_out, d_in]."""
        self._require_fit("scoring")
        return self.estimator.query_preconditioned(self.query_gradients(query_data))

    # -- scores -------------------------------------------------------------------------------------------
    @autograd_allowed
    def scores(
        self, query_data: Any, query_rank: int | None = None, train_indices: list[int] | None = None
    ) -> InfluenceResult:
        """Pairwise scores of every query against every train example, split by layer.

        With the train side cached (the default when it fits the memory budget) this is one forward+backward per
        query plus a matrix product per layer. ``query_rank=k`` scores rank-k approximations of the
        preconditioned queries in one streamed pass over the train data instead (query batching; see
        :mod:`infkit.scoring`), for when the train side is not cached.

        ``train_indices=[...]`` scores only those train examples (e.g. TF-IDF candidates from
        :mod:`infkit.retrieval`): the result's columns are those examples in that order (``result.train_indices``;
        ``top()`` reports train indices). Without a cached train side only they are streamed, so the cost scales
        with their number; with the cache it saves only the matrix product over the others.
        """
        self._require_fit("scores()")
        columns = self._check_train_indices(train_indices)
        # several processes: each rank scores its shard and the columns are gathered; chosen columns are scored
        # from the gathered scores (with a store) or streamed by every rank (without one)
        local = columns is None or (self.world.active and self.cache is not None and self.cache.train_side is not None)
        passes = self.train_passes if local else self._passes([self.train_data[i] for i in columns], "train")
        start = time.perf_counter()
        if query_rank is not None:
            query_rank = whole_number(query_rank, "query_rank", minimum=1)
        query_grads = self.query_gradients(query_data)
        if query_rank is not None:
            factors = scoring.low_rank_queries(self.estimator.query_preconditioned(query_grads), query_rank)
            per_layer = scoring.streamed_low_rank(factors, passes)
        elif self.cache is not None and self.cache.train_side is not None:
            train_side = self.cache.train_side
            if not local:
                train_side = {n: t[torch.as_tensor(columns, device=t.device)] for n, t in train_side.items()}
            query_side = (self.estimator.projected_query_side(query_grads) if self.cache.projected
                          else self.estimator.query_side(query_grads))
            on_disk = self.cache.folder is not None and local  # selected rows are already copied out
            per_layer = scoring.against_cache(query_side, train_side, on_disk, progress=self.progress and on_disk)
        else:
            per_layer = scoring.streamed(self.estimator, self.estimator.query_side(query_grads), passes)
        if local and self.world.active:
            per_layer = {name: self.world.gather_columns(scores, "gather scores") for name, scores in per_layer.items()}
            if columns is not None:
                per_layer = {name: scores[:, columns] for name, scores in per_layer.items()}
        total = torch.stack(list(per_layer.values())).sum(dim=0)
        scoring.check_finite_scores(total, per_layer, columns)
        self.timings["scores"] = time.perf_counter() - start
        self._last_result = InfluenceResult(
            scores=total,
            per_layer=per_layer,
            estimator=self.estimator.name,
            damping=dict(self.estimator.damping_used),
            train_indices=columns,
            info={"fisher": self.fisher, "fisher_default": not self.fisher_given, "fisher_samples": self.fisher_samples,
                  "seconds": self.timings["scores"], "adapters": list(self.adapters),
                  "ordinary_layers": dict(self.ordinary_layers), "tracked": self.tracked},
            _analysis=self,
            _query_grads=query_grads,
        )
        return self._last_result

    @autograd_allowed
    def top(self, query_data: Any, k: int = 10) -> list[Top]:
        """The k strongest proponents and opponents of each query, as ``scores(query_data).top(q, k)`` gives them,
        without keeping the [n_query, n_train] scores: against a stored train side (full, projected or on disk)
        the best k are kept on the fly, chunk by chunk, so n_train can be in the millions. Without a store (the
        streamed path) it computes the scores and ranks them."""
        self._require_fit("top()")
        k = whole_number(k, "k", minimum=1)
        if self.cache is None or self.cache.train_side is None:
            result = self.scores(query_data)
            return [result.top(q, k) for q in range(result.n_query)]
        query_grads = self.query_gradients(query_data)
        query_side = (self.estimator.projected_query_side(query_grads) if self.cache.projected
                      else self.estimator.query_side(query_grads))
        high, high_at, low, low_at = scoring.top_against_store(query_side, self.cache.train_side, k,
                                                               progress=self.progress and self.cache.folder is not None,
                                                               offset=self.shard.start)
        high, high_at, low, low_at = scoring.merge_tops(self.world, high, high_at, low, low_at, k)
        tops = []
        for q in range(high.shape[0]):
            positive, negative = high[q] > 0, low[q] < 0
            tops.append(Top(q, Ranked(high_at[q][positive].tolist(), high[q][positive].tolist()),
                            Ranked(low_at[q][negative].tolist(), low[q][negative].tolist())))
        return tops

    def _check_train_indices(self, train_indices) -> list[int] | None:
        """The train columns to score: a sequence of indices, or a boolean mask with one entry per train example
        (list, numpy array or tensor of bools), read as the indices of its True entries."""
        import numpy as np

        if train_indices is None:
            return None
        if torch.is_tensor(train_indices):
            train_indices = train_indices.detach().cpu().numpy()
        elif not hasattr(train_indices, "__len__") and hasattr(train_indices, "__iter__"):
            train_indices = list(train_indices)  # a generator
        values = np.asarray(train_indices)
        if values.dtype != bool and isinstance(train_indices, (list, tuple)) and any(
                isinstance(v, (bool, np.bool_)) for v in train_indices):
            # numpy reads [True, 3] as [1, 3]; a mask mixed with indices is a mistake either way
            raise InfkitError("train_indices mixes bools and integers; give either indices or a boolean mask")
        if values.ndim != 1:
            raise InfkitError(f"train_indices must be a 1-D sequence of train indices or a boolean mask, got shape "
                              f"{list(values.shape)}")
        if values.dtype == bool:
            if len(values) != self.n_train:
                raise InfkitError(f"train_indices is a boolean mask of {len(values)} entries, but there are "
                                  f"{self.n_train} train examples; give one bool per train example, or indices")
            if not values.any():
                raise InfkitError("the boolean mask train_indices selects no train example (all False)")
            values = values.nonzero()[0]
        elif values.size and values.dtype.kind not in "iu":  # [] is float64 to numpy: the empty case is below
            raise InfkitError(f"train_indices must be integer indices or a boolean mask, got {values.dtype} values "
                              f"(e.g. {values[0]!r})")
        columns = [int(i) for i in values]
        if not columns:
            raise InfkitError("train_indices is empty: give at least one train example to score")
        bad = [i for i in columns if not 0 <= i < self.n_train]
        if bad:
            raise InfkitError(f"train_indices {bad[:5]} are out of range for {self.n_train} train examples")
        return columns

    @autograd_allowed
    def self_influence(self) -> torch.Tensor:
        """∇L(z_i)ᵀ (G + λI)⁻¹ ∇L(z_i) for every train example, [n_train] (>= 0)."""
        self._require_fit("self_influence()")
        if self._self_influence is None:
            store = self.cache.train_side if self.cache is not None else None
            # a float32 cache of raw train gradients answers without a pass (bfloat16 is too coarse for it)
            if store is not None and self.cache.projected:
                self._self_influence = scoring.self_influence_projected(self.estimator, store)
            elif store is not None and self.estimator.raw_train_side and self.cache_dtype == torch.float32:
                self._self_influence = scoring.self_influence_from_cache(self.estimator, store)
            else:
                self._self_influence = scoring.self_influence_streamed(self.estimator, self.train_passes)
            self._self_influence = self.world.gather_rows(self._self_influence, "gather self-influence")
        return self._self_influence.clone()

    @autograd_allowed
    def token_scores(self, q: int, i: int, result: InfluenceResult | None = None) -> TokenScores:
        """Per-token contributions s_tᵀ Ṽ_q a_t of train example i to query q of ``result`` (default: the last
        ``scores()`` call's). They sum, with the per-layer split, to ``result.scores[q, i]``."""
        result = result if result is not None else self._last_result
        if result is None or result._query_grads is None:
            raise InfkitError("token_scores(q, i) needs a result: call an.scores(queries) first")
        if not 0 <= q < result.n_query:
            raise InfkitError(f"query index {q} is out of range for {result.n_query} queries")
        if not 0 <= i < self.n_train:
            raise InfkitError(f"train index {i} is out of range for {self.n_train} train examples")
        preconditioned = self.estimator.query_preconditioned({n: g[q : q + 1] for n, g in result._query_grads.items()})
        cb = self._passes(self.train_data, "train").capture([i], Labels.DATA)  # any rank: example i of all
        per_layer, unassigned = scoring.per_token(preconditioned, cb, self.task.token_mask(cb.batch))
        try:
            token_ids, tokens = self.task.tokens(cb.batch, 0)
        except NotImplementedError:
            token_ids, tokens = [], None
        length = len(token_ids)
        values = torch.zeros(length, dtype=torch.float64)
        for per_token in per_layer.values():
            values += per_token.double()
        return TokenScores(q, i, token_ids, tokens, values, per_layer, unassigned)

    def __repr__(self) -> str:
        state = "fitted" if self.fitted else "not fitted"
        return (
            f"Analysis(estimator={self.estimator.name!r}, layers={len(self.layers)}, params={self.n_params}, "
            f"n_train={self.n_train}, fisher={self.fisher!r}, {state})"
        )
