"""Input checks (issue #17): ``top()`` lists only scores of the right sign, boolean masks select train examples,
and bad sequences, token ids, labels and input shapes get an InfkitError naming the example and the fix instead of
a raw IndexError/RuntimeError or silent NaN scores."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, digits_mlp, structured_sequences, tiny_gpt2
from torch import nn

from infkit import Analysis, InfkitError, InfluenceResult, tasks
from infkit.cli import main

VOCAB, CONTEXT = 24, 32  # tiny_gpt2's vocabulary and n_positions


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


# -- causal LM sequences ------------------------------------------------------------------------------------------
def lm_scores(train, queries, task=None):
    an = Analysis(tiny_gpt2(), task or tasks.CausalLM(), train, estimator="identity", progress=False)
    return an.scores(queries)


TRAIN = structured_sequences(6, VOCAB, 10, seed=1)


def test_sequence_longer_than_the_context_names_it_and_max_length():
    long = {"input_ids": torch.arange(40) % (VOCAB - 1) + 1}
    with pytest.raises(InfkitError, match=rf"query example 0 \(40 tokens\) is longer than the model's context "
                                          rf"of {CONTEXT} positions.*CausalLM\(max_length={CONTEXT}\)"):
        lm_scores(TRAIN, [long])
    with pytest.raises(InfkitError, match="train example 2 .40 tokens. is longer"):
        lm_scores(TRAIN[:2] + [long], TRAIN[:1])
    # the suggested fix works
    assert lm_scores(TRAIN, [long], tasks.CausalLM(max_length=CONTEXT)).scores.isfinite().all()


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 6, -2])
def test_token_id_outside_the_vocabulary(bad):
    with pytest.raises(InfkitError, match=rf"query example 0 has token id {bad} at position 1, outside the "
                                          rf"model's vocabulary of {VOCAB} .*tokenizer matches the model"):
        lm_scores(TRAIN, [{"input_ids": torch.tensor([1, bad, 3])}])


def test_pad_id_outside_the_vocabulary():
    ragged = [{"input_ids": torch.tensor([1, 2, 3])}, {"input_ids": torch.tensor([4, 5])}]
    with pytest.raises(InfkitError, match=r"query example 1 is padded with id 99.*pad_token_id below 24"):
        lm_scores(TRAIN, ragged, tasks.CausalLM(pad_token_id=99))


def test_label_outside_the_vocabulary():
    query = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 30])}
    with pytest.raises(InfkitError, match="query example 0 has label 30 at position 2, outside the model's 24"):
        lm_scores(TRAIN, [query])


def test_float_or_batched_token_ids():
    with pytest.raises(InfkitError, match="input_ids of dtype torch.float32; token ids are integers"):
        lm_scores(TRAIN, [{"input_ids": torch.tensor([1.5, 2.0, 3.0])}])
    with pytest.raises(InfkitError, match=r"input_ids of shape \[2, 3\]; an example is one sequence"):
        lm_scores(TRAIN, [{"input_ids": torch.ones(2, 3, dtype=torch.long)}])
    with pytest.raises(InfkitError, match="has 2 labels for 3 input_ids"):
        lm_scores(TRAIN, [{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_single_token_train_examples_are_refused_not_nan():
    # before: EK-FAC fitted a 0/0 curvature on them and every score was NaN, with no error
    singles = TRAIN[:3] + [{"input_ids": torch.tensor([5])}]
    with pytest.raises(InfkitError, match=r"train example 3 \(1 token\) has no next-token loss.*at least 2 "
                                          r"real tokens.*Drop it"):
        Analysis(tiny_gpt2(), tasks.CausalLM(), singles, estimator="ekfac", progress=False).fit()
    unlabelled = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, -100, -100])}
    with pytest.raises(InfkitError, match="query example 0 .3 tokens. has no next-token loss.*its 3 tokens"):
        lm_scores(TRAIN, [unlabelled])


# -- classification labels and plain-tensor inputs ---------------------------------------------------------------
def clf_scores(model, train, queries):
    return Analysis(model, tasks.Classification(), train, estimator="identity", progress=False).scores(queries)


@pytest.mark.parametrize("label", [10, -1])
def test_classification_label_out_of_range_names_the_example(label):
    model, train, query = digits_mlp()
    broken = train[:6] + [(train[6][0], label)]
    with pytest.raises(InfkitError, match=rf"train example 6 has label {label}, but the model has 10 classes"):
        clf_scores(model, broken, query[:1])


def test_classification_ignore_index_is_allowed():
    model, train, query = digits_mlp()
    res = clf_scores(model, train[:6] + [(train[6][0], tasks.IGNORE_INDEX)], query[:1])
    assert res.scores[0, 6] == 0  # an unscored example has no gradient


def test_inputs_the_model_cannot_take():
    model, train, query = digits_mlp()  # a float64 64-12-10 MLP
    x, y = query[0]
    with pytest.raises(InfkitError, match=r"cannot run on this batch: inputs x of shape \[1, 32\].*mat1 and mat2"):
        clf_scores(model, train[:6], [(x[:32], y)])
    with pytest.raises(InfkitError, match=r"dtype torch.float32, model dtype torch.float64.*x.to\(torch.float64\)"):
        clf_scores(model, train[:6], [(x.float(), y)])
    with pytest.raises(InfkitError, match=r"query example 1 has an input of shape \[32\]"):
        clf_scores(model, train[:6], [(x, y), (x[:32], y)])
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10)).double()
    images = [(torch.randn(1, 8, 8, dtype=torch.float64), i) for i in range(4)]
    with pytest.raises(InfkitError, match=r"one example: \[64\].*an image \[C, H, W\]"):
        clf_scores(conv, images, [(x, y)])  # a flat vector where [1, 8, 8] is expected


def test_classification_token_dicts_check_dtype_and_vocabulary():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=8, n_layer=1, n_head=2, num_labels=3,
                        pad_token_id=0)
    model = GPT2ForSequenceClassification(config).double().eval()
    train = [{"input_ids": torch.tensor([1, 2, 3]), "labels": 1}, {"input_ids": torch.tensor([4, 5, 6]), "labels": 2}]
    with pytest.raises(InfkitError, match="query example 0 has token id 40 at position 2"):
        clf_scores(model, train, [{"input_ids": torch.tensor([1, 2, 40]), "labels": 0}])
    with pytest.raises(InfkitError, match="input_ids of dtype torch.float32"):
        clf_scores(model, train, [{"input_ids": torch.tensor([1.0, 2.0, 3.0]), "labels": 0}])
    with pytest.raises(InfkitError, match=r"longer than the model's context of 32.*truncation=True, max_length=32"):
        clf_scores(model, train, [{"input_ids": torch.ones(40, dtype=torch.long), "labels": 0}])
    with pytest.raises(InfkitError, match="has label 3, but the model has 3 classes"):
        clf_scores(model, train, [{"input_ids": torch.tensor([1, 2, 3]), "labels": 3}])


# -- the report command -----------------------------------------------------------------------------------------
def test_report_query_longer_than_the_context_exits_2(tmp_path, capsys):
    code = main(["report", "--no-progress", "-o", str(tmp_path / "r.html"), "--query", "a " * 600, " b"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "infkit report: error: --query 'a a a" in err and "longer than the demo model's context of 32" in err
    assert "shorten the prompt to at most 31 tokens" in err
    assert "Traceback" not in err and not (tmp_path / "r.html").exists()
