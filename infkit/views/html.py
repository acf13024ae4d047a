"""Static HTML renderers: token heatmaps, top-k lists, a legend, tables, embedded figures and a page shell.

Every function returns a string of HTML that needs no script, no network and no stylesheet beyond :data:`STYLE`
(inline in :func:`page`; a notebook output or a widget's ``_repr_html_`` can include it with :func:`style_tag`).
Output is deterministic — no random ids — so it can be snapshot-tested and stored in notebooks.

Colour (docs/design.md §2, §4): positive influence (a proponent) is red, negative (an opponent) blue, mixed linearly
with white by |value| / scale, so zero is white. The ends are ColorBrewer's RdBu (#b2182b, #2166ac), a diverging
pair that stays distinct under the common colour-vision deficiencies. A NaN is never white: it is grey and
hatched, and says NaN on hover. Every coloured token has a ``title`` (hover) with its raw and normalised value.

Default scale (:func:`scale_of`): the 99th percentile of |value| over the rows that share it, not the largest, so
one outlier token (a "###" heading that takes a third of a score) does not leave every other token pale; the
tokens beyond it are drawn at full colour and the legend says how many. ``clip=None`` (or 1.0) gives the largest.
The percentile is the nearest-rank one (the smallest |value| with at least 99% of the values at or below it): with
100 values or more the single largest is always beyond it, and up to 99 values (a few short sentences, which have
no outlier to speak of) it is the largest itself.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infkit.fmt import num

RED = (178, 24, 43)  # #b2182b: proponents
BLUE = (33, 102, 172)  # #2166ac: opponents
WHITE = (255, 255, 255)
#: The dark end of the one-sided (sequential) scale of a loss, e.g. the query's −log p per token: white at 0, this
#: grey (ColorBrewer Greys) at the top. Grey, not red or blue, because a loss is not a proponent or an opponent.
DARK = (37, 37, 37)
NAN_CLASS = "ik-nan"
#: The default colour scale clips at this quantile of |value| (:func:`scale_of`).
DEFAULT_CLIP = 0.99

STYLE = """
.ik { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b; line-height: 1.45; }
.ik h1 { font-size: 1.6em; margin: 0.2em 0 0.1em; }
.ik h2 { font-size: 1.25em; margin: 1.6em 0 0.4em; border-bottom: 1px solid #ddd; padding-bottom: 0.15em; }
.ik h3 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
.ik p.ik-note { color: #555; font-size: 0.92em; margin: 0.3em 0; max-width: 60em; }
.ik code, .ik .ik-mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.92em; }
.ik table.ik-table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.92em; }
.ik table.ik-table th, .ik table.ik-table td { border-bottom: 1px solid #e3e3e3; padding: 0.25em 0.6em;
  text-align: left; vertical-align: top; }
