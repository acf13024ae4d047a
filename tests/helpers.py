"""Tiny models and independent dense references for the tests (no hooks, no infkit internals).

Everything here is computed the slow, obvious way — per-example autograd loops and torch.func Jacobians in
float64 — so that infkit's estimators are checked against math, not against themselves.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.func import functional_call, jacrev


@functools.cache
def digits_mlp(n_train: int = 160, n_query: int = 12, hidden: int = 12, seed: int = 0):
    """A 64-12-10 tanh MLP on sklearn's bundled digits, trained briefly, in float64."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:n_train]), y[:n_train]).backward()
        opt.step()
    train = list(zip(x[:n_train], y[:n_train]))
    query = list(zip(x[n_train : n_train + n_query], y[n_train : n_train + n_query]))
    return model, train, query


def structured_sequences(n: int, vocab: int, length: int, seed: int, min_length: int | None = None):
    """Token sequences with learnable structure: each is an arithmetic progression mod (vocab - 1), token ids
    1..vocab-1 (0 is left for padding). With ``min_length`` the lengths vary."""
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(n):
        start = int(torch.randint(0, vocab - 1, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        size = length if min_length is None else int(torch.randint(min_length, length + 1, (1,), generator=g))
        ids = (start + step * torch.arange(size)) % (vocab - 1) + 1
        sequences.append({"input_ids": ids})
    return sequences


@functools.cache
def tiny_gpt2(vocab: int = 24, width: int = 16, layers: int = 2, seed: int = 0, steps: int = 60):
    """A GPT-2 from a config (no download), trained a few steps on structured sequences, in float64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).double()
    data = structured_sequences(64, vocab, 10, seed=seed + 1)
    ids = torch.stack([d["input_ids"] for d in data])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    return model


def per_example_param_grads(model, layers, loss_fn, examples) -> torch.Tensor:
    """[n, P] gradients of loss_fn(model, example) w.r.t. the tracked parameters, one autograd call each,
    laid out like infkit (per layer [d_out, d_in], bias last column, layers in order)."""
    rows = []
    for example in examples:
        params = [p for layer in layers.values() for p in layer.parameters()]
        grads = torch.autograd.grad(loss_fn(model, example), params)
        parts, k = [], 0
        for layer in layers.values():
            weight_grad = grads[k]
            bias_grad = grads[k + 1] if layer.has_bias else None
            k += 2 if layer.has_bias else 1
            parts.append(layer.gradient_of(weight_grad, bias_grad).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def dense_ggn(model, layers, logits_fn, examples) -> torch.Tensor:
    """G = mean_i Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t over the tracked parameters, with torch.func Jacobians.

    ``logits_fn(model, example)`` returns [positions, classes] logits of the *scored* positions only.
    """
    names = {p: n for n, p in model.named_parameters()}
    tracked = {names[p]: p for layer in layers.values() for p in layer.parameters()}

    def logits_of(params, example):
        return logits_fn(lambda *a, **k: functional_call(model, params, a, k), example)

    total = None
    for example in examples:
        jac = jacrev(logits_of)(dict(tracked), example)  # {param: [T, C, *param.shape]}
        logits = logits_of(dict(tracked), example).detach()
        probs = torch.softmax(logits, dim=-1)
        hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        parts = []
        for layer in layers.values():
            weight_jac = jac[names[layer.module.weight]]
            t, c = weight_jac.shape[:2]
            if type(layer.module).__name__ == "Conv1D":  # transformers' Conv1D stores its weight as [in, out]
                weight_jac = weight_jac.transpose(-1, -2)
            pieces = [weight_jac]
            if layer.has_bias:
                pieces.append(jac[names[layer.module.bias]][..., None])
            parts.append(torch.cat(pieces, dim=-1).reshape(t, c, -1))
        j = torch.cat(parts, dim=-1)  # [T, C, P]
        contribution = torch.einsum("tcp,tcd,tdq->pq", j, hessian, j)
        total = contribution if total is None else total + contribution
    return total / len(examples)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return pearson(*ranks)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |actual − expected| <= rel · max |expected| (a relative error on the scale of the whole tensor)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max())
    assert error <= rel * scale, f"max abs error {error:.3g} > {rel:g} x max abs value {scale:.3g}"
