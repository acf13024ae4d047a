"""Kronecker-structured projections of per-example gradients, for a compressed train-side store (LoGra, Choe et
al. 2024).

Per tracked layer with inputs a_t ∈ R^{d_in} and output gradients s_t ∈ R^{d_out}, an example's gradient is
G = Σ_t s_t a_tᵀ [d_out, d_in]. A projection keeps

    Ĝ = P_out G P_inᵀ = Σ_t (P_out s_t)(P_in a_t)ᵀ      [k_out, k_in]

formed from the projected a and s of each token, never from G itself: B·T·(d_in·k_in + d_out·k_out + k_out·k_in)
flops per batch instead of B·T·d_out·d_in. Queries are projected the same way, and a score is the inner product
of projected sides. Two kinds:

* **eigenbasis** (EK-FAC, K-FAC): a set of eigen-pairs (i, j) per layer — entry m of the projected gradient is
  (Q_Sᵀ G Q_A)[i_m, j_m], with Q_S, Q_A the eigenvectors of the layer's Kronecker factors S and A (known after the
  first pass, so EK-FAC's second pass can fill the projected store, as it fills the full one). In that basis the
  preconditioner is diagonal, so the projected score is the full score summed over the kept pairs only:
  Σ_{(i,j) kept} q_ij g_ij / (Λ_ij + λ). What is dropped is the sum over the other pairs. A pair's expected
  contribution to a self-influence is Λ_ij / (Λ_ij + λ) (E[g_ij²] = Λ_ij): nearly 1 when Λ_ij ≫ λ, and Λ_ij / λ,
  small, for the many directions whose eigenvalue is far below λ. :func:`kept_share` measures, per layer, the
  share of Σ Λ/(Λ+λ) the kept pairs hold; ``benchmarks/store.py`` measures what it does to scores.

  Which pairs: the store's budget (k_out·k_in per layer, the bytes of a k x k projection) is shared across all
  layers, and :func:`leading_pairs` keeps the pairs with the largest K-FAC eigenvalue T̄·λ_S,i·λ_A,j anywhere in
  the model (at least one per layer). Within a layer that is nearly the product of the leading k directions of
  each side; across layers it moves the budget to where the curvature is. Measured by ``benchmarks/store.py`` on
  its tiny GPT-2 at the bytes of 16 x 16 per layer, this lifted top-10 overlap with the full store from 0.49 to
  0.59 (Pearson from 0.73 to 0.84) against the per-layer 16 x 16 product, while ranking by Λ/(Λ+λ) did worse than
  by the eigenvalue itself.
* **random** (identity, DataInf): P_out [k_out, d_out] and P_in [k_in, d_in] with i.i.d. N(0, 1/k) entries, drawn
  from a generator seeded by (seed, layer name): E[P_outᵀ P_out] = I and E[P_inᵀ P_in] = I, so inner products of
  projected gradients are unbiased estimates of the full ones. Their error shrinks as 1/√k on each side but
  depends on the gradients' structure: for a rank-one gradient (one token) it is about 2/√k, far from the
  1/√(k_out·k_in) of a dense Gaussian map of the same output size.

A side of a layer that fits (k ≥ d) is not projected at all (its random matrix is the identity), and an eigenbasis
budget of every layer's d_out·d_in keeps every pair, so at k ≥ max(d_out, d_in) the projected scores equal the full
scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class LayerProjection:
    """P_out [k_out, d_out] and P_in [k_in, d_in] of one layer."""

    p_out: torch.Tensor
    p_in: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.p_out.shape[0], self.p_in.shape[0]

    def of_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """P_out G P_inᵀ of a stack of full gradients [Q, d_out, d_in] -> [Q, k_out, k_in], in their dtype."""
        return self.p_out.to(grads) @ grads @ self.p_in.T.to(grads)

    def of_tokens(self, activations: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """Σ_t (P_out s_t)(P_in a_t)ᵀ of a batch's a [B, T, d_in] and s [B, T, d_out] -> [B, k_out, k_in]."""
        a = activations @ self.p_in.T.to(activations)
        s = output_grads @ self.p_out.T.to(output_grads)
        return torch.einsum("bto,bti->boi", s, a)

    def lift(self, projected: torch.Tensor) -> torch.Tensor:
        """P_outᵀ X P_in of projected matrices [Q, k_out, k_in] -> [Q, d_out, d_in]: ⟨lift(X), G⟩ = ⟨X, Ĝ⟩."""
        return self.p_out.T.to(projected) @ projected @ self.p_in.to(projected)


#: Dense combination of a pair projection's rotated tokens when its used rows x columns are at most this many
#: times its pairs (one matmul, then a gather); above it, pair by pair (B·T flops per pair, no r x c temporary).
DENSE_PAIRS = 4
#: Elements of the [B, T, pairs] products formed at once by the pair-by-pair path.
PAIR_CHUNK = 1 << 24


