"""Builders for notebook 07 (DataInf's sentence-transformation experiment on SmolLM2-135M): the generated
transformation classes, LoRA fine-tuning, teacher-forced evaluation, and the per-estimator measurement.

Nothing here computes influence itself; :func:`measure` calls infkit's public API (``Analysis``) and
``infkit.metrics``. Everything is seeded and single-threaded, so the notebook's outputs are reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from infkit import Analysis, tasks
from infkit.metrics import class_auc, class_recall

# -- 1. the transformation classes ---------------------------------------------------------------------------------
WORDS = (
    "cat dog sun red box hat pen cup map egg fox bed car bus key sky tree fish bird milk rain star book lamp door "
    "ship moon ring cake leaf"
).split()


def _mask_vowels(words: list[str]) -> list[str]:
    return ["".join("*" if ch in "aeiou" else ch for ch in w) for w in words]


#: name shown in the prompt -> the transformation of a list of words
TRANSFORMS = {
    "Reverse": lambda w: w[::-1],
    "Uppercase": lambda w: [x.upper() for x in w],
    "Capitalize": lambda w: [x.capitalize() for x in w],
    "Double": lambda w: [x for x in w for _ in range(2)],
    "Sort": lambda w: sorted(w),
    "Initials": lambda w: [x[0] for x in w],
    "Drop first": lambda w: w[1:],
    "Drop last": lambda w: w[:-1],
    "Rotate": lambda w: w[1:] + w[:1],
    "Mask vowels": _mask_vowels,
}
CLASSES = list(TRANSFORMS)


def example(name: str, words: list[str]) -> dict:
    """One prompt/completion pair: ``"<name>: w1 w2 w3 w4\\nAnswer:"`` -> ``" <transformed words>"``."""
    return {"prompt": f"{name}: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(TRANSFORMS[name](words))}


@dataclass
class Split:
    examples: list[dict]  # prompt/completion dicts
    labels: np.ndarray  # class index per example


def make_data(n_train: int, n_test: int, n_words: int = 4, seed: int = 0) -> tuple[Split, Split]:
    """``n_train`` train and ``n_test`` test prompts per class, each on its own sentence of ``n_words`` distinct
    words drawn (seeded) from :data:`WORDS`; no sentence is used twice. Train examples are interleaved by class."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, ...]] = set()

    def sentence() -> list[str]:
        while True:
            words = tuple(WORDS[i] for i in rng.choice(len(WORDS), n_words, replace=False))
            if words not in seen:
                seen.add(words)
                return list(words)

    splits = []
    for per_class in (n_train, n_test):
        examples, labels = [], []
        for _ in range(per_class):
            for label, name in enumerate(CLASSES):
                examples.append(example(name, sentence()))
                labels.append(label)
        splits.append(Split(examples, np.array(labels)))
    return splits[0], splits[1]


def as_text(split: Split) -> Split:
    """The same examples as plain strings (prompt + completion), so that every token is labelled: the train loss
    and the query measurement then cover the prompt too."""
    return Split([ex["prompt"] + ex["completion"] for ex in split.examples], split.labels)


# -- 2. LoRA fine-tuning and evaluation ----------------------------------------------------------------------------
def add_lora(model, r: int = 4, layers: list[int] | None = None, seed: int = 0):
    """peft LoRA rank r (alpha 2r, no dropout) on q_proj and v_proj of ``layers`` (default: all)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # peft draws LoRA A from the global generator
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        layers_to_transform=layers)
    return get_peft_model(model, config)


def _batches(task, examples: list[dict], batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield task.collate(examples[start : start + batch_size])


def finetune(model, task, train: list[dict], steps: int, batch_size: int = 16, lr: float = 3e-3,
             seed: int = 0) -> list[float]:
    """Adam on the completion loss (mean over the completion tokens of a batch), mini-batches drawn without
    replacement (seeded); returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += list(rng.permutation(len(train)))
        idx, order = order[:batch_size], order[batch_size:]
        batch = task.collate([train[i] for i in idx])
        n_tokens = (batch["labels"][:, 1:] != tasks.IGNORE_INDEX).sum()
        loss = task.train_loss(model, batch).sum() / n_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in params:
        p.grad = None
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, task, examples: list[dict], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the mean completion-token loss, and whether every completion token is the model's argmax
    (teacher forced — the same as greedy decoding producing the completion)."""
    losses, exact = [], []
    for batch in _batches(task, examples, batch_size):
        logits = task.forward(model, batch)[:, :-1].float()
        targets = batch["labels"][:, 1:]
        valid = targets != tasks.IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        losses += ((nll * valid).sum(1) / valid.sum(1)).tolist()
        exact += ((logits.argmax(-1) == targets) | ~valid).all(1).tolist()
    return np.array(losses), np.array(exact)


# -- 3, 4. one estimator: fit, score, time, measure ----------------------------------------------------------------
@dataclass
class Run:
    name: str
    scores: torch.Tensor  # [n_test, n_train]
    recall: np.ndarray  # [n_test]
    auc: np.ndarray  # [n_test]
    fit_s: float  # fit + train-side cache
    score_s: float  # all queries
    query_s: float  # one query, cache warm
    cache_bytes: dict  # {"factors": bytes, "train_side": bytes}
    analysis: Analysis
    result: object


def measure(name: str, model, task, train: Split, test: Split, k: int, batch_size: int = 16,
            **options) -> Run:
    """Fit one estimator on the train prompts, score every test prompt, and time one warm single-query call."""
    an = Analysis(model, task, train.examples, batch_size=batch_size, progress=False, **options)
    start = time.perf_counter()
    an.fit()
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    result = an.scores(test.examples)
    score_s = time.perf_counter() - start
    an.scores(test.examples[:1])  # warm-up
    start = time.perf_counter()
    an.scores(test.examples[1:2])
    query_s = time.perf_counter() - start
    return Run(name, result.scores, class_recall(result.scores, train.labels, test.labels, k),
               class_auc(result.scores, train.labels, test.labels), fit_s, score_s, query_s, an.cache.bytes, an,
               result)
