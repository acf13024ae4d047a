"""What a scoring call returns: :class:`InfluenceResult`, :class:`Top` and :class:`TokenScores`.

Sign (docs/design.md §2): score(q, i) = ∇f(z_q)ᵀ (G + λI)⁻¹ ∇L(z_i) with f the query's loss. Positive: up-weighting
training example i lowers the query's loss — a proponent. Negative: an opponent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from infkit.errors import InfkitError


@dataclass(frozen=True)
class Ranked:
    """Train indices and their scores, strongest first."""

    indices: list[int]
    scores: list[float]

    def __iter__(self):
        return iter(zip(self.indices, self.scores))

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Top:
    """The k strongest proponents (positive scores, highest first) and opponents (negative scores, lowest first)
    of one query: fewer than k of a side when fewer scores have that sign. ``n_nonfinite`` counts the query's NaN
    and infinite scores, which are never listed (they mean a broken computation, not a strong influence)."""

    query: int
    proponents: Ranked
    opponents: Ranked
    n_nonfinite: int = 0


@dataclass
class TokenScores:
    """Per-token contributions of one train example to one query's score.

    ``values[t]`` sums the layers' terms s_tᵀ Ṽ a_t at token t; ``values.sum() + unassigned`` equals the score.
    ``unassigned`` holds the part of layers that do not see the sequence's positions (e.g. a classifier head on
    a pooled vector); it is 0 for causal LMs.
    """

    query: int
    train_index: int
    token_ids: list[int]
    tokens: list[str] | None
    values: torch.Tensor  # [T]
    per_layer: dict[str, torch.Tensor]  # {layer: [T]}
    unassigned: float = 0.0

    @property
    def total(self) -> float:
        return float(self.values.sum()) + self.unassigned


@dataclass
class InfluenceResult:
    """Scores of every query against every train example, with their per-layer split.

    Attributes:
        scores: [n_query, n_train], the sum of ``per_layer``.
        per_layer: {layer name: [n_query, n_train]}.
        estimator: the estimator's name; ``damping``: the λ used per layer.
        train_indices: which train examples the columns are (all of them unless candidates were filtered).
    """

    scores: torch.Tensor
    per_layer: dict[str, torch.Tensor]
    estimator: str
    damping: dict[str, float]
    train_indices: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _analysis: Any = field(default=None, repr=False)
    _query_grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # ∇f [n_query, d_out, d_in]

    @property
    def n_query(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def top(self, q: int, k: int = 10) -> Top:
        """Query q's k strongest proponents (scores > 0, highest first) and opponents (scores < 0, lowest first),
        as train indices. A side has fewer than k entries when fewer scores have its sign (a score of 0 is neither);
        NaN and infinite scores are left out of both and counted in ``Top.n_nonfinite``. Ties keep column order."""
        if not -self.n_query <= q < self.n_query:
            raise InfkitError(f"query index {q} is out of range for {self.n_query} queries")
        if int(k) != k or k < 0:
            raise InfkitError(f"k must be a whole number >= 0, got {k!r}")
        row = self.scores[q].detach().double().cpu()
        finite = torch.isfinite(row)
        columns = self.train_indices or list(range(row.numel()))

        def side(sign: int) -> Ranked:
            candidates = (finite & (sign * row > 0)).nonzero().flatten()
            order = torch.sort(sign * row[candidates], descending=True, stable=True).indices[: int(k)]
            chosen = candidates[order].tolist()
            return Ranked([columns[c] for c in chosen], [float(row[c]) for c in chosen])

        return Top(q, side(1), side(-1), int((~finite).sum()))

    def layer_shares(self, q: int, i: int) -> dict[str, float]:
        """Each layer's part of score(q, i) (sums to the score)."""
        column = self.train_indices.index(i) if self.train_indices else i
        return {name: float(s[q, column]) for name, s in self.per_layer.items()}

    def token_scores(self, q: int, i: int) -> TokenScores:
        """Per-token contributions of train example i to query q (recomputes that one example)."""
        if self._analysis is None:
            raise RuntimeError("this result is not attached to an Analysis")
        return self._analysis.token_scores(q, i, result=self)

    def _repr_html_(self) -> str:
        """Notebook view: the top 5 proponents and opponents of the first queries, static HTML (survives export)."""
        from infkit.views.static import result_html

        return result_html(self)

    def __repr__(self) -> str:
        return (
            f"InfluenceResult(estimator={self.estimator!r}, n_query={self.n_query}, n_train={self.n_train}, "
            f"layers={len(self.per_layer)})"
        )
