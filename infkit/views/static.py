"""Static HTML of every widget view, built only from the renderers of :mod:`infkit.views.html`.

This is what a notebook keeps next to the live widget (``text/html`` in the mime bundle) and what nbconvert,
nbviewer, GitHub and saved reports show: inline CSS, colours in ``style`` attributes, hover text in ``title``
attributes — no script, no CDN, no random ids. Importing this module needs neither ipywidgets nor anywidget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from infkit.views import html as H
from infkit.views.common import (
    LOSS_PALETTE,
    SIGN_LEGEND,
    HeatmapRow,
    ranked,
    scale_note,
    train_text,
)
from infkit.views.plots import short_layer_name

#: Long sequences wrap between tokens (a token keeps its own spaces visible), and a token with no space in it
#: may break anywhere rather than overflow.
WRAP_STYLE = "<style>.ik .ik-seq .ik-tok { white-space: pre-wrap; } .ik .ik-seq { overflow-wrap: anywhere; }</style>"


def fragment(body: str) -> str:
    """:func:`infkit.views.html.fragment` plus :data:`WRAP_STYLE`."""
    return WRAP_STYLE + H.fragment(body)


def _score_span(value: float) -> str:
    kind = "ik-pro" if value > 0 else ("ik-opp" if value < 0 else "")
    return f'<span class="ik-mono {kind}">{H.esc(H.fmt(value, 4))}</span>'


def _palette(palette: dict | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not palette:
        return H.RED, H.BLUE
    return tuple(palette["pos"]), tuple(palette["neg"])


def heatmap_rows_html(rows: Sequence[HeatmapRow], scales: Sequence[float], value_label: str = "value",
                      palette: dict | None = None) -> str:
    """Heatmap rows with their heads (label, score, detail) and group headings; hover titles give the token index,
    the raw value and the value / scale. ``palette``: {"pos": rgb, "neg": rgb}, default red / blue."""
    ends = _palette(palette)
    parts: list[str] = []
    group = None
    for row, scale in zip(rows, scales):
        if row.group and row.group != group:
            parts.append(f'<p class="ik-note"><b>{H.esc(row.group)}</b></p>')
            group = row.group
        head = []
        if row.label:
            head.append(f'<span class="ik-rank">{H.esc(row.label)}</span>')
        if row.score is not None:
            head.append(_score_span(row.score))
        if row.detail:
            head.append(f'<span class="ik-rank">{H.esc(row.detail)}</span>')
        titles = [H.token_title(t, v, scale, f"  token {k}  ({value_label})") for k, (t, v) in
                  enumerate(zip(row.tokens, row.values))]
        special = {row.tokens[k] for k in row.special if 0 <= k < len(row.tokens)}
        body = H.token_row(row.tokens, row.values, scale, special, titles, ends) if row.tokens else \
            '<span class="ik-rank">(no tokens)</span>'
        heading = f'<div class="ik-note">{" ".join(head)}</div>' if head else ""
        parts.append(f'<div style="margin:0.2em 0 0.5em">{heading}{body}</div>')
    return "".join(parts)


#: A static heatmap stops after this many tokens (a note says how many more the live view shows): every token
#: carries its hover text, so a few thousand would make a notebook file heavy.
STATIC_MAX_TOKENS = 400


def _capped(rows: Sequence[HeatmapRow], limit: int) -> tuple[list[HeatmapRow], int]:
    out, used, left_out = [], 0, 0
    for row in rows:
        room = max(0, limit - used)
        if len(row.tokens) <= room:
            out.append(row)
        else:
            left_out += len(row.tokens) - room
            keep = [k for k in row.special if k < room]
            out.append(HeatmapRow(row.tokens[:room], row.values[:room], row.label, row.score, row.detail, row.group,
                                  keep, row.index))
        used += len(out[-1].tokens)
    return out, left_out


def heatmap_html(rows: Sequence[HeatmapRow], scales: Sequence[float], caption: str = "", legend: str = SIGN_LEGEND,
                 normalization: str = "shared", value_label: str = "influence",
                 max_tokens: int = STATIC_MAX_TOKENS, scale: float | None = None, clip: float | None = H.DEFAULT_CLIP,
                 palette: dict | None = None, kind: str = "diverging") -> str:
    """A whole :class:`~infkit.views.TokenHeatmap` as a fragment (stylesheet included), with at most
    ``max_tokens`` tokens (a note says how many more the live view shows). ``scale`` and ``clip`` are how
    ``scales`` were chosen (the legend says so); ``kind="sequential"`` draws a one-sided scale (a loss: white 0 …
    dark ≥ ``scales[0]``) with its own legend."""
    parts = [H.note(caption)] if caption else []
    if kind == "sequential":
        parts.append(H.loss_legend(scales[0] if scales else 1.0, legend))
    else:
        shared = normalization != "row" and len(set(scales)) <= 1
        if legend == SIGN_LEGEND:
            if shared and scales:
                sc = H.Scale(float(scale)) if scale is not None else H.scale_of([r.values for r in rows],
                                                                                   clip)
                parts.append(H.legend(sc, "shared by all rows"))
            else:
                parts.append(H.legend(None))
        else:
            parts.append(H.note(legend))
        parts.append(H.note(f"Colours: {scale_note(rows, normalization, scale, clip)}; hatched grey = NaN."))
    shown, left_out = _capped(rows, max_tokens)
    parts.append(heatmap_rows_html(shown, scales, value_label, palette))
    if left_out:
        parts.append(H.note(f"… and {left_out} more tokens: this static copy stops at {max_tokens} tokens; the live "
                            "widget shows them all."))
    return fragment("".join(parts))


def layer_table(parts: dict[str, float], caption: str) -> str:
    """Each layer's part of one score as a table with an inline bar (red positive, blue negative)."""
    values = {k: float(v) for k, v in parts.items()}
    finite = [v for v in values.values() if math.isfinite(v)]
    total = sum(finite)
    peak = max((abs(v) for v in finite), default=0.0) or 1.0
    rows = []
    for name, v in values.items():
        if math.isfinite(v):
            rgb = H.RED if v >= 0 else H.BLUE
            width = 10.0 * abs(v) / peak
            bar = (f'<span style="display:inline-block;width:{width:.2f}em;height:0.8em;'
                   f'background:{H.hex_color(rgb)}" title="{H.esc(H.fmt(v, 4))}"></span>')
            share = v / total if total else float("nan")
        else:
            bar = '<span class="ik-tok ik-nan" title="NaN">NaN</span>'
            share = float("nan")
        rows.append([short_layer_name(name), v, share, H.Raw(bar)])
    return H.table(["layer", "part of the score", "share", ""], rows, caption=caption,
                   numeric=[False, True, True, False])


