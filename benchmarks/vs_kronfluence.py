"""infkit's EK-FAC side by side with kronfluence's EK-FAC on the same tiny GPT-2, data and settings.

    .venv/bin/python benchmarks/vs_kronfluence.py            # table on stdout and in bench-output/vs_kronfluence.md

Setup (built here, identical for every method): a GPT-2 from a config (2 layers, n_embd 128, 4 heads, 32 positions,
vocab 256, seed 0) trained 80 Adam steps on sequences from a sparse Markov chain; 512 train and 32 query sequences
of length 32 from the same chain.

Matched settings:
  * curvature: empirical Fisher (the data's labels) in both (kronfluence ``use_empirical_fisher=True``);
  * damping: one absolute λ added to every layer's corrected eigenvalues, (Λ + λ), in both. kronfluence's
    ``ScoreArguments.damping_factor`` is absolute when it is a float (``Ekfac.prepare`` in
    ``kronfluence/factor/config.py``: Λ / n_examples, then ``add_(damping_factor)``; only ``None`` means its
    0.1·mean(Λ) heuristic), and infkit's ``damping=<float>`` is the same absolute λ;
  * layers: the 8 linear maps of the two blocks (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), weight and bias
    as one block in both. For kronfluence, which tracks only nn.Linear / nn.Conv2d, a copy of the model has its
    Conv1D modules converted to nn.Linear (weight transposed; the logits are checked to match). lm_head is left
    out of both by default (it is tied to the token embedding, so a hook sees only part of that parameter's
    gradient); ``--lm-head`` tracks it in both;
  * loss: the SUM of next-token NLL over a sequence, as train loss and as measurement, in both. kronfluence
    averages its covariances over tokens and its Λ over examples, as infkit does, and applies no other scaling,
    so the two score matrices are on one scale (the median |score| ratio checks it);
  * batch size 32 everywhere (kronfluence's query batch is all 32 queries, so it streams the train data once);
  * threads: ``torch.set_num_threads(--threads)`` in every worker.

Precision is each library's default: infkit accumulates its factors and rotates in float64; kronfluence in float32
(eigendecomposition in float64).

Timing and memory: each method runs in a fresh worker process (this script with ``--worker``) that loads the
saved model and data, imports its library, then measures
  * fit s   — wall time of the whole fit (infkit: ``Analysis(...).fit()``, which also builds infkit's train-side
              cache when ``cache=True``; kronfluence: ``Analyzer(...)`` + ``fit_all_factors``, which also writes
              its factors to disk, as it always does);
  * score s — wall time of the pairwise scores of 32 queries × 512 train (kronfluence: ``compute_pairwise_scores``
              + ``load_pairwise_scores``);
  * peak MB — the worker's peak resident set size (VmHWM of /proc/self/status) during fit + scoring, minus its
              resident set size just before fitting (after imports, model and data). It counts every byte the
              process touched (tensors, allocator slack, Python objects); freed memory that the allocator keeps
              still counts, which is what the machine has to provide.
``--repeats k`` runs k rounds, each a fresh worker per method, methods interleaved, and reports the fastest
round of each (other load on the machine only ever slows a run down). CPU times (time.process_time) are kept in
the notes as a second view that is less sensitive to that load.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

N_TRAIN, N_QUERY, SEQ_LEN, VOCAB = 512, 32, 32, 256
BATCH = 32
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tracked_names(n_layer: int, lm_head: bool) -> list[str]:
    names = [f"transformer.h.{i}.{suffix}" for i in range(n_layer) for suffix in BLOCK_LAYERS]
    return names + (["lm_head"] if lm_head else [])


# -- the shared setup -------------------------------------------------------------------------------------------
def build_setup(args) -> dict:
    config = C.gpt2_config(vocab=VOCAB, width=128, layers=2, heads=4, positions=SEQ_LEN)
    model = C.build_gpt2(config, seed=0)
    train = C.markov_sequences(N_TRAIN, VOCAB, SEQ_LEN, seed=1)
    query = C.markov_sequences(N_QUERY, VOCAB, SEQ_LEN, seed=2)
    first, last = C.train_briefly(model, train, steps=args.train_steps, seed=0)
    return {
        "config": config.to_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train": torch.stack([d["input_ids"] for d in train]),
        "query": torch.stack([d["input_ids"] for d in query]),
        "train_loss": (first, last),
    }


def load_model(setup: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config.from_dict(setup["config"]))
    model.load_state_dict(setup["state_dict"])
    model.eval()
    return model


def check_conversion(setup: dict) -> float:
    """Max |logit difference| between the GPT-2 and its Conv1D -> nn.Linear copy."""
    model = load_model(setup)
    linear = C.conv1d_to_linear(load_model(setup))
    with torch.no_grad():
        ids = setup["query"][:4]
        return float((model(input_ids=ids).logits - linear(input_ids=ids).logits).abs().max())


# -- workers ----------------------------------------------------------------------------------------------------
class Measure:
    """Wall time, process CPU time and the peak-RSS rise of one fit + scores run in this process."""

    def __init__(self):
        gc.collect()
        self.resettable = C.reset_peak_rss()
        self.rss_start = C.rss_mb()
        self.base = C.rss_mb() if self.resettable else C.peak_rss_mb()
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = {"wall_s": wall - self.wall, "cpu_s": cpu - self.cpu, "peak_mb": C.peak_rss_mb() - self.base}
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return lap

    def report(self, fit: dict, score: dict, **extra) -> dict:
        return {
            "fit_s": fit["wall_s"],
            "score_s": score["wall_s"],
            "fit_cpu_s": fit["cpu_s"],
            "score_cpu_s": score["cpu_s"],
            "fit_peak_mb": fit["peak_mb"],
            "peak_mb": score["peak_mb"],
            "rss_start_mb": self.rss_start,
            "peak_rss_mb": C.peak_rss_mb(),
            **extra,
        }


def run_infkit(setup: dict, args, cache: bool) -> tuple[torch.Tensor, dict]:
    from infkit import Analysis, tasks

    model = load_model(setup)
    train = [{"input_ids": row} for row in setup["train"]]
    query = [{"input_ids": row} for row in setup["query"]]
    options = {}
    if "cache" in inspect.signature(Analysis.__init__).parameters:
        options["cache"] = cache
    elif not cache:
        raise SystemExit("this infkit has no cache= option")
    patterns = tracked_names(model.config.n_layer, args.lm_head)

    measure = Measure()
    an = Analysis(
        model,
        tasks.CausalLM(),
        train,
        estimator="ekfac",
        damping=args.damping,
        batch_size=BATCH,
        seed=0,
        fisher="empirical",
        modules=patterns,
        progress=False,
        **options,
    )
    an.fit()
    fit = measure.lap()
    scores = an.scores(query).scores.detach().clone()
    score = measure.lap()
    if sorted(an.layers) != sorted(patterns):
        raise SystemExit(f"infkit tracked {sorted(an.layers)}, expected {sorted(patterns)}")
    return scores, measure.report(fit, score, timings=dict(getattr(an, "timings", {})))


def run_kronfluence(setup: dict, args) -> tuple[torch.Tensor, dict]:
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    names = tracked_names(setup["config"]["n_layer"], args.lm_head)

    class SummedLMTask(Task):
        """Sum of next-token NLL over each sequence (and over the batch: kronfluence wants a scalar)."""

        def _loss(self, batch, model, sample: bool) -> torch.Tensor:
            ids = batch["input_ids"]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
            flat = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(flat.detach(), dim=-1), 1)[:, 0]
            else:
                targets = ids[:, 1:].reshape(-1)
            return F.cross_entropy(flat, targets, reduction="sum")

        def compute_train_loss(self, batch, model, sample=False):
            return self._loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return self._loss(batch, model, False)

        def get_influence_tracked_modules(self):
            return names

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    train, query = Rows(setup["train"]), Rows(setup["query"])
    task = SummedLMTask()
    model = prepare_model(C.conv1d_to_linear(load_model(setup)), task)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=args.damping)

    with tempfile.TemporaryDirectory(prefix="kronfluence-bench-") as out:
        measure = Measure()
        analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=BATCH,
            factor_args=factor_args,
        )
        fit = measure.lap()
        analyzer.compute_pairwise_scores(  # returns None on a fresh computation: load what it saved
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=N_QUERY,
            per_device_train_batch_size=BATCH,
            score_args=score_args,
        )
        scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].detach().clone()
        score = measure.lap()
    tracked = sorted(n for n, m in model.named_modules() if type(m).__name__ == "TrackedLinear")
    if tracked != sorted(names):
        raise SystemExit(f"kronfluence tracked {tracked}, expected {sorted(names)}")
    return scores, measure.report(fit, score)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    setup = torch.load(Path(args.workdir) / "setup.pt", weights_only=False)
    if args.worker == "kronfluence":
        scores, info = run_kronfluence(setup, args)
    else:
        scores, info = run_infkit(setup, args, cache=args.worker == "infkit")
    info["threads"] = torch.get_num_threads()
    torch.save({"scores": scores, "info": info}, Path(args.workdir) / f"{args.worker}.pt")


# -- the driver -------------------------------------------------------------------------------------------------
METHODS = {
    "infkit": "infkit EK-FAC (train-side cache, default)",
    "infkit-streamed": "infkit EK-FAC (cache=False)",
    "kronfluence": "kronfluence EK-FAC",
}


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def rounded(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


def combine(runs: list[dict]) -> dict:
    """Fastest wall times over the rounds (the run least disturbed by other load), all runs kept for the notes;
    memory from the round with the fastest fit+score (it varies little)."""
    best = dict(min(runs, key=lambda r: r["fit_s"] + r["score_s"]))
    for key in ("fit_s", "score_s", "fit_cpu_s", "score_cpu_s"):
        best[key] = min(r[key] for r in runs)
        best["all_" + key] = [r[key] for r in runs]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    parser.add_argument("--damping", type=float, default=1e-3, help="absolute λ for both libraries")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (methods interleaved); fastest is reported")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--lm-head", action="store_true", help="track lm_head too (in both)")
    parser.add_argument("--methods", default="infkit,infkit-streamed,kronfluence")
    parser.add_argument("--out", default=str(C.OUTPUT_DIR / "vs_kronfluence.md"))
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    torch.set_num_threads(args.threads)
    total_start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    scores: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="vs-kronfluence-") as workdir:
        setup = build_setup(args)
        torch.save(setup, Path(workdir) / "setup.pt")
        logit_diff = check_conversion(setup)
        print(
            f"model trained: loss {setup['train_loss'][0]:.3f} -> {setup['train_loss'][1]:.3f}; "
            f"Conv1D->Linear max |Δlogit| = {logit_diff:.2e}",
            flush=True,
        )
        for round_ in range(args.repeats):
            for method in methods:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--workdir",
                    workdir,
                    "--threads",
                    str(args.threads),
                    "--damping",
                    repr(args.damping),
                ]
                if args.lm_head:
                    cmd.append("--lm-head")
                subprocess.run(cmd, check=True)
                out = torch.load(Path(workdir) / f"{method}.pt", weights_only=False)
                runs[method].append(out["info"])
                if method in scores and not torch.equal(scores[method], out["scores"]):
                    print(
                        f"  note: {method} scores differ between rounds "
                        f"(max {float((scores[method] - out['scores']).abs().max()):.2e})"
                    )
                scores.setdefault(method, out["scores"])
                print(
                    f"  round {round_ + 1}/{args.repeats} {method}: fit {out['info']['fit_s']:.2f} s, "
                    f"scores {out['info']['score_s']:.2f} s",
                    flush=True,
                )
    results = {m: combine(r) for m, r in runs.items()}

    ref = results.get("kronfluence")
    ref_scores = scores.get("kronfluence")
    header = [
        "method",
        "fit s",
        "score s",
        "fit+score s",
        "peak MB",
        "fit ratio",
        "score ratio",
        "fit+score ratio",
        "peak MB ratio",
        "Pearson vs kronfluence",
        "median abs score",
    ]
    rows = []
    for method, info in results.items():
        total = info["fit_s"] + info["score_s"]
        row = [METHODS[method], fmt(info["fit_s"]), fmt(info["score_s"]), fmt(total), fmt(info["peak_mb"], 0)]
        if ref is not None:
            row += [
                fmt(info["fit_s"] / ref["fit_s"]),
                fmt(info["score_s"] / ref["score_s"]),
                fmt(total / (ref["fit_s"] + ref["score_s"])),
                fmt(info["peak_mb"] / max(ref["peak_mb"], 1e-9)),
                fmt(C.pearson(scores[method], ref_scores), 6),
            ]
        else:
            row += ["–"] * 5
        row.append(f"{float(scores[method].abs().median()):.5g}")
        rows.append(row)
    table = C.markdown_table(header, rows)

    notes = [
        f"Tiny GPT-2 (2 layers, n_embd 128, 4 heads, vocab {VOCAB}), {N_TRAIN} train × {N_QUERY} query sequences of "
        f"length {SEQ_LEN}; EK-FAC, empirical Fisher, absolute damping λ = {args.damping:g} in both, batch {BATCH}, "
        f"torch threads {args.threads}, tracked: "
        f"{'8 block linear layers + lm_head' if args.lm_head else '8 block linear layers (no lm_head)'}.",
        f"Ratios: method / kronfluence (below 1 = faster or smaller). Times: wall clock, fastest of {args.repeats} "
        "rounds, each round a fresh worker process per method, methods interleaved. Peak MB: the worker's peak RSS "
        "(VmHWM) during fit + scores minus its RSS just before fit (after imports, model and data); it includes "
        "allocator slack and infkit's train-side cache.",
        "infkit's fit includes building its train-side cache (one more pass; `timings` below split it); "
        "kronfluence's fit includes writing its factors to a temporary folder, scores include loading them back.",
    ]
    if ref is not None:
        for method in results:
            if method == "kronfluence":
                continue
            a, b = scores[method].double(), ref_scores.double()
            per_query = sum(C.pearson(a[q], b[q]) for q in range(a.shape[0])) / a.shape[0]
            top = sum(
                len(set(a[q].topk(10).indices.tolist()) & set(b[q].topk(10).indices.tolist()))
                for q in range(a.shape[0])
            ) / (10 * a.shape[0])
            rel = float((a - b).norm() / b.norm())
            notes.append(
                f"{METHODS[method]} vs kronfluence: median |score| ratio "
                f"{float(a.abs().median() / b.abs().median()):.5f}; Spearman {C.spearman(a, b):.5f}; "
                f"mean per-query Pearson {per_query:.6f}; top-10 proponent overlap {top:.3f}; "
                f"relative Frobenius difference {rel:.2e}."
            )
    for method, info in results.items():
        extra = ""
        if info.get("timings"):
            timings = {k: round(v, 2) for k, v in info["timings"].items()}
            extra = f"; infkit timings (fastest round) {json.dumps(timings)}"
        notes.append(
            f"{method}: fit wall {rounded(info['all_fit_s'])} s, scores wall {rounded(info['all_score_s'])} s; "
            f"fit CPU {rounded(info['all_fit_cpu_s'])} s, scores CPU {rounded(info['all_score_cpu_s'])} s; "
            f"fit-only peak {info['fit_peak_mb']:.0f} MB; RSS before fit {info['rss_start_mb']:.0f} MB, "
            f"absolute peak {info['peak_rss_mb']:.0f} MB{extra}."
        )
    report = table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print()
    print(report)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/vs_kronfluence.py " + " ".join(sys.argv[1:])
    out_path.write_text(f"# infkit vs kronfluence (EK-FAC)\n\n`{command.strip()}`\n\n" + report)
    print(f"written to {out_path} (total {time.perf_counter() - total_start:.0f} s)")


if __name__ == "__main__":
    main()
