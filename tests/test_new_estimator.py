"""A new estimator is one class and one registry line: a diagonal empirical Fisher, defined here, runs through every
path of Analysis (cached, streamed, self-influence, per-token, save/load) and matches dense math written here."""

import pytest
import torch
from helpers import assert_close, digits_mlp, per_example_param_grads

from infkit import Analysis, tasks
from infkit.capture import find_layers
from infkit.estimators.base import REGISTRY, Estimator, Side, register
from infkit.tasks import Labels

LAMBDA = 1e-3


class DiagonalFisher(Estimator):
    """(diag(G) + λI)⁻¹ with G = (1/n) Σ_i g_i g_iᵀ the empirical Fisher: one pass, the mean squared gradient."""

    preconditions = Side.TRAIN  # precondition the train side once; queries stay raw

    def fit(self, passes, keep=None):
        self.diagonal = {name: 0.0 for name in self.layers}
        for cb in passes.iterate(Labels.DATA):
            for name in self.layers:
                self.diagonal[name] = self.diagonal[name] + cb.grads(name).double().square().sum(dim=0)
        for name in self.layers:
            self.diagonal[name] = self.diagonal[name] / passes.n
            self.resolve_damping(name, LAMBDA)
        return self.fitted()

    def precondition(self, grads):
        return {name: (g.double() / (self.diagonal[name] + self.damping_used[name])).to(g.dtype)
                for name, g in grads.items()}

    def state(self):
        return {f"{name}/diagonal": d for name, d in self.diagonal.items()}

    def load_state(self, state, damping_used):
        self.diagonal = {name: state[f"{name}/diagonal"] for name in self.layers}
        self.damping_used = dict(damping_used)


@pytest.fixture
def registered():
    register("diagonal-test")(DiagonalFisher)  # the one registry line
    yield "diagonal-test"
    REGISTRY.pop("diagonal-test")


def mlp_loss(model, example):
    x, y = example
    return torch.nn.functional.cross_entropy(model(x[None]), y[None], reduction="sum")


def test_a_tiny_estimator_defined_here_matches_dense_math(registered, tmp_path):
    model, train, query = digits_mlp(n_train=60, n_query=5)
    layers = find_layers(model)
    train_grads = per_example_param_grads(model, layers, mlp_loss, train)  # [n, P] float64, autograd
    query_grads = per_example_param_grads(model, layers, mlp_loss, query)
    diagonal = train_grads.square().mean(dim=0) + LAMBDA
    expected = (query_grads / diagonal) @ train_grads.T

    an = Analysis(model, tasks.Classification(), train, estimator=registered, batch_size=16, progress=False)
    fitted_plan = an.plan()
    assert fitted_plan.estimator == registered and fitted_plan.cache_passes == 1
    result = an.fit().scores(query)
    assert_close(result.scores, expected, rel=1e-6)
    assert an.cache.train_side is not None  # cached path

    streamed = Analysis(model, tasks.Classification(), train, estimator=registered, batch_size=16, progress=False,
                        cache=False)
    assert_close(streamed.fit().scores(query).scores, expected, rel=1e-6)

    self_expected = ((train_grads / diagonal) * train_grads).sum(dim=1)
    assert_close(an.self_influence(), self_expected, rel=1e-6)

    token = an.token_scores(2, 7)  # an MLP has one "token": its score is all unassigned
    assert token.total == pytest.approx(float(expected[2, 7]), rel=1e-6)

    an.save(tmp_path / "saved")
    reopened = Analysis.load(tmp_path / "saved", model, tasks.Classification(), train, progress=False)
    assert_close(reopened.scores(query).scores, expected, rel=1e-6)


def test_an_estimator_that_preconditions_both_sides_must_split_the_inverse():
    class Both(DiagonalFisher):
        preconditions = Side.QUERY | Side.TRAIN

    with pytest.raises(TypeError, match="override query_side and train_side"):
        register("both-test")(Both)
    assert "both-test" not in REGISTRY
