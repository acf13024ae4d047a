"""The one interface every estimator shares: fit on train data, then precondition gradients.

An estimator sees tensors only: it asks :class:`infkit.passes.DataPasses` for captured batches (``passes.iterate``
with a :class:`infkit.tasks.Labels`) and never touches hooks or the model's mode. Gradients travel as
``{layer name: [Q, d_out, d_in]}`` dicts, laid out as in :mod:`infkit.capture`. ``fit(passes)`` returns a
:class:`Fitted` (its state tensors, the damping it used, and the train side when its own pass produced it); the
class attribute ``preconditions`` says on which side of a score (G + λI)⁻¹ is applied. Adding an estimator is one
file with a subclass decorated by ``@register("name")`` and its import in ``infkit/estimators/__init__.py``.

Damping (docs/design.md §2): ``damping=None`` uses the estimator's own heuristic; a float is the absolute λ added to
the curvature of every layer; a dict ``{layer name: λ}`` sets layers one by one (layers it omits use the
heuristic).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from enum import Flag, auto
from typing import Any

import torch

from infkit.capture import Layer
from infkit.distributed import SINGLE, World
from infkit.errors import InfkitError
from infkit.projection import LayerProjection, random_projection

Grads = dict[str, torch.Tensor]
Damping = float | dict[str, float] | None

REGISTRY: dict[str, type[Estimator]] = {}


def register(name: str):
    def add(cls: type[Estimator]) -> type[Estimator]:
        split = cls.preconditions == Side.QUERY | Side.TRAIN
        if split and (cls.query_side is Estimator.query_side or cls.train_side is Estimator.train_side):
            raise TypeError(f"estimator {name!r} preconditions both sides: it must override query_side and "
                            "train_side with its split (G + λI)⁻¹ = MᵀM")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def make_estimator(name: str, layers: dict[str, Layer], damping: Damping, options: dict[str, Any]) -> Estimator:
    if name not in REGISTRY:
        raise InfkitError(f"unknown estimator {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    valid = estimator_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise InfkitError(f"the {name!r} estimator has no option {', '.join(map(repr, unknown))}; its options are: "
                          f"{listed} (the Analysis' own arguments are listed in help(infkit.Analysis))")
    return cls(layers, check_damping(damping, layers), **{k: plain_number(v) for k, v in options.items()})


def estimator_options(cls: type[Estimator]) -> list[str]:
    """The keyword options an estimator's constructor takes besides ``layers`` and ``damping``."""
    parameters = inspect.signature(cls.__init__).parameters
    return [p for p in parameters if p not in ("self", "layers", "damping") and parameters[p].kind is not
            inspect.Parameter.VAR_KEYWORD]


