""":class:`EstimatorComparison`: how far do estimators agree? A scatter of their scores, correlations, top-k overlap,
and what each costs; click a point for that pair's token heatmaps under both estimators."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anywidget
import ipywidgets as W
import numpy as np
import traitlets as t

from infkit.cache import format_bytes
from infkit.errors import InfkitError
from infkit.metrics import agreement
from infkit.views import html as H
from infkit.views.common import (
    ASSETS,
    MODE_OPTIONS,
    MODES,
    PALETTE,
    HeatmapRow,
    QuerySpec,
    StaticHTMLRepr,
    asset_text,
    context_length,
    divisors,
    json_values,
    make_query,
    mode_text,
    token_texts,
    tokenizer_of,
)
from infkit.views.heatmap import TokenHeatmap
from infkit.views.static import fragment, heatmap_rows_html, scatter_figure


class ScoreScatter(anywidget.AnyWidget):
    """Scores of one estimator against another, one point per (query, train example); a click selects a point.

    Synced traits: ``x``, ``y`` (null for NaN), ``query``, ``index``, ``selected`` ([query, train index] or []),
    ``xlabel``, ``ylabel``, ``title``, ``palette``."""

    _esm = ASSETS / "scatter.js"
    _css = H.STYLE + asset_text("widgets.css")

    x = t.List().tag(sync=True)
    y = t.List().tag(sync=True)
    query = t.List(t.Int()).tag(sync=True)
    index = t.List(t.Int()).tag(sync=True)
    selected = t.List(t.Int(), maxlen=2).tag(sync=True)
    xlabel = t.Unicode("").tag(sync=True)
    ylabel = t.Unicode("").tag(sync=True)
    title = t.Unicode("").tag(sync=True)
    palette = t.Dict(PALETTE).tag(sync=True)

    def __repr__(self) -> str:
        return f"ScoreScatter(points={len(self.x)}, x={self.xlabel!r}, y={self.ylabel!r})"


class EstimatorComparison(StaticHTMLRepr, W.VBox):
    """Compare estimators on the same queries and train data.

    Args:
        analyses: {name: Analysis} — two or more, same model, task and train data (e.g. "ekfac", "datainf",
            "identity" and "exact" on a LoRA model). Unfitted ones are fitted here.
        queries: the queries, in any form :class:`~infkit.views.InfluenceExplorer` takes.
        k: the top-k sizes of the overlap column (a k ≥ the number of train examples is shown as n/a).
        mode: "raw", "self" or "std" (see :data:`infkit.views.common.MODES`); the correlations are those of the
            shown values.

    Shows: the scatter of x's scores against y's (every query, or one), a table of Pearson / Spearman / top-k
    overlap for every pair of estimators (:func:`infkit.metrics.agreement`), fit / query time and cache bytes per
    estimator (``analysis.timings``, ``analysis.cache.bytes``, and the time of the ``scores()`` call made here).
    Clicking a point shows that (query, train example) pair's token heatmaps under x and y.
    """

    selected = t.Tuple()
    error = t.Unicode("")

    def __init__(self, analyses: Mapping[str, Any], queries: Sequence[Any], k: Sequence[int] = (10, 100),
                 mode: str = "raw", x: str | None = None, y: str | None = None):
        if not isinstance(analyses, Mapping) or len(analyses) < 2:
            raise InfkitError("EstimatorComparison needs a dict of two or more analyses, {name: Analysis}")
        if mode not in MODES:
            raise InfkitError(f"mode={mode!r} is not one of {sorted(MODES)}")
        self.analyses = dict(analyses)
        names = list(self.analyses)
        for name in (x, y):
            if name is not None and name not in self.analyses:
                raise InfkitError(f"{name!r} is not one of the analyses {names}")
        self.ks = tuple(int(v) for v in k)
        first = next(iter(self.analyses.values()))
        self.tokenizer = tokenizer_of(first)
        context = context_length(list(self.analyses.values()))
        self.queries: list[QuerySpec] = [make_query(q, self.tokenizer, context, n) for n, q in enumerate(queries)]
        if not self.queries:
            raise InfkitError("give at least one query")
        self.results: dict[str, Any] = {}
        self.query_seconds: dict[str, float] = {}
        for name, an in self.analyses.items():
            if not an.fitted:
                an.fit()
            start = time.perf_counter()
            self.results[name] = an.scores([q.api for q in self.queries])
            self.query_seconds[name] = time.perf_counter() - start
        shapes = {name: tuple(r.scores.shape) for name, r in self.results.items()}
        if len(set(shapes.values())) > 1:
            raise InfkitError(f"the analyses score different train data (score shapes {shapes}): compare estimators "
                              "on the same model, task and train data")
        self.n_query, self.n_train = next(iter(shapes.values()))
        self._shown: dict[tuple[str, str], np.ndarray] = {}
        self._tokens: dict[tuple[str, int, int], Any] = {}
        self._quiet = False
        x = x or ("exact" if "exact" in names else names[0])
        y = y or next(n for n in names if n != x)

        self.x_picker = W.Dropdown(options=names, value=x, description="x", layout=W.Layout(width="14em"))
        self.y_picker = W.Dropdown(options=names, value=y, description="y", layout=W.Layout(width="14em"))
        self.query_picker = W.Dropdown(options=[("all queries", -1)] + [(f"{n}. {q.label}", n) for n, q in
                                                                         enumerate(self.queries)],
                                       value=-1, description="query", layout=W.Layout(width="30em"))
        self.mode_picker = W.ToggleButtons(options=MODE_OPTIONS, value=mode, description="scores",
                                           tooltips=[MODES[m] for _, m in MODE_OPTIONS])
        self.mode_picker.style.button_width = "11em"
        self.scatter = ScoreScatter()
        # The agreement table sits beside the scatter when there is room and goes under it when not (the row wraps);
        # narrower than the table, its box scrolls sideways instead of cutting it off (widgets.css: .ikw-wide).
        wide = dict(flex="0 1 auto", min_width="0", max_width="100%")
        self.agreement_box = W.HTML(layout=W.Layout(**wide))
        self.agreement_box.add_class("ikw-wide")
        self.cost_box = W.HTML(f'<div class="ik">{H.scroll(self._cost_html())}</div>', layout=W.Layout(**wide))
        self.cost_box.add_class("ikw-wide")
        self.error_box = W.HTML()
        self.pair_map = TokenHeatmap(normalization="row")
        super().__init__(children=[
            W.HBox([self.x_picker, self.y_picker, self.query_picker]), self.mode_picker, self.error_box,
            W.HBox([self.scatter, self.agreement_box], layout=W.Layout(flex_flow="row wrap", align_items="flex-start",
                                                                        max_width="100%")),
            self.cost_box, self.pair_map,
        ])
        self.add_class("ikw-comparison")
        for control in (self.x_picker, self.y_picker, self.query_picker, self.mode_picker):
            control.observe(self._on_control, names="value")
        self.scatter.observe(self._on_select, names="selected")
        self._refresh()

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.mode_picker.value

    def _mode_text(self) -> str:
        return mode_text(self.mode, [an.estimator.name for an in self.analyses.values()])

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        self.error = ""
        self.error_box.value = ""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - shown in the widget
            self.error = f"{type(err).__name__}: {err}"
            self.error_box.value = (f'<div class="ik"><div class="ikw-error">Error while {H.esc(what)}: '
                                    f"{H.esc(self.error)}</div></div>")

    def shown(self, name: str, mode: str | None = None) -> np.ndarray:
        """The scores of ``name`` as shown in ``mode`` (default the current one), [n_query, n_train]."""
        mode = mode or self.mode
        key = (name, mode)
        if key not in self._shown:
            an, res = self.analyses[name], self.results[name]
            rows = [(res.scores[q].double().cpu() / divisors(an, res, q, mode)).numpy() for q in range(self.n_query)]
            self._shown[key] = np.stack(rows)
        return self._shown[key]

    def _queries_shown(self) -> list[int]:
        q = self.query_picker.value
        return list(range(self.n_query)) if q == -1 else [q]

    # -- tables ----------------------------------------------------------------------------------------------------
    def agreement_rows(self) -> list[list[Any]]:
        """[pair, Pearson (all pairs), mean Pearson per query, mean Spearman per query, top-k overlaps...] for
        every pair of estimators, over the shown queries and values."""
        qs = self._queries_shown()
        names = list(self.analyses)
        out = []
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                numbers = agreement(self.shown(a)[qs], self.shown(b)[qs], k=self.ks).as_dict()
                row: list[Any] = [f"{a}\u00a0vs\u00a0{b}", numbers["pearson"], numbers["mean_query_pearson"],
                                  numbers["mean_query_spearman"]]
                for k in self.ks:
                    row.append(numbers[f"top_{k}"] if k < self.n_train else "n/a")
                out.append(row)
        return out

    def _agreement_html(self) -> str:
        q = self.query_picker.value
        over = "all queries" if q == -1 else f"query {q}"
        headers = ["pair", "Pearson", "Pearson / query", "Spearman / query"] + [f"top-{k} overlap" for k in self.ks]
        caption = (f"Agreement over {over}, {MODES[self.mode].split(' (')[0]} (infkit.metrics.agreement): Pearson "
                   "over all the shown pairs; per-query Pearson and Spearman averaged over queries; top-k overlap = "
                   "the share of one estimator's top-k proponents also in the other's"
                   + (f" (n/a: k ≥ the {self.n_train} train examples, so every example is in both)."
                      if any(k >= self.n_train for k in self.ks) else "."))
        return H.table(headers, self.agreement_rows(), caption=caption, numeric=[False] + [True] * (len(headers) - 1))

    def cost_rows(self) -> list[list[Any]]:
        rows = []
        for name, an in self.analyses.items():
            cache = an.cache
            sizes = cache.bytes if cache is not None else {}
            rows.append([name, f"{an.timings.get('fit', float('nan')):.2f} s",
                         f"{an.timings.get('cache', float('nan')):.2f} s",
                         f"{self.query_seconds[name]:.3f} s",
                         format_bytes(sizes.get("factors", 0)), format_bytes(sizes.get("train_side", 0)),
                         format_bytes(sum(sizes.values()))])
        return rows

    def _cost_html(self) -> str:
        headers = ["estimator", "fit", "cache build", f"scores of {len(self.queries)} queries", "factors",
                   "train side", "cache total"]
        return H.table(headers, self.cost_rows(), caption="Cost per estimator (this machine; analysis.timings and "
                       "analysis.cache.bytes)", numeric=[False] + [True] * 6)

    # -- updating --------------------------------------------------------------------------------------------------
    def _on_control(self, change: dict) -> None:
        if not self._quiet:
            self._refresh()

    def _on_select(self, change: dict) -> None:
        if not self._quiet:
            with self._guard("showing the selected pair"):
                self._show_pair()

    def _refresh(self) -> None:
        with self._guard("updating the comparison"):
            x, y, mode = self.x_picker.value, self.y_picker.value, self.mode
            qs = self._queries_shown()
            sx, sy = self.shown(x)[qs], self.shown(y)[qs]
            unit = {"raw": "raw score", "self": "score ÷ self-influence", "std": "score ÷ std of query"}[mode]
            self._quiet = True
            try:
                with self.scatter.hold_sync():
                    self.scatter.x = json_values(sx.ravel().tolist())
                    self.scatter.y = json_values(sy.ravel().tolist())
                    self.scatter.query = [q for q in qs for _ in range(self.n_train)]
                    self.scatter.index = list(range(self.n_train)) * len(qs)
                    self.scatter.xlabel, self.scatter.ylabel = f"{x} ({unit})", f"{y} ({unit})"
                    self.scatter.title = (f"{y} against {x}: {len(qs)} quer{'y' if len(qs) == 1 else 'ies'} × "
                                          f"{self.n_train} train examples")
                    # Select the point where x is strongest, so the pair's heatmaps show at once.
                    strength = np.where(np.isfinite(sx), np.abs(sx), -1.0)
                    flat = int(np.argmax(strength)) if strength.size else 0
                    self.scatter.selected = [qs[flat // self.n_train], flat % self.n_train]
            finally:
                self._quiet = False
            self.agreement_box.value = f'<div class="ik">{H.scroll(self._agreement_html())}</div>'
            self._show_pair()

    def pair_rows(self, q: int, i: int) -> list[HeatmapRow]:
        """That pair's token scores under x and y (shown in the current mode)."""
        rows = []
        for name in (self.x_picker.value, self.y_picker.value):
            an, res = self.analyses[name], self.results[name]
            key = (name, q, i)
            if key not in self._tokens:
                self._tokens[key] = an.token_scores(q, i, res)
            ts = self._tokens[key]
            div = float(divisors(an, res, q, self.mode)[i]) if self.mode != "raw" else 1.0
            texts, special = token_texts(self.tokenizer, ts.token_ids)
            rows.append(HeatmapRow(texts, (ts.values.double() / div).tolist(), label=name,
                                   score=float(self.shown(name)[q, i]), special=special, index=i))
        return rows

    def _show_pair(self) -> None:
        sel = self.scatter.selected
        if len(sel) != 2:
            self.selected = ()
            self.pair_map.set_rows([])
            return
        q, i = sel
        self.pair_map.caption = (f"Query {q} “{self.queries[q].label}” × train {i}: its tokens under "
                                 f"{self.x_picker.value} and {self.y_picker.value} (one colour scale per row: the "
                                 "estimators' scales differ)")
        self.pair_map.set_rows(self.pair_rows(q, i))
        self.selected = (q, i)

    # -- text and HTML ---------------------------------------------------------------------------------------------
    def summary(self, digits: int = 2) -> str:
        """The agreement table as text (rounded), for scripts and notebooks."""
        headers = ["Pearson", "Pearson/query", "Spearman/query"] + [f"top-{k}" for k in self.ks]
        rows = [[r[0].replace("\u00a0", " ")] + r[1:] for r in self.agreement_rows()]
        width = max(len(r[0]) for r in rows)
        lines = [" " * width + "".join(f"{h:>16}" for h in headers)]
        for row in rows:
            cells = [f"{v:.{digits}f}" if isinstance(v, float) else "n/a" for v in row[1:]]
            lines.append(f"{row[0]:<{width}}" + "".join(f"{c:>16}" for c in cells))
        return "\n".join(lines)

    def static_html(self) -> str:
        x, y = self.x_picker.value, self.y_picker.value
        qs = self._queries_shown()
        sx, sy = self.shown(x)[qs].ravel(), self.shown(y)[qs].ravel()
        sel = None
        if len(self.scatter.selected) == 2 and self.scatter.selected[0] in qs:
            q, i = self.scatter.selected
            sel = (float(self.shown(x)[q, i]), float(self.shown(y)[q, i]))
        fig = scatter_figure(sx, sy, self.scatter.xlabel, self.scatter.ylabel, self.scatter.title, sel)
        parts = [H.note(f"Estimators compared: {', '.join(self.analyses)} on {self.n_query} queries × {self.n_train} "
                        f"train examples; showing {self._mode_text()}."),
                 H.figure(fig, f"scatter of {y} against {x}", "Red: both say proponent; blue: both say opponent; "
                          "grey: they disagree. The ringed point is the selected pair."),
                 H.scroll(self._agreement_html()), H.scroll(self._cost_html())]
        if self.pair_map.row_data:
            parts.append(H.note(self.pair_map.caption))
            parts.append(H.legend(None))
            parts.append(heatmap_rows_html(self.pair_map.row_data, self.pair_map.scales, "influence"))
        return fragment("".join(parts))

    def __repr__(self) -> str:
        q = self.query_picker.value
        return (f"EstimatorComparison(estimators={list(self.analyses)}, queries={self.n_query}, "
                f"n_train={self.n_train}, x={self.x_picker.value!r}, y={self.y_picker.value!r}, "
                f"query={'all' if q == -1 else q}, scores={self.mode!r})")


__all__ = ["EstimatorComparison", "ScoreScatter"]
