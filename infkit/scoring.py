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
from tqdm.auto import tqdm

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


def against_cache(query_side: Grads, train_side: Grads, on_disk: bool = False, progress: bool = False) -> PerLayer:
    """⟨query side, stored train side⟩ per layer, in float32. A float32 store on the query's device is one matrix
    product per layer; otherwise (bfloat16, memory-mapped ``on_disk``, another device) the store is read in chunks of
    :data:`SCORE_CHUNK` rows, each moved to the query's device (a progress bar when ``progress``)."""
    per_layer = {}
    n = next(iter(train_side.values())).shape[0]
    chunked = [name for name, t in train_side.items()
               if on_disk or t.dtype != torch.float32 or t.device != query_side[name].device]
    bar = tqdm(total=len(chunked) * n, desc="scoring against the stored train side", unit="row", unit_scale=True,
               disable=not progress or not chunked, leave=False)
    for name, stored in train_side.items():
        q = query_side[name].flatten(1).to(torch.float32)
        flat = stored.flatten(1)
        if name not in chunked:
            per_layer[name] = (q.to(flat.device) @ flat.T).cpu()
            continue
        parts = []
        for i in range(0, n, SCORE_CHUNK):
            block = flat[i : i + SCORE_CHUNK].to(device=q.device, dtype=torch.float32)
            parts.append((q @ block.T).cpu())
            bar.update(block.shape[0])
        per_layer[name] = torch.cat(parts, 1)
    bar.close()
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


def _own_self_influence(estimator: Estimator, grads: Grads) -> torch.Tensor:
    """∇Lᵀ (G + λI)⁻¹ ∇L of a few train gradients {layer: [B, d_out, d_in]}, [B]."""
    query_side, train_side = estimator.query_side(grads), estimator.train_side(grads)
    return sum((query_side[name].flatten(1) * train_side[name].flatten(1)).sum(dim=1) for name in estimator.layers)


def self_influence_streamed(estimator: Estimator, passes: DataPasses) -> torch.Tensor:
    """∇L(z_i)ᵀ (G + λI)⁻¹ ∇L(z_i) of every example of ``passes``, [n] float32, one pass over the data (this rank's
    shard: with an estimator that preconditions with every rank's statistics, the ranks take turns, and a rank
    with fewer batches joins the last turns with none)."""
    world, together = passes.world, estimator.preconditions_with_all_ranks
    values = torch.zeros(passes.n)
    batches = passes.iterate(Labels.DATA, desc="self-influence")
    rounds = world.most(-(-passes.n // passes.batch_size)) if world.active and together else None
    done = 0
    for cb in batches:
        grads = {name: cb.grads(name) for name in estimator.layers}
        values[cb.indices] = world.on_own_rows(lambda g: _own_self_influence(estimator, g), grads, together).cpu().to(
            torch.float32)
        done += 1
    empty = {name: torch.zeros(0, layer.d_out, layer.d_in, dtype=layer.module.weight.dtype, device=passes.device)
             for name, layer in estimator.layers.items()}
    for _ in range(done, rounds or done):
        world.on_own_rows(lambda g: _own_self_influence(estimator, g), empty, together)
    return values


def self_influence_from_cache(estimator: Estimator, raw_train_grads: Grads) -> torch.Tensor:
    """Self-influence from a float32 cache of raw train gradients (``estimator.raw_train_side``): no data pass."""
    n = next(iter(raw_train_grads.values())).shape[0]
    values = torch.zeros(n)
    world, together = estimator.world, estimator.preconditions_with_all_ranks
    for start in range(0, world.most(n) if together else n, SELF_CHUNK):  # every rank runs as many rounds
        grads = {name: raw_train_grads[name][start : start + SELF_CHUNK] for name in estimator.layers}
        values[start : start + SELF_CHUNK] = world.on_own_rows(
            lambda g: _own_self_influence(estimator, g), grads, together).cpu().to(torch.float32)
    return values


def top_against_store(query_side: Grads, train_side: Grads, k: int, progress: bool = False, offset: int = 0):
    """The k highest and k lowest total scores per query against a stored train side, kept on the fly chunk by
    chunk of :data:`SCORE_CHUNK` rows, so no [n_query, n_train] matrix is formed: (highest values [Q, k'], their
    train indices, lowest values, their indices), k' = min(k, n_train). Non-finite totals are refused. ``offset``:
    the train index of the store's first row (a rank's shard, :mod:`infkit.distributed`)."""
    n = next(iter(train_side.values())).shape[0]
    queries = {name: q.flatten(1).to(torch.float32) for name, q in query_side.items()}
    n_query = next(iter(queries.values())).shape[0]
    empty = torch.empty(n_query, 0)
    high, high_at, low, low_at = empty, empty.long(), empty, empty.long()
    bar = tqdm(total=n, desc="top influences against the stored train side", unit="row", unit_scale=True,
               disable=not progress, leave=False)
    for start in range(0, n, SCORE_CHUNK):
        total = None
        for name, stored in train_side.items():
            q = queries[name]
            block = stored[start : start + SCORE_CHUNK].flatten(1).to(device=q.device, dtype=torch.float32)
            part = (q @ block.T).cpu()
            total = part if total is None else total + part
        if not bool(torch.isfinite(total).all()):
            q_bad, column = (int(v) for v in (~torch.isfinite(total)).nonzero()[0])
            raise InfkitError(f"the score of query {q_bad} against train example {offset + start + column} is not "
                              "finite; give a larger damping= (or damping=None for the heuristic)")
        at = torch.arange(offset + start, offset + start + total.shape[1]).expand(n_query, -1)
        high, high_at = _keep(torch.cat([high, total], 1), torch.cat([high_at, at], 1), k, largest=True)
        low, low_at = _keep(torch.cat([low, total], 1), torch.cat([low_at, at], 1), k, largest=False)
        bar.update(total.shape[1])
    bar.close()
    return high, high_at, low, low_at


def merge_tops(world, high, high_at, low, low_at, k: int):
    """Every rank's best k (``top_against_store`` of its shard) merged into the best k of all, on every rank."""
    if not world.active:
        return high, high_at, low, low_at
    high, high_at, low, low_at = (world.gather_columns(t.contiguous(), "gather top influences")
                                  for t in (high, high_at, low, low_at))
    return (*_keep(high, high_at, k, largest=True), *_keep(low, low_at, k, largest=False))


def _keep(values: torch.Tensor, indices: torch.Tensor, k: int, largest: bool):
    """The k largest (or smallest) of each row, ties broken by the lower train index."""
    order = torch.argsort(indices, dim=1)  # stable ties: sort by index first, then stably by value
    values, indices = values.gather(1, order), indices.gather(1, order)
    ranked = torch.sort(values, dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, ranked), indices.gather(1, ranked)


def self_influence_projected(estimator: Estimator, stored: Grads) -> torch.Tensor:
    """Self-influence from a projected store (``estimator.projected_self_influence``, the diagonal of the projected
    scores): no data pass, in chunks of rows."""
    n = next(iter(stored.values())).shape[0]
    values = torch.zeros(n)
    world, together = estimator.world, estimator.preconditions_with_all_ranks
    for start in range(0, world.most(n) if together else n, SCORE_CHUNK):  # every rank runs as many rounds
        chunk = {name: t[start : start + SCORE_CHUNK].to(torch.float32) for name, t in stored.items()}
        values[start : start + SCORE_CHUNK] = world.on_own_rows(
            estimator.projected_self_influence, chunk, together).cpu().to(torch.float32)
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
