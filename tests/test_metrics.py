"""infkit.metrics: agreement, LDS, mislabel AUC, the detection curve and class recall / AUC against hand-computed
cases, and bad input."""

import math

import numpy as np
import pytest
import torch
from helpers import digits_mlp

from infkit import Analysis, tasks
from infkit.errors import InfkitError
from infkit.metrics import (
    LDSError,
    agreement,
    class_auc,
    class_recall,
    detection_curve,
    lds,
    lds_from_measurements,
    lds_subsets,
    mislabel_auc,
)
from infkit.result import InfluenceResult


# -- agreement ----------------------------------------------------------------------------------------------------
def test_agreement_hand_computed():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0]])
    result = agreement(a, b, k=(2, 100))
    # Query 0: deviations (-1.5, -.5, .5, 1.5) and (-3, -2, -1, 6): 14 / sqrt(5 · 50); same order -> Spearman 1.
    assert result.per_query["pearson"][0] == pytest.approx(14 / math.sqrt(250))
    assert result.per_query["spearman"][0] == pytest.approx(1.0)
    # Query 1: reversed -> -1 and -1; its top 2 are {0, 1} against {2, 3}: overlap 0.
    assert result.per_query["pearson"][1] == pytest.approx(-1.0)
    assert result.per_query["spearman"][1] == pytest.approx(-1.0)
    assert list(result.per_query["top_2"]) == [1.0, 0.0]
    assert result.top_k[2] == 0.5
    assert result.top_k[100] == 1.0  # k above n_train is clipped: every train example is in both "top 100"
    # Overall: all 8 pairs at once. a = (1,2,3,4,4,3,2,1), b = (1,2,3,10,1,2,3,4): means 2.5 and 3.25.
    da = np.array([1, 2, 3, 4, 4, 3, 2, 1]) - 2.5
    db = np.array([1, 2, 3, 10, 1, 2, 3, 4]) - 3.25
    assert result.pearson == pytest.approx((da @ db) / math.sqrt((da @ da) * (db @ db)))
    assert result.mean_pearson == pytest.approx((14 / math.sqrt(250) - 1) / 2)
    assert result.mean_spearman == pytest.approx(0.0)
    assert set(result.as_dict()) == {
        "pearson", "spearman", "mean_query_pearson", "mean_query_spearman", "top_2", "top_100"
    }
    assert "pearson=" in repr(result)


def test_agreement_ties_opponents_magnitude_and_inputs():
    # Ties get their average rank: ranks (1.5, 1.5, 3) and (1, 2, 3) -> 1.5 / sqrt(1.5 · 2).
    assert agreement(np.array([1.0, 1.0, 2.0]), [1.0, 2.0, 3.0]).spearman == pytest.approx(1.5 / math.sqrt(3))
    a, b = np.array([[-5.0, 0.0, 1.0, 4.0]]), np.array([[-1.0, -9.0, 2.0, 3.0]])
    assert agreement(a, b, k=1, by="opponents").top_k[1] == 0.0  # 0 vs 1
    assert agreement(a, b, k=1, by="magnitude").top_k[1] == 0.0  # 0 vs 1
    assert agreement(a, b, k=1, by="proponents").top_k[1] == 1.0  # 3 vs 3
    constant = agreement(np.ones((1, 4)), a)  # a constant row has no correlation
    assert math.isnan(constant.per_query["pearson"][0]) and math.isnan(constant.mean_spearman)
    res = InfluenceResult(scores=torch.tensor(a), per_layer={}, estimator="x", damping={})
    assert agreement(res, res).pearson == pytest.approx(1.0)


