"""The analyses of Grosse et al. 2023 on the demo model, each a small function over the public API.

:func:`run` does them all (what ``infkit report`` renders); the quickstart notebook calls them one by one.

1. **Queries** — prompt/completion pairs ("The capital of Veloria is" -> " Parth") scored against the pretraining
   corpus with EK-FAC; top proponents and opponents (:func:`top_influences`).
2. **Token-wise attribution** of those sequences (``Analysis.token_scores``).
3. **Layer-wise distribution**: each layer's share of the top proponents' influence (:func:`layer_shares`).
4. **Sparsity**: sorted |influence| against rank, with a power-law fit (:func:`infkit.views.plots.fit_power_law`).
5. **Word order**: for each country, the paraphrases that keep the query's order ("Veloria ... Parth") against those
   that flip it ("Parth is the capital of Veloria.") (:func:`word_order`).
6. **TF-IDF filtering**: how many of the exact top-10 survive scoring only the top-m TF-IDF candidates
   (:func:`tfidf_filter`), through ``Analysis.scores(train_indices=...)``.
7. **Estimators compared** on the LoRA fine-tuning: EK-FAC, DataInf and the gradient dot product ("identity")
   (:func:`compare_estimators`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from infkit import Analysis, tasks
from infkit._version import __version__
from infkit.demo.corpus import ADJECTIVES, NOUNS, VERBS, Corpus, Example
from infkit.demo.model import VERSION, DemoModels, load, next_word, single_thread
from infkit.demo.tokenizer import SPECIALS, token_strings
from infkit.retrieval import TfidfIndex, kept_of_top
from infkit.views.plots import PowerLaw, fit_power_law

ESTIMATORS = ("ekfac", "datainf", "identity")
FRACTIONS = (0.05, 0.10, 0.25)


@dataclass(frozen=True)
class Query:
    label: str
    prompt: str
    completion: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def where_words_are(corpus: Corpus, english: str, velish: str) -> str:
    """A sentence saying that an (English, Velish) pair is not in the corpus and where its words are: how many
    training sentences hold each Velish word (with its English meaning), and how many of those are translations."""
    meaning = {v: e for table in (NOUNS, ADJECTIVES, VERBS) for e, v in table.items()}
    words = [(e.kind, set(e.text.lower().replace(".", " ").replace(":", " ").split())) for e in corpus.pretrain]
    parts = []
    for word in velish.split():
        if word not in meaning:
            continue  # "lo", the article, is in every Velish sentence
        holding = [kind for kind, ws in words if word in ws]
        parts.append(f"“{word}” ({meaning[word]}) is in {len(holding)} training sentences, "
                     f"{holding.count('translation')} of them translations")
    listed = "; ".join(parts) if parts else "none of its words is there either"
    return f"this pair is not in the corpus, but its words are: {listed}."


def main_queries(corpus: Corpus) -> list[Query]:
    """The four queries of the story: a fact, a fact about a person, a sum, a translation never seen whole."""
    c = corpus.countries[0]
    english, velish = corpus.untranslated[0]
    return [
        Query("capital", f"The capital of {c.country} is", f" {c.capital}"),
        Query("birthplace", f"{c.person} was born in", f" {c.country}"),
        Query("arithmetic", "3 plus 4 equals", " 7"),
        Query("translation", f"In Velish, {english} is:", f" {velish}", where_words_are(corpus, english, velish)),
    ]


def capital_queries(corpus: Corpus) -> list[Query]:
    return [Query(c.country, f"The capital of {c.country} is", f" {c.capital}") for c in corpus.countries]


def currency_queries(corpus: Corpus) -> list[Query]:
    return [Query(c.country, f"The currency of {c.country} is the", f" {c.currency}") for c in corpus.countries]


def task_for(models: DemoModels) -> tasks.CausalLM:
    return tasks.CausalLM(tokenizer=models.tokenizer)


def pretraining_analysis(models: DemoModels, estimator: str = "ekfac", progress: bool = True, seed: int = 0,
                         **options: Any) -> Analysis:
    """An (unfitted) analysis of the base model over the pretraining corpus (``progress``: the plan and tqdm bars
    while it fits and scores; ``progress=False`` for none)."""
    return Analysis(models.base, task_for(models), models.corpus.pretrain_texts, estimator=estimator,
                    progress=progress, seed=seed, **options)


def finetuning_analysis(models: DemoModels, estimator: str = "ekfac", progress: bool = True, seed: int = 0,
                        **options: Any) -> Analysis:
    """An (unfitted) analysis of the LoRA model over the fine-tuning set (the adapter's A and B are tracked);
    ``progress`` as in :func:`pretraining_analysis`."""
    return Analysis(models.lora, task_for(models), models.corpus.finetune_texts, estimator=estimator,
                    progress=progress, seed=seed, **options)


# -- 1, 2: top influences with their tokens -----------------------------------------------------------------------
@dataclass
class Row:
    index: int
    text: str
    kind: str
    score: float
    tokens: list[str]
    values: list[float]  # per-token contributions, summing to ``score``


@dataclass
class QueryView:
    query: Query
    answer: str  # the model's greedy continuation of the prompt, as many tokens as the completion
    proponents: list[Row]
    opponents: list[Row]

    @property
    def rows(self) -> list[Row]:
        return self.proponents + self.opponents


def top_influences(analysis: Analysis, result, q: int, query: Query, examples: Sequence[Example], tokenizer,
                   k: int = 5) -> QueryView:
    """The k strongest proponents and opponents of query ``q`` of ``result``, each with its per-token scores."""
    top = result.top(q, k)

    def row(i: int, score: float) -> Row:
        ts = analysis.token_scores(q, i, result)
        return Row(i, examples[i].text, examples[i].kind, score, token_strings(tokenizer, ts.token_ids),
                   [float(v) for v in ts.values])

    n_tokens = len(tokenizer(query.completion, add_special_tokens=False)["input_ids"])
    answer = next_word(analysis.model, tokenizer, query.prompt, n_tokens)
    return QueryView(query, answer, [row(i, s) for i, s in top.proponents], [row(i, s) for i, s in top.opponents])


# -- 3, 4: layers and sparsity -------------------------------------------------------------------------------------
def layer_shares(result, k: int = 10) -> tuple[list[str], np.ndarray]:
    """Each layer's share of the summed score of each query's top-k proponents: [n_query, n_layer], rows sum to 1."""
    names = list(result.per_layer)
    shares = np.zeros((result.n_query, len(names)))
    for q in range(result.n_query):
        top = result.top(q, k).proponents.indices
        columns = [result.train_indices.index(i) for i in top] if result.train_indices else top
        per_layer = np.array([float(result.per_layer[n][q, columns].sum()) for n in names])
        shares[q] = per_layer / per_layer.sum()
    return names, shares


def sparsity(result) -> list[PowerLaw]:
    """A power-law fit of each query's sorted |scores| (top half of the ranks)."""
    return [fit_power_law(result.scores[q].numpy()) for q in range(result.n_query)]


# -- 5: word order -------------------------------------------------------------------------------------------------
@dataclass
class WordOrder:
    """Per country (rows of ``table``, columns :attr:`COLUMNS`): the score of the sentence with the query's own
    words, the mean of the other same-order paraphrases, the mean of the flipped ones, the flipped sentence with the
    query's words ("Parth is the capital of Veloria."), and the median |score| of unrelated sequences."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "same words, same order", "same order, paraphrased", "flipped (mean)", "flipped, same words",
        "unrelated (median |score|)",
    )

    countries: list[str]
    table: np.ndarray  # [n_country, 5]
    flipped_rank: list[int]  # rank (1 = top proponent) of the flipped sentence with the query's words
    same_beats_flipped: np.ndarray  # [n_country] bool: every same-order sentence outscores every flipped one
    flipped_scores: np.ndarray  # all flipped sentences' scores (for their own country's query)
    n_train: int

    @property
    def means(self) -> np.ndarray:
        return self.table.mean(axis=0)

    @property
    def ratio(self) -> float:
        """Mean score of the same-order paraphrases / mean |score| of the flipped sentences."""
        return float(self.table[:, 1].mean() / np.abs(self.flipped_scores).mean())

    def summary(self) -> str:
        m = self.means
        return (
            f"over {len(self.countries)} capital queries, mean score: same words and order {m[0]:.1f}, same order "
            f"paraphrased {m[1]:.1f}, flipped {m[2]:.1f} (mean |flipped| {np.abs(self.flipped_scores).mean():.1f}, "
            f"median |unrelated| {m[4]:.1f}); same-order paraphrases score {self.ratio:.0f}x the flipped sentences; "
            f"every same-order sentence beats every flipped one for {int(self.same_beats_flipped.sum())}/"
            f"{len(self.countries)} countries; the flipped sentence with the query's words ranks "
            f"{int(np.median(self.flipped_rank))} of {self.n_train} (median)"
        )


def word_order(analysis: Analysis, corpus: Corpus, result=None) -> WordOrder:
    """Score every capital query and compare same-order and flipped sentences about the same country."""
    queries = capital_queries(corpus)
    result = result if result is not None else analysis.scores([q.as_dict() for q in queries])
    scores = result.scores.numpy()
    ex = corpus.pretrain
    rows, ranks, ok, flipped_all = [], [], [], []
    for q, c in enumerate(corpus.countries):
        row = scores[q]
        pick = {kind_t: [i for i, e in enumerate(ex) if e.subject == c.country and (e.kind, e.template) == kind_t]
                for kind_t in [("capital", 0), ("capital", 1), ("capital", 2), ("capital_flipped", 0),
                               ("capital_flipped", 1)]}
        same_exact = row[pick[("capital", 0)]]
        same_para = row[pick[("capital", 1)] + pick[("capital", 2)]]
        flipped = row[pick[("capital_flipped", 0)] + pick[("capital_flipped", 1)]]
        unrelated = np.abs(row[[i for i, e in enumerate(ex) if e.subject != c.country]])
        order = np.argsort(-row, kind="stable")
        flipped_exact_index = pick[("capital_flipped", 0)][0]
        ranks.append(int(np.nonzero(order == flipped_exact_index)[0][0]) + 1)
        rows.append([same_exact.mean(), same_para.mean(), flipped.mean(), row[flipped_exact_index],
                     np.median(unrelated)])
        ok.append(min(same_exact.min(), same_para.min()) > flipped.max())
        flipped_all.extend(flipped.tolist())
    return WordOrder([c.country for c in corpus.countries], np.array(rows), ranks, np.array(ok),
                     np.array(flipped_all), len(ex))


# -- 6: TF-IDF -----------------------------------------------------------------------------------------------------
@dataclass
class TfidfCheck:
    fractions: tuple[float, ...]
    m: list[int]  # candidates per query at each fraction
    kept: np.ndarray  # [n_fraction, n_query]: of the exact top-k, how many the filtered top-k keeps
    k: int
    n_train: int
    seconds_full: float  # scoring all queries against all train examples
    seconds_filtered: list[float]  # scoring each query against its candidates only, all queries, per fraction

    def summary(self) -> str:
        parts = [f"m = {f:.0%} ({m}): {self.kept[j].mean():.1f}/{self.k} kept on average (min {self.kept[j].min()})"
                 for j, (f, m) in enumerate(zip(self.fractions, self.m))]
        return "; ".join(parts)


def tfidf_filter(analysis: Analysis, queries: Sequence[Query], fractions: Sequence[float] = FRACTIONS,
                 k: int = 10, full=None) -> TfidfCheck:
    """For each query, score only its top-m TF-IDF candidates (``scores(train_indices=...)``) and count how many
    of the exact top-k proponents (from scoring everything) are still the top-k."""
    dicts = [q.as_dict() for q in queries]
    start = time.perf_counter()
    full = full if full is not None else analysis.scores(dicts)
    seconds_full = time.perf_counter() - start
    index = TfidfIndex(analysis.train_data)
    kept = np.zeros((len(fractions), len(queries)), dtype=int)
    ms, seconds = [], []
    for j, fraction in enumerate(fractions):
        candidates = index.candidates_many(dicts, fraction)
        ms.append(len(candidates[0]))
        start = time.perf_counter()
        for q, (query, cands) in enumerate(zip(dicts, candidates)):
            filtered = analysis.scores([query], train_indices=cands)
            exact_top = set(full.top(q, k).proponents.indices)
            kept[j, q] = len(exact_top & set(filtered.top(0, k).proponents.indices))
            assert kept[j, q] == kept_of_top(full.scores[q].numpy(), cands, k)
        seconds.append(time.perf_counter() - start)
    return TfidfCheck(tuple(fractions), ms, kept, k, analysis.n_train, seconds_full, seconds)


# -- 7: estimators compared ----------------------------------------------------------------------------------------
@dataclass
class Comparison:
    estimators: tuple[str, ...]
    scores: dict[str, np.ndarray]  # [n_query, n_train] per estimator
    seconds: dict[str, float]  # fit + scores
    pairs: list[tuple[str, str, float, float, float]]  # (a, b, mean Pearson, mean Spearman, mean top-10 overlap)
    own_fact: dict[str, float]  # share of queries whose top-3 proponents are the queried country's 3 sentences
    n_query: int
    n_train: int
    layers: int
    params: int


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def compare_estimators(models: DemoModels, estimators: Sequence[str] = ESTIMATORS, k: int = 10,
                       progress: Callable[[str], None] | None = None) -> Comparison:
    """Fit each estimator on the LoRA model's fine-tuning data and compare their scores for the currency queries."""
    queries = [q.as_dict() for q in currency_queries(models.corpus)]
    ex = models.corpus.finetune
    scores, seconds, own = {}, {}, {}
    layers = params = 0
    for est in estimators:
        if progress:
            progress(est)
        start = time.perf_counter()
        an = finetuning_analysis(models, est, progress=False)  # ``progress`` here reports the steps
        an.fit()
        result = an.scores(queries)
        seconds[est] = time.perf_counter() - start
        scores[est] = result.scores.numpy().astype(np.float64)
        layers, params = len(an.layers), an.n_params
        hits = 0
        for q, c in enumerate(models.corpus.countries):
            own_sentences = {i for i, e in enumerate(ex) if e.kind == "currency" and e.subject == c.country}
            hits += set(result.top(q, len(own_sentences)).proponents.indices) == own_sentences
        own[est] = hits / len(queries)
    pairs = []
    for a_i, a in enumerate(estimators):
        for b in estimators[a_i + 1:]:
            pear, spear, over = [], [], []
            for q in range(len(queries)):
                x, y = scores[a][q], scores[b][q]
                pear.append(float(np.corrcoef(x, y)[0, 1]))
                spear.append(float(np.corrcoef(_ranks(x), _ranks(y))[0, 1]))
                top_x = set(np.argsort(-x, kind="stable")[:k].tolist())
                top_y = set(np.argsort(-y, kind="stable")[:k].tolist())
                over.append(len(top_x & top_y) / k)
            pairs.append((a, b, float(np.mean(pear)), float(np.mean(spear)), float(np.mean(over))))
    return Comparison(tuple(estimators), scores, seconds, pairs, own, len(queries), len(ex), layers, params)


# -- everything ------------------------------------------------------------------------------------------------------
STEPS = ("load the demo model", "fit EK-FAC", "score the queries", "token-wise attribution", "word order",
         "TF-IDF filter", "EK-FAC vs DataInf vs identity")


@dataclass
class Story:
    models: DemoModels
    analysis: Analysis
    queries: list[Query]
    result: Any  # InfluenceResult of the main queries
    views: list[QueryView]
    layer_names: list[str]
    layer_shares: np.ndarray
    fits: list[PowerLaw]
    word_order: WordOrder
    tfidf: TfidfCheck
    comparison: Comparison
    lora_view: QueryView
    timings: dict[str, float]
    settings: dict[str, Any]


def settings_of(models: DemoModels, analysis: Analysis) -> dict[str, Any]:
    cfg = models.base.config
    return {
        "infkit": __version__,
        "demo model version": VERSION,
        "model": f"GPT-2 from a config: {cfg.n_layer} blocks, width {cfg.n_embd}, {cfg.n_head} heads, "
                 f"vocabulary {cfg.vocab_size} words, {sum(p.numel() for p in models.base.parameters()):,} parameters",
        "LoRA": f"rank {models.recipe.lora_r} on {', '.join(models.recipe.lora_targets)}",
        "tokenizer": "word level (tokenizers WordLevel, Metaspace + punctuation split), built locally",
        "pretraining corpus": f"{len(models.corpus.pretrain)} sequences",
        "fine-tuning set": f"{len(models.corpus.finetune)} sequences",
        "estimator": analysis.estimator.name,
        "tracked layers": f"{len(analysis.layers)} ({analysis.n_params:,} parameters)",
        "damping": "0.1 x mean eigenvalue per layer (the paper's heuristic)" if analysis.estimator.damping is None
                   else str(analysis.estimator.damping),
        "Fisher": f"{analysis.fisher or 'none (no curvature)'}, seed {analysis.seed}",
        "model weights": f"{models.source} ({models.cache_path or 'not cached'})",
        "training (when the weights were made)": ", ".join(
            f"{k}: {v['epochs']} epochs, {v['seconds']} s" for k, v in models.train_info.items() if k != "accuracy"
        ),
        "torch": f"{torch.__version__}, {platform.machine()}, the demo runs on {torch.get_num_threads()} thread(s)",
    }


def run(models: DemoModels | None = None, analysis: Analysis | None = None, k: int = 5,
        progress: Callable[[str], None] | None = None, timings: dict[str, float] | None = None,
        queries: Sequence[Query] | None = None) -> Story:
    """Every analysis of the report. ``progress(step)`` is called as each of :data:`STEPS` starts.

    Args:
        models: the demo models (default :func:`infkit.demo.load`).
        analysis: a fitted analysis of ``models.base`` over the pretraining corpus (e.g. ``Analysis.load`` of a
            save); default a fresh EK-FAC fit.
        k: proponents and opponents shown per query.
        timings: timings measured before (e.g. loading the models), listed first in ``story.timings``.
        queries: the queries to show (default :func:`main_queries`).

    Runs on one torch thread (:func:`infkit.demo.model.single_thread`).
    """
    with single_thread():
        return _run(models, analysis, k, progress, dict(timings or {}), queries)


def _run(models, analysis, k, progress, timings, queries) -> Story:

    def step(name: str) -> float:
        if progress:
            progress(name)
        return time.perf_counter()

    t = step(STEPS[0])
    if models is None:
        models = load(verbose=False)
        timings[f"load the demo model ({models.source})"] = time.perf_counter() - t
    corpus, tok = models.corpus, models.tokenizer

    t = step(STEPS[1])
    an = analysis or pretraining_analysis(models, progress=False)  # the caller's ``progress`` reports the steps
    an.fit()
    timings["fit EK-FAC" if an.estimator.name == "ekfac" else f"fit {an.estimator.name}"] = time.perf_counter() - t

    t = step(STEPS[2])
    queries = list(queries) if queries else main_queries(corpus)
    result = an.scores([q.as_dict() for q in queries])
    capitals = an.scores([q.as_dict() for q in capital_queries(corpus)])
    timings["score the queries"] = time.perf_counter() - t

    t = step(STEPS[3])
    views = [top_influences(an, result, q, query, corpus.pretrain, tok, k) for q, query in enumerate(queries)]
    names, shares = layer_shares(result)
    fits = sparsity(result)
    timings["token-wise attribution, layers, sparsity"] = time.perf_counter() - t

    t = step(STEPS[4])
    order = word_order(an, corpus, capitals)
    timings["word order"] = time.perf_counter() - t

    t = step(STEPS[5])
    tfidf = tfidf_filter(an, capital_queries(corpus) + queries)
    timings["TF-IDF filter"] = time.perf_counter() - t

    t = step(STEPS[6])
    comparison = compare_estimators(models)
    lora_an = finetuning_analysis(models, "ekfac", progress=False).fit()
    lora_query = currency_queries(corpus)[0]
    lora_result = lora_an.scores([lora_query.as_dict()])
    lora_view = top_influences(lora_an, lora_result, 0, lora_query, corpus.finetune, tok, k)
    timings["EK-FAC vs DataInf vs identity"] = time.perf_counter() - t

    return Story(models, an, queries, result, views, names, shares, fits, order, tfidf, comparison, lora_view,
                 timings, settings_of(models, an))


SPECIAL_TOKENS = SPECIALS