.ik table.ik-table th { background: #f5f5f5; font-weight: 600; }
.ik table.ik-table td.ik-num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.ik table.ik-table caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
.ik .ik-seq { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.95em;
  line-height: 1.9; overflow-wrap: anywhere; }
.ik .ik-tok { white-space: pre-wrap; padding: 0.12em 0.06em; border-radius: 2px; box-shadow: inset 0 0 0 1px #eee; }
.ik .ik-tok.ik-dark { color: #fff; }
.ik .ik-tok.ik-nan { background: repeating-linear-gradient(45deg, #bdbdbd 0 3px, #e6e6e6 3px 6px); color: #333; }
.ik .ik-tok .ik-ws { color: #8a8a8a; }
.ik .ik-tok.ik-special { outline: 1px dashed #777; font-style: italic; }
.ik .ik-rank { color: #777; }
.ik .ik-pro { color: #b2182b; font-weight: 600; }
.ik .ik-opp { color: #2166ac; font-weight: 600; }
.ik .ik-legend { display: flex; align-items: center; gap: 0.6em; flex-wrap: wrap; margin: 0.4em 0 0.8em;
  font-size: 0.9em; }
.ik .ik-bar { width: 16em; height: 0.9em; border: 1px solid #ccc;
  background: linear-gradient(to right, #2166ac, #ffffff, #b2182b); }
.ik .ik-bar.ik-seqbar { width: 10em; background: linear-gradient(to right, #ffffff, #252525); }
.ik .ik-swatch { display: inline-block; width: 1.6em; height: 0.9em; border: 1px solid #ccc; vertical-align: middle; }
.ik figure { margin: 0.5em 0 1em; }
.ik figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.ik figcaption { color: #555; font-size: 0.9em; max-width: 60em; }
.ik .ik-query { background: #fafafa; border-left: 3px solid #999; padding: 0.3em 0.7em; margin: 0.5em 0;
  white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; }
.ik .ik-scroll { overflow-x: auto; max-width: 100%; }
.ik .ik-completion { text-decoration: underline; text-decoration-color: #b2182b; text-underline-offset: 3px; }
.ik details > summary { cursor: pointer; color: #333; }
"""


def style_tag() -> str:
    """The stylesheet as a ``<style>`` element (for notebook outputs that are not a whole page)."""
    return f"<style>{STYLE}</style>"


def esc(value: Any) -> str:
    """HTML-escape text for element content and attribute values (quotes included)."""
    return html.escape(str(value), quote=True)


# -- numbers and colours -----------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 3) -> str:
    """A number with a sign, through :func:`infkit.fmt.num` ("+1.23", "-0.0451", "+2745"); "NaN" and "—" (None)."""
    if value is None:
        return "—"
    if math.isnan(float(value)):
        return "NaN"
    return "0" if float(value) == 0 else num(value, digits, sign=True)


def is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def shared_scale(rows: Iterable[Sequence[float]]) -> float:
    """One colour scale for several rows: the largest finite |value| among them (1.0 when all are 0 or NaN)."""
    peak = 0.0
    for row in rows:
        for v in row:
            v = float(v)
            if math.isfinite(v):
                peak = max(peak, abs(v))
    return peak if peak > 0 else 1.0


def count(n: int, what: str = "tokens") -> str:
    """How many, e.g. 1 token or 3 tokens (``what`` is the plural)."""
    return f"{n} {what[:-1] if n == 1 and what.endswith('s') else what}"


def ordinal(clip: float) -> str:
    """A quantile as a percentile's name: 0.99 -> "99th", 0.995 -> "99.5th"."""
    pct = f"{clip * 100:.4g}"
    if "." in pct or "e" in pct:
        return pct + "th"
    n = int(pct)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class Scale:
    """A colour scale and how it was chosen: ``value`` is the |value| that gets the full colour, ``clip`` the
    quantile of |value| it is (None: the largest), ``beyond`` how many values lie beyond it (drawn at full colour)."""

    value: float
    clip: float | None = None
    beyond: int = 0

    def __float__(self) -> float:
        return self.value

    def describe(self, what: str = "tokens") -> str:
        """What the legend says about it, e.g. "clipped at the 99th percentile of |value|: 3 tokens beyond it
        drawn at full colour"."""
        if self.clip is None:
            return "the largest |value|"
        return (f"clipped at the {ordinal(self.clip)} percentile of |value|: {count(self.beyond, what)} beyond it "
                "drawn at full colour")


def _finite_abs(rows: Iterable[Sequence[float]]) -> tuple[list[float], int]:
    finite, n_inf = [], 0
    for row in rows:
        for v in row:
            v = float(v)
            if math.isfinite(v):
                finite.append(abs(v))
            elif math.isinf(v):
                n_inf += 1
    return finite, n_inf


def scale_of(rows: Iterable[Sequence[float]], clip: float | None = DEFAULT_CLIP) -> Scale:
    """The colour scale of rows that share it: the ``clip`` quantile of the finite |values| by nearest rank (the
    ⌈clip·n⌉-th smallest of n), or the largest |value| when ``clip`` is None or ≥ 1 (or when the quantile is 0).
    Values beyond it (±inf included) saturate. 1.0 when every value is 0 or NaN."""
    finite, n_inf = _finite_abs(rows)
    peak = max(finite, default=0.0)
    if peak <= 0:
        return Scale(1.0, None, n_inf)
    if clip is None or clip >= 1.0:
        return Scale(peak, None, n_inf)
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip={clip!r}: give a quantile in (0, 1], e.g. 0.99, or None for the largest |value|")
    finite.sort()
    q = finite[max(0, math.ceil(clip * len(finite) - 1e-9) - 1)]
    if q <= 0:
        return Scale(peak, None, n_inf)
    return Scale(q, clip, sum(v > q for v in finite) + n_inf)


def clipped_scale(rows: Iterable[Sequence[float]], clip: float | None = DEFAULT_CLIP) -> float:
    """:func:`scale_of`'s value: the default colour scale of rows that share one."""
    return scale_of(rows, clip).value


def color(value: float, scale: float, pos: Sequence[int] = RED,
          neg: Sequence[int] = BLUE) -> tuple[int, int, int] | None:
    """RGB for a value on the diverging scale (white at 0, ``pos`` (RED) at +scale, ``neg`` (BLUE) at -scale, clipped
    beyond); ``None`` for NaN, which gets the hatched grey style instead. ``pos=neg=DARK`` gives the one-sided scale
    of a loss."""
    value = float(value)
    if math.isnan(value):
        return None
    scale = float(scale)
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    end = pos if t >= 0 else neg
    a = abs(t)
    return tuple(round(w + a * (e - w)) for w, e in zip(WHITE, end))  # type: ignore[return-value]


def hex_color(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# -- tokens ------------------------------------------------------------------------------------------------------
_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥", "\u00a0": "⍽", "\u200b": "⟨ZWSP⟩", "\ufeff": "⟨BOM⟩"}


def token_html(text: str, special: bool = False) -> str:
    """A token's text, escaped, with whitespace shown faithfully: spaces stay spaces (the span keeps them with
    ``white-space: pre-wrap``, and a long row still wraps at them), a newline shows as ↵ and breaks the line, a tab
    as ⇥, other control and invisible characters by name; an empty token as ∅. Special tokens (``<eos>``,
    ``[CLS]`` ...) keep their exact text."""
    if text == "":
        return '<span class="ik-ws">∅</span>'
    if special:
        return esc(text)
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(f'<span class="ik-ws">{esc(_VISIBLE[ch])}</span>' + ("\n" if ch == "\n" else ""))
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != " ":
            out.append(f'<span class="ik-ws">{esc(f"⟨U+{ord(ch):04X}⟩")}</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def token_title(text: str, value: float, scale: float, extra: str = "") -> str:
    raw = fmt(value, 4)
    norm = "NaN" if is_nan(value) else fmt(float(value) / scale if scale > 0 else 0.0, 3)
    label = repr(text)
    return f"{label}  raw {raw}  normalised {norm} (of ±{fmt(scale, 3).lstrip('+')}){extra}"


def token_row(tokens: Sequence[str], values: Sequence[float], scale: float | None = None,
              special_tokens: Iterable[str] = (), titles: Sequence[str] | None = None,
              palette: tuple[Sequence[int], Sequence[int]] = (RED, BLUE)) -> str:
    """One sequence as coloured tokens (a heatmap row).

    Args:
        tokens: each token's text (with its own whitespace: " Parth" for a word after a space).
        values: one value per token (NaN allowed: drawn hatched grey).
        scale: |value| that gets the full colour; default :func:`clipped_scale` of this row (its 99th percentile
            of |value|). Share one scale across rows by passing :func:`clipped_scale` (or :func:`shared_scale`, the
            largest) of them.
        special_tokens: token texts to draw as special tokens.
        titles: hover text per token; default the token, its raw value and its value / scale.
        palette: the (positive, negative) ends; (DARK, DARK) for a loss.
    """
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    scale = clipped_scale([values]) if scale is None else float(scale)
    specials = set(special_tokens)
    parts = []
    for k, (text, value) in enumerate(zip(tokens, values)):
        rgb = color(value, scale, *palette)
        classes = ["ik-tok"]
        special = text in specials
        if special:
            classes.append("ik-special")
        style = ""
        if rgb is None:
            classes.append(NAN_CLASS)
        else:
            style = f' style="background:{hex_color(rgb)}"'
            if scale > 0 and abs(float(value)) / scale > 0.6:
                classes.append("ik-dark")
        title = titles[k] if titles is not None else token_title(text, value, scale)
        cls = " ".join(classes)
        parts.append(f'<span class="{cls}"{style} title="{esc(title)}">{token_html(text, special)}</span>')
    return f'<span class="ik-seq">{"".join(parts)}</span>'


# -- top-k lists, legend, tables, figures, page --------------------------------------------------------------------
@dataclass
class TopItem:
    """One row of a top-k list: a train example, its score and (optionally) its tokens and their values."""

    index: int
    score: float
    text: str | None = None
    tokens: Sequence[str] | None = None
    values: Sequence[float] | None = None
    note: str = ""  # e.g. the example's kind


def top_list(items: Sequence[TopItem], scale: float | None = None, score_scale: float | None = None,
             caption: str | None = None, special_tokens: Iterable[str] = (), heading: str = "") -> str:
    """A table of train examples with their scores (raw and normalised by ``score_scale``, default the largest
    |score| in the list) and, where given, their token heatmaps on one shared colour ``scale`` (default
    :func:`clipped_scale` of the rows' token values: their 99th percentile of |value|)."""
    with_tokens = [it for it in items if it.tokens is not None and it.values is not None]
    if scale is None:
        scale = clipped_scale([it.values for it in with_tokens])
    scale = float(scale)
    if score_scale is None:
        score_scale = shared_scale([[it.score for it in items]])
    head = (f"<tr><th>#</th><th>train</th><th>score</th><th>normalised</th><th>{esc(heading) or 'sequence'}</th>"
            "</tr>")
    rows = []
    for rank, it in enumerate(items, 1):
        kind = "ik-pro" if it.score > 0 else ("ik-opp" if it.score < 0 else "")
        if it.tokens is not None and it.values is not None:
            body = token_row(it.tokens, it.values, scale, special_tokens)
        else:
            body = f'<span class="ik-seq">{esc(it.text or "")}</span>'
        note = f' <span class="ik-rank">({esc(it.note)})</span>' if it.note else ""
        norm = "NaN" if is_nan(it.score) else fmt(float(it.score) / score_scale, 2)
        rows.append(
            f'<tr><td class="ik-rank">{rank}</td><td class="ik-idx">{it.index}</td>'
            f'<td class="ik-num {kind}">{esc(fmt(it.score, 4))}</td><td class="ik-num">{esc(norm)}</td>'
            f"<td>{body}{note}</td></tr>"
        )
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="ik-table ik-top">{cap}<thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def legend(scale: float | Scale | None = None, scale_note: str = "") -> str:
    """What the colours mean: blue (opponent) through white (0) to red (proponent), the NaN style, and the scale's
    ends when ``scale`` is given (``scale_note`` says what it is shared by, e.g. "all rows of this query"; a
    :class:`Scale` also says how it was chosen: "clipped at the 99th percentile of |value|: 3 tokens beyond it drawn
    at full colour")."""
    ends = ""
    if scale is not None:
        s = fmt(float(scale), 3).lstrip("+")
        notes = [scale.describe()] if isinstance(scale, Scale) and scale.clip is not None else []
        notes += [scale_note] if scale_note else []
        ends = (f'<span class="ik-mono">scale −{esc(s)} … 0 … +{esc(s)}</span>'
                + (f'<span class="ik-rank">({esc("; ".join(notes))})</span>' if notes else ""))
    return (
        '<div class="ik-legend">'
        f'<span class="ik-opp">blue: opponent</span><span class="ik-bar" title="diverging scale, white at 0"></span>'
        f'<span class="ik-pro">red: proponent</span>{ends}'
        '<span><span class="ik-swatch ik-tok ik-nan"></span> NaN</span>'
        '<span class="ik-rank">Red: training on it lowers the query\'s loss (the answer gets more likely); blue: '
        "raises it; white: 0. Hover a token for its raw value and its value divided by the scale.</span>"
        "</div>"
    )


def loss_legend(top: float, text: str = "") -> str:
    """The legend of a one-sided loss scale (the query's −log p per token): white at 0, dark grey at ``top`` and
    beyond, on a fixed scale; ``text`` says what the values are."""
    t = fmt(top, 3).lstrip("+")
    return (
        '<div class="ik-legend">'
        f'<span class="ik-mono">white 0</span><span class="ik-bar ik-seqbar" title="sequential scale, white at 0">'
        f'</span><span class="ik-mono">dark ≥ {esc(t)}</span>'
        + (f'<span class="ik-rank">{esc(text)}</span>' if text else "")
        + "</div>"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None,
          numeric: Sequence[bool] | None = None, digits: int = 3) -> str:
    """A plain table; floats get ``digits`` significant digits, other cells are escaped text (or ``Raw`` HTML)."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)

    def cell(value: Any, k: int) -> str:
        cls = ' class="ik-num"' if k < len(numeric) and numeric[k] else ""
        if isinstance(value, Raw):
            text = value.html
        elif isinstance(value, float):
            text = esc(fmt(value, digits).lstrip("+"))
        else:
            text = esc(value)
        return f"<td{cls}>{text}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v, k) for k, v in enumerate(r)) + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="ik-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class Raw:
    """Already-rendered HTML to put in a :func:`table` cell as is."""

    html: str


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (no timestamp or version metadata, so the bytes are reproducible)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def figure(image: Any, alt: str, caption: str | None = None, width: int | None = None) -> str:
    """An embedded image: a matplotlib figure or PNG bytes, as a base64 ``data:`` URL (nothing to fetch)."""
    png = image if isinstance(image, (bytes, bytearray)) else figure_png(image)
    data = base64.b64encode(bytes(png)).decode("ascii")
    size = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}"{size} src="data:image/png;base64,{data}">{cap}</figure>'


def query_box(prompt: str, completion: str, note: str = "") -> str:
    """A prompt/completion query, the completion underlined."""
    extra = f' <span class="ik-rank">{esc(note)}</span>' if note else ""
    return (f'<div class="ik-query"><span class="ik-mono">{token_html(prompt)}'
            f'<span class="ik-completion">{token_html(completion)}</span></span>{extra}</div>')


def scroll(body: str) -> str:
    """A box that scrolls sideways when ``body`` (a wide table) is wider than the space it is given."""
    return f'<div class="ik-scroll">{body}</div>'


def section(title: str, body: str, anchor: str | None = None, level: int = 2) -> str:
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h{level}>{esc(title)}</h{level}>{body}</section>"


def note(text: str) -> str:
    return f'<p class="ik-note">{esc(text)}</p>'


def fragment(body: str) -> str:
    """A self-contained piece for a notebook output: the stylesheet and the body in an ``ik`` container."""
    return f'{style_tag()}<div class="ik">{body}</div>'


def write_page(text: str, path: str | os.PathLike) -> Path:
    """Write an HTML page (UTF-8) to ``path``; its folder must exist (the error says so when it does not)."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        from infkit.errors import InfkitError

        raise InfkitError(f"cannot write {target}: the folder {target.parent} does not exist; create it first")
    target.write_text(text, encoding="utf-8")
    return target


def page(title: str, body: str, subtitle: str | None = None) -> str:
    """A whole HTML document with inline CSS: opens offline, needs no script."""
    sub = f'<p class="ik-note">{esc(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}body {{ margin: 1.5em 2em; max-width: 78em; }}</style></head>\n"
        f'<body class="ik"><h1>{esc(title)}</h1>{sub}\n{body}\n</body></html>\n'
    )
