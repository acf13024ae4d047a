"""fit_data=: the curvature fitted on one data set, the store and the scores over another — against the dense
empirical Fisher of the fit data solved in float64, for the exact and DataInf estimators; and through a save."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, per_example_param_grads, structured_sequences, tiny_gpt2

from infkit import Analysis, InfkitError, tasks

VOCAB = 24
MODULES = "transformer.h.1.mlp.c_proj"
TRAIN = structured_sequences(9, VOCAB, 10, seed=5)
FIT = structured_sequences(30, VOCAB, 10, seed=7)
QUERIES = structured_sequences(3, VOCAB, 10, seed=99)
LAMBDA = 0.05
pytestmark = pytest.mark.filterwarnings("ignore:datainf is designed for LoRA")


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


def lm_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


def make(model, estimator, **kwargs):
    return Analysis(model, tasks.CausalLM(), TRAIN, estimator=estimator, modules=MODULES, fisher="empirical",
                    damping=LAMBDA, progress=False, fit_data=FIT, **kwargs)


def test_exact_fits_on_fit_data_and_scores_the_train_data(model):
    an = make(model, "exact").fit()
    fit = per_example_param_grads(model, an.layers, lm_loss, FIT)  # [n_fit, P]
    train = per_example_param_grads(model, an.layers, lm_loss, TRAIN)
    queries = per_example_param_grads(model, an.layers, lm_loss, QUERIES)
    curvature = fit.T @ fit / len(FIT) + LAMBDA * torch.eye(fit.shape[1], dtype=torch.float64)
    expected = queries @ torch.linalg.solve(curvature, train.T)
    assert an.scores(QUERIES).scores.shape == (len(QUERIES), len(TRAIN))
    assert_close(an.scores(QUERIES).scores, expected, rel=1e-5)
    # the same curvature fitted on the train data differs: fit_data is used
    own = Analysis(model, tasks.CausalLM(), TRAIN, estimator="exact", modules=MODULES, fisher="empirical",
                   damping=LAMBDA, progress=False).fit()
    assert float((own.scores(QUERIES).scores - expected).abs().max()) > 1e-3 * float(expected.abs().max())
    plan = an.plan().summary()
    assert "1 pass(es) over the 30 examples of fit_data" in plan and "1 more pass(es)" in plan


def test_datainf_fits_on_fit_data(model):
    an = make(model, "datainf").fit()
    fit = per_example_param_grads(model, an.layers, lm_loss, FIT)
    train = per_example_param_grads(model, an.layers, lm_loss, TRAIN)
    queries = per_example_param_grads(model, an.layers, lm_loss, QUERIES)
    # DataInf: (1/n) Σ_i (g_i g_iᵀ + λI)⁻¹ over the fit data's gradients, by Sherman-Morrison, applied to queries
    eye = torch.eye(fit.shape[1], dtype=torch.float64)
    inverse = sum(torch.linalg.inv(torch.outer(g, g) + LAMBDA * eye) for g in fit) / len(FIT)
    assert_close(an.scores(QUERIES).scores, queries @ inverse @ train.T, rel=1e-5)
    assert_close(an.self_influence(), torch.einsum("ip,pq,iq->i", train, inverse, train), rel=1e-5)


def test_fit_data_survives_a_save(model, tmp_path):
    an = make(model, "datainf").fit()
    loaded = Analysis.load(an.save(tmp_path / "saved"), model, tasks.CausalLM(), TRAIN, progress=False)
    assert torch.equal(loaded.scores(QUERIES).scores, an.scores(QUERIES).scores)


def test_empty_fit_data_is_refused(model):
    with pytest.raises(InfkitError, match="the fit data is empty"):
        Analysis(model, tasks.CausalLM(), TRAIN, fit_data=[], progress=False)
