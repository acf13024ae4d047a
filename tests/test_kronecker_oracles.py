"""K-FAC and EK-FAC against oracles: a model where K-FAC is exact, the Frobenius optimality of EK-FAC's eigenvalues,
and a dense build from one-example-at-a-time autograd on a padded, variable-length GPT-2."""

import itertools

import pytest
import torch
from helpers import assert_close, per_example_param_grads, structured_sequences, tiny_gpt2
from torch import nn

from infkit import Analysis, tasks
from infkit.capture import find_layers


# -- K-FAC is exact on a deep linear network with one token per example ------------------------------------------
class SquaredError(tasks.Task):
    """‖model(x) − y‖², one "token" per example (the data's labels only: the tests use fisher="empirical")."""

    def collate(self, examples):
        return {"x": torch.stack([e[0] for e in examples]), "y": torch.stack([e[1] for e in examples])}

    def forward(self, model, batch):
        return model(batch["x"])

    def train_loss(self, model, batch, sample=None):
        return (self.forward(model, batch) - batch["y"]).square().sum(dim=1)


def deep_linear_factorial():
    """A 3-layer linear network and a full factorial data set: every input x_a paired with every residual r_b
    (targets y = model(x_a) + r_b). In a linear network a layer's input depends on x only and its output gradient
    on r only, and over a factorial design their moments factor exactly: the empirical Fisher block of each layer
    is exactly A ⊗ S, so K-FAC (T̄ = 1) is exact."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2)).double()
    inputs, residuals = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        data = [(x, model(x[None])[0] + r) for x, r in itertools.product(inputs, residuals)]
    return model, data


def test_kfac_is_exact_on_a_deep_linear_network_with_one_token_per_example():
    model, train = deep_linear_factorial()
    queries = train[::7]
    layers = find_layers(model)

    def loss(model, example):
        return (model(example[0][None])[0] - example[1]).square().sum()

    train_grads = per_example_param_grads(model, layers, loss, train)
    query_grads = per_example_param_grads(model, layers, loss, queries)
    damping = 1e-3
    expected, start = torch.zeros(len(queries), len(train), dtype=torch.float64), 0
    for layer in layers.values():  # the dense empirical Fisher block of each layer, solved
        cols = slice(start, start + layer.n_params)
        start += layer.n_params
        g = train_grads[:, cols]
        block = g.T @ g / len(train) + damping * torch.eye(layer.n_params, dtype=torch.float64)
        expected += query_grads[:, cols] @ torch.linalg.solve(block, g.T)
    for estimator in ("kfac", "ekfac"):
        an = Analysis(model, SquaredError(), train, estimator=estimator, fisher="empirical", damping=damping,
                      batch_size=7, progress=False)
        assert_close(an.fit().scores(queries).scores, expected, rel=1e-6)  # without the factorial design: ~0.3


# -- EK-FAC's eigenvalues are Frobenius-optimal in the Kronecker eigenbasis ----------------------------------------
def lm_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


def dense_in_basis(est, name, eigenvalues):
    """(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ in infkit's row-major [d_out, d_in] layout."""
    basis = torch.kron(est.eigvecs_s[name], est.eigvecs_a[name])
    return basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.T


def test_ekfac_is_closer_to_the_fisher_than_kfac_on_every_layer_of_a_gpt2(report):
    """For the Fisher both estimate (here the empirical one, built from per-example autograd gradients), EK-FAC's
    Λ = E[(Q_Sᵀ G Q_A)²] is the best diagonal in K-FAC's eigenbasis, so its Frobenius error is at most K-FAC's."""
    model = tiny_gpt2()
    train = structured_sequences(24, 24, 8, seed=6, min_length=5)
    layers = find_layers(model)
    grads = per_example_param_grads(model, layers, lm_loss, train)
    options = dict(fisher="empirical", batch_size=6, damping=1e-3, progress=False)
    ekfac = Analysis(model, tasks.CausalLM(), train, estimator="ekfac", **options).fit().estimator
    kfac = Analysis(model, tasks.CausalLM(), train, estimator="kfac", **options).fit().estimator
    report("\n## EK-FAC vs K-FAC: relative Frobenius error to the empirical Fisher block (tiny GPT-2, n=24)\n")
    report("| layer | EK-FAC | K-FAC |")
    report("|---|---|---|")
    start = 0
    for name, layer in layers.items():
        g = grads[:, start : start + layer.n_params]
        start += layer.n_params
        fisher = g.T @ g / len(train)
        errors = [float((fisher - dense_in_basis(est, name, est.eigenvalues[name])).norm() / fisher.norm())
                  for est in (ekfac, kfac)]
        report(f"| {name} | {errors[0]:.3f} | {errors[1]:.3f} |")
        assert errors[0] <= errors[1] + 1e-12, name


# -- an end-to-end dense build, one example at a time ----------------------------------------------------------
def captured_one_example(model, layers, example):
    """Inputs a_t (with the bias column) and output gradients s_t of every tracked layer for one unpadded
    example, by forward hooks and autograd written here."""
    inputs, outputs, handles = {}, {}, []
    for name, layer in layers.items():
        def hook(module, args, out, name=name):
            inputs[name], outputs[name] = args[0].detach()[0], out
        handles.append(layer.module.register_forward_hook(hook))
    try:
        loss = lm_loss(model, example)
        s = dict(zip(layers, torch.autograd.grad(loss, [outputs[n] for n in layers])))
    finally:
        for handle in handles:
            handle.remove()
    a = {n: torch.cat([x, torch.ones_like(x[:, :1])], dim=1) for n, x in inputs.items()}
    return a, {n: g[0].detach() for n, g in s.items()}


@pytest.mark.parametrize("estimator", ["ekfac", "kfac"])
def test_dense_build_one_example_at_a_time_equals_padded_batches(estimator):
    model = tiny_gpt2()
    train = structured_sequences(14, 24, 10, seed=9, min_length=4)  # variable lengths: padded in batches
    queries = structured_sequences(3, 24, 10, seed=10, min_length=4)
    layers = find_layers(model)
    damping = 1e-3
    sum_aa = {n: 0.0 for n in layers}
    sum_ss = {n: 0.0 for n in layers}
    tokens = 0
    for example in train:
        a, s = captured_one_example(model, layers, example)
        tokens += example["input_ids"].numel()
        for n in layers:
            sum_aa[n] = sum_aa[n] + a[n].T @ a[n]
            sum_ss[n] = sum_ss[n] + s[n].T @ s[n]
    train_grads = per_example_param_grads(model, layers, lm_loss, train)
    query_grads = per_example_param_grads(model, layers, lm_loss, queries)
    expected, start = torch.zeros(len(queries), len(train), dtype=torch.float64), 0
    for n, layer in layers.items():
        cols = slice(start, start + layer.n_params)
        start += layer.n_params
        lam_a, q_a = torch.linalg.eigh(sum_aa[n] / tokens)
        lam_s, q_s = torch.linalg.eigh(sum_ss[n] / tokens)
        g = q_s.T @ train_grads[:, cols].reshape(-1, layer.d_out, layer.d_in) @ q_a
        v = q_s.T @ query_grads[:, cols].reshape(-1, layer.d_out, layer.d_in) @ q_a
        if estimator == "ekfac":
            eigenvalues = g.square().mean(dim=0)
        else:
            eigenvalues = tokens / len(train) * torch.outer(lam_s.clamp(min=0), lam_a.clamp(min=0))
        expected += (v / (eigenvalues + damping)).flatten(1) @ g.flatten(1).T
    an = Analysis(model, tasks.CausalLM(), train, estimator=estimator, fisher="empirical", damping=damping,
                  batch_size=5, progress=False)
    assert_close(an.fit().scores(queries).scores, expected, rel=1e-6)
