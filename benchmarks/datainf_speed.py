"""DataInf: infkit's matrix-product form against the per-example loop of the original DataInf code, same inputs.

    .venv/bin/python benchmarks/datainf_speed.py            # n = 2,000 train examples (about a minute on 2 cores)
    .venv/bin/python benchmarks/datainf_speed.py --n 500    # quicker

Model: the tiny GPT-2 of the tests (2 blocks, width 16) with LoRA rank 8 on c_attn, attn.c_proj and mlp.c_proj
(12 tracked blocks, 2,816 parameters), float32, fine-tuned a few steps. Train data: n sequences of 10 tokens.

1. The math, on identical inputs. infkit's DataInf is fitted; its stored per-example gradients and the queries'
   gradients are then handed, as per-layer dicts of tensors, to ``loop_datainf`` below: the structure of the
   DataInf reference code (``compute_hvp_proposed`` then ``compute_IF`` in Kwon et al.'s repository — a Python loop
   over validation examples, layers and train examples), with the per-layer λ computed once per layer instead of
   once per query (in its favour). infkit's side: ``estimator.precondition`` + one matrix product per layer.
   Printed: both times, their ratio, and the largest score difference (relative to the largest score).
2. End to end. infkit's ``Analysis(estimator="datainf").fit()`` + ``scores()`` (capture passes included) next to
   one plain forward + backward pass over the same data at the same batch size — the floor: any influence method
   needs at least the train gradients.
3. Which side to precondition, at n = 1k / 4k / 16k (``--sides``), for one 2,048-parameter block and 8 queries:
   preconditioning every train gradient once (so that it can be cached) costs O(n² · d); preconditioning the
   queries (what infkit does, as the paper's code does) costs O(Q · n · d) per call.

Writes the table to bench-output/datainf_speed.md as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny LoRA models live with the tests

from _common import publish  # noqa: E402
from lora_models import finetune_data, lora_gpt2  # noqa: E402

from infkit import Analysis, tasks  # noqa: E402


def loop_datainf(tr_grad_dict, val_grad_dict, lambda_const_param: float = 10.0):
    """The original code's structure: dicts {example id: {weight name: gradient}}; loops over examples."""
    n_train = len(tr_grad_dict)
    weight_names = list(val_grad_dict[0])
    lambdas = {}
    for weight_name in weight_names:
        s = torch.zeros(n_train)
        for tr_id in tr_grad_dict:
            s[tr_id] = torch.mean(tr_grad_dict[tr_id][weight_name] ** 2)
        lambdas[weight_name] = torch.mean(s) / lambda_const_param  # layer-wise λ = 0.1 · mean ‖g‖² / d
    hvp_dict = {}
    for val_id in val_grad_dict:
        hvp_dict[val_id] = {}
        for weight_name in weight_names:
            lambda_const = lambdas[weight_name]
            v = val_grad_dict[val_id][weight_name]
            hvp = torch.zeros(v.shape)
            for tr_id in tr_grad_dict:
                tmp_grad = tr_grad_dict[tr_id][weight_name]
                c_tmp = torch.sum(v * tmp_grad) / (lambda_const + torch.sum(tmp_grad**2))
                hvp += (v - c_tmp * tmp_grad) / (n_train * lambda_const)
            hvp_dict[val_id][weight_name] = hvp
    scores = torch.zeros(len(val_grad_dict), n_train)
    for tr_id in tr_grad_dict:
        for val_id in val_grad_dict:
            value = 0
            for weight_name in weight_names:
                value += torch.sum(hvp_dict[val_id][weight_name] * tr_grad_dict[tr_id][weight_name])
            scores[val_id, tr_id] = value  # infkit's sign: the reference code stores −value (docs/design.md §2)
    return scores


def vectorized(estimator, query_grads, train_stacked):
    """infkit's DataInf on the same inputs: precondition all queries, then one product per layer."""
    preconditioned = estimator.precondition(query_grads)
    total = 0
    for name, g in train_stacked.items():
        total = total + preconditioned[name].flatten(1) @ g.T
    return total


def best_of(fn, repeats: int):
    """(result, seconds of the fastest of ``repeats`` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def forward_backward_floor(model, task, data, batch_size: int) -> float:
    """One forward + backward pass (batch gradients) over the data: the least any influence method must do."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for lo in range(0, len(data), batch_size):
        batch = task.collate(data[lo : lo + batch_size])
        loss = task.train_loss(model, batch).sum()
        torch.autograd.grad(loss, params)
    return time.perf_counter() - start


def precondition_in_chunks(est, grads: torch.Tensor, chunk: int = 1024) -> list:
    return [est.precondition({"block": grads[i : i + chunk]}) for i in range(0, len(grads), chunk)]


