"""TF-IDF candidate filtering (Grosse et al. 2023, §3.3): score only the training texts that share words with a query.

Influence needs a forward and backward pass per training example; on a large corpus a cheap lexical filter picks
the top-m candidates of each query first, and only they are scored:

    index = TfidfIndex(train_texts)
    candidates = index.candidates(query, m=0.10)           # the 10% of train_texts most similar to the query
    result = analysis.scores([query], train_indices=candidates)
    result.top(0, k=10)                                     # train indices, as without the filter

Cost: where the train side is cached (``an.cache``), every score is a row of one matrix product and the filter saves
almost nothing; it pays where the train data is streamed (no cache, or over the memory budget), because only the
candidates are then passed through the model. Candidates' scores are exact either way (a score does not depend on
which other examples are scored), so what the filter can lose is only the influential examples it does not pick:
:func:`kept_of_top` counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from infkit.errors import InfkitError

#: Words are runs of letters and digits; one-character words ("3", "a") are kept, unlike scikit-learn's default.
TOKEN_PATTERN = r"(?u)\b\w+\b"


def query_text(query: Any) -> str:
    """The text of a query: a string itself, a prompt/completion dict the two joined."""
    if isinstance(query, str):
        return query
    if isinstance(query, Mapping) and "prompt" in query:
        return f"{query['prompt']}{query.get('completion', '')}"
    raise InfkitError(
        f"TF-IDF filtering needs text queries (strings or prompt/completion dicts), got {type(query).__name__}"
    )


def resolve_m(m: int | float, n: int) -> int:
    """A candidate count: an int as is, a float in (0, 1] as that fraction of ``n`` (rounded up), at most ``n``."""
    if isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating)):
        raise InfkitError(f"m must be a count or a fraction, got {m!r}")
    if isinstance(m, (float, np.floating)):
        if not 0 < m <= 1:
            raise InfkitError(f"a fraction m must be in (0, 1], got {m}")
        return max(1, int(np.ceil(m * n - 1e-9)))
    if m < 1:
        raise InfkitError(f"m must be >= 1, got {m}")
    return min(int(m), n)


class TfidfIndex:
    """scikit-learn's ``TfidfVectorizer`` fitted on the training texts; cosine similarity ranks candidates.

    Args:
        documents: the training texts, in the order of the analysis' train data.
        **vectorizer_options: passed to ``TfidfVectorizer`` (default: lowercase words incl. one-character ones).
    """

    def __init__(self, documents: Sequence[str], **vectorizer_options: Any):
        from sklearn.feature_extraction.text import TfidfVectorizer

        documents = list(documents)
        if not documents:
            raise InfkitError("TfidfIndex needs at least one document")
        if not all(isinstance(d, str) for d in documents):
            raise InfkitError("TfidfIndex indexes texts: give the training examples as strings")
        vectorizer_options.setdefault("token_pattern", TOKEN_PATTERN)
        self.vectorizer = TfidfVectorizer(**vectorizer_options)
        self.matrix = self.vectorizer.fit_transform(documents)  # [n, vocab], rows L2-normalised
        self.n = len(documents)

    def similarities(self, queries: Sequence[Any]) -> np.ndarray:
        """Cosine similarity of each query to each document, [n_query, n]."""
        vectors = self.vectorizer.transform([query_text(q) for q in queries])
        return np.asarray((vectors @ self.matrix.T).todense())

    def candidates(self, query: Any, m: int | float) -> list[int]:
        """The ``m`` most similar documents to one query (a count, or a fraction of the documents), most similar
        first; ties keep document order."""
        return self.candidates_many([query], m)[0]

    def candidates_many(self, queries: Sequence[Any], m: int | float) -> list[list[int]]:
        k = resolve_m(m, self.n)
        sims = self.similarities(queries)
        return [[int(i) for i in np.argsort(-row, kind="stable")[:k]] for row in sims]


def kept_of_top(scores: Any, candidates: Sequence[int], k: int = 10) -> int:
    """How many of the exact top-k proponents (highest scores over all train examples) are among ``candidates``.

    Scores of candidates are exact, so this is also how many of the exact top-k the filtered top-k keeps."""
    row = np.asarray(scores, dtype=np.float64).reshape(-1)
    top = np.argsort(-row, kind="stable")[: min(k, row.size)]
    return len(set(int(i) for i in top) & set(int(c) for c in candidates))


def score_candidates(analysis, queries: Sequence[Any], m: int | float, index: TfidfIndex | None = None,
                     documents: Sequence[str] | None = None):
    """Score each query against only its top-m TF-IDF candidates, through ``analysis.scores(train_indices=...)``.

    Returns ``[(candidates, result), ...]``, one per query (each query has its own candidates).
    """
    if index is None:
        index = TfidfIndex(documents if documents is not None else analysis.train_data)
    if index.n != analysis.n_train:
        raise InfkitError(
            f"the TF-IDF index has {index.n} documents but the analysis {analysis.n_train} train examples"
        )
    out = []
    for query, cands in zip(queries, index.candidates_many(queries, m)):
        out.append((cands, analysis.scores([query], train_indices=cands)))
    return out