def top_items(rows: Sequence[HeatmapRow]) -> list[H.TopItem]:
    return [H.TopItem(r.index if r.index is not None else -1, r.score if r.score is not None else float("nan"),
                      None, r.tokens or None, r.values if r.tokens else None, r.detail) for r in rows]


def explorer_html(view: Any) -> str:
    """The explorer's current view (an :class:`infkit.views.explorer.ExplorerView`) as a fragment."""
    parts = [H.note(view.state_line)]
    for note in view.notes:
        parts.append(f'<p class="ik-note">⚠ {H.esc(note)}</p>')
    if view.error:
        parts.append(f'<p class="ik-note" style="color:#7a0c1a">Error: {H.esc(view.error)}</p>')
    if view.query_row is not None:
        parts.append(H.loss_legend(view.query_scale, view.query_caption))
        parts.append(heatmap_rows_html([view.query_row], [view.query_scale], "−log p", LOSS_PALETTE))
    scale = view.token_scale
    specials = {r.tokens[k] for r in view.proponents + view.opponents for k in r.special if k < len(r.tokens)}
    score_scale = H.shared_scale([[r.score for r in view.proponents + view.opponents if r.score is not None]])
    parts.append(H.legend(scale, "token colours, shared by all rows below"))  # a Scale: says how it was chosen
    if view.proponents:
        parts.append(H.top_list(top_items(view.proponents), scale, score_scale, special_tokens=specials,
                                caption=f"Top {len(view.proponents)} proponents — {view.mode_text}"))
    if view.opponents:
        parts.append(H.top_list(top_items(view.opponents), scale, score_scale, special_tokens=specials,
                                caption=f"Top {len(view.opponents)} opponents — {view.mode_text}"))
    if view.layers:
        parts.append(layer_table(view.layers, view.layers_caption))
    return fragment("".join(parts))


def scatter_figure(x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str, title: str,
                   selected: tuple[float, float] | None = None):
    """The comparison's scatter as a matplotlib figure (object API, nothing registered with pyplot)."""
    import numpy as np
    from matplotlib.figure import Figure

    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    colours = np.where((xa > 0) & (ya > 0), H.hex_color(H.RED), np.where((xa < 0) & (ya < 0), H.hex_color(H.BLUE),
                                                                          "#787878"))
    fig = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(xa, ya, s=7, c=colours, alpha=0.55, linewidths=0)
    ax.axhline(0, color="#bbb", lw=0.8, ls="--")
    ax.axvline(0, color="#bbb", lw=0.8, ls="--")
    if selected is not None:
        ax.scatter([selected[0]], [selected[1]], s=70, facecolors="none", edgecolors="black", linewidths=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.25)
    return fig


def result_html(result: Any, k: int = 5, max_queries: int = 3) -> str:
    """``InfluenceResult._repr_html_``: the top-k proponents and opponents of its first queries, with the train
    examples' text when the data is text (no token scores: they cost a backward pass each)."""
    analysis = getattr(result, "_analysis", None)
    n_q = min(result.n_query, max_queries)
    columns = result.train_indices if result.train_indices is not None else None
    parts = [H.note(f"{result!r} — raw scores; top {min(k, result.n_train)} of the first {n_q} of {result.n_query} "
                    f"queries. {SIGN_LEGEND}")]
    if result.info.get("ordinary_layers"):
        parts.append(H.note(f"Tracked: {result.info['tracked']}."))
    for q in range(n_q):
        pro, opp, n_nan = ranked(result.scores[q], k)

        def items(pairs):
            out = []
            for col, value in pairs:
                i = columns[col] if columns is not None else col
                text = train_text(analysis, i) if analysis is not None else None
                out.append(H.TopItem(i, value, text))
            return out

        extra = f" ({n_nan} NaN scores ranked last)" if n_nan else ""
        parts.append(H.top_list(items(pro), caption=f"query {q}: top proponents{extra}"))
        parts.append(H.top_list(items(opp), caption=f"query {q}: top opponents{extra}"))
    return fragment("".join(parts))
