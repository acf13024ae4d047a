"""Re-query latency with a warm train-side cache, against one forward+backward of the query alone.

For each model: fit once on n = 2,000 train sequences, then time ``an.scores([new_query])`` (median of several
runs, each query new), the same with the cache disabled (the train data streamed again), and a plain
forward+backward of that query through the model (the floor). Also: cache bytes, the time to save and to load
the analysis, and the fit time. Prints a markdown table and writes bench-output/requery.md.

Run: .venv/bin/python benchmarks/requery.py  (about 2-4 minutes on 2 cores)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    OUTPUT_DIR,
    build_gpt2,
    forward_backward,
    gpt2_config,
    markdown_table,
    markov_sequences,
    median_seconds,
    train_briefly,
)

from infkit import Analysis, tasks  # noqa: E402
from infkit.cache import format_bytes  # noqa: E402

N_TRAIN = 2000
LENGTH = 32
REPEATS = 7


def lora_model(width: int):
    from peft import LoraConfig, get_peft_model

    base = build_gpt2(gpt2_config(width=width), seed=0)
    train_briefly(base, markov_sequences(512, 256, LENGTH, seed=1), steps=60)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.0))
    train_briefly(model, markov_sequences(512, 256, LENGTH, seed=2), steps=30)
    return model


def full_model(width: int):
    model = build_gpt2(gpt2_config(width=width), seed=0)
    train_briefly(model, markov_sequences(512, 256, LENGTH, seed=1), steps=60)
    return model


def measure(label: str, model, estimator: str, train, queries) -> list[str]:
    an = Analysis(model, tasks.CausalLM(), train, estimator=estimator, batch_size=32, progress=False)
    start = time.perf_counter()
    an.fit()
    fit_seconds = time.perf_counter() - start
    an.scores([queries[-1]])  # warm-up
    cached = median_seconds(lambda k: an.scores([queries[k]]), REPEATS)
    floor = median_seconds(lambda k: forward_backward(model, queries[k]), REPEATS)
    train_side = an.cache.train_side
    an.cache.train_side = None  # the same fitted analysis, streaming the train data instead
    streamed = median_seconds(lambda k: an.scores([queries[k]]), repeats=2)
    an.cache.train_side = train_side
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        an.save(Path(folder) / "saved")
        save_seconds = time.perf_counter() - start
        start = time.perf_counter()
        loaded = Analysis.load(Path(folder) / "saved", model, tasks.CausalLM(), train, progress=False)
        load_seconds = time.perf_counter() - start
    reloaded, original = loaded.scores([queries[0]]).scores, an.scores([queries[0]]).scores
    assert (reloaded - original).abs().max() <= 1e-5 * original.abs().max(), "save/load changed the scores"
    return [
        label,
        f"{an.n_params:,}",
        format_bytes(an.cache.bytes["train_side"]),
        f"{floor * 1e3:.1f}",
        f"{cached * 1e3:.1f}",
        f"**{cached / floor:.1f}x**",
        f"{streamed:.2f} s ({streamed / floor:.0f}x)",
        f"{fit_seconds:.1f}",
        f"{save_seconds:.2f} / {load_seconds:.2f}",
    ]


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train = markov_sequences(N_TRAIN, 256, LENGTH, seed=3)
    queries = markov_sequences(REPEATS + 1, 256, LENGTH, seed=4)
    rows = []
    for width in (32, 64):
        rows.append(measure(f"full GPT-2 w{width}, EK-FAC", full_model(width), "ekfac", train, queries))
        print(rows[-1], flush=True)
    for width in (64, 128):
        rows.append(measure(f"LoRA r=4 GPT-2 w{width}, DataInf", lora_model(width), "datainf", train, queries))
        print(rows[-1], flush=True)
    header = [
        "model, estimator", "tracked params", "train cache", "fwd+bwd of query (ms)", "re-query, cache warm (ms)",
        "ratio", "re-query, cache off", "fit (s)", "save / load (s)",
    ]
    table = markdown_table(header, rows)
    text = (
        f"# Re-query latency: {N_TRAIN} train sequences of {LENGTH} tokens, 2-layer GPT-2, vocab 256, "
        f"{torch.get_num_threads()} threads\n\n{table}\n\nratio = re-query with the cache warm / one forward+backward "
        "of the query alone (the floor). Aim: <= 2 for DataInf on LoRA, <= 4 for full EK-FAC.\n"
    )
    print(text)
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / "requery.md").write_text(text)


if __name__ == "__main__":
    main()