def which_side(ns: list[int], n_queries: int, repeats: int, d: int = 2048) -> list[str]:
    """Seconds to precondition all n train gradients of one block vs the Q query gradients, same estimator."""
    from infkit.capture import Layer
    from infkit.estimators.datainf import DataInf

    layer = Layer("block", torch.nn.Linear(d, 1, bias=False), d, 1, False)
    rows = ["| n | precondition every train gradient (cacheable) | precondition the queries | ratio |",
            "|---|---|---|---|"]
    generator = torch.Generator().manual_seed(0)
    for n in ns:
        est = DataInf({"block": layer})
        est.gradients = {"block": torch.randn(n, d, generator=generator)}
        est.squared_norms = {"block": est.gradients["block"].square().sum(dim=1)}
        est.resolve_damping("block", 0.1 * float(est.squared_norms["block"].mean()) / d)
        train = est.gradients["block"].reshape(n, 1, d)
        queries = torch.randn(n_queries, 1, d, generator=generator)
        _, t_train = best_of(partial(precondition_in_chunks, est, train), 1 if n > 4000 else repeats)
        _, t_query = best_of(partial(est.precondition, {"block": queries}), 5 * repeats)
        rows.append(f"| {n:,} | {t_train:.3f} s | {t_query * 1e3:.1f} ms | {t_train / t_query:,.0f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="train examples")
    parser.add_argument("--queries", type=int, default=8, help="query examples")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many runs")
    parser.add_argument("--sides", type=int, nargs="*", default=[1000, 4000, 16000],
                        help="n for the which-side table (3.)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = lora_gpt2(r=args.rank, dtype=torch.float32)
    task = tasks.CausalLM()
    train, queries = finetune_data(args.n, seed=21), finetune_data(args.queries, seed=99)

    # -- end to end, and the floor (best of --repeats runs: the machine may be shared) --------------------------
    forward_backward_floor(model, task, train[: args.batch_size], args.batch_size)  # warm-up
    floors, runs = [], []
    for _ in range(args.repeats):  # interleaved, so that the floor and infkit see the same machine
        floors.append(forward_backward_floor(model, task, train, args.batch_size))
        an = Analysis(model, task, train, estimator="datainf", batch_size=args.batch_size, progress=False)
        start = time.perf_counter()
        an.fit()
        an.scores(queries)
        runs.append((time.perf_counter() - start, an.timings["fit"], an.timings["cache"], an.timings["scores"]))
    end_to_end, fitted, cached, scored = min(runs)
    floor = min(floors)

    # -- the math on identical inputs ---------------------------------------------------------------------------
    est = an.estimator
    query_grads = an.query_gradients(queries)
    train_stacked = est.gradients  # {layer: [n, d_l]}: the per-example gradients DataInf was fitted on
    ours, t_ours = best_of(lambda: vectorized(est, query_grads, train_stacked), 5 * args.repeats)
    tr_grad_dict = {i: {name: g[i] for name, g in train_stacked.items()} for i in range(args.n)}
    val_grad_dict = {q: {name: g[q].flatten() for name, g in query_grads.items()} for q in range(args.queries)}
    theirs, t_loop = best_of(lambda: loop_datainf(tr_grad_dict, val_grad_dict), args.repeats)
    difference = float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())

    n_params = an.n_params
    lines = [
        f"## DataInf speed: n = {args.n:,} train x {args.queries} queries, LoRA r = {args.rank} "
        f"({len(an.layers)} blocks, {n_params:,} params), float32, {args.threads} threads, best of "
        f"{args.repeats} runs",
        "",
        "| what | seconds | ratio |",
        "|---|---|---|",
        f"| per-example loop (the DataInf reference code's structure) | {t_loop:.3f} | 1 |",
        f"| infkit DataInf, same inputs (precondition + score) | {t_ours:.4f} | {t_loop / t_ours:,.0f}x faster |",
        f"| max score difference / max score | {difference:.1e} | |",
        f"| one forward + backward over the {args.n:,} examples (floor) | {floor:.3f} | 1 |",
        f"| infkit DataInf: estimator fit (one capture pass, empirical Fisher, fills the cache) | {fitted:.3f} | "
        f"{fitted / floor:.2f}x the floor |",
        f"| infkit DataInf: train-side cache (nothing left to do) | {cached:.3f} | |",
        f"| infkit DataInf: scores of {args.queries} queries | {scored:.3f} | |",
        f"| infkit DataInf: fit + scores, end to end | {end_to_end:.3f} | {end_to_end / floor:.2f}x the floor |",
    ]
    lines += ["", *which_side(args.sides, args.queries, args.repeats)]
    publish("\n".join(lines), "datainf_speed")


if __name__ == "__main__":
    main()
