"""Every score kernel: a query side against a train side, cached or streamed, full or low-rank, pairwise, self and
per token. ``Analysis`` only chooses which one runs; the math of all of them is here.

A score is Σ_layers ⟨query_side(∇f(z_q)), train_side(∇L(z_i))⟩ (docs/design.md §2), with the estimator deciding
which side carries (G + λI)⁻¹ (``Estimator.preconditions``). Scores come out per layer, [n_query, n_train] float32
on the CPU; their sum over layers is the total.

Query batching (Grosse et al. 2023, §3.2): each preconditioned query gradient Ṽ_q [d_out, d_in] of a layer may be
replaced by its rank-k SVD U diag(σ) Vᵀ. Its score against a train example is then computed from the example's
per-token tensors without forming the example's gradient:

    ⟨Ṽ_q, Σ_t s_t a_tᵀ⟩ ≈ Σ_t Σ_j σ_j (s_tᵀ u_j)(v_jᵀ a_t)

costing B·T·Q·k·(d_out + d_in) per batch instead of B·T·d_out·d_in + Q·B·d_out·d_in, and storing Q·k·(d_out + d_in)
numbers per layer instead of Q·d_out·d_in. It pays off for wide layers and many queries on the streamed path (no
train-side cache). At k = min(d_out, d_in) it is exact; the README reports the accuracy at smaller k.
"""

from __future__ import annotations

import torch

from infkit.errors import InfkitError
from infkit.estimators.base import Estimator, Grads
from infkit.passes import CapturedBatch, DataPasses
from infkit.tasks.base import Labels

#: train rows per matmul when scoring against the cache (bounds the float32 copy of a bfloat16 cache)
SCORE_CHUNK = 4096
#: cached train rows per step of self-influence from a cache of raw gradients
SELF_CHUNK = 256

PerLayer = dict[str, torch.Tensor]  # {layer: [n_query, n_train]} float32, CPU
LowRank = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # {layer: (U, σ, Vᵀ)}


def against_cache(query_side: Grads, train_side: Grads) -> PerLayer:
    """⟨query side, cached train side⟩ per layer, in float32 (bfloat16 caches in chunks of train rows)."""
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


def streamed(estimator: Estimator, query_side: Grads, passes: DataPasses) -> PerLayer:
    """⟨query side, train side⟩ per layer for every example of ``passes``, streamed batch by batch."""
    n_query = next(iter(query_side.values())).shape[0]
    per_layer = {name: torch.zeros(n_query, passes.n) for name in estimator.layers}
    for cb in passes.iterate(Labels.DATA, desc="scoring train data"):
        for name, t in estimator.train_side_batch(cb).items():
            q = query_side[name].to(t.dtype)
            per_layer[name][:, cb.indices] = (q.flatten(1) @ t.flatten(1).T).cpu().to(torch.float32)
    return per_layer


def low_rank_queries(preconditioned: Grads, rank: int) -> LowRank:
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


def streamed_low_rank(factors: LowRank, passes: DataPasses) -> PerLayer:
    """Low-rank preconditioned queries against every example of ``passes``, from its per-token a and s."""
    n_query = next(iter(factors.values()))[1].shape[0]
    per_layer = {name: torch.zeros(n_query, passes.n) for name in factors}
    for cb in passes.iterate(Labels.DATA, desc="scoring train data (low-rank queries)"):
        for name in factors:
            scores = score_low_rank(factors[name], cb.activations[name], cb.output_grads[name])
            per_layer[name][:, cb.indices] = scores.cpu().to(torch.float32)
    return per_layer


def self_influence_streamed(estimator: Estimator, passes: DataPasses) -> torch.Tensor:
    """∇L(z_i)ᵀ (G + λI)⁻¹ ∇L(z_i) of every example of ``passes``, [n] float32, one pass over the data."""
    values = torch.zeros(passes.n)
    for cb in passes.iterate(Labels.DATA, desc="self-influence"):
        grads = {name: cb.grads(name) for name in estimator.layers}
        query_side, train_side = estimator.query_side(grads), estimator.train_side(grads)
        total = sum((query_side[name].flatten(1) * train_side[name].flatten(1)).sum(dim=1)
                    for name in estimator.layers)
        values[cb.indices] = total.cpu().to(torch.float32)
    return values


def self_influence_from_cache(estimator: Estimator, raw_train_grads: Grads) -> torch.Tensor:
    """Self-influence from a float32 cache of raw train gradients (``estimator.raw_train_side``): no data pass."""
    n = next(iter(raw_train_grads.values())).shape[0]
    values = torch.zeros(n)
    for start in range(0, n, SELF_CHUNK):
        grads = {name: raw_train_grads[name][start : start + SELF_CHUNK] for name in estimator.layers}
        query_side = estimator.query_side(grads)
        total = sum((query_side[name].flatten(1) * grads[name].flatten(1)).sum(dim=1) for name in estimator.layers)
        values[start : start + SELF_CHUNK] = total.cpu().to(torch.float32)
    return values


def per_token(preconditioned: Grads, cb: CapturedBatch, mask: torch.Tensor | None) -> tuple[PerLayer, float]:
    """Per-token contributions s_tᵀ Ṽ a_t of the one example captured in ``cb`` to one preconditioned query Ṽ
    ({layer: [1, d_out, d_in]}): {layer: [real positions]} for layers that see the sequence's positions, and the
    summed score of the layers that do not (e.g. a classifier head on a pooled vector)."""
    per_layer: PerLayer = {}
    unassigned = 0.0
    for name, v in preconditioned.items():
        a, s = cb.activations[name][0], cb.output_grads[name][0]  # [T, d_in], [T, d_out]
        contributions = torch.einsum("to,oi,ti->t", s, v[0].to(a.dtype), a)
        if mask is not None and contributions.shape[0] == mask.shape[1]:
            per_layer[name] = contributions[mask[0].bool()].cpu()
        else:
            unassigned += float(contributions.sum())
    return per_layer, unassigned


def check_finite_scores(total: torch.Tensor, per_layer: dict[str, torch.Tensor], columns: list[int] | None) -> None:
    """Refuse non-finite scores, naming the first (query, train example) and the layers that produced it. (Inputs,
    losses and captured tensors are checked as the passes run, so this is the last guard: an overflow in the
    preconditioning, a singular curvature that slipped through.)"""
    bad = ~torch.isfinite(total)
    if not bool(bad.any()):
        return
    q, column = (int(v) for v in bad.nonzero()[0])
    i = columns[column] if columns is not None else column
    layers = [name for name, s in per_layer.items() if not bool(torch.isfinite(s[q, column]))]
    raise InfkitError(
        f"{int(bad.sum())} of the {total.numel()} scores are not finite (e.g. query {q} against train example {i}: "
        f"{float(total[q, column])}, from layer(s) {layers[:5]}). The damped curvature of those layers is probably "
        "near-singular for this precision: give a larger damping= for them (or damping=None for the heuristic)"
    )
