"""TF-IDF candidate filtering (infkit.retrieval) and scoring a subset of the train data (scores(train_indices=))."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import structured_sequences, tiny_gpt2

from infkit import Analysis, InfkitError, demo, retrieval, tasks

DOCS = [
    "The capital of Veloria is Parth.",
    "Parth is the capital of Veloria.",
    "3 plus 4 equals 7.",
    "The capital of Nakroora is Gru.",
    "People in Veloria speak Velic.",
    "lo piro rubi dormi.",
]


def test_candidates_rank_by_shared_words():
    index = retrieval.TfidfIndex(DOCS)
    query = {"prompt": "The capital of Veloria is", "completion": " Parth"}
    cands = index.candidates(query, m=3)
    assert cands[:2] == [0, 1] or cands[:2] == [1, 0]
    assert set(cands) <= {0, 1, 3, 4} and len(cands) == 3
    assert index.candidates("3 plus 4 equals", 1) == [2], "one-character words count (3, 4)"
    assert index.candidates("zzz qqq", 2) == [0, 1], "ties keep document order"
    sims = index.similarities(["3 plus 4 equals 7."])
    assert sims.shape == (1, len(DOCS)) and sims[0, 2] == pytest.approx(1.0)


def test_fractions_and_bad_m():
    index = retrieval.TfidfIndex(DOCS)
    assert len(index.candidates("Veloria", 0.5)) == 3
    assert len(index.candidates("Veloria", 0.01)) == 1, "a fraction gives at least one candidate"
    assert len(index.candidates("Veloria", 100)) == len(DOCS), "never more than the documents"
    for bad in (0, -1, 0.0, 1.5, "10%", True):
        with pytest.raises(InfkitError):
            index.candidates("Veloria", bad)
    with pytest.raises(InfkitError, match="text"):
        retrieval.TfidfIndex([{"input_ids": [1, 2]}])
    with pytest.raises(InfkitError, match="at least one"):
        retrieval.TfidfIndex([])
    with pytest.raises(InfkitError, match="text queries"):
        index.candidates({"input_ids": [1]}, 2)


def test_kept_of_top():
    scores = np.array([5.0, -3.0, 4.0, 0.5, 3.0, 2.0])
    assert retrieval.kept_of_top(scores, [0, 2, 4], k=3) == 3
    assert retrieval.kept_of_top(scores, [1, 3], k=3) == 0
    assert retrieval.kept_of_top(scores, [0, 1, 5], k=2) == 1


@pytest.mark.parametrize("cache", [True, False])
def test_train_indices_equal_the_full_columns(cache):
    """scores(train_indices=) gives exactly the full scores' columns, cached or streamed, and top() maps back."""
    train = structured_sequences(30, 24, 10, seed=5)
    queries = structured_sequences(3, 24, 10, seed=99)
    an = Analysis(tiny_gpt2(), tasks.CausalLM(), train, estimator="ekfac", progress=False, cache=cache,
                  modules="transformer.h.1.*").fit()
    full = an.scores(queries)
    subset = [17, 3, 25, 8, 11]
    part = an.scores(queries, train_indices=subset)
    assert part.scores.shape == (3, 5) and part.train_indices == subset
    torch.testing.assert_close(part.scores, full.scores[:, subset], rtol=1e-5, atol=1e-8)
    for name in full.per_layer:
        torch.testing.assert_close(part.per_layer[name], full.per_layer[name][:, subset], rtol=1e-5, atol=1e-8)
    best = max(subset, key=lambda i: float(full.scores[0, i]))
    assert part.top(0, 1).proponents.indices == [best]
    assert part.layer_shares(0, best) == pytest.approx(full.layer_shares(0, best), rel=1e-5)
    with pytest.raises(InfkitError, match="out of range"):
        an.scores(queries, train_indices=[0, 30])
    with pytest.raises(InfkitError, match="empty"):
        an.scores(queries, train_indices=[])


def test_score_candidates_on_the_demo():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", demo.DemoCacheWarning)
        models = demo.load(verbose=False)
    from infkit.demo import story

    with demo.single_thread():
        an = story.pretraining_analysis(models, progress=False).fit()
        query = story.main_queries(models.corpus)[0].as_dict()
        full = an.scores([query])
        [(cands, filtered)] = retrieval.score_candidates(an, [query], m=0.05)
    assert len(cands) == 20 and filtered.train_indices == cands
    top = filtered.top(0, 3).proponents.indices
    facts = [i for i in full.top(0, 4).proponents.indices if "Parth" in models.corpus.pretrain[i].text]
    assert top == facts, "the fact and its paraphrases share the query's words (the Velish sentence shares none)"
    kept = retrieval.kept_of_top(full.scores[0].numpy(), cands, 10)
    assert kept == len(set(full.top(0, 10).proponents.indices) & set(filtered.top(0, 10).proponents.indices))
