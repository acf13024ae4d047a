"""Can I trust these scores? The measures the field uses, in one call each.

* :func:`agreement` — how two score matrices agree (e.g. an estimator against ``estimator="exact"``): Pearson,
  Spearman and top-k overlap, per query and overall.
* :func:`lds` — the linear datamodeling score (Ilyas et al. 2022; Park et al. 2023, TRAK; used by kronfluence
  and dattri): retrain on random subsets of the train data and ask whether the summed scores of each subset rank
  the retrained models' query losses correctly. :func:`lds_subsets` and :func:`lds_from_measurements` split it
  in two for retraining elsewhere (in parallel, on other machines).
* :func:`mislabel_auc` and :func:`detection_curve` — how well the scores find mislabelled training points
  (Koh & Liang 2017; Kwon et al. 2023, DataInf, Fig. 2).
* :func:`class_recall` and :func:`class_auc` — whether each query's strongest proponents come from its own class
  (Kwon et al. 2023, DataInf, §4.2: the sentence-transformation and math tasks).

Sign (docs/design.md §2): score(q, i) > 0 means up-weighting train example i lowers query q's loss (a proponent).
So a model trained on a subset S is predicted to have query loss ≈ const − Σ_{i∈S} score(q, i) (the
first-order change of removing the others), and a mislabelled point is expected to be a strong *opponent* of
clean validation queries (most negative total score) or to have a high self-influence.

Every function accepts an :class:`~infkit.result.InfluenceResult`, a torch tensor or a numpy array, and
raises :class:`~infkit.errors.InfkitError` naming the problem and the fix for bad input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from infkit.errors import InfkitError
from infkit.result import InfluenceResult

__all__ = [
    "Agreement",
    "DetectionCurve",
    "LDSError",
    "LDSResult",
    "agreement",
    "class_auc",
    "class_recall",
    "detection_curve",
    "lds",
    "lds_from_measurements",
    "lds_subsets",
    "mislabel_auc",
]

BOOTSTRAP_RESAMPLES = 2000


# -- helpers ------------------------------------------------------------------------------------------------------
def _as_array(x: Any, what: str) -> np.ndarray:
    """float64 numpy copy of a tensor / array / InfluenceResult (its ``scores``)."""
    if isinstance(x, InfluenceResult):
        x = x.scores
    if torch.is_tensor(x):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InfkitError(
            f"{what} must be an InfluenceResult, a torch tensor or a numpy array of numbers; got {type(x).__name__}"
        ) from err
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InfkitError(
            f"{what} holds {bad} non-finite value(s) (nan or inf); influence scores must be finite — check the "
            "model's losses and the damping (damping=0 with a singular curvature gives inf)"
        )
    return arr


def _scores_2d(x: Any, what: str) -> np.ndarray:
    arr = _as_array(x, what)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InfkitError(f"{what} must be scores of shape [n_query, n_train] or [n_train]; got shape {arr.shape}")
    return arr


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of a and b [Q, n]; nan for a row that is constant in a or b."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    out = np.full(a.shape[0], np.nan)
    ok = denominator > 0
    out[ok] = (a * b).sum(axis=1)[ok] / denominator[ok]
    return out


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation per row: Pearson of the ranks (ties get their average rank)."""
    return _row_pearson(rankdata(a, axis=1), rankdata(b, axis=1))


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if not np.isfinite(x) else f"{x:.{digits}f}"