def plain_number(value: Any) -> Any:
    """A numpy or 0-d torch scalar as the Python number it holds (so it behaves, and saves to JSON, as one)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, numbers.Number) or (torch.is_tensor(value) and value.ndim == 0):
        return value.item()
    return value


def check_damping(damping: Any, layers: dict[str, Layer]) -> Damping:
    """``damping`` as None, a float or {layer: float}, refused at construction when it is not one (a negative,
    NaN or infinite number, a string, a flag, a dict naming layers that are not tracked)."""
    if damping is None:
        return None
    if isinstance(damping, dict):
        unknown = [name for name in damping if name not in layers]
        if unknown:
            tracked = ", ".join(list(layers)[:6]) + (", ..." if len(layers) > 6 else "")
            raise InfkitError(f"damping names layers that are not tracked: {unknown[:5]}; the tracked layers are: "
                              f"{tracked} (an.layers lists them all)")
        return {name: _damping_value(value, f"damping[{name!r}]") for name, value in damping.items()}
    return _damping_value(damping, "damping")


def _damping_value(value: Any, what: str) -> float:
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InfkitError(f"{what}={value!r} is not a number: give a float λ >= 0 (the same for every layer), a dict "
                          "{layer name: λ}, or None for the estimator's heuristic")
    if not math.isfinite(value) or value < 0:
        raise InfkitError(f"{what}={value!r}: damping must be a finite number >= 0 (or None for the heuristic)")
    return float(value)


class Side(Flag):
    """The side of a score ⟨query side, train side⟩ on which an estimator applies (G + λI)⁻¹."""

    QUERY = auto()  # precondition each query; the train side is the raw gradient (cacheable, reusable)
    TRAIN = auto()  # precondition each train gradient once (it is cached); queries stay raw (or only rotated)


@dataclass
class Fitted:
    """What ``Estimator.fit`` fitted: the state tensors (as ``state()`` names them, for caches and saves), the λ it
    used per layer, and, when its own pass over the train data produced it, the train side of every example
    ({layer: [n_train, d_out, d_in]}, in the form ``train_side`` gives)."""

    state: dict[str, torch.Tensor]
    damping: dict[str, float]
    train_side: Grads | None = field(default=None, repr=False)


class Estimator:
    """Base class. Subclasses implement ``fit`` (returning ``self.fitted(...)``) and ``precondition``, and fill
    ``self.damping_used`` (through ``resolve_damping``)."""

    name = "base"
    #: False for estimators that need no pass over the data before scoring (gradient dot product).
    needs_fit = True
    #: Passes over the train data that ``fit`` makes (stated by ``Analysis.plan()``).
    fit_passes = 1
    #: Where (G + λI)⁻¹ goes in a score Σ_layers ⟨query_side(∇f), train_side(∇L)⟩. ``Side.QUERY`` (default): the
    #: query side is preconditioned and the train side is the raw gradient — so a cached train side holds the raw
    #: train gradients (self-influence then needs no pass over the data). ``Side.TRAIN``: the train side is
    #: preconditioned once and cached, a query is only transformed (EK-FAC rotates it; DataInf leaves it raw),
    #: valid because (G + λI)⁻¹ is symmetric. ``Side.QUERY | Side.TRAIN``: a split (G + λI)⁻¹ = MᵀM, with both
    #: ``query_side`` and ``train_side`` overridden.
    preconditions = Side.QUERY
    #: The Fisher of the estimator's paper, used when the analysis is given ``fisher=None``: "sampled" (labels
    #: drawn from the model: the true Fisher) or "empirical" (the data's labels); None when it has no curvature.
    default_fisher: str | None = "sampled"
    #: Why, in a few words (the plan prints it).
    fisher_reason = "the true Fisher, labels drawn from the model (Grosse et al. 2023)"

    #: How a compressed train-side store projects this estimator's gradients (:mod:`infkit.projection`): "random"
    #: (seeded Gaussian), "eigenbasis" (leading directions of its Kronecker factors), or None (no projected store).
    projection_kind: str | None = None

    #: The ranks whose shards the fit's statistics are summed over (``infkit.distributed``; the analysis sets it),
    #: for estimators whose queries need the train data again (DataInf sums its query products over the ranks).
    world: World = SINGLE
    #: Whether the fitted state holds this rank's train rows only (DataInf's stacked gradients), so that
    #: preconditioning sums over every rank's: every rank must then precondition the same gradients together
    #: (:meth:`infkit.distributed.World.on_own_rows`), and a save's state has this rank's rows.
    preconditions_with_all_ranks = False

    def __init__(self, layers: dict[str, Layer], damping: Damping = None):
        self.layers = layers
        self.damping = damping
        self.damping_used: dict[str, float] = {}
        #: (k_out, k_in) per layer when the train side is stored projected, else None
        self.projected_shapes: dict[str, tuple[int, int]] | None = None
        self.projections: dict[str, LayerProjection] = {}  # filled before (random) or during (eigenbasis) fit

    # -- a projected train-side store (infkit.projection) --------------------------------------------------------
    def use_projection(self, shapes: dict[str, tuple[int, int]], seed: int) -> None:
        """Score through projected gradients of these (k_out, k_in) shapes. Random projections are drawn now (so
        a fit can stack projected gradients); eigenbasis ones are chosen by the fit, which shares the shapes'
        total size across layers and sets ``projected_shapes`` to [1, pairs kept] per layer."""
        if self.projection_kind is None:
            raise InfkitError(f"the {self.name!r} estimator has no projected store (its curvature is not "
                              "diagonal in any projection); use store='full' or store='stream'")
        self.projected_shapes = dict(shapes)
        if self.projection_kind == "random":
            self.projections = {name: random_projection(self.layers[name], shape, seed)
                                for name, shape in shapes.items()}

    def projected_query_side(self, grads: Grads) -> Grads:
        """The query side of full query gradients, in the projected space: {layer: [Q, k_out, k_in]}."""
        return self.finish_projected_query({name: self.projections[name].of_grads(v) for name, v in grads.items()})

    def projected_train_side_batch(self, cb) -> Grads:
        """The train side of a captured batch in the projected space, from its tokens' a and s: [B, k_out, k_in]."""
        return self.finish_projected_train({name: self.projections[name].of_tokens(cb.activations[name],
                                                                                   cb.output_grads[name])
                                            for name in self.layers})

    def finish_projected_query(self, projected: Grads) -> Grads:
        """Precondition projected query gradients where the estimator preconditions queries (default: as they are)."""
        return projected

    def finish_projected_train(self, projected: Grads) -> Grads:
        """Precondition projected train gradients where the estimator preconditions the train side (default: as
        they are)."""
        return projected

    def projected_self_influence(self, stored: Grads) -> torch.Tensor:
        """Self-influence of stored rows of the projected train side, [rows] float64: ⟨query side, train side⟩ of
        each example with itself (the stored rows hold raw projected gradients by default)."""
        query = self.finish_projected_query(stored)
        return sum((query[name].double() * stored[name].double()).flatten(1).sum(dim=1) for name in stored)

    def query_preconditioned(self, grads: Grads) -> Grads:
        """Ṽ = (G + λI)⁻¹ V of full query gradients, as scores use it: with a projected store, the projected
        preconditioned query lifted back, P_outᵀ Ṽ̂ P_in, so that ⟨Ṽ, G⟩ = Σ_t s_tᵀ Ṽ a_t is exactly the projected
        score of any train gradient G (per-token scores then sum to the score the store gives)."""
        if self.projected_shapes is None:
            return self.precondition(grads)
        preconditioned = self.finish_projected_train(self.projected_query_side(grads))  # ⟨Ṽ̂, ĝ⟩ = the score
        return {name: self.projections[name].lift(v).to(grads[name]) for name, v in preconditioned.items()}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """``state()`` and, with a projected store, the projection (what a save holds of the estimator)."""
        return {**self.state(), **self.projection_state()}

    def projection_state(self) -> dict[str, torch.Tensor]:
        """The projection matrices, for a save (empty when the store is not projected)."""
        if self.projected_shapes is None:
            return {}
        tensors = {}
        for name, projection in self.projections.items():
            tensors[f"{name}/p_out"], tensors[f"{name}/p_in"] = projection.p_out, projection.p_in
        return tensors

    def load_projection_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.projected_shapes is not None:
            self.projections = {name: LayerProjection(state[f"{name}/p_out"], state[f"{name}/p_in"])
                                for name in self.layers}

    def projection_state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, (k_out, k_in) in (self.projected_shapes or {}).items():
            layer = self.layers[name]
            shapes[f"{name}/p_out"], shapes[f"{name}/p_in"] = (k_out, layer.d_out), (k_in, layer.d_in)
        return shapes

    def fit(self, passes, keep: Grads | None = None) -> Fitted:
        """Fit the curvature on ``passes`` (an :class:`infkit.passes.DataPasses` over the train data).

        ``keep`` is given only when ``fills_train_side`` said yes and the train side will be cached: empty
        tensors {layer: [n_train, d_out, d_in]} (or the projected shapes) for the fit to fill with ``train_side``
        of every example, handed back in the returned ``Fitted.train_side``. It is a mapping allocated on first
        access (:class:`infkit.cache.TrainSideSlots`), so a fit that chooses its projection first gets its shapes."""
        raise NotImplementedError

    def fitted(self, train_side: Grads | None = None) -> Fitted:
        return Fitted(self.saved_state(), dict(self.damping_used), train_side)

    def fills_train_side(self, fisher: str) -> bool:
        """Whether ``fit`` computes every train gradient with the data's labels anyway (so it can fill ``keep``
        and the separate caching pass is saved) under the analysis' ``fisher=`` setting."""
        return False

    def precondition(self, grads: Grads) -> Grads:
        """(G + λI)⁻¹ applied to each gradient; same dict layout in and out."""
        raise NotImplementedError

    @property
    def raw_train_side(self) -> bool:
        """Whether ``train_side`` is the raw gradient (what a cache of it then holds)."""
        return Side.TRAIN not in self.preconditions

    def query_side(self, grads: Grads) -> Grads:
        return self.precondition(grads) if self.preconditions is Side.QUERY else dict(grads)

    def train_side(self, grads: Grads) -> Grads:
        return self.precondition(grads) if self.preconditions is Side.TRAIN else grads

    def train_side_batch(self, cb) -> Grads:
        """The train side of a captured batch (``infkit.passes.CapturedBatch``); override to skip forming ΣW."""
        return self.train_side({name: cb.grads(name) for name in self.layers})

    def resolve_damping(self, name: str, heuristic: float) -> float:
        """The λ of one layer: the user's float or dict entry, else the estimator's heuristic."""
        if isinstance(self.damping, dict):
            value = self.damping.get(name, heuristic)
        elif self.damping is None:
            value = heuristic
        else:
            value = float(self.damping)
        if not value >= 0:
            raise InfkitError(f"damping for layer {name!r} is {value}; it must be a number >= 0")
        self.damping_used[name] = float(value)
        return float(value)

    def check_fits(self, n_train: int, fisher: str) -> None:
        """Refuse early (at ``Analysis`` construction) when the fitted state could not fit; default: no check."""

    def describe_factors(self) -> str:
        """A few words on the form of the fitted state, for the plan (e.g. exact's dense or low-rank blocks)."""
        return ""

    def planned_factor_bytes(self, n_train: int) -> int:
        """Bytes the fitted state will take, estimated before fitting (for ``Analysis.plan()``)."""
        return 0

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that define the fitted estimator (for caches and saving)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor], damping_used: dict[str, float]) -> None:
        """Restore a fitted estimator from ``state()`` and the damping it used (``Analysis.load``)."""
        raise InfkitError(f"the {self.name!r} estimator cannot be restored from a save; fit it again")

    def state_shapes(self, rows: int) -> dict[str, tuple[int, ...]] | None:
        """The shape of every tensor ``state()`` holds once fitted, ``rows`` being the rows of per-example state
        (n_train, times ``fisher_samples`` with the sampled Fisher): a save is checked against it on load. None
        (the default) when the estimator does not say; its tensors are then only checked to be finite."""
        return None
