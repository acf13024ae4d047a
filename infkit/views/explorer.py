""":class:`InfluenceExplorer`: pick a query (or type one), an estimator and k; see the top proponents and opponents as
token heatmaps, the query's own tokens, and the layer-wise split of the selected pair."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import torch
import traitlets as t

from infkit.errors import InfkitError
from infkit.views import html as H
from infkit.views.common import (
    LOSS_LEGEND,
    LOSS_PALETTE,
    LOSS_TOP,
    MODE_OPTIONS,
    MODES,
    HeatmapRow,
    QuerySpec,
    StaticHTMLRepr,
    context_length,
    divisors,
    make_query,
    mode_text,
    query_token_losses,
    ranked,
    text_query,
    token_texts,
    tokenizer_of,
    train_text,
)
from infkit.views.heatmap import TokenHeatmap
from infkit.views.static import explorer_html, layer_table

#: The query row's legend: its own one-sided, fixed scale of −log p (not the influence colours).
QUERY_LEGEND = LOSS_LEGEND


@dataclass
class ExplorerView:
    """What the explorer shows now; :func:`infkit.views.static.explorer_html` renders it as static HTML."""

    state_line: str = ""
    mode_text: str = ""
    notes: list[str] = field(default_factory=list)
    error: str = ""
    query_row: HeatmapRow | None = None
    query_scale: float = LOSS_TOP  # −log p at full (dark) colour: a fixed, absolute scale
    query_caption: str = ""
    proponents: list[HeatmapRow] = field(default_factory=list)
    opponents: list[HeatmapRow] = field(default_factory=list)
    token_scale: H.Scale | float = 1.0
    layers: dict[str, float] = field(default_factory=dict)
    layers_caption: str = ""


def _analyses(analyses: Any) -> dict[str, Any]:
    if isinstance(analyses, Mapping):
        out = dict(analyses)
    else:
        out = {analyses.estimator.name: analyses}
    if not out:
        raise InfkitError("give at least one Analysis (or a dict of them, one per estimator)")
    return out


class InfluenceExplorer(StaticHTMLRepr, W.VBox):
    """Explore which training examples drive each query's measurement.

    Args:
        analyses: an :class:`~infkit.Analysis`, or {name: Analysis} to switch estimators (they must score the same
            train data for the same model and task, e.g. ``ekfac`` and ``identity``). Unfitted ones are fitted when
            first shown.
        queries: the prepared queries — prompt/completion dicts, ``infkit.demo.story.Query`` objects, strings,
            dicts with ``input_ids`` (any form the task reads).
        k: proponents and opponents shown (1 … ``max_k``).
        mode: "raw", "self" (score ÷ the train example's self-influence) or "std" (score ÷ the std of the query's
            scores); see :data:`infkit.views.common.MODES`.

    Everything goes through the public API: ``an.scores`` (each query once, then memoised; prepared queries in
    one batch), ``an.token_scores(q, i)`` for the shown rows only (one backward each, memoised), ``an.self_influence``
    for the "self" mode. A query longer than the model's context is cut from the left (the prompt's start) with a
    visible note; one whose completion alone does not fit is refused with an error shown in the widget.

    Python-side state for scripts and tests: :attr:`view` (what is shown), :attr:`error`, :attr:`busy`,
    :attr:`selected` ((query position, train index) of the pair whose layers are shown), :attr:`timings` and
    :attr:`last_update_seconds`.
    """

    busy = t.Bool(False)
    error = t.Unicode("")
    selected = t.Tuple()
    last_update_seconds = t.Float(0.0)

    def __init__(self, analyses: Any, queries: Sequence[Any], k: int = 5, mode: str = "raw",
                 estimator: str | None = None, max_k: int = 25):
        self.analyses = _analyses(analyses)
        if mode not in MODES:
            raise InfkitError(f"mode={mode!r} is not one of {sorted(MODES)}")
        first = next(iter(self.analyses.values()))
        self.tokenizer = tokenizer_of(first)
        self.context = context_length(list(self.analyses.values()))
        self.queries: list[QuerySpec] = [make_query(q, self.tokenizer, self.context, n) for n, q in enumerate(queries)]
        if not self.queries:
            raise InfkitError("give at least one prepared query (you can type more in the widget)")
        self._n_prepared = len(self.queries)
        self._results: dict[tuple[str, int], tuple[Any, int]] = {}
        self._tokens: dict[tuple[str, int, int], Any] = {}
        self._query_rows: dict[tuple[str, int], HeatmapRow | None] = {}
        self._divisor: torch.Tensor | None = None
        self._quiet = False
        self.view = ExplorerView()
        self.timings: dict[str, float] = {}
        self.busy_log: list[str] = []
        n_train = min(an.n_train for an in self.analyses.values())
        names = list(self.analyses)
        if estimator is not None and estimator not in self.analyses:
            raise InfkitError(f"estimator={estimator!r} is not one of {names}")

        self.query_picker = W.Dropdown(options=self._query_options(), value=0, description="query",
                                       layout=W.Layout(width="34em"))
        self.estimator_picker = W.Dropdown(options=names, value=estimator or names[0], description="estimator",
                                           layout=W.Layout(width="16em", display="" if len(names) > 1 else "none"))
        self.k_picker = W.IntSlider(value=max(1, min(k, max_k, n_train)), min=1, max=max(1, min(max_k, n_train)),
                                    description="top k", continuous_update=False)
        self.mode_picker = W.ToggleButtons(options=MODE_OPTIONS, value=mode, description="scores",
                                           tooltips=[MODES[m] for _, m in MODE_OPTIONS])
        self.mode_picker.style.button_width = "11em"
        self.prompt_box = W.Text(placeholder="type a prompt, e.g. The capital of Veloria is", description="prompt",
                                 layout=W.Layout(width="30em"))
        self.completion_box = W.Text(placeholder="and its completion, e.g.  Parth", description="completion",
                                     layout=W.Layout(width="20em"))
        self.score_button = W.Button(description="Score this query", icon="search", button_style="primary")
        self.status = W.HTML()
        self.error_box = W.HTML()
        self.query_map = TokenHeatmap(caption="The query", legend=QUERY_LEGEND, value_label="−log p",
                                      scale=LOSS_TOP, palette=LOSS_PALETTE, scale_kind="sequential")
        self.heatmap = TokenHeatmap(caption="Top proponents and opponents (click a row for its layer-wise split)")
        self.heatmap.add_class("ikw-topk")
        self.query_map.add_class("ikw-querymap")
        self.layers_box = W.HTML()
        super().__init__(children=[
            W.HBox([self.query_picker, self.estimator_picker]),
            W.HBox([self.k_picker, self.mode_picker]),
            W.HBox([self.prompt_box, self.completion_box, self.score_button]),
            self.status, self.error_box, self.query_map, self.heatmap, self.layers_box,
        ])
        self.add_class("ikw-explorer")
        for control in (self.query_picker, self.estimator_picker, self.k_picker, self.mode_picker):
            control.observe(self._on_control, names="value")
        self.heatmap.observe(self._on_select, names="selected_row")
        self.score_button.on_click(lambda _button: self._submit())
        self._refresh()

    # -- state -----------------------------------------------------------------------------------------------------
    @property
    def estimator(self) -> str:
        return self.estimator_picker.value

    @property
    def query(self) -> QuerySpec:
        return self.queries[self.query_picker.value]

    @property
    def k(self) -> int:
        return int(self.k_picker.value)

    @property
    def mode(self) -> str:
        return self.mode_picker.value

    def _query_options(self) -> list[tuple[str, int]]:
        return [(f"{n}. {q.label}" + (" (typed)" if n >= getattr(self, "_n_prepared", n + 1) else ""), n)
                for n, q in enumerate(self.queries)]

    # -- busy and errors -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _busy(self, message: str) -> Iterator[None]:
        """Shown while the kernel computes (the front-end gets the message before the work starts)."""
        self.busy_log.append(message)
        self.busy = True
        self.heatmap.busy = True
        self.status.value = f'<div class="ik"><div class="ikw-status">⏳ {H.esc(message)}…</div></div>'
        try:
            yield
        finally:
            self.busy = False
            self.heatmap.busy = False

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Errors are shown inside the widget (and kept in :attr:`error`), not lost in the kernel's log."""
        self.error = ""
        self.error_box.value = ""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every failure is reported in the widget
            self.error = f"{type(err).__name__}: {err}"
            self.view.error = self.error
            self.error_box.value = (f'<div class="ik"><div class="ikw-error">Error while {H.esc(what)}: '
                                    f"{H.esc(self.error)}</div></div>")
            self.status.value = ""

    # -- computing (memoised, through the public API) --------------------------------------------------------------
    def _result(self, est: str, pos: int) -> tuple[Any, int]:
        key = (est, pos)
        if key not in self._results:
            an = self.analyses[est]
            spec = self.queries[pos]
            if not an.fitted:
                with self._busy(f"fitting {est} on {an.n_train} training examples (once)"):
                    an.fit()
            start = time.perf_counter()
            if pos < self._n_prepared:
                with self._busy(f"scoring the {self._n_prepared} prepared queries with {est}"):
                    res = an.scores([q.api for q in self.queries[: self._n_prepared]])
                for n in range(self._n_prepared):
                    self._results[(est, n)] = (res, n)
            else:
                with self._busy(f"scoring “{spec.label}” with {est} (one backward pass, then the cached train side)"):
                    self._results[key] = (an.scores([spec.api]), 0)
            self.timings["scores"] = time.perf_counter() - start
        return self._results[key]

    def _token_scores(self, est: str, pos: int, i: int) -> Any:
        key = (est, pos, i)
        if key not in self._tokens:
            result, q = self._result(est, pos)
            self._tokens[key] = self.analyses[est].token_scores(q, i, result)
        return self._tokens[key]

    def _query_row(self, est: str, pos: int) -> HeatmapRow | None:
        key = (est, pos)
        if key not in self._query_rows:
            spec = self.queries[pos]
            losses = query_token_losses(self.analyses[est], spec)
            if losses is None:
                self._query_rows[key] = None
            else:
                ids, values, measured = losses
                texts, special = token_texts(self.tokenizer, ids)
                self._query_rows[key] = HeatmapRow(
                    texts, values, label="query", special=special,
                    detail=f"loss f = {H.fmt(sum(values), 4).lstrip('+')}, the sum of −log p over its "
                           f"{sum(measured)} measured tokens")
        return self._query_rows[key]

    def _row(self, est: str, pos: int, result: Any, q: int, column: int, shown: float, group: str,
             rank: int, notes: list[str]) -> HeatmapRow:
        i = result.train_indices[column] if result.train_indices is not None else column
        raw = float(result.scores[q, column])
        div = float(self._divisor[column])
        detail = "" if self.mode == "raw" else f"raw {H.fmt(raw, 4)}"
        try:
            ts = self._token_scores(est, pos, i)
            texts, special = token_texts(self.tokenizer, ts.token_ids)
            values = (ts.values.double() / div).tolist()
            if ts.unassigned:
                detail = (detail + " · " if detail else "") + f"{H.fmt(ts.unassigned / div, 3)} not on tokens"
        except Exception as err:  # noqa: BLE001 - the row still shows its score
            texts, special, values = [], [], []
            notes.append(f"no token scores for train {i}: {type(err).__name__}: {err}")
        if not texts:
            text = train_text(self.analyses[est], i)
            if text is not None:
                detail = (detail + " · " if detail else "") + text
        return HeatmapRow(texts, values, label=f"#{rank} · train {i}", score=shown, detail=detail, group=group,
                          special=special, index=i)

    # -- updating the view -----------------------------------------------------------------------------------------
    def _on_control(self, change: dict) -> None:
        if not self._quiet:
            self._refresh()

    def _on_select(self, change: dict) -> None:
        if not self._quiet:
            with self._guard("showing the layer-wise split"):
                self._show_layers()

    def _refresh(self) -> None:
        """Recompute what is shown for the current query, estimator, k and mode (what a control change triggers)."""
        start = time.perf_counter()
        with self._guard("updating the view"):
            est, pos, k, mode = self.estimator, self.query_picker.value, self.k, self.mode
            spec = self.queries[pos]
            an = self.analyses[est]
            shown_text = mode_text(mode, an.estimator.name)
            result, q = self._result(est, pos)
            if mode == "self":
                with self._busy(f"self-influence of every training example with {est} (computed once, then kept)"):
                    self._divisor = divisors(an, result, q, mode)
            else:
                self._divisor = divisors(an, result, q, mode)
            shown = result.scores[q].double().cpu() / self._divisor
            pro, opp, n_nan = ranked(shown, k)
            notes = [spec.note] if spec.note else []
            if n_nan:
                notes.append(f"{n_nan} of {shown.numel()} shown scores are NaN: they are ranked last and drawn hatched "
                             "grey")
            t_tokens = time.perf_counter()
            with self._busy(f"per-token scores of the {len(pro) + len(opp)} shown training examples"):
                rows = [self._row(est, pos, result, q, c, v, f"Top {len(pro)} proponents", r + 1, notes)
                        for r, (c, v) in enumerate(pro)]
                rows += [self._row(est, pos, result, q, c, v, f"Top {len(opp)} opponents", r + 1, notes)
                         for r, (c, v) in enumerate(opp)]
            self.timings["token_scores"] = time.perf_counter() - t_tokens
            t_query = time.perf_counter()
            query_row = self._query_row(est, pos)
            self.timings["query_tokens"] = time.perf_counter() - t_query

            self._quiet = True
            try:
                self.heatmap.caption = f"Top {k} proponents and opponents — {shown_text}. Click a row for its layers."
                self.heatmap.set_rows(rows)
                self.heatmap.locked = []
                self.heatmap.selected_row = 0 if rows else -1
                if query_row is not None:
                    self.query_map.caption = f"The query: {spec.label}"
                    self.query_map.set_rows([query_row])
                    self.query_map.layout.display = ""
                else:
                    self.query_map.layout.display = "none"
            finally:
                self._quiet = False

            state = (f"Estimator {est} · query {pos} “{spec.label}” · top {len(pro)} · showing {shown_text} · "
                     "ranked by the shown value")
            self.view = ExplorerView(
                state_line=state, mode_text=shown_text, notes=notes, query_row=query_row,
                query_scale=LOSS_TOP, query_caption=QUERY_LEGEND,
                proponents=rows[: len(pro)], opponents=rows[len(pro):],
                token_scale=H.scale_of([r.values for r in rows], self.heatmap.clip) if rows else 1.0,
            )
            self._show_layers()
            notes_html = "".join(f'<div class="ikw-note">⚠ {H.esc(n)}</div>' for n in notes)
            self.last_update_seconds = time.perf_counter() - start
            self.timings["total"] = self.last_update_seconds
            self.status.value = (f'<div class="ik"><div class="ikw-status">{H.esc(state)} '
                                 f'<span class="ik-rank">(updated in {self.last_update_seconds * 1000:.0f} ms)</span>'
                                 f"</div>{notes_html}</div>")

    def _show_layers(self) -> None:
        r = self.heatmap.selected_row
        rows = self.heatmap.row_data
        if r < 0 or r >= len(rows) or rows[r].index is None:
            self.layers_box.value = ""
            self.selected = ()
            self.view.layers, self.view.layers_caption = {}, ""
            return
        row = rows[r]
        result, q = self._result(self.estimator, self.query_picker.value)
        column = result.train_indices.index(row.index) if result.train_indices is not None else row.index
        div = float(self._divisor[column]) if self._divisor is not None else 1.0
        parts = {name: value / div for name, value in result.layer_shares(q, row.index).items()}
        shown_text = mode_text(self.mode, self.analyses[self.estimator].estimator.name)
        caption = (f"Layer-wise split of {row.label} ({shown_text}): each tracked layer's part; they sum to "
                   f"the score {H.fmt(sum(parts.values()), 4)}")
        self.view.layers, self.view.layers_caption = parts, caption
        self.layers_box.value = f'<div class="ik">{layer_table(parts, caption)}</div>'
        self.selected = (self.query_picker.value, row.index)

    # -- typed queries ---------------------------------------------------------------------------------------------
    def _select_quietly(self, pos: int) -> None:
        self._quiet = True
        try:
            self.query_picker.options = self._query_options()
            self.query_picker.value = pos
        finally:
            self._quiet = False

    def _submit(self) -> int | None:
        previous = self.query_picker.value
        with self._guard("adding the typed query"):
            spec = text_query(self.prompt_box.value, self.completion_box.value, self.tokenizer, self.context)
            self.queries.append(spec)
            pos = len(self.queries) - 1
            self._select_quietly(pos)
            self._refresh()
            if self.error:  # it could not be scored: take it back (the error stays shown; the boxes keep the text)
                self.queries.pop()
                for key in [key for key in self._results if key[1] == pos]:
                    del self._results[key]
                self._select_quietly(previous)
                return None
            return pos
        return None

    def add_query(self, prompt: str, completion: str) -> int | None:
        """Type a new query (as the prompt/completion boxes and the button do) and show it. Returns its position
        in the query list, or None when it was refused (the reason is in :attr:`error` and in the widget)."""
        self.prompt_box.value, self.completion_box.value = prompt, completion
        return self._submit()

    # -- text and HTML ---------------------------------------------------------------------------------------------
    def summary(self, digits: int = 3) -> str:
        """The current view as text: the state line, notes, and each shown row (train index, score, text)."""
        lines = [self.view.state_line] + [f"note: {n}" for n in self.view.notes]
        if self.error:
            lines.append(f"error: {self.error}")
        an = self.analyses[self.estimator]
        for title, rows in (("proponents", self.view.proponents), ("opponents", self.view.opponents)):
            lines.append(f"{title}:")
            for row in rows:
                text = train_text(an, row.index) if row.index is not None else None
                score = "NaN" if row.score is None or row.score != row.score else f"{row.score:+.{digits}g}"
                lines.append(f"  train {row.index:>4}  {score:>10}  {text if text is not None else ''}")
        return "\n".join(lines)

    def static_html(self) -> str:
        return explorer_html(self.view)

    def __repr__(self) -> str:
        return (f"InfluenceExplorer(estimators={list(self.analyses)}, queries={len(self.queries)}, "
                f"query={self.query_picker.value}, estimator={self.estimator!r}, k={self.k}, scores={self.mode!r})")