# -- agreement ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    """How two score matrices [n_query, n_train] agree.

    Attributes:
        pearson, spearman: over all n_query × n_train pairs at once (the scale of each query counts).
        top_k: {k: mean over queries of |top-k of a ∩ top-k of b| / k}.
        per_query: {"pearson": [Q], "spearman": [Q], "top_10": [Q], ...} — within each query (nan where a row is
            constant).
        by: which end of each row the top-k overlap looks at ("proponents", "opponents" or "magnitude").
    """

    pearson: float
    spearman: float
    top_k: dict[int, float]
    per_query: dict[str, np.ndarray]
    by: str = "proponents"

    @property
    def mean_pearson(self) -> float:
        """Mean over queries of the within-query Pearson correlation."""
        return _nanmean(self.per_query["pearson"])

    @property
    def mean_spearman(self) -> float:
        """Mean over queries of the within-query Spearman correlation."""
        return _nanmean(self.per_query["spearman"])

    def as_dict(self) -> dict[str, float]:
        """Flat summary, one number each (for a table row)."""
        out = {
            "pearson": self.pearson,
            "spearman": self.spearman,
            "mean_query_pearson": self.mean_pearson,
            "mean_query_spearman": self.mean_spearman,
        }
        out.update({f"top_{k}": v for k, v in self.top_k.items()})
        return out

    def __repr__(self) -> str:
        tops = ", ".join(f"top_{k}={_fmt(v, 2)}" for k, v in self.top_k.items())
        return (
            f"Agreement(pearson={_fmt(self.pearson)}, spearman={_fmt(self.spearman)}, "
            f"mean per-query pearson={_fmt(self.mean_pearson)}, spearman={_fmt(self.mean_spearman)}, {tops}, "
            f"n_query={len(self.per_query['pearson'])}, by={self.by!r})"
        )


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _top_sets(scores: np.ndarray, k: int, by: str) -> np.ndarray:
    """Indices of the k strongest entries of each row [Q, k] (ties: lower index first)."""
    key = {"proponents": -scores, "opponents": scores, "magnitude": -np.abs(scores)}[by]
    return np.argsort(key, axis=1, kind="stable")[:, :k]


def agreement(result_a: Any, result_b: Any, k: Sequence[int] = (10, 100), by: str = "proponents") -> Agreement:
    """Agreement of two score matrices: Pearson, Spearman and top-k overlap, per query and overall.

    Args:
        result_a, result_b: InfluenceResults, tensors or arrays of the same shape [n_query, n_train] (or
            [n_train] for one query), scoring the same train examples in the same order.
        k: the top-k sizes; a k above n_train is clipped to n_train (the overlap is then 1).
        by: "proponents" (top-k = the k highest scores, default), "opponents" (the k lowest) or "magnitude"
            (the k largest |score|).

    Returns:
        :class:`Agreement`. ``pearson`` / ``spearman`` correlate all pairs at once; ``per_query`` holds the
        within-query values and ``mean_pearson`` / ``mean_spearman`` their means; ``top_k[k]`` is the mean over
        queries of the fraction of a's top-k that is also in b's top-k.
    """
    if by not in ("proponents", "opponents", "magnitude"):
        raise InfkitError(f"by={by!r} is not one of 'proponents', 'opponents', 'magnitude'")
    for name, r in (("result_a", result_a), ("result_b", result_b)):
        if isinstance(r, InfluenceResult) and r.train_indices is not None:
            other = result_b if r is result_a else result_a
            if not (isinstance(other, InfluenceResult) and other.train_indices == r.train_indices):
                raise InfkitError(
                    f"{name} scores only the train examples in its train_indices ({len(r.train_indices)} of them) "
                    "and the other result does not score the same ones: score both with the same train_indices= "
                    "(or both on all the train data)"
                )
    a, b = _scores_2d(result_a, "result_a"), _scores_2d(result_b, "result_b")
    if a.shape != b.shape:
        raise InfkitError(
            f"result_a has shape {a.shape} and result_b {b.shape}: agreement compares the same queries against the "
            "same train examples, so score both with the same queries and train data"
        )
    ks = [int(x) for x in ([k] if isinstance(k, int) else k)]
    if not ks or any(x < 1 for x in ks):
        raise InfkitError(f"k must be one or more positive integers, got {k!r}")
    n_train = a.shape[1]
    per_query: dict[str, np.ndarray] = {"pearson": _row_pearson(a, b), "spearman": _row_spearman(a, b)}
    top_k: dict[int, float] = {}
    for size in ks:
        kk = min(size, n_train)
        top_a, top_b = _top_sets(a, kk, by), _top_sets(b, kk, by)
        overlap = np.array([len(np.intersect1d(x, y)) / kk for x, y in zip(top_a, top_b)])
        per_query[f"top_{size}"] = overlap
        top_k[size] = float(overlap.mean())
    flat_a, flat_b = a.reshape(1, -1), b.reshape(1, -1)
    return Agreement(
        pearson=float(_row_pearson(flat_a, flat_b)[0]),
        spearman=float(_row_spearman(flat_a, flat_b)[0]),
        top_k=top_k,
        per_query=per_query,
        by=by,
    )


# -- LDS ----------------------------------------------------------------------------------------------------------
@dataclass
class LDSResult:
    """The linear datamodeling score of one score matrix.

    Attributes:
        mean: mean over queries of ``per_query`` (queries whose LDS is undefined are left out).
        per_query: [n_query] Spearman correlation, over the subsets, between the measured query loss of the
            retrained models and the predicted one, −Σ_{i∈S} score(q, i). nan where the measured (or predicted)
            values do not vary across subsets.
        ci: (low, high) confidence interval of ``mean`` at level ``ci_level``: a percentile bootstrap over queries
            (2,000 resamples of the finite per-query values, seeded), so it says how much the mean depends on
            which queries were asked — not the retraining noise, which is in each per-query value.
        subsets: [n_done, subset size] the train indices of each finished subset (sorted).
        measured, predicted: [n_done, n_query] the measured and predicted query losses.
        n_planned: subsets asked for; ``complete`` is False for the partial result of an interrupted run.
    """

    mean: float
    per_query: np.ndarray
    ci: tuple[float, float]
    ci_level: float
    subsets: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    n_planned: int
    fraction: float
    seed: int
    seeds: tuple[int, ...] | None = None
    ci_method: str = field(default=f"percentile bootstrap over queries ({BOOTSTRAP_RESAMPLES} resamples)")

    @property
    def n_subsets(self) -> int:
        return int(self.measured.shape[0])

    @property
    def complete(self) -> bool:
        return self.n_subsets == self.n_planned

    @property
    def n_undefined(self) -> int:
        return int((~np.isfinite(self.per_query)).sum())

    def __repr__(self) -> str:
        undefined = f", {self.n_undefined} undefined" if self.n_undefined else ""
        return (
            f"LDSResult(mean={_fmt(self.mean)}, {round(100 * self.ci_level)}% CI [{_fmt(self.ci[0])}, "
            f"{_fmt(self.ci[1])}] ({self.ci_method}), n_query={len(self.per_query)}{undefined}, "
            f"subsets={self.n_subsets}/{self.n_planned}, fraction={self.fraction:g})"
        )


class LDSError(InfkitError):
    """``retrain_fn`` (or the measurement) failed on one subset. ``partial`` keeps the finished subsets: an
    :class:`LDSResult` (``complete`` False; None when fewer than 2 finished) that ``lds(..., resume=partial)``
    continues from; ``subset`` is the failing subset's number and ``indices`` its train indices."""

    def __init__(self, message: str, subset: int, indices: list[int], partial: LDSResult | None):
        super().__init__(message)
        self.subset, self.indices, self.partial = subset, indices, partial


