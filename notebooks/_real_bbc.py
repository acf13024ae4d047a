"""Builders for notebook 08 (DataInf's mislabel detection, Fig. 2, on real text): a seeded, class-balanced split of
BBC News with 20% of the training labels flipped, a LoRA classifier on the pretrained all-MiniLM-L6-v2 encoder,
its deterministic fine-tuning, and the per-estimator measurement.

Nothing here computes influence itself: :func:`measure` calls infkit's public API (``Analysis``) and
``infkit.metrics``. Everything is seeded and single-threaded, so the notebook's outputs are reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from infkit import Analysis, tasks
from infkit.demo.real import BBC_CLASSES, bbc_news, minilm_classifier


# -- 1. the data -----------------------------------------------------------------------------------------------------
@dataclass
class Split:
    texts: list[str]  # title + start of the body
    labels: np.ndarray  # the labels trained on (flipped where ``flipped``)
    true_labels: np.ndarray  # the articles' own labels
    flipped: np.ndarray  # bool, True where the label was changed
    paths: list[str]  # "<class>/<file>" of each article


def make_splits(n_train: int, n_val: int, flip: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """``n_train`` train and ``n_val`` validation articles, each balanced across the 5 classes (n // 5 per class),
    drawn without overlap (seeded); then ``flip`` of the train labels (exactly round(flip · n_train) points, chosen
    at random) are changed to another class drawn uniformly among the other four. Validation labels stay clean.
    Train examples are shuffled so that classes are interleaved."""
    articles = bbc_news()
    rng = np.random.default_rng(seed)
    labels = np.array([a.label for a in articles])
    per_train, per_val = n_train // len(BBC_CLASSES), n_val // len(BBC_CLASSES)
    picks: dict[str, list[int]] = {"train": [], "val": []}
    for label in range(len(BBC_CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        picks["train"] += members[:per_train]
        picks["val"] += members[per_train : per_train + per_val]
    splits = []
    for name in ("train", "val"):
        order = rng.permutation(np.asarray(picks[name]))
        chosen = [articles[i] for i in order]
        true = np.array([a.label for a in chosen])
        noisy, flipped = true.copy(), np.zeros(len(chosen), dtype=bool)
        if name == "train":
            flipped[rng.choice(len(chosen), int(round(flip * len(chosen))), replace=False)] = True
            shift = rng.integers(1, len(BBC_CLASSES), int(flipped.sum()))
            noisy[flipped] = (true[flipped] + shift) % len(BBC_CLASSES)
        texts = [f"{a.title}. {a.text}" for a in chosen]
        splits.append(Split(texts, noisy, true, flipped, [a.path for a in chosen]))
    return splits[0], splits[1]


def encode(tokenizer, split: Split, max_length: int) -> list[dict]:
    """Examples for ``infkit.tasks.Classification``: input_ids, attention_mask (padded to ``max_length``, the text
    truncated to it) and the (noisy) label."""
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(split.labels[i])}
        for i in range(len(split.texts))
    ]


# -- 2. the model ----------------------------------------------------------------------------------------------------
def lora_minilm(r: int = 4, seed: int = 0):
    """all-MiniLM-L6-v2 with a fresh 5-class head (seeded) and a peft LoRA adapter (task SEQ_CLS, rank ``r`` on
    every attention query and value, alpha 2r, no dropout); the classifier head is trainable as a
    ``modules_to_save`` copy. Returns ``(model, tokenizer)``."""
    from peft import LoraConfig, TaskType, get_peft_model

    base, tokenizer = minilm_classifier(num_labels=len(BBC_CLASSES), seed=seed)
    base.config.hidden_dropout_prob = 0.0
    for module in base.modules():  # no dropout anywhere: fine-tuning and gradients are deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(seed)  # peft draws LoRA A from the global generator
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r, target_modules=["query", "value"],
                        lora_dropout=0.0)
    return get_peft_model(base, config), tokenizer


def batch_of(examples: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in examples[0]}


def fine_tune(model, examples: list[dict], epochs: int, lr: float, batch_size: int = 16, seed: int = 0) -> list[float]:
    """Adam on the mean cross-entropy, mini-batches in a seeded random order; returns the mean loss per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = batch_of([examples[i] for i in order[start : start + batch_size]])
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch["labels"])
        losses.append(total / len(examples))
    for p in params:
        p.grad = None
    model.eval()
    return losses


