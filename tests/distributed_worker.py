"""The ranks of the torch.distributed tests (tests/test_distributed.py): each is a fresh process (spawned, gloo on
127.0.0.1) that builds the same analyses as one process would and writes what it computed to a file."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
from helpers import structured_sequences, tiny_gpt2

from infkit import Analysis, tasks

VOCAB = 24
TRAIN = structured_sequences(23, VOCAB, 10, seed=5, min_length=6)  # 23: shards of 12 and 11 on two ranks
QUERIES = structured_sequences(4, VOCAB, 10, seed=99)
MODULES = "transformer.h.1.*"

#: name -> Analysis options; every case is fitted and scored the same way with one process and with several
CASES = {
    "ekfac": {},  # the sampled Fisher: labels seeded per example
    "ekfac-empirical": {"fisher": "empirical"},  # the fit fills the store
    "kfac": {"estimator": "kfac"},
    "datainf": {"estimator": "datainf"},
    "identity": {"estimator": "identity"},
    # a well-conditioned solve: its heuristic λ here amplifies the last bits that batch padding changes (shards
    # batch other examples together) to 3e-5 of the scores, in one process as in several
    "exact": {"estimator": "exact", "fisher": "empirical", "damping": 0.1},
    "lissa": {"estimator": "lissa", "depth": 40, "minibatch": 8},
    "ekfac-projected": {"store": "projected", "projection": 4},
    "datainf-projected": {"estimator": "datainf", "store": "projected", "projection": 4},
    "ekfac-disk": {"fisher": "empirical", "store": "projected", "projection": 4, "store_dir": "STORE"},
    "ekfac-stream": {"store": "stream"},
    # streamed self-influence preconditions with every rank's rows: 2 batches on rank 0, 1 on rank 1
    "datainf-stream": {"estimator": "datainf", "store": "stream", "batch_size": 11},
    "ekfac-ddp": {"ddp": True},  # the model as a DDP training job wraps it (one process: as it is)
}


#: cases saved and loaded again in the same job (each rank its shard)
SAVED = ("ekfac-empirical", "datainf", "ekfac-disk")


def build(model, name: str, store_root: str, **extra) -> Analysis:
    options = dict(CASES[name])
    if options.pop("ddp", False) and torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    if options.get("store_dir") == "STORE":
        options["store_dir"] = os.path.join(store_root, name)
    return Analysis(model, tasks.CausalLM(), TRAIN, modules=MODULES, progress=False, **options, **extra)


def results(an: Analysis) -> dict[str, torch.Tensor]:
    """What a test compares: scores, self-influence, the top proponents, a token split."""
    an.fit()
    res = an.scores(QUERIES)
    tops = an.top(QUERIES, k=3)
    last = len(TRAIN) - 1  # on the last rank's shard
    tokens = an.token_scores(1, last, res)
    return {
        "scores": res.scores.double(),
        "self_influence": an.self_influence().double(),
        "top": torch.tensor([t.proponents.indices[:3] + [-1] * (3 - len(t.proponents.indices)) for t in tops]),
        "token_sum": tokens.values.sum().reshape(1),
        "token_score": res.scores[1, last].double().reshape(1),
    }


def single_process(store_root: str) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_gpt2()
    return {name: results(build(model, name, store_root)) for name in CASES}


def rank_main(rank: int, world: int, port: int, out: str, mode: str) -> None:
    """One rank: ``mode`` "equal" runs every case; "killed" / "hung": rank 1 dies or stalls before the fit."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20 if mode == "equal" else 6))
    try:
        model = tiny_gpt2()
        if mode == "equal":
            computed = {}
            for name in CASES:
                an = build(model, name, os.path.join(out, "stores"))
                computed[name] = results(an)
                if name in SAVED:
                    saved = an.save(os.path.join(out, "saves", name))
                    loaded = Analysis.load(saved, model, tasks.CausalLM(), TRAIN, progress=False)
                    computed[name]["loaded_scores"] = loaded.scores(QUERIES).scores.double()
            torch.save(computed, os.path.join(out, f"rank{rank}.pt"))
        elif mode == "other-data":
            data = TRAIN if rank == 0 else TRAIN[::-1]
            Analysis(model, tasks.CausalLM(), data, modules=MODULES, progress=False)
        else:
            an = build(model, "ekfac", out)
            if rank == 1:
                if mode == "killed":
                    os._exit(3)
                time.sleep(60)  # hung: never reaches the fit's first collective
                return
            start = time.perf_counter()
            try:
                an.fit()
            finally:
                with open(os.path.join(out, "seconds"), "w") as f:
                    f.write(f"{time.perf_counter() - start:.1f}")
    except Exception:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if mode == "equal":
            dist.destroy_process_group()