@dataclass
class PairProjection:
    """Kept eigen-pairs of one layer: entry m of a projected gradient is (P_out G P_inᵀ)[rows[m], columns[m]],
    P_out [r, d_out] and P_in [c, d_in] the used rows of Q_Sᵀ and Q_Aᵀ, ``rows`` / ``columns`` [m] indices into
    them. A projected gradient is stored as [1, m]."""

    p_out: torch.Tensor
    p_in: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor

    @classmethod
    def of_pairs(cls, eigvecs_s: torch.Tensor, eigvecs_a: torch.Tensor, kept_out: torch.Tensor,
                 kept_in: torch.Tensor) -> PairProjection:
        """The projection onto pairs (kept_out[m], kept_in[m]) of eigenvector indices (columns of Q_S, Q_A)."""
        used_out, rows = torch.unique(kept_out, return_inverse=True)
        used_in, columns = torch.unique(kept_in, return_inverse=True)
        return cls(eigvecs_s[:, used_out].T, eigvecs_a[:, used_in].T, rows, columns)

    @property
    def shape(self) -> tuple[int, int]:
        return 1, self.rows.numel()

    def _gather(self, dense: torch.Tensor) -> torch.Tensor:
        """[B, r, c] -> the kept entries [B, 1, m]."""
        return dense[:, self.rows.to(dense.device), self.columns.to(dense.device)].unsqueeze(1)

    def of_grads(self, grads: torch.Tensor) -> torch.Tensor:
        """The kept pairs of a stack of full gradients [Q, d_out, d_in] -> [Q, 1, m]."""
        return self._gather(self.p_out.to(grads) @ grads @ self.p_in.T.to(grads))

    def of_tokens(self, activations: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """Σ_t (P_out s_t)[rows[m]] (P_in a_t)[columns[m]] of a batch's a [B, T, d_in], s [B, T, d_out] -> [B, 1, m]."""
        a = activations @ self.p_in.T.to(activations)  # [B, T, c]
        s = output_grads @ self.p_out.T.to(output_grads)  # [B, T, r]
        m = self.rows.numel()
        if s.shape[-1] * a.shape[-1] <= DENSE_PAIRS * m:
            return self._gather(torch.einsum("bto,bti->boi", s, a))
        rows, columns = self.rows.to(a.device), self.columns.to(a.device)
        out = a.new_empty(a.shape[0], m)
        step = max(1, PAIR_CHUNK // max(a.shape[0] * a.shape[1], 1))
        for start in range(0, m, step):
            pairs = slice(start, start + step)
            out[:, pairs] = (s[:, :, rows[pairs]] * a[:, :, columns[pairs]]).sum(dim=1)
        return out.unsqueeze(1)

    def lift(self, projected: torch.Tensor) -> torch.Tensor:
        """The full matrices [Q, d_out, d_in] of projected ones [Q, 1, m]: P_outᵀ X P_in with X [Q, r, c] zero
        outside the kept pairs, so ⟨lift(x), G⟩ = ⟨x, kept pairs of G⟩."""
        dense = projected.new_zeros(projected.shape[0], self.p_out.shape[0], self.p_in.shape[0])
        dense[:, self.rows.to(dense.device), self.columns.to(dense.device)] = projected[:, 0]
        return self.p_out.T.to(dense) @ dense @ self.p_in.to(dense)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for (seed, layer name): the same on every machine and process."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def gaussian(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, d] with N(0, 1/k) entries, or the identity when k >= d (nothing to compress on that side)."""
    if k >= d:
        return torch.eye(d, dtype=torch.float64)
    return torch.randn(k, d, generator=generator, dtype=torch.float64) / k**0.5


def random_projection(layer, shape: tuple[int, int], seed: int) -> LayerProjection:
    g = torch.Generator().manual_seed(layer_seed(seed, layer.name))
    k_out, k_in = shape
    return LayerProjection(gaussian(layer.d_out, k_out, g), gaussian(layer.d_in, k_in, g))


def leading_pairs(values: dict[str, torch.Tensor], budget: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``budget`` entries of the layers' value matrices {layer: [d_out, d_in]} that are largest across all
    layers, with each layer's largest always kept (a layer is never left out): per layer (rows, columns) of its
    kept entries, largest first — always a leading run of the layer's entries sorted by value (ties: the lower flat
    index first; across layers, the earlier layer)."""
    budget = max(int(budget), len(values))
    orders = {}
    for name, matrix in values.items():  # each layer's entries, largest first: no more than the budget of them
        flat = matrix.reshape(-1).double()
        order = torch.sort(flat, descending=True, stable=True).indices[:budget]
        orders[name] = (order, flat[order])
    rest = budget - len(values)  # after each layer's largest
    counts = dict.fromkeys(values, 1)
    if rest > 0:
        candidates = torch.cat([sorted_values[1:] for _, sorted_values in orders.values()])
        rest = min(rest, candidates.numel())
        threshold = float(torch.topk(candidates, rest).values[-1]) if rest else float("inf")
        for name, (_, sorted_values) in orders.items():
            counts[name] += int((sorted_values[1:] > threshold).sum())
        ties = rest - sum(counts.values()) + len(values)
        for name, (_, sorted_values) in orders.items():  # entries equal to the threshold, layer by layer
            extra = min(ties, int((sorted_values[1:] == threshold).sum()))
            counts[name] += extra
            ties -= extra
    kept = {}
    for name, (order, _) in orders.items():
        flat = order[: counts[name]]
        columns = values[name].shape[1]
        kept[name] = (torch.div(flat, columns, rounding_mode="floor"), flat % columns)
    return kept


def kept_share(eigenvalues: torch.Tensor, damping: float, rows: torch.Tensor, columns: torch.Tensor) -> float:
    """The share of Σ Λ/(Λ + λ) — a train example's expected self-influence — held by the kept eigen-pairs
    (rows[m], columns[m])."""
    ratio = eigenvalues.double() / (eigenvalues.double() + damping)
    total = float(ratio.sum())
    return float(ratio[rows, columns].sum()) / total if total > 0 else 1.0