@torch.no_grad()
def batched_logits(model, examples: list[dict], batch_size: int = 50):
    """(batch, logits) for consecutive batches of the examples, without gradients."""
    for start in range(0, len(examples), batch_size):
        batch = batch_of(examples[start : start + batch_size])
        yield batch, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def predict(model, examples: list[dict]) -> np.ndarray:
    return torch.cat([logits.argmax(-1) for _, logits in batched_logits(model, examples)]).numpy()


def tracked_layers(an: Analysis) -> list[list]:
    """Rows (layer, kind, shape, parameters) of what an analysis tracks, LoRA matrices summed per kind."""
    rows = []
    lora = [(n, layer) for n, layer in an.layers.items() if n not in an.ordinary_layers]
    for kind in ("lora_A", "lora_B"):
        group = [layer for n, layer in lora if f".{kind}." in n]
        if group:
            shapes = sorted({(layer.d_out, layer.d_in) for layer in group})
            rows.append([f"{len(group)} x {kind} (query, value; 6 layers)", "LoRA",
                         " / ".join(f"{o} x {i}" for o, i in shapes), f"{sum(layer.n_params for layer in group):,}"])
    for name, why in an.ordinary_layers.items():
        layer = an.layers[name]
        rows.append([name, why, f"{layer.d_out} x {layer.d_in}", f"{layer.n_params:,}"])
    return rows


# -- 3. the measurement ----------------------------------------------------------------------------------------------
def example_losses(model, examples: list[dict]) -> np.ndarray:
    """Each train example's cross-entropy under its (noisy) label: the no-influence baseline for the ranking."""
    return torch.cat([torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                      for batch, logits in batched_logits(model, examples)]).numpy()


@dataclass
class Measured:
    name: str
    val_scores: np.ndarray  # [n_val, n_train] influence of each train point on each validation loss
    val_total: np.ndarray  # [n_train] influence on the validation loss, summed over the queries
    val_head: np.ndarray  # the same, from the classifier head (modules_to_save) alone
    val_lora: np.ndarray  # the same, from the LoRA matrices alone
    self_influence: np.ndarray  # [n_train]
    t_fit: float  # seconds: fit (curvature + train-side cache)
    t_val: float  # seconds: scores of the validation queries
    t_self: float  # seconds: self-influence
    damping: dict  # λ per layer, as used
    info: dict  # the result's info (fisher, adapters, ordinary layers, what is tracked)


def measure(name: str, model, train: list[dict], val: list[dict], batch_size: int = 25, **options) -> Measured:
    """Fit one estimator on the noisy train set, score the validation queries and the self-influence; every
    estimator uses the empirical Fisher (the data's labels, as DataInf's formula does) unless ``options`` say
    otherwise, and its own damping heuristic."""
    options = {"fisher": "empirical", **options}
    an = Analysis(model, tasks.Classification(), train, batch_size=batch_size, progress=False, **options)
    start = time.perf_counter()
    an.fit()
    t_fit = time.perf_counter() - start
    start = time.perf_counter()
    res = an.scores(val)
    t_val = time.perf_counter() - start
    start = time.perf_counter()
    self_influence = an.self_influence().double().numpy()
    t_self = time.perf_counter() - start
    head = list(res.info["ordinary_layers"])
    by_layer = {n: s.double().sum(dim=0).numpy() for n, s in res.per_layer.items()}
    val_head = sum(by_layer[n] for n in head)
    val_lora = sum(v for n, v in by_layer.items() if n not in head)
    scores = res.scores.double().numpy()
    return Measured(name, scores, scores.sum(axis=0), val_head, val_lora, self_influence, t_fit, t_val,
                    t_self, dict(res.damping), dict(res.info))


def auc_interval(suspicion: np.ndarray, flipped: np.ndarray, draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the ROC AUC of ``suspicion`` (higher = more suspicious), resampling train points
    (seeded)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(flipped), len(flipped))
        if flipped[pick].any() and not flipped[pick].all():
            values.append(roc_auc_score(flipped[pick], suspicion[pick]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def table(header: list[str], rows: list[list]) -> str:
    """A fixed-width text table whose last column is left free (not padded, no width taken from it): timings go
    there, so that the notebook sanitizer's TIME replacement leaves the same text whatever the digits."""
    cells = [[str(c) for c in header[:-1]]] + [[str(c) for c in row[:-1]] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]

    def line(r: list[str], last: str) -> str:
        return "  ".join([c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))] + [last])

    lines = [line(cells[0], header[-1]), line(["-" * w for w in widths], "-" * len(header[-1]))]
    lines += [line(r, str(row[-1])) for r, row in zip(cells[1:], rows)]
    return "\n".join(x.rstrip() for x in lines)
