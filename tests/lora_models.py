"""Tiny peft LoRA models for the tests and benchmarks, built from configs (no download) and trained a few steps.

LoRA's B starts at zero, so before any training the gradients of every A vanish; each builder fine-tunes the
adapters a few steps so that A and B both carry gradient. Models are float64 unless asked otherwise.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from helpers import structured_sequences, tiny_gpt2

VOCAB = 24
GPT2_TARGETS = ("c_attn", "c_proj")  # attn.c_attn, attn.c_proj and mlp.c_proj: three wrapped Conv1D per block


def quiet_peft(fn):
    """peft warns that Conv1D forces fan_in_fan_out=True, and transformers about deprecations: expected here."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return fn(*args, **kwargs)

    return wrapped


def lm_sequences(n: int, seed: int, length: int = 10, min_length: int | None = None):
    return structured_sequences(n, VOCAB, length, seed=seed, min_length=min_length)


def finetune_data(n: int = 64, seed: int = 11):
    """The fine-tuning task: progressions with a step of 4 or 5, which the base model (steps 1-3) never saw."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB - 1, (1,), generator=g))
        step = int(torch.randint(4, 6, (1,), generator=g))
        data.append({"input_ids": (start + step * torch.arange(10)) % (VOCAB - 1) + 1})
    return data


@quiet_peft
def lora_gpt2(
    r: int = 4,
    targets=GPT2_TARGETS,
    layers_to_transform=None,
    steps: int = 25,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    width: int = 16,
):
    """The tiny GPT-2 of tests/helpers.py (2 blocks, width 16, vocab 24) with LoRA rank r on ``targets``, fine-tuned
    ``steps`` Adam steps on :func:`finetune_data`. A fresh copy every call (peft wraps the model in place)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_gpt2(width=width)).to(dtype)
    torch.manual_seed(seed)  # LoRA A's initialisation draws from the global generator
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, layers_to_transform=layers_to_transform
    )
    model = get_peft_model(base, config)
    train(model, finetune_data(), steps, seed)
    return model


def train(model, data, steps: int, seed: int, lr: float = 1e-2) -> None:
    torch.manual_seed(seed)
    ids = torch.stack([d["input_ids"] for d in data])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    model.eval()


# -- a tiny LoRA sequence classifier ----------------------------------------------------------------------------
CLS_VOCAB, CLS_LENGTH = 20, 8


def classification_data(n: int, seed: int):
    """Token sequences labelled 1 when token 3 occurs more often than token 4 (ties: 0); fixed length, all real."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        ids = torch.randint(2, CLS_VOCAB, (CLS_LENGTH,), generator=g)
        label = int((ids == 3).sum() > (ids == 4).sum())
        data.append({"input_ids": ids, "attention_mask": torch.ones(CLS_LENGTH, dtype=torch.long), "labels": label})
    return data


@quiet_peft
def lora_classifier(r: int = 2, steps: int = 30, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A 2-layer BERT (hidden 16) sequence classifier from a config with LoRA on query/value (task SEQ_CLS: the
    classifier head is a trainable modules_to_save copy), trained ``steps`` steps on :func:`classification_data`."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=CLS_VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0, attn_implementation="eager",
    )
    base = BertForSequenceClassification(config).to(dtype)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=2 * r, target_modules=["query", "value"],
                      lora_dropout=0.0)
    model = get_peft_model(base, lora)
    data = classification_data(96, seed=seed + 1)
    batch = {k: torch.stack([torch.as_tensor(d[k]) for d in data]) for k in data[0]}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    model.eval()
    return model
