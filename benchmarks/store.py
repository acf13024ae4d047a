"""The compressed train-side store, side by side with the full one, in one run.

For each model and n: fit with the full store (or, where it exceeds the memory budget, the same fitted estimator
scoring by streaming the train data: the same full scores), then with projected stores of 2-3 sizes. Per row: the
store's bytes (full vs projected), fit + store time, the warm one-query latency (median over new queries) against
one forward+backward of that query (the floor), and the projected scores' quality against the full scores on the
same model and queries: Pearson, Spearman and top-10 overlap (the 10 most positive train examples) per query, the
mean over queries. EK-FAC on whole layers; DataInf on the tiny model (whole layers: its full store must fit).

Models (trained briefly on Markov sequences, vocab 256, 32 tokens): "tiny" = GPT-2 2 blocks width 64, "wide" = 4
blocks width 256. Defaults follow the issue (n = 4k, 16k, 64k); on 2 CPU cores the wide model at 64k takes hours,
so pick with --models / --n / --ranks:

    .venv/bin/python benchmarks/store.py --models tiny,wide --n 4000,16000 --ranks 8,16,32

Writes bench-output/store.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    build_gpt2,
    forward_backward,
    gpt2_config,
    markdown_table,
    markov_sequences,
    median_seconds,
    pearson,
    publish,
    spearman,
    train_briefly,
)

from infkit import Analysis, tasks  # noqa: E402
from infkit.cache import format_bytes  # noqa: E402

LENGTH = 32
QUERIES = 8
MODELS = {"tiny": dict(width=64, layers=2, heads=4), "wide": dict(width=256, layers=4, heads=8)}


def model_for(name: str):
    spec = MODELS[name]
    model = build_gpt2(gpt2_config(width=spec["width"], layers=spec["layers"], heads=spec["heads"],
                                   positions=LENGTH), seed=0)
    train_briefly(model, markov_sequences(512, 256, LENGTH, seed=1), steps=60)
    return model


def quality(projected: torch.Tensor, full: torch.Tensor) -> tuple[float, float, float]:
    """Mean over queries of Pearson, Spearman and top-10 overlap against the full scores."""
    rows = list(zip(projected, full))
    top = [len(set(p.topk(10).indices.tolist()) & set(f.topk(10).indices.tolist())) / 10 for p, f in rows]
    return (statistics.mean(pearson(p, f) for p, f in rows), statistics.mean(spearman(p, f) for p, f in rows),
            statistics.mean(top))


def run(model_name: str, model, estimator: str, train, queries, ranks, budget) -> list[list[str]]:
    floor = median_seconds(lambda k: forward_backward(model, queries[k]), len(queries))
    rows = []
    reference = None
    for rank in [None, *ranks]:
        if rank:
            options = dict(store="projected", projection=rank, memory_budget=budget)
        else:  # the reference: the full store where it fits the budget, else streaming (the same full scores)
            full_bytes = Analysis(model, tasks.CausalLM(), train, estimator=estimator, progress=False,
                                  store="stream").plan().train_cache_bytes
            options = dict(store="full", memory_budget=budget) if full_bytes <= budget else dict(store="stream")
        an = Analysis(model, tasks.CausalLM(), train, estimator=estimator, batch_size=32, progress=False, **options)
        plan = an.plan()
        start = time.perf_counter()
        an.fit()
        fit_seconds = time.perf_counter() - start
        an.scores([queries[-1]])  # warm-up
        repeats = 1 if an.store.kind == "stream" else len(queries)
        latency = median_seconds(lambda k, an=an: an.scores([queries[k]]), repeats)
        scores = an.scores(queries).scores
        if rank is None:
            reference = scores
            stored = "full" if an.store.kind == "full" else "none: streamed (full store above the budget)"
            measured = ["1", "1", "1"]
        else:
            stored = f"projected k={rank}"
            measured = [f"{v:.3f}" for v in quality(scores, reference)]
        rows.append([f"{model_name} ({an.n_params:,} params)", estimator, f"{len(train):,}", stored,
                     format_bytes(plan.store.bytes if rank else plan.train_cache_bytes),
                     f"{plan.train_cache_bytes / max(plan.store.bytes, 1):,.0f}x" if rank else "-",
                     f"{fit_seconds:.1f}", f"{latency * 1e3:.0f} ({latency / floor:.1f}x)", *measured])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,wide")
    parser.add_argument("--n", default="4000,16000,64000")
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget of the full store")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    ranks = [int(k) for k in args.ranks.split(",")]
    queries = markov_sequences(QUERIES, 256, LENGTH, seed=4)
    rows = []
    for model_name in args.models.split(","):
        model = model_for(model_name)
        for n in [int(v) for v in args.n.split(",")]:
            train = markov_sequences(n, 256, LENGTH, seed=3)
            for estimator in ("ekfac", "datainf") if model_name == "tiny" else ("ekfac",):
                budget = int(args.budget_gib * 2**30)
                # DataInf's full reference keeps every gradient twice (its factors and the store): skip it above
                if estimator == "datainf" and 2 * Analysis(model, tasks.CausalLM(), train, estimator="datainf",
                                                           progress=False, store="stream").plan().train_cache_bytes \
                        > budget:
                    print(f"skipped: datainf at n={n} (its full reference does not fit {args.budget_gib} GiB)")
                    continue
                rows += run(model_name, model, estimator, train, queries, ranks, budget)
    header = ["model", "estimator", "n train", "store", "store bytes", "smaller by", "fit + store (s)",
              "warm query, ms (x fwd+bwd)", "Pearson", "Spearman", "top-10 overlap"]
    text = (f"# Compressed train-side store: GPT-2 on Markov sequences of {LENGTH} tokens, vocab 256, "
            f"{torch.get_num_threads()} threads; quality = mean over {QUERIES} queries against the full scores\n\n"
            + markdown_table(header, rows) + "\n")
    publish(text, "store")


if __name__ == "__main__":
    main()
