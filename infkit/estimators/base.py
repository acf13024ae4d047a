"""The one interface every estimator shares: fit on train data, then precondition query gradients.

An estimator sees tensors only (capture is elsewhere). Gradients travel as ``{layer name: [Q, d_out, d_in]}``
dicts, laid out as in :mod:`infkit.capture`. Adding an estimator is one file with a subclass decorated by
``@register("name")``.

Damping (docs/design.md §2): ``damping=None`` uses the estimator's own heuristic; a float is the absolute λ added to
the curvature of every layer; a dict ``{layer name: λ}`` sets layers one by one (layers it omits use the
heuristic).
"""

from __future__ import annotations

from typing import Any

import torch

from infkit.capture import Layer
from infkit.errors import InfkitError

Grads = dict[str, torch.Tensor]
Damping = float | dict[str, float] | None

REGISTRY: dict[str, type[Estimator]] = {}


def register(name: str):
    def add(cls: type[Estimator]) -> type[Estimator]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def make_estimator(name: str, layers: dict[str, Layer], damping: Damping, options: dict[str, Any]) -> Estimator:
    if name not in REGISTRY:
        raise InfkitError(f"unknown estimator {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](layers, damping, **options)


class Estimator:
    """Base class. Subclasses implement ``fit`` and ``precondition`` and fill ``self.damping_used``."""

    name = "base"
    #: False for estimators that need no pass over the data before scoring (gradient dot product).
    needs_fit = True
    #: Passes over the train data that ``fit`` makes (stated by ``Analysis.plan()``).
    fit_passes = 1

    def __init__(self, layers: dict[str, Layer], damping: Damping = None):
        self.layers = layers
        self.damping = damping
        self.damping_used: dict[str, float] = {}
        # Set by the analysis before fit when the train side will be cached: {layer: empty [n, d_out, d_in]}.
        # An estimator whose fit already computes the train side may fill it and hand it back as fused_train_side.
        self.train_store: dict[str, torch.Tensor] | None = None
        self.fused_train_side: dict[str, torch.Tensor] | None = None

    def fit(self, passes) -> None:  # passes: infkit.passes.DataPasses
        raise NotImplementedError

    def precondition(self, grads: Grads) -> Grads:
        """(G + λI)⁻¹ applied to each query gradient; same dict layout in and out."""
        raise NotImplementedError

    # A score is Σ_layers ⟨query_side(∇f), train_side(∇L)⟩. By default the query side is preconditioned and the
    # train side is the raw gradient; an estimator whose preconditioning is cheaper on the train side (EK-FAC:
    # rotate once, divide by Λ + λ, cache) overrides both. The train side is what the train cache stores.
    #: Whether train_side() is the raw gradient (not overridden): the cached train side then holds every train
    #: gradient, and self-influence can be computed from it without another pass over the data.
    train_side_is_raw = True

    def query_side(self, grads: Grads) -> Grads:
        return self.precondition(grads)

    def train_side(self, grads: Grads) -> Grads:
        return grads

    def fuses_train_side(self, fisher: str) -> bool:
        """Whether ``fit`` can fill ``train_store`` itself (saving the separate caching pass)."""
        return False

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
