"""EK-FAC with k sampled labels per example (``fisher_samples=k``): agreement with the exact GGN, LDS, and cost.

    .venv/bin/python benchmarks/fisher_samples.py              # about a minute on 2 cores
    .venv/bin/python benchmarks/fisher_samples.py --seeds 10

Model: the digits MLP of the tests (64-12-10 tanh, float64, 160 train examples), 20 held-out queries. For each
damping λ, each k in 1 / 4 / 16 and each seed: EK-FAC (sampled Fisher, independent draws per pass) against the
exact damped GGN solve at the same λ (mean Pearson over queries), its LDS (60 subsets of half the train data,
each retrained from the same initialisation; the same retrained models for every estimator) and its fit time.
Mean ± standard deviation over the seeds. Writes bench-output/fisher_samples.md too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the digits MLP lives with the tests

from _common import publish  # noqa: E402
from helpers import digits_mlp  # noqa: E402

from infkit import Analysis, tasks  # noqa: E402
from infkit.metrics import lds_from_measurements, lds_subsets  # noqa: E402

N_TRAIN, N_QUERY, HIDDEN = 160, 20, 12


def retrained_losses(train, queries, subsets) -> np.ndarray:
    """[n_subsets, n_query] query losses of the MLP retrained (same initialisation and steps) on each subset."""
    x = torch.stack([ex[0] for ex in train])
    y = torch.stack([ex[1] for ex in train])
    qx = torch.stack([ex[0] for ex in queries])
    qy = torch.stack([ex[1] for ex in queries])
    rows = []
    for subset in subsets:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        idx = torch.as_tensor(subset)
        for _ in range(80):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            rows.append(nn.functional.cross_entropy(model(qx), qy, reduction="none").numpy())
    return np.stack(rows)


def mean_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--samples", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--damping", type=float, nargs="*", default=[1e-3, 1e-2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, train, _ = digits_mlp(n_train=N_TRAIN, n_query=N_QUERY)
    _, _, queries = digits_mlp(n_train=N_TRAIN, n_query=N_QUERY)
    subsets = lds_subsets(N_TRAIN, n_subsets=60, fraction=0.5, seed=0)
    measured = retrained_losses(train, queries, subsets)
    task = tasks.Classification()
    lines = [f"## EK-FAC with k sampled labels per example: digits MLP, {N_TRAIN} train, {N_QUERY} held-out queries, "
             f"{args.seeds} seeds", "",
             "| λ | k | Pearson vs exact GGN | LDS | LDS of exact | fit seconds |", "|---|---|---|---|---|---|"]
    for damping in args.damping:
        exact = Analysis(model, task, train, estimator="exact", damping=damping, progress=False).fit()
        exact_scores = exact.scores(queries).scores
        exact_lds = lds_from_measurements(exact_scores, subsets, measured).mean
        for k in args.samples:
            pearsons, ldss, seconds = [], [], []
            for seed in range(args.seeds):
                an = Analysis(model, task, train, estimator="ekfac", damping=damping, seed=seed, fisher_samples=k,
                              batch_size=32, progress=False)
                start = time.perf_counter()
                an.fit()
                seconds.append(time.perf_counter() - start)
                scores = an.scores(queries).scores
                pearsons.append(mean_pearson(scores.double(), exact_scores.double()))
                ldss.append(lds_from_measurements(scores, subsets, measured).mean)
            lines.append(f"| {damping:g} | {k} | {spread(pearsons)} | {spread(ldss)} | {exact_lds:.3f} | "
                         f"{statistics.mean(seconds):.3f} |")
            print(lines[-1], flush=True)
    publish("\n".join(lines), "fisher_samples")


if __name__ == "__main__":
    main()
