"""Kronecker-structured projections of per-example gradients, for a compressed train-side store (LoGra, Choe et
al. 2024).

Per tracked layer with inputs a_t ∈ R^{d_in} and output gradients s_t ∈ R^{d_out}, an example's gradient is
G = Σ_t s_t a_tᵀ [d_out, d_in]. A projection keeps

    Ĝ = P_out G P_inᵀ = Σ_t (P_out s_t)(P_in a_t)ᵀ      [k_out, k_in]

formed from the projected a and s of each token, never from G itself: B·T·(d_in·k_in + d_out·k_out + k_out·k_in)
flops per batch instead of B·T·d_out·d_in. Queries are projected the same way, and a score is the inner product
of projected sides. Two kinds:

* **eigenbasis** (EK-FAC, K-FAC): P_out and P_in are the leading eigenvectors of the layer's Kronecker factors S and
  A (rows of Q_Sᵀ and Q_Aᵀ), ranked by their eigenvalues λ_S and λ_A (known after the first pass, so EK-FAC's
  second pass can fill the projected store, as it fills the full one). In that basis the
  preconditioner is diagonal, so the projected score is the full score summed over the kept eigen-pairs only:
  Σ_{i∈kept_S, j∈kept_A} q_ij g_ij / (Λ_ij + λ). What is dropped is the sum over the other pairs. A pair's
  expected contribution to a self-influence is Λ_ij / (Λ_ij + λ) (E[g_ij²] = Λ_ij): nearly 1 when Λ_ij ≫ λ, and
  Λ_ij / λ, small, for the many directions whose eigenvalue is far below λ. :func:`kept_share` measures, per
  layer, the share of Σ Λ/(Λ+λ) the kept pairs hold; ``benchmarks/store.py`` measures what it does to scores.
* **random** (identity, DataInf): P_out [k_out, d_out] and P_in [k_in, d_in] with i.i.d. N(0, 1/k) entries, drawn
  from a generator seeded by (seed, layer name): E[P_outᵀ P_out] = I and E[P_inᵀ P_in] = I, so inner products of
  projected gradients are unbiased estimates of the full ones. Their error shrinks as 1/√k on each side but
  depends on the gradients' structure: for a rank-one gradient (one token) it is about 2/√k, far from the
  1/√(k_out·k_in) of a dense Gaussian map of the same output size.

A side of a layer that fits (k ≥ d) is not projected at all: its matrix is the identity for random projections and
the full eigenbasis for eigenbasis ones, so at k ≥ max(d_out, d_in) the projected scores equal the full scores.
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


def leading(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, in decreasing order (ties: the lower index first)."""
    return torch.sort(eigenvalues, descending=True, stable=True).indices[:k]


def kept_share(eigenvalues: torch.Tensor, damping: float, rows: torch.Tensor, columns: torch.Tensor) -> float:
    """The share of Σ Λ/(Λ + λ) — a train example's expected self-influence — held by the kept eigen-pairs."""
    ratio = eigenvalues.double() / (eigenvalues.double() + damping)
    total = float(ratio.sum())
    return float(ratio[rows][:, columns].sum()) / total if total > 0 else 1.0
