"""The engine on a 2-layer GPT-2 built from a config: exact GGN against torch.func, decompositions, padding,
determinism, one scale across estimators."""

import pytest
import torch
from helpers import assert_close, dense_ggn, pearson, per_example_param_grads, spearman, structured_sequences, tiny_gpt2

from infkit import Analysis, tasks
from infkit.capture import find_layers

VOCAB = 24
LAYER_1 = "transformer.h.1.*"  # one block: ~3.2k parameters, small enough for a dense GGN


def lm_loss(model, example):
    ids = example["input_ids"][None]
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


def train_data(n=40, seed=5, **kw):
    return structured_sequences(n, VOCAB, 10, seed=seed, **kw)


def query_data():
    return structured_sequences(6, VOCAB, 10, seed=99)


def make(estimator, data=None, **kwargs):
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("modules", LAYER_1)
    return Analysis(tiny_gpt2(), tasks.CausalLM(), data or train_data(), estimator=estimator, progress=False, **kwargs)


@pytest.fixture(scope="module")
def dense():
    model = tiny_gpt2()
    layers = find_layers(model, LAYER_1)
    train, query = train_data(), query_data()
    ggn = dense_ggn(model, layers, lambda call, ex: call(input_ids=ex["input_ids"][None]).logits[0, :-1], train)
    return {
        "ggn": ggn.detach(),
        "train": per_example_param_grads(model, layers, lm_loss, train),
        "query": per_example_param_grads(model, layers, lm_loss, query),
        "layers": layers,
    }


def test_exact_equals_torch_func_ggn_solve(dense):
    result = make("exact", damping=1e-3).fit().scores(query_data())
    damped = dense["ggn"] + 1e-3 * torch.eye(len(dense["ggn"]), dtype=torch.float64)
    expected = dense["query"] @ torch.linalg.solve(damped, dense["train"].T)
    assert_close(result.scores, expected, rel=1e-5)


def test_identity_equals_explicit_dot_products(dense):
    result = make("identity").scores(query_data())
    assert_close(result.scores, dense["query"] @ dense["train"].T, rel=1e-6)


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "identity", "exact"])
def test_per_token_scores_sum_to_each_layers_score(estimator):
    """Per-token terms s_tᵀ Ṽ a_t come from one train example's capture, apart from the batched scores: their sum
    per layer must equal that layer's score (the per-layer scores summing to the total holds by construction)."""
    an = make(estimator, damping=1e-3).fit()
    result = an.scores(query_data())
    assert set(result.per_layer) == set(an.layers)
    for q, i in [(0, 3), (2, 17), (5, 39)]:
        tokens = an.token_scores(q, i)
        assert tokens.values.shape == (10,)
        assert len(tokens.token_ids) == 10 and tokens.unassigned == 0.0
        assert abs(tokens.total - float(result.scores[q, i])) <= 1e-5 * float(result.scores[q].abs().max())
        shares = result.layer_shares(q, i)
        for name, per_token in tokens.per_layer.items():
            assert abs(float(per_token.sum()) - shares[name]) <= 1e-5 * float(result.scores[q].abs().max())


@pytest.mark.parametrize("estimator", ["ekfac", "kfac", "exact"])
def test_self_influence_is_the_diagonal_of_train_scores(estimator):
    data = train_data(12)
    an = make(estimator, data=data, damping=1e-3).fit()
    diagonal = torch.diagonal(an.scores(data).scores)
    self_influence = an.self_influence()
    assert_close(self_influence, diagonal, rel=1e-5)
    assert bool((self_influence >= 0).all())


def test_same_seed_same_scores_and_seed_matters():
    first = make("ekfac", seed=3).fit().scores(query_data()).scores
    again = make("ekfac", seed=3).fit().scores(query_data()).scores
    other = make("ekfac", seed=4).fit().scores(query_data()).scores
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("estimator", ["ekfac", "exact"])
def test_padding_changes_nothing(estimator):
    """Variable-length sequences scored one by one (no padding) and in padded batches give the same scores."""
    data = train_data(16, seed=7, min_length=4)
    lengths = {len(d["input_ids"]) for d in data}
    assert len(lengths) > 1
    queries = structured_sequences(4, VOCAB, 9, seed=8, min_length=3)
    alone = make(estimator, data=data, batch_size=1, fisher="empirical", damping=1e-3).fit().scores(queries)
    padded = make(estimator, data=data, batch_size=16, fisher="empirical", damping=1e-3).fit().scores(queries)
    assert_close(padded.scores, alone.scores, rel=1e-6)


def test_estimators_share_one_scale_and_agree_with_exact(report):
    """K-FAC is scaled by the mean token count, so K-FAC, EK-FAC and exact land on one scale."""
    queries = query_data()
    report("\n## GPT-2 (2 layers, width 16, block 1 tracked: 3,216 params; 40 train x 6 queries of 10 tokens)\n")
    report("| fisher | estimator | Pearson vs exact | Spearman | Pearson vs block-diag exact | median abs / exact's |")
    report("|---|---|---|---|---|---|")
    results = {}
    for fisher in ["sampled", "empirical"]:
        exact = make("exact", fisher=fisher).fit()
        lam = exact.estimator.damping_used  # the exact heuristic's global λ, used by every estimator below
        lam = float(next(iter(lam.values())))
        exact_scores = make("exact", fisher=fisher, damping=lam).fit().scores(queries).scores
        block = make("exact", fisher=fisher, damping=lam, block_diagonal=True).fit().scores(queries).scores
        for name in ["ekfac", "kfac", "identity"]:
            s = make(name, fisher=fisher, damping=lam).fit().scores(queries).scores
            scale = float(s.abs().median() / exact_scores.abs().median())
            results[fisher, name] = (pearson(s, exact_scores), pearson(s, block), scale)
            report(f"| {fisher} | {name} | {pearson(s, exact_scores):.3f} | {spearman(s, exact_scores):.3f} | "
                   f"{pearson(s, block):.3f} | {scale:.3g} |")
    # One scale: without the T̄ factor (9 scored tokens here) K-FAC would sit ~9x below EK-FAC.
    kfac_over_ekfac = results["sampled", "kfac"][2] / results["sampled", "ekfac"][2]
    report(f"\nK-FAC / EK-FAC median abs score (sampled Fisher): {kfac_over_ekfac:.3g}")
    assert 0.5 < kfac_over_ekfac < 2
    for name in ["ekfac", "kfac"]:
        # Within 10x of the exact GGN: with one label draw per example on 40 examples, the sampled Fisher has
        # rank <= 40 in 3,216 dimensions, so block-diagonal estimators see less curvature than the GGN.
        assert 0.1 < results["sampled", name][2] < 10, (name, results["sampled", name])
        assert results["sampled", name][0] > results["sampled", "identity"][0] + 0.1
    assert results["sampled", "ekfac"][1] >= results["sampled", "kfac"][1] - 0.01
    assert results["sampled", "ekfac"][1] > 0.8
