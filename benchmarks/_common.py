"""Shared pieces of the side-by-side benchmarks: a tiny GPT-2 trained from a config (no download), token data
with learnable structure, GPT-2 Conv1D -> nn.Linear conversion for peers that only know nn.Linear, process memory
readings, and small statistics / table helpers.

Not a benchmark itself (``make bench`` runs every ``benchmarks/*.py``; running this file does nothing).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
OUTPUT_DIR = REPO / "bench-output"


# -- model and data -------------------------------------------------------------------------------------------
def markov_sequences(n: int, vocab: int, length: int, seed: int, chain_seed: int = 1234) -> list[dict]:
    """Sequences from a fixed sparse Markov chain: every token has 4 likely successors (probabilities .55, .25,
    .12, .08). The chain is fixed by ``chain_seed``; ``seed`` draws the sequences. A model learns it quickly but
    not perfectly, so per-example gradients stay varied and non-trivial."""
    chain = torch.Generator().manual_seed(chain_seed)
    successors = torch.stack([torch.randperm(vocab, generator=chain)[:4] for _ in range(vocab)])  # [V, 4]
    probs = torch.tensor([0.55, 0.25, 0.12, 0.08])
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        choice = torch.multinomial(probs.expand(n, 4), 1, generator=g)[:, 0]
        ids[:, t] = successors[ids[:, t - 1], choice]
    return [{"input_ids": row.clone()} for row in ids]


def gpt2_config(vocab: int = 256, width: int = 128, layers: int = 2, heads: int = 4, positions: int = 32):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
    )


def build_gpt2(config, seed: int = 0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def train_briefly(model, data: list[dict], steps: int = 80, batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
    """A few Adam steps on mean token NLL; returns (first loss, last loss). Leaves the model in eval mode."""
    ids = torch.stack([d["input_ids"] for d in data])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch_size,), generator=g)
        opt.zero_grad()
        loss = model(input_ids=ids[idx], labels=ids[idx]).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    for p in model.parameters():
        p.grad = None
    return losses[0], losses[-1]


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers ``Conv1D`` (weight [in, out]) by an ``nn.Linear`` with the transposed weight, in
    place: same outputs, a module type that peers such as kronfluence can track."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.to(module.weight.device, module.weight.dtype)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], linear)
    return model


# -- timing -----------------------------------------------------------------------------------------------------
def median_seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``fn(k)`` for k = 0 .. repeats - 1 (each call may use a new input)."""
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(model, query) -> None:
    """One forward+backward of a causal-LM query through the model alone: the floor of a re-query."""
    ids = query["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
    model.zero_grad(set_to_none=True)


# -- memory -----------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB): VmHWM, which ``reset_peak_rss`` can lower; falls back
    to ru_maxrss (never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- statistics and tables --------------------------------------------------------------------------------------
def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def ranks(v):
        v = v.double().flatten()
        r = torch.empty_like(v)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    return pearson(ranks(x), ranks(y))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # `make bench` runs every benchmarks/*.py; this one is a library
    pass


def publish(table: str, name: str) -> None:
    """Print a benchmark's markdown table and write it to bench-output/<name>.md."""
    print(table)
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / f"{name}.md").write_text(table + "\n")