def lds_subsets(n_train: int, n_subsets: int = 100, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """The random subsets :func:`lds` retrains on, [n_subsets, round(fraction · n_train)] sorted train indices.

    Fixed by (n_train, n_subsets, fraction, seed) alone, so they can be retrained anywhere — in parallel, in other
    processes — and the measurements handed to :func:`lds_from_measurements`. Subset j is the same whatever
    n_subsets is (each is drawn from its own generator, seeded by (seed, j)).
    """
    if int(n_subsets) < 2:
        raise InfkitError(
            f"n_subsets={n_subsets}: the LDS is a rank correlation over subsets, so it needs at least 2 (use about "
            "100 for a stable estimate)"
        )
    if not 0 < fraction < 1:
        raise InfkitError(f"fraction={fraction} must be strictly between 0 and 1 (the share of train data per subset)")
    if int(n_train) < 2:
        raise InfkitError(f"n_train={n_train}: the LDS needs at least 2 train examples to draw subsets from")
    size = int(round(fraction * n_train))
    if not 1 <= size < n_train:
        raise InfkitError(
            f"fraction={fraction} of {n_train} train examples gives subsets of {size}; choose a fraction that keeps "
            f"between 1 and {n_train - 1} examples"
        )
    rows = [
        np.sort(np.random.default_rng([int(seed), j]).choice(n_train, size=size, replace=False))
        for j in range(int(n_subsets))
    ]
    return np.stack(rows)


def _ci(per_query: np.ndarray, level: float, seed: int) -> tuple[float, float]:
    values = per_query[np.isfinite(per_query)]
    if values.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng([int(seed), 2**31 - 1])
    means = values[rng.integers(0, values.size, size=(BOOTSTRAP_RESAMPLES, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return (float(low), float(high))


def lds_from_measurements(
    scores: Any,
    subsets: Any,
    measured: Any,
    ci: float = 0.95,
    seed: int = 0,
    n_planned: int | None = None,
    fraction: float | None = None,
    seeds: Sequence[int] | None = None,
) -> LDSResult:
    """The LDS of ``scores`` [n_query, n_train] from query losses already measured on retrained models.

    Args:
        scores: an InfluenceResult, tensor or array [n_query, n_train] (all train examples, in order).
        subsets: [n_subsets, m] train indices each model was trained on (e.g. from :func:`lds_subsets`).
        measured: [n_subsets, n_query] the query losses (the quantity the scores are gradients of) of the model
            retrained on each subset.
        ci: confidence level of the bootstrap interval over queries; ``seed`` seeds the bootstrap.
    """
    s = _scores_2d(scores, "scores")
    subsets = np.asarray(subsets)
    measured = _as_array(measured, "measured")
    if subsets.ndim != 2 or subsets.shape[0] < 2:
        raise InfkitError(
            f"subsets has shape {subsets.shape}; the LDS is a rank correlation over subsets, so it needs at least "
            "2 subsets as an [n_subsets, subset size] array of train indices"
        )
    if subsets.size and (subsets.min() < 0 or subsets.max() >= s.shape[1]):
        raise InfkitError(f"subsets hold train indices outside 0..{s.shape[1] - 1}, the columns of the scores")
    if measured.shape != (subsets.shape[0], s.shape[0]):
        raise InfkitError(
            f"measured has shape {measured.shape}; expected [n_subsets, n_query] = "
            f"[{subsets.shape[0]}, {s.shape[0]}] (one measured query loss per subset and query)"
        )
    if not 0 < ci < 1:
        raise InfkitError(f"ci={ci} must be a confidence level strictly between 0 and 1, e.g. 0.95")
    # Sum of each subset's scores: [n_subsets, n_query]. Predicted loss = −sum (proponents lower the loss).
    predicted = -np.stack([s[:, row].sum(axis=1) for row in subsets.astype(np.int64)])
    per_query = _row_spearman(measured.T, predicted.T)
    return LDSResult(
        mean=_nanmean(per_query),
        per_query=per_query,
        ci=_ci(per_query, ci, seed),
        ci_level=ci,
        subsets=subsets,
        measured=measured,
        predicted=predicted,
        n_planned=int(n_planned if n_planned is not None else subsets.shape[0]),
        fraction=float(fraction if fraction is not None else subsets.shape[1] / s.shape[1]),
        seed=int(seed),
        seeds=tuple(int(x) for x in seeds) if seeds is not None else None,
    )


def _task_measure(task, queries: Sequence[Any], batch_size: int = 64) -> Callable[[torch.nn.Module], np.ndarray]:
    from infkit.passes import eval_mode, model_device

    def measure(model: torch.nn.Module) -> np.ndarray:
        out = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(queries), batch_size):
                batch = task.collate([queries[i] for i in range(start, min(start + batch_size, len(queries)))])
                batch = task.batch_to(batch, model_device(model))
                out.append(task.measurement(model, batch).detach().to("cpu", torch.float64).reshape(-1))
        return torch.cat(out).numpy()

    return measure


def _call_retrain(retrain_fn: Callable, indices: list[int], seed: int | None):
    if seed is None:
        return retrain_fn(indices)
    return retrain_fn(indices, seed=seed)


def lds(
    analysis_or_scores: Any,
    retrain_fn: Callable[..., torch.nn.Module],
    queries: Sequence[Any],
    n_subsets: int = 100,
    fraction: float = 0.5,
    seeds: Sequence[int] | None = None,
    *,
    seed: int = 0,
    measure_fn: Callable[[torch.nn.Module, Sequence[Any]], Any] | None = None,
    task: Any = None,
    ci: float = 0.95,
    progress: bool = True,
    resume: LDSResult | None = None,
) -> LDSResult:
    """Linear datamodeling score: do the summed scores of a train subset predict the query loss of a model
    retrained on that subset?

    For each of ``n_subsets`` random subsets S_j (``round(fraction · n_train)`` train examples, drawn by
    :func:`lds_subsets` from ``seed``), ``retrain_fn(indices)`` trains a model on S_j and each query's loss is
    measured on it. The datamodel prediction is −Σ_{i∈S_j} score(q, i) (docs/design.md sign: a proponent lowers the
    query loss); the LDS of query q is the Spearman correlation over j of measured and predicted losses, and the
    LDS is its mean over queries, with a bootstrap confidence interval over queries.

    Args:
        analysis_or_scores: an :class:`~infkit.analysis.Analysis` (its ``scores(queries)`` are computed here and
            its task measures the queries), an InfluenceResult, or scores [n_query, n_train] (tensor or array;
            then give ``measure_fn`` or ``task``). The scores must cover every train example, in order.
        retrain_fn: ``retrain_fn(indices) -> model``, training from scratch (or from a fixed initialisation) on
            the train examples ``indices`` (a sorted list of ints). With ``seeds`` it is called as
            ``retrain_fn(indices, seed=s)`` for each s and the query losses are averaged over the seeds (fewer
            retraining noise, as TRAK and kronfluence do).
        queries: the query examples (what the scores were computed for, in the same order).
        n_subsets: at least 2; about 100 is usual. ``fraction``: share of the train data in each subset.
        seed: draws the subsets and seeds the bootstrap. The same seed gives the same subsets and the same result.
        measure_fn: ``measure_fn(model, queries) -> [n_query]`` the query losses; by default the task's
            measurement (the quantity the scores are gradients of). A custom one must measure the same quantity,
            or at least one that falls when the scores say it should (a loss, not an accuracy).
        task: the task to measure with when ``analysis_or_scores`` is a bare score matrix.
        ci: confidence level of the interval. ``progress``: a tqdm bar over the subsets.
        resume: the ``partial`` result of an :class:`LDSError`; its finished subsets are kept and the run goes on
            from the next one (same seed, n_subsets and fraction).

    Returns:
        :class:`LDSResult` with ``mean``, ``per_query`` [n_query] and ``ci``.

    Raises:
        LDSError: ``retrain_fn`` or the measurement raised on a subset. The error names the subset and carries
            ``partial``, the LDS of the subsets finished before it (kept, never thrown away).
        InfkitError: bad input (fewer than 2 subsets, a fraction outside (0, 1), scores of another shape, ...).

    Retraining runs one subset after another in this process. To spread it over processes or machines, take the
    subsets from :func:`lds_subsets`, retrain them anywhere and call :func:`lds_from_measurements`.
    """
    from tqdm.auto import tqdm

    from infkit.analysis import Analysis

    if not callable(retrain_fn):
        raise InfkitError(
            f"retrain_fn must be a function retrain_fn(indices) -> model; got {type(retrain_fn).__name__}"
        )
    try:
        n_query = len(queries)
    except TypeError as err:
        raise InfkitError(f"queries must be a list of query examples; got {type(queries).__name__}") from err
    if n_query == 0:
        raise InfkitError("queries is empty: the LDS needs at least one query to measure")
    if int(n_subsets) < 2:
        raise InfkitError(
            f"n_subsets={n_subsets}: the LDS is a rank correlation over subsets, so it needs at least 2 (use about "
            "100 for a stable estimate)"
        )
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise InfkitError("seeds is empty: give None (one retraining per subset) or a list of retraining seeds")
        if "seed" not in inspect.signature(retrain_fn).parameters and not any(
            p.kind is p.VAR_KEYWORD for p in inspect.signature(retrain_fn).parameters.values()
        ):
            raise InfkitError(
                "seeds= was given, so retrain_fn is called as retrain_fn(indices, seed=s), but it takes no 'seed' "
                "argument: add one, or leave seeds=None"
            )

    # The scores and the measurement.
    if isinstance(analysis_or_scores, Analysis):
        result = analysis_or_scores.scores(queries)
        scores, default_task = result.scores, analysis_or_scores.task
    elif isinstance(analysis_or_scores, InfluenceResult):
        scores = analysis_or_scores.scores
        attached = analysis_or_scores._analysis
        default_task = attached.task if attached is not None else None
        if analysis_or_scores.train_indices is not None:
            raise InfkitError(
                "the result scores only the train examples in its train_indices; the LDS sums the scores of random "
                "subsets of the whole train data, so score every train example (no train_indices=)"
            )
    else:
        scores, default_task = analysis_or_scores, None
    s = _scores_2d(scores, "scores")
    if s.shape[0] != n_query:
        raise InfkitError(
            f"the scores have {s.shape[0]} rows but {n_query} queries were given: pass the queries the scores were "
            "computed for, in the same order"
        )
    if measure_fn is not None:
        measure = lambda model: measure_fn(model, queries)  # noqa: E731
    else:
        chosen_task = task if task is not None else default_task
        if chosen_task is None:
            raise InfkitError(
                "cannot measure the queries: give measure_fn=(model, queries) -> query losses, or task= (e.g. "
                "infkit.tasks.Classification()), or pass the Analysis instead of bare scores"
            )
        measure = _task_measure(chosen_task, queries)

    n_train = s.shape[1]
    subsets = lds_subsets(n_train, n_subsets, fraction, seed)
    measured: list[np.ndarray] = []
    if resume is not None:
        done = resume.subsets
        if done.shape[0] > subsets.shape[0] or done.shape[1] != subsets.shape[1] or not np.array_equal(
            done, subsets[: done.shape[0]]
        ):
            raise InfkitError(
                "resume= holds other subsets than this call would draw: resume with the same seed, fraction and "
                "scores (n_train) as the interrupted run"
            )
        if resume.measured.shape[1] != n_query:
            raise InfkitError(f"resume= measured {resume.measured.shape[1]} queries, this call has {n_query}")
        measured = [row for row in resume.measured]

    def finish(rows: list[np.ndarray]) -> LDSResult:
        return lds_from_measurements(
            s, subsets[: len(rows)], np.stack(rows), ci=ci, seed=seed, n_planned=int(n_subsets),
            fraction=fraction, seeds=seeds,
        )

    bar = tqdm(total=int(n_subsets), initial=len(measured), desc="LDS: retraining on subsets", disable=not progress)
    try:
        for j in range(len(measured), int(n_subsets)):
            indices = [int(i) for i in subsets[j]]
            try:
                values = []
                for retrain_seed in seeds if seeds is not None else [None]:
                    model = _call_retrain(retrain_fn, indices, retrain_seed)
                    if not isinstance(model, torch.nn.Module) and measure_fn is None:
                        raise InfkitError(
                            f"retrain_fn returned {type(model).__name__}, not a torch module; return the trained "
                            "model (or give measure_fn= that can measure what it returns)"
                        )
                    value = _as_array(measure(model), "the measured query losses").reshape(-1)
                    if value.shape != (n_query,):
                        raise InfkitError(
                            f"the measurement returned {value.size} values for {n_query} queries; it must return "
                            "one loss per query"
                        )
                    values.append(value)
            except Exception as err:
                partial = finish(measured) if len(measured) >= 2 else None
                kept = (
                    f"the {len(measured)} finished subsets are kept in err.partial (LDS over them: "
                    f"{_fmt(partial.mean)}); fix retrain_fn and continue with lds(..., resume=err.partial)"
                    if partial is not None
                    else f"{len(measured)} subset(s) had finished, too few for an LDS (err.partial is None)"
                )
                raise LDSError(
                    f"retrain_fn failed on subset {j} of {n_subsets} ({len(indices)} train indices, first "
                    f"{indices[:5]}): {type(err).__name__}: {err}. {kept}",
                    subset=j,
                    indices=indices,
                    partial=partial,
                ) from err
            measured.append(np.mean(values, axis=0))
            bar.update(1)
    finally:
        bar.close()
    return finish(measured)


# -- mislabel detection -------------------------------------------------------------------------------------------
def _suspicion(train_scores: Any, flipped_mask: Any, self_influence: Any) -> tuple[np.ndarray, np.ndarray]:
    """(suspicion [n_train], mask [n_train] bool): higher suspicion = inspected first."""
    if flipped_mask is None:
        raise InfkitError("flipped_mask is missing: give a [n_train] boolean array, True where the label was flipped")
    if (train_scores is None) == (self_influence is None):
        raise InfkitError(
            "give exactly one of train_scores (influence on clean validation queries, [n_train] or "
            "[n_query, n_train]) and self_influence= ([n_train], e.g. an.self_influence())"
        )
    mask = np.asarray(flipped_mask.detach().cpu() if torch.is_tensor(flipped_mask) else flipped_mask)
    if mask.ndim != 1:
        raise InfkitError(f"flipped_mask must be one-dimensional [n_train]; got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise InfkitError("flipped_mask must be boolean (or 0/1): True where a training label was flipped")
        mask = mask.astype(bool)
    if train_scores is not None:
        arr = _as_array(train_scores, "train_scores")
        if arr.ndim == 2:
            arr = arr.sum(axis=0)
        if arr.ndim != 1:
            raise InfkitError(f"train_scores must be [n_train] or [n_query, n_train]; got shape {arr.shape}")
        suspicion, what = -arr, "train_scores"
    else:
        arr = _as_array(self_influence, "self_influence")
        if arr.ndim != 1:
            raise InfkitError(f"self_influence must be [n_train]; got shape {arr.shape}")
        suspicion, what = arr, "self_influence"
    if mask.shape[0] != suspicion.shape[0]:
        hint = ""
        if isinstance(train_scores, InfluenceResult) and train_scores.train_indices is not None:
            hint = " (the result scores only its train_indices; score every train example)"
        raise InfkitError(
            f"flipped_mask has {mask.shape[0]} entries but {what} covers {suspicion.shape[0]} train examples{hint}: "
            "give one mask entry per train example, in the train data's order"
        )
    return suspicion, mask


def mislabel_auc(train_scores: Any = None, flipped_mask: Any = None, *, self_influence: Any = None) -> float:
    """ROC AUC of flagging training points as mislabelled (1 = every flipped point ranked above every clean one,
    0.5 = chance).

    Two ways to rank the training points:

    * ``mislabel_auc(train_scores, flipped_mask)``: ``train_scores`` is the influence of each training point on
      clean validation queries, [n_train] or [n_query, n_train] (summed over the queries), or an InfluenceResult.
      The most negative total — the strongest opponent of the clean queries — is the most suspicious.
    * ``mislabel_auc(flipped_mask=..., self_influence=...)``: the highest self-influence is the most suspicious.

    ``flipped_mask``: [n_train] booleans, True where the label was flipped. Ties share the AUC credit
    (sklearn's ``roc_auc_score``).
    """
    from sklearn.metrics import roc_auc_score

    suspicion, mask = _suspicion(train_scores, flipped_mask, self_influence)
    if mask.all() or not mask.any():
        raise InfkitError(
            f"flipped_mask marks {int(mask.sum())} of {mask.size} points as flipped; the AUC needs both flipped and "
            "clean points"
        )
    return float(roc_auc_score(mask, suspicion))


@dataclass(frozen=True)
class DetectionCurve:
    """Fraction of the flipped points found against the fraction of the train data inspected, most suspicious
    first. ``inspected`` and ``found`` are [n_train + 1], from (0, 0) to (1, 1); ``order`` [n_train] is the
    inspection order (train indices)."""

    inspected: np.ndarray
    found: np.ndarray
    order: np.ndarray

    def found_at(self, fraction: float) -> float:
        """Fraction of the flipped points found after inspecting ``fraction`` of the train data (rounded down)."""
        if not 0 <= fraction <= 1:
            raise InfkitError(f"fraction={fraction} must be between 0 and 1")
        return float(self.found[int(np.floor(fraction * (len(self.found) - 1) + 1e-9))])

    def __repr__(self) -> str:
        points = ", ".join(f"{f:.0%}: {self.found_at(f):.2f}" for f in (0.1, 0.2, 0.3, 0.5))
        return f"DetectionCurve(n_train={len(self.order)}, found after inspecting {points})"


def detection_curve(
    train_scores: Any = None, flipped_mask: Any = None, *, self_influence: Any = None
) -> DetectionCurve:
    """The detection-rate curve of :func:`mislabel_auc`'s ranking (same arguments): inspect the training points
    most suspicious first and count the flipped ones found. Ties are inspected in index order."""
    suspicion, mask = _suspicion(train_scores, flipped_mask, self_influence)
    if not mask.any():
        raise InfkitError("flipped_mask marks no point as flipped: there is nothing to find")
    order = np.argsort(-suspicion, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(mask[order]) / mask.sum()])
    inspected = np.arange(len(order) + 1) / len(order)
    return DetectionCurve(inspected=inspected, found=found, order=order)


# -- class recall / class AUC ---------------------------------------------------------------------------------------
def _labels(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)
    if arr.ndim != 1:
        raise InfkitError(f"{what} must be one-dimensional (one label per example); got shape {arr.shape}")
    return arr


def _class_inputs(scores: Any, train_labels: Any, query_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, n] float64, same-class mask [Q, n] bool), checked."""
    arr = _scores_2d(scores, "scores")
    train = _labels(train_labels, "train_labels")
    query = _labels(query_labels, "query_labels")
    if isinstance(scores, InfluenceResult) and scores.train_indices is not None and train.shape[0] != arr.shape[1]:
        columns = np.asarray(scores.train_indices)
        if train.shape[0] > columns.max():  # labels of every train example: take those of the scored columns
            train = train[columns]
    if train.shape[0] != arr.shape[1]:
        raise InfkitError(
            f"train_labels has {train.shape[0]} entries but the scores cover {arr.shape[1]} train examples: give one "
            "label per train example (per column of the scores), in the same order"
        )
    if query.shape[0] != arr.shape[0]:
        raise InfkitError(
            f"query_labels has {query.shape[0]} entries but the scores have {arr.shape[0]} queries (rows): give one "
            "label per query, in the same order"
        )
    return arr, train[None, :] == query[:, None]


def class_recall(scores: Any, train_labels: Any, query_labels: Any, k: int | None = None) -> np.ndarray:
    """Per query: the fraction of its k strongest proponents (highest scores) that share its class.

    Kwon et al. (2023, DataInf, §4.2) use it with k = the number of train examples per class: 1 when a query's
    top-k proponents are exactly the train examples of its class.

    Args:
        scores: [n_query, n_train] (or [n_train] for one query): a tensor, an array or an InfluenceResult (with
            ``train_indices``, ``train_labels`` may label every train example; the scored columns are taken).
        train_labels: [n_train] class of each train example (ints, strings: anything comparable with ==).
        query_labels: [n_query] class of each query.
        k: how many top proponents to look at; default, per query, the number of train examples of its class
            (then recall = precision: R-precision). Ties: the lower train index first.

    Returns:
        np.ndarray [n_query] in [0, 1].
    """
    arr, same = _class_inputs(scores, train_labels, query_labels)
    n_train = arr.shape[1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_train):
        raise InfkitError(f"k must be an integer between 1 and the number of train examples ({n_train}); got {k!r}")
    order = np.argsort(-arr, axis=1, kind="stable")
    out = np.zeros(arr.shape[0])
    for q in range(arr.shape[0]):
        size = int(k) if k is not None else int(same[q].sum())
        if size == 0:
            raise InfkitError(
                f"query {q}'s class has no train example, so the default k (its class size) is 0: pass k= explicitly"
            )
        out[q] = same[q, order[q, :size]].mean()
    return out


def class_auc(scores: Any, train_labels: Any, query_labels: Any) -> np.ndarray:
    """Per query: the ROC AUC of its scores separating the train examples of its class (positives) from the others
    — the probability that a random same-class example outscores a random other-class one (ties count half).
    1: every same-class example above every other; 0.5: chance.

    Arguments as for :func:`class_recall`. Returns np.ndarray [n_query]; nan for a query whose class has no train
    example, or only train examples of its class (the AUC needs both).
    """
    arr, same = _class_inputs(scores, train_labels, query_labels)
    ranks = rankdata(arr, axis=1)  # ties: average rank
    out = np.full(arr.shape[0], np.nan)
    for q in range(arr.shape[0]):
        n_pos = int(same[q].sum())
        n_neg = same.shape[1] - n_pos
        if n_pos and n_neg:
            out[q] = (ranks[q, same[q]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out
