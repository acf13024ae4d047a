"""Input checks (issue #17): ``top()`` lists only scores of the right sign, boolean masks select train examples."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, digits_mlp

from infkit import Analysis, InfkitError, InfluenceResult, tasks


def result_of(row, train_indices=None):
    scores = torch.tensor([row], dtype=torch.float32)
    return InfluenceResult(scores=scores, per_layer={"all": scores}, estimator="test", damping={},
                           train_indices=train_indices)


# -- top(): signs, NaN, fewer than k ------------------------------------------------------------------------------
def test_top_lists_positive_proponents_and_negative_opponents_only():
    res = result_of([3.0, -1.0, math.nan, 2.0, -5.0, 0.0, math.inf, 0.5])
    top = res.top(0, 5)
    assert list(top.proponents) == [(0, 3.0), (3, 2.0), (7, 0.5)]  # no NaN, no inf, no 0, no negative
    assert list(top.opponents) == [(4, -5.0), (1, -1.0)]  # fewer than k: only two scores are negative
    assert top.n_nonfinite == 2
    assert res.top(0, 1).proponents.indices == [0] and res.top(0, 1).opponents.indices == [4]
    assert len(res.top(0, 0).proponents) == 0


def test_top_reports_train_indices_of_filtered_columns():
    top = result_of([-2.0, 4.0, 1.0], train_indices=[10, 20, 30]).top(0, 10)
    assert top.proponents.indices == [20, 30] and top.opponents.indices == [10]


def test_top_refuses_a_bad_query_or_k():
    res = result_of([1.0, -1.0])
    with pytest.raises(InfkitError, match="query index 1 is out of range for 1 queries"):
        res.top(1)
    with pytest.raises(InfkitError, match="k must be a whole number >= 0"):
        res.top(0, -1)


# -- train_indices as a boolean mask ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    model, train, query = digits_mlp()
    an = Analysis(model, tasks.Classification(), train[:20], estimator="identity", progress=False)
    return an, query[:2]


@pytest.mark.parametrize("kind", ["list", "numpy", "torch"])
def test_boolean_mask_selects_its_true_entries(mlp, kind):
    an, query = mlp
    mask = [i % 3 == 0 for i in range(20)]
    given = {"list": mask, "numpy": np.array(mask), "torch": torch.tensor(mask)}[kind]
    res = an.scores(query, train_indices=given)
    expected = [i for i in range(20) if mask[i]]
    assert res.train_indices == expected
    assert_close(res.scores, an.scores(query).scores[:, expected], rel=1e-5)  # the same columns


def test_bad_masks_and_indices_are_refused(mlp):
    an, query = mlp
    with pytest.raises(InfkitError, match="boolean mask of 5 entries, but there are 20 train examples"):
        an.scores(query, train_indices=[True] * 5)
    with pytest.raises(InfkitError, match="selects no train example"):
        an.scores(query, train_indices=torch.zeros(20, dtype=torch.bool))
    with pytest.raises(InfkitError, match="mixes bools and integers"):
        an.scores(query, train_indices=[True, 3])
    with pytest.raises(InfkitError, match="integer indices or a boolean mask, got float64"):
        an.scores(query, train_indices=[1.5, 2.0])
    assert an.scores(query, train_indices=(i for i in [4, 2])).train_indices == [4, 2]
