"""One process against several (torchrun, gloo on 127.0.0.1), side by side in one run: the same analysis of the
same model and data, fitted and scored by 1 and by 2 processes.

Per world size and estimator: fit + store time (the slowest rank), one scores() call for 8 queries, the peak
memory of each rank above its baseline (the model and data loaded), the speed-up and parallel efficiency against
one process (speed-up / world size), and the largest difference of the scores from the one-process scores. Every
rank uses one thread (``torch.set_num_threads(1)``), so W processes use W cores: on a machine with 2 cores the
ideal is 2x, and the passes' Python overhead, the factor all-reduces and the eigendecompositions (done by every
rank) keep it below.

Model: the GPT-2 of the store benchmark ("tiny": 2 blocks, width 64, vocab 256, 32 tokens, trained briefly on
Markov sequences), n = 16,000 train sequences by default; EK-FAC (sampled Fisher, a projected store of 16 x 16 per
layer, so the store is the same for both world sizes) and DataInf (empirical Fisher, its stacked gradients sharded).

    .venv/bin/python benchmarks/distributed.py --n 16000

Writes bench-output/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  # noqa: E402
    build_gpt2,
    gpt2_config,
    markdown_table,
    markov_sequences,
    peak_rss_mb,
    publish,
    reset_peak_rss,
    rss_mb,
    train_briefly,
)

LENGTH = 32
QUERIES = 8
CASES = {
    "ekfac": dict(estimator="ekfac", store="projected", projection=16),
    "datainf": dict(estimator="datainf"),
}


def setting(n: int):
    """The model (the same weights on every rank: seeded), train data and queries."""
    torch.manual_seed(0)
    model = build_gpt2(gpt2_config(width=64, layers=2, heads=4, positions=LENGTH), seed=0)
    train_briefly(model, markov_sequences(512, 256, LENGTH, seed=1), steps=60)
    return model, markov_sequences(n, 256, LENGTH, seed=2), markov_sequences(QUERIES, 256, LENGTH, seed=3)


def rank_job(out: Path, n: int, case: str) -> None:
    """Inside torchrun: fit and score one case, rank 0 writes the scores, every rank its timings and memory."""
    import warnings

    import torch.distributed as dist

    from infkit import Analysis, tasks

    warnings.filterwarnings("ignore", message="datainf is designed for LoRA")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, train, queries = setting(n)
    reset_peak_rss()
    baseline = rss_mb()
    an = Analysis(model, tasks.CausalLM(), train, batch_size=64, progress=False, **CASES[case])
    dist.barrier()
    start = time.perf_counter()
    an.fit()
    dist.barrier()
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = an.scores(queries).scores
    dist.barrier()
    score_seconds = time.perf_counter() - start
    record = {"fit": fit_seconds, "scores": score_seconds, "peak_mb": peak_rss_mb() - baseline,
              "store_mb": an.cache.bytes["train_side"] / 2**20, "factors_mb": an.cache.bytes["factors"] / 2**20,
              "n_local": len(an.shard)}
    (out / f"{case}-w{world}-rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(scores, out / f"{case}-w{world}.pt")
    dist.destroy_process_group()


def launch(out: Path, n: int, case: str, world: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               __file__, "--rank-job", str(out), "--n", str(n), "--case", case]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16000)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rank-job", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job is not None:
        return rank_job(args.rank_job, args.n, args.case)
    out = Path("bench-output") / "distributed-runs"
    out.mkdir(parents=True, exist_ok=True)
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for case in args.cases.split(","):
        for world in worlds:
            launch(out, args.n, case, world)
        one = torch.load(out / f"{case}-w{worlds[0]}.pt")
        base = None
        for world in worlds:
            ranks = [json.loads((out / f"{case}-w{world}-rank{r}.json").read_text()) for r in range(world)]
            fit = max(r["fit"] for r in ranks)
            base = base or fit
            scores = torch.load(out / f"{case}-w{world}.pt")
            difference = float((scores - one).abs().max() / one.abs().max())
            rows.append([case, str(world), f"{fit:.1f}", f"{base / fit:.2f}x", f"{base / fit / world:.0%}",
                         f"{max(r['scores'] for r in ranks):.2f}",
                         " / ".join(f"{r['peak_mb']:.0f}" for r in ranks),
                         " / ".join(f"{r['store_mb'] + r['factors_mb']:.0f}" for r in ranks),
                         f"{difference:.1e}"])
    header = ["estimator", "processes", "fit + store s", "speed-up", "efficiency", "scores() s (8 queries)",
              "peak MiB per rank", "factors + store MiB per rank", "max rel. score difference vs 1 process"]
    table = (f"n = {args.n:,} train sequences of {LENGTH} tokens, tiny GPT-2; one thread per process; "
             f"{os.cpu_count()} CPU cores\n\n" + markdown_table(header, rows))
    publish(table, "distributed")


if __name__ == "__main__":
    main()
