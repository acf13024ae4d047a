"""Query batching (Grosse et al. 2023, §3.2): low-rank preconditioned queries sharing one pass over train data.

Note:
    Each preconditioned query gradient Ṽ_q [d_out, d_in] of a layer is replaced by its rank-k SVD
    U diag(σ) Vᵀ. Its score against a train example is then computed from the example's per-token tensors
    without forming the example's gradient:

        ⟨Ṽ_q, Σ_t s_t a_tᵀ⟩ ≈ Σ_t Σ_j σ_j (s_tᵀ u_j)(v_jᵀ a_t)

    costing B·T·Q·k·(d_out + d_in) per batch instead of B·T·d_out·d_in + Q·B·d_out·d_in, and storing
    Q·k·(d_out + d_in) numbers per layer instead of Q·d_out·d_in. It pays off for wide layers and many queries on
    the streamed path (no train-side cache). At k = min(d_out, d_in) it is exact; the README reports the accuracy
    at smaller k.
"""

from __future__ import annotations

import torch

from infkit.estimators.base import Grads


def low_rank_queries(preconditioned: Grads, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (U [Q, d_out, k], σ [Q, k], Vᵀ [Q, k, d_in])} with k = min(rank, d_out, d_in)."""
    factors = {}
    for name, v in preconditioned.items():
        u, sigma, vh = torch.linalg.svd(v, full_matrices=False)
        k = min(rank, sigma.shape[-1])
        factors[name] = (u[..., :k], sigma[..., :k], vh[..., :k, :])
    return factors


def score_low_rank(factors, activations: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """[Q, B] scores of one layer from low-rank queries and a batch's a [B, T, d_in], s [B, T, d_out]."""
    u, sigma, vh = (f.to(activations.dtype) for f in factors)
    s_proj = torch.einsum("bto,qok->qbtk", output_grads, u)
    a_proj = torch.einsum("bti,qki->qbtk", activations, vh)
    return torch.einsum("qbtk,qk->qb", s_proj * a_proj, sigma)