def test_agreement_bad_input():
    with pytest.raises(InfkitError, match="shape"):
        agreement(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(InfkitError, match="non-finite"):
        agreement(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    with pytest.raises(InfkitError, match="by="):
        agreement(torch.zeros(3), torch.zeros(3), by="top")
    with pytest.raises(InfkitError, match="k must"):
        agreement(torch.zeros(3), torch.zeros(3), k=0)
    partial = InfluenceResult(scores=torch.zeros(1, 2), per_layer={}, estimator="x", damping={}, train_indices=[3, 5])
    with pytest.raises(InfkitError, match="train_indices"):
        agreement(partial, torch.zeros(1, 2))


# -- LDS ----------------------------------------------------------------------------------------------------------
def test_lds_from_measurements_hand_computed():
    scores = np.array([[1.0, 2.0, 3.0]])
    subsets = np.array([[0], [1], [2]])
    # Predicted losses -(1, 2, 3): ranks (3, 2, 1). Measured (3, 1, 2): ranks (3, 1, 2). Spearman = 1 / 2.
    result = lds_from_measurements(scores, subsets, np.array([[3.0], [1.0], [2.0]]))
    assert result.per_query.tolist() == [pytest.approx(0.5)]
    assert result.mean == pytest.approx(0.5)
    assert result.predicted[:, 0].tolist() == [-1.0, -2.0, -3.0]
    # Two queries: the second's measured losses rise with its summed scores -> LDS -1. Mean 0.
    two = lds_from_measurements(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), subsets, [[3, 1], [1, 2], [2, 3]])
    assert two.per_query.tolist() == [pytest.approx(0.5), pytest.approx(-1.0)]
    assert two.mean == pytest.approx(-0.25)
    assert two.ci[0] <= two.mean <= two.ci[1] and -1.0 <= two.ci[0] and two.ci[1] <= 0.5


def linear_world(n_train=40, n_query=3, seed=0):
    """A 'training' whose query losses are exactly linear in the subset: loss_q(S) = 5 − Σ_{i∈S} θ[q, i]. Its true
    influence scores are θ (a proponent lowers the loss)."""
    theta = torch.randn(n_query, n_train, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def retrain_fn(indices):
        return torch.tensor(indices)  # the "model" is the subset; measure_fn reads it

    def measure_fn(model, queries):
        return 5.0 - theta[:, model].sum(dim=1)

    return theta, retrain_fn, measure_fn


def test_lds_is_one_for_the_true_linear_scores():
    theta, retrain_fn, measure_fn = linear_world()
    queries = list(range(3))
    result = lds(theta, retrain_fn, queries, n_subsets=30, measure_fn=measure_fn, progress=False)
    assert np.allclose(result.per_query, 1.0) and result.mean == pytest.approx(1.0)
    assert result.ci == (pytest.approx(1.0), pytest.approx(1.0))
    assert result.subsets.shape == (30, 20) and result.complete
    # The opposite sign ranks every subset backwards; unrelated scores land near 0.
    assert lds(-theta, retrain_fn, queries, n_subsets=30, measure_fn=measure_fn, progress=False).mean == -1.0
    noise = torch.randn(3, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert abs(lds(noise, retrain_fn, queries, n_subsets=30, measure_fn=measure_fn, progress=False).mean) < 0.5


def test_lds_subsets_are_seeded_and_stable():
    a, b = lds_subsets(50, 10, 0.5, seed=3), lds_subsets(50, 10, 0.5, seed=3)
    assert np.array_equal(a, b) and a.shape == (10, 25)
    assert not np.array_equal(a, lds_subsets(50, 10, 0.5, seed=4))
    assert np.array_equal(lds_subsets(50, 4, 0.5, seed=3), a[:4])  # subset j does not depend on n_subsets
    assert all(len(set(row)) == 25 and list(row) == sorted(row) for row in a)
    assert lds_subsets(10, 2, 0.3).shape == (2, 3)


def test_lds_retrain_seeds_are_averaged():
    theta, _, measure_fn = linear_world()
    calls = []

    def retrain_fn(indices, seed):
        calls.append(seed)
        return torch.tensor(indices)

    def noisy_measure(model, queries):  # subtracts a per-call offset that averages out over seeds 0 and 1
        return measure_fn(model, queries) + (1.0 if calls[-1] == 0 else -1.0) * 100

    result = lds(theta, retrain_fn, [0, 1, 2], n_subsets=4, seeds=[0, 1], measure_fn=noisy_measure, progress=False)
    assert calls == [0, 1] * 4
    assert result.mean == pytest.approx(1.0) and result.seeds == (0, 1)
    with pytest.raises(InfkitError, match="seed"):
        lds(theta, lambda idx: idx, [0, 1, 2], n_subsets=4, seeds=[0], measure_fn=noisy_measure, progress=False)


def test_lds_keeps_finished_subsets_when_retrain_fails_and_resumes():
    theta, retrain_fn, measure_fn = linear_world()
    queries = [0, 1, 2]
    full = lds(theta, retrain_fn, queries, n_subsets=8, measure_fn=measure_fn, progress=False)
    count = {"n": 0}

    def flaky(indices):
        count["n"] += 1
        if count["n"] == 6:
            raise RuntimeError("out of disk")
        return retrain_fn(indices)

    with pytest.raises(LDSError, match=r"subset 5 of 8.*RuntimeError: out of disk.*5 finished") as info:
        lds(theta, flaky, queries, n_subsets=8, measure_fn=measure_fn, progress=False)
    err = info.value
    assert isinstance(err, InfkitError) and isinstance(err.__cause__, RuntimeError)
    assert err.subset == 5 and err.indices == full.subsets[5].tolist()
    assert err.partial.n_subsets == 5 and not err.partial.complete and err.partial.n_planned == 8
    assert np.array_equal(err.partial.measured, full.measured[:5])
    resumed = lds(theta, retrain_fn, queries, n_subsets=8, measure_fn=measure_fn, progress=False, resume=err.partial)
    assert np.array_equal(resumed.measured, full.measured) and resumed.complete
    # Failing on the second subset: one finished, too few for an LDS.
    with pytest.raises(LDSError, match="subset 1 of 8") as early:
        lds(theta, _fails_after(1, retrain_fn), queries, n_subsets=8, measure_fn=measure_fn, progress=False)
    assert early.value.partial is None
    with pytest.raises(InfkitError, match="other subsets"):
        lds(theta, retrain_fn, queries, n_subsets=8, seed=1, measure_fn=measure_fn, progress=False,
            resume=err.partial)


def _fails_after(n_ok, retrain_fn):
    count = {"n": 0}

    def fn(indices):
        count["n"] += 1
        if count["n"] > n_ok:
            raise ValueError("boom")
        return retrain_fn(indices)

    return fn


def test_lds_bad_input():
    theta, retrain_fn, measure_fn = linear_world()
    queries = [0, 1, 2]
    with pytest.raises(InfkitError, match="at least 2"):
        lds(theta, retrain_fn, queries, n_subsets=1, measure_fn=measure_fn, progress=False)
    with pytest.raises(InfkitError, match="at least 2"):
        lds_from_measurements(theta, np.zeros((1, 3), dtype=int), np.zeros((1, 3)))
    with pytest.raises(InfkitError, match="fraction"):
        lds(theta, retrain_fn, queries, fraction=1.0, measure_fn=measure_fn, progress=False)
    with pytest.raises(InfkitError, match="3 rows but 2 queries"):
        lds(theta, retrain_fn, [0, 1], measure_fn=measure_fn, progress=False)
    with pytest.raises(InfkitError, match="cannot measure"):
        lds(theta, retrain_fn, queries, progress=False)
    with pytest.raises(InfkitError, match="empty"):
        lds(theta, retrain_fn, [], measure_fn=measure_fn, progress=False)
    with pytest.raises(LDSError, match="one loss per query"):
        lds(theta, retrain_fn, queries, n_subsets=3, measure_fn=lambda m, q: torch.zeros(2), progress=False)
    with pytest.raises(InfkitError, match="measured has shape"):
        lds_from_measurements(theta, lds_subsets(40, 3), np.zeros((3, 2)))


def test_lds_with_an_analysis_and_a_real_retraining():
    """End to end on the tiny digits MLP: the analysis' task measures the queries of each retrained model."""
    model, train, query = digits_mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.stack([t[0] for t in train])
    y = torch.stack([t[1] for t in train])

    def retrain_fn(indices):
        m = torch.nn.Sequential(torch.nn.Linear(64, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10)).double()
        m.load_state_dict(init)  # warm start from the trained weights: a few steps on the subset
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x[indices]), y[indices]).backward()
            opt.step()
        return m

    an = Analysis(model, tasks.Classification(), train, estimator="identity", progress=False)
    result = lds(an, retrain_fn, query[:4], n_subsets=6, progress=False)
    assert result.per_query.shape == (4,) and result.measured.shape == (6, 4)
    assert np.isfinite(result.mean) and -1 <= result.mean <= 1
    # The same seed gives the same result; the result given instead of the analysis measures with its task.
    again = lds(an.scores(query[:4]), retrain_fn, query[:4], n_subsets=6, progress=False)
    assert np.array_equal(again.per_query, result.per_query)
    with pytest.raises(LDSError, match="not a torch module"):
        lds(an.scores(query[:4]), lambda idx: None, query[:4], n_subsets=2, progress=False)


# -- mislabel AUC and the detection curve -------------------------------------------------------------------------
SCORES = torch.tensor([[-2.0, 1.0, 0.0, 1.0], [-3.0, 0.0, -1.0, 2.0]])  # totals (-5, 1, -1, 3)


def test_mislabel_auc_hand_computed():
    # Suspicion = −total = (5, −1, 1, −3). Flipped {0, 2} are the two most suspicious: AUC 1.
    assert mislabel_auc(SCORES, [True, False, True, False]) == 1.0
    assert mislabel_auc(SCORES.sum(0), np.array([1, 0, 1, 0])) == 1.0  # [n_train] and 0/1 masks too
    # Flipped {0, 3}: suspicions 5 and −3 against clean −1 and 1 -> 2 of 4 pairs right.
    assert mislabel_auc(SCORES, [True, False, False, True]) == 0.5
    assert mislabel_auc(SCORES, [False, True, False, True]) == 0.0
    # Self-influence: highest first.
    assert mislabel_auc(flipped_mask=[False, True, False, False], self_influence=[0.1, 0.9, 0.5, 0.2]) == 1.0
    assert mislabel_auc(flipped_mask=[True, False, False, False], self_influence=[0.1, 0.9, 0.5, 0.2]) == 0.0
    assert mislabel_auc(flipped_mask=[True, False], self_influence=torch.tensor([1.0, 1.0])) == 0.5  # a tie
    res = InfluenceResult(scores=SCORES, per_layer={}, estimator="x", damping={})
    assert mislabel_auc(res, torch.tensor([True, False, True, False])) == 1.0


def test_detection_curve_hand_computed():
    curve = detection_curve(SCORES, [True, False, True, False])
    assert curve.order.tolist() == [0, 2, 1, 3]
    assert curve.found.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert curve.inspected.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.found_at(0.5) == 1.0 and curve.found_at(0.25) == 0.5 and curve.found_at(0.0) == 0.0
    by_self = detection_curve(flipped_mask=[False, True, False, False], self_influence=[0.1, 0.9, 0.5, 0.2])
    assert by_self.order.tolist() == [1, 2, 3, 0] and by_self.found_at(0.25) == 1.0
    assert "DetectionCurve" in repr(curve)


def test_mislabel_bad_input():
    with pytest.raises(InfkitError, match="flipped_mask has 3 entries but train_scores covers 4"):
        mislabel_auc(SCORES, [True, False, True])
    with pytest.raises(InfkitError, match="flipped_mask has 5 entries but self_influence covers 4"):
        mislabel_auc(flipped_mask=[True, False, True, False, False], self_influence=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InfkitError, match="exactly one"):
        mislabel_auc(SCORES, [True, False, True, False], self_influence=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InfkitError, match="exactly one"):
        mislabel_auc(flipped_mask=[True, False])
    with pytest.raises(InfkitError, match="flipped_mask is missing"):
        mislabel_auc(SCORES)
    with pytest.raises(InfkitError, match="both flipped and clean"):
        mislabel_auc(SCORES, [True] * 4)
    with pytest.raises(InfkitError, match="boolean"):
        mislabel_auc(SCORES, [2, 0, 1, 0])
    with pytest.raises(InfkitError, match="one-dimensional"):
        mislabel_auc(SCORES, [[True, False, True, False]])
    with pytest.raises(InfkitError, match="non-finite"):
        mislabel_auc(flipped_mask=[True, False], self_influence=[float("inf"), 1.0])
    with pytest.raises(InfkitError, match="nothing to find"):
        detection_curve(SCORES, [False] * 4)
    partial = InfluenceResult(scores=SCORES[:, :2], per_layer={}, estimator="x", damping={}, train_indices=[0, 1])
    with pytest.raises(InfkitError, match="train_indices"):
        mislabel_auc(partial, [True, False, True, False])


# -- class recall / class AUC -------------------------------------------------------------------------------------
CLASS_SCORES = np.array([[5.0, 1.0, 4.0, 0.0, 2.0, 3.0], [0.0, 6.0, 1.0, 5.0, 2.0, 2.0]])
TRAIN_CLASSES = ["a", "a", "b", "b", "c", "c"]


def test_class_recall_hand_computed():
    # Query 0 (class a): ranking 0(a) 2(b) 5(c) 4(c) 1(a) 3(b). Query 1 (class b): 1(a) 3(b) 4(c) 5(c) 2(b) 0(a)
    # (the tie 4/5 in index order).
    assert class_recall(CLASS_SCORES, TRAIN_CLASSES, ["a", "b"]).tolist() == [0.5, 0.5]  # k = class size = 2
    assert class_recall(CLASS_SCORES, TRAIN_CLASSES, ["a", "b"], k=1).tolist() == [1.0, 0.0]
    assert np.allclose(class_recall(CLASS_SCORES, TRAIN_CLASSES, ["a", "b"], k=3), [1 / 3, 1 / 3])
    assert class_recall(CLASS_SCORES, TRAIN_CLASSES, ["c", "c"], k=6).tolist() == [1 / 3, 1 / 3]
    # torch inputs, integer labels, a single query as [n_train], an InfluenceResult
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert class_recall(torch.tensor(CLASS_SCORES), labels, torch.tensor([0, 1]), k=1).tolist() == [1.0, 0.0]
    assert class_recall(CLASS_SCORES[1], labels, [1], k=2).tolist() == [0.5]
    res = InfluenceResult(scores=torch.tensor(CLASS_SCORES), per_layer={}, estimator="x", damping={})
    assert class_recall(res, TRAIN_CLASSES, ["a", "b"], k=1).tolist() == [1.0, 0.0]
    # ties: the lower train index first
    assert class_recall([[1.0, 1.0]], ["a", "b"], ["a"], k=1).tolist() == [1.0]
    assert class_recall([[1.0, 1.0]], ["a", "b"], ["b"], k=1).tolist() == [0.0]
    # a result over some train examples: labels of all of them select the scored columns
    part = InfluenceResult(scores=torch.tensor([[1.0, 3.0]]), per_layer={}, estimator="x", damping={},
                           train_indices=[4, 1])
    assert class_recall(part, TRAIN_CLASSES, ["a"], k=1).tolist() == [1.0]


def test_class_auc_hand_computed():
    # Query 0 (a): positives 5 and 1 against 4, 0, 2, 3: 4 + 1 of 8 pairs. Query 1 (b): 5 and 1 against 0, 6, 2, 2:
    # 3 + 1 of 8.
    assert class_auc(CLASS_SCORES, TRAIN_CLASSES, ["a", "b"]).tolist() == [0.625, 0.5]
    assert class_auc(torch.tensor(CLASS_SCORES), np.array([0, 0, 1, 1, 2, 2]), [0, 1]).tolist() == [0.625, 0.5]
    assert class_auc([[3.0, 2.0, 1.0, 0.0]], [1, 1, 0, 0], [1]).tolist() == [1.0]
    assert class_auc([[3.0, 2.0, 1.0, 0.0]], [1, 1, 0, 0], [0]).tolist() == [0.0]
    assert class_auc([[1.0, 1.0, 0.0]], [0, 1, 1], [0]).tolist() == [0.75]  # a tie counts half: (0.5 + 1) / 2
    out = class_auc([[1.0, 2.0], [1.0, 2.0]], [0, 0], [0, 3])  # all positives / no positive: undefined
    assert math.isnan(out[0]) and math.isnan(out[1])


def test_class_metrics_bad_input():
    with pytest.raises(InfkitError, match="train_labels has 5 entries but the scores cover 6"):
        class_recall(CLASS_SCORES, TRAIN_CLASSES[:5], ["a", "b"])
    with pytest.raises(InfkitError, match="query_labels has 1 entries but the scores have 2 queries"):
        class_auc(CLASS_SCORES, TRAIN_CLASSES, ["a"])
    with pytest.raises(InfkitError, match="train_labels must be one-dimensional"):
        class_auc(CLASS_SCORES, [TRAIN_CLASSES], ["a", "b"])
    with pytest.raises(InfkitError, match="query_labels must be one-dimensional"):
        class_recall(CLASS_SCORES, TRAIN_CLASSES, [["a", "b"]])
    with pytest.raises(InfkitError, match="scores must be scores of shape"):
        class_auc(np.zeros((2, 3, 4)), [0, 1, 2], [0, 1])
    with pytest.raises(InfkitError, match="non-finite"):
        class_auc([[1.0, float("nan")]], [0, 1], [0])
    for k in (0, 7, 1.5, True):
        with pytest.raises(InfkitError, match="k must be an integer between 1 and the number of train examples"):
            class_recall(CLASS_SCORES, TRAIN_CLASSES, ["a", "b"], k=k)
    with pytest.raises(InfkitError, match="query 1's class has no train example"):
        class_recall(CLASS_SCORES, TRAIN_CLASSES, ["a", "z"])
