""":class:`TokenHeatmap`: tokens coloured by a value on a diverging scale, hover for the value, click to lock."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t

from infkit.errors import InfkitError
from infkit.views import html as H
from infkit.views.common import (
    ASSETS,
    PALETTE,
    SIGN_LEGEND,
    HeatmapRow,
    asset_text,
    scale_note,
    scales_for,
    token_texts,
)
from infkit.views.static import heatmap_html


class TokenHeatmap(anywidget.AnyWidget):
    """One or more token sequences coloured by a value: red positive, blue negative, white at zero, NaN hatched grey.

    The colours are :mod:`infkit.views.html`'s (ColorBrewer RdBu ends, colour-blind safe), so the live view and the
    static HTML it also renders (``_repr_html_``, for exports) look the same.

    Args:
        tokens, values: one sequence (its tokens' text and one value each; NaN allowed). Or:
        rows: several, as :class:`HeatmapRow` (or dicts of its fields).
        normalization: "shared" (one colour scale for all rows, default) or "row" (each row its own).
        scale: a fixed |value| for the full colour (overrides ``normalization``).
        clip: quantile of |values| that gets the full colour — default 0.99, the 99th percentile, so one outlier
            token does not leave the others pale (the tokens beyond it are drawn at full colour and the legend says
            how many); None or 1.0: the largest |value|.
        caption, legend: a title line and the one-line legend (default: the influence sign).
        special: indices of special tokens (single-sequence form).
        palette, scale_kind: the colour ends ({"pos": rgb, "neg": rgb}) and "diverging" (default) or "sequential"
            (a one-sided scale, e.g. a loss: white 0 … dark at ``scale``, with its own legend).

    Synced traits: ``rows``, ``scales``, ``scale_note`` (what the legend says about the scale), ``normalization``,
    ``locked`` ([row, token] after a click, [] when none), ``selected_row`` (the row last clicked, -1 none),
    ``busy``. Python-side: :attr:`row_data` (the rows with float values), :meth:`set_rows`, :meth:`static_html`,
    :meth:`save_html`.
    """

    _esm = ASSETS / "heatmap.js"
    _css = H.STYLE + asset_text("widgets.css")

    rows = t.List(t.Dict()).tag(sync=True)
    scales = t.List(t.Float()).tag(sync=True)
    normalization = t.Enum(("shared", "row"), default_value="shared").tag(sync=True)
    scale = t.Float(None, allow_none=True)
    clip = t.Float(H.DEFAULT_CLIP, allow_none=True)
    scale_note = t.Unicode("").tag(sync=True)
    scale_kind = t.Enum(("diverging", "sequential"), default_value="diverging").tag(sync=True)
    locked = t.List(t.Int(), maxlen=2).tag(sync=True)
    selected_row = t.Int(-1).tag(sync=True)
    palette = t.Dict(PALETTE).tag(sync=True)
    caption = t.Unicode("").tag(sync=True)
    legend = t.Unicode(SIGN_LEGEND).tag(sync=True)
    value_label = t.Unicode("influence").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)

    def __init__(self, tokens: Sequence[str] | None = None, values: Sequence[float] | None = None, *,
                 rows: Sequence[HeatmapRow | dict] | None = None, special: Sequence[int] = (), label: str = "",
                 **kwargs: Any):
        self.row_data: list[HeatmapRow] = []
        super().__init__(**kwargs)
        if tokens is not None or values is not None:
            if rows is not None:
                raise InfkitError("give either tokens and values (one row) or rows=, not both")
            rows = [HeatmapRow(list(tokens or []), values if values is not None else [], label=label,
                               special=list(special))]
        self.set_rows(rows or [])

    @classmethod
    def from_token_scores(cls, token_scores: Any, tokenizer: Any = None, label: str = "",
                          **kwargs: Any) -> TokenHeatmap:
        """A heatmap of ``Analysis.token_scores(q, i)``: the train example's tokens (ids when there is no
        tokenizer) coloured by their contribution to the score."""
        texts, special = token_texts(tokenizer, token_scores.token_ids)
        label = label or f"train {token_scores.train_index} · query {token_scores.query}"
        row = HeatmapRow(texts, token_scores.values, label=label, score=token_scores.total, special=special,
                         index=token_scores.train_index)
        return cls(rows=[row], **kwargs)

    def set_rows(self, rows: Sequence[HeatmapRow | dict]) -> None:
        """Replace the rows (keeps the normalisation; clears the lock when it no longer points at a token)."""
        data = [r if isinstance(r, HeatmapRow) else HeatmapRow(**r) for r in rows]
        self.row_data = data
        with self.hold_sync():
            self._set_scales()
            self.rows = [r.to_json() for r in data]
            if self.locked and not (self.locked[0] < len(data) and self.locked[1] < len(data[self.locked[0]].tokens)):
                self.locked = []
            if self.selected_row >= len(data):
                self.selected_row = -1

    @t.validate("clip")
    def _valid_clip(self, proposal: dict) -> float | None:
        clip = proposal["value"]
        if clip is not None and not 0.0 < clip <= 1.0:
            raise t.TraitError(f"clip={clip!r}: give a quantile in (0, 1] (0.99 is the default), or None for the "
                               "largest |value|")
        return clip

    def _set_scales(self) -> None:
        self.scales = scales_for(self.row_data, self.normalization, self.scale, self.clip)
        self.scale_note = scale_note(self.row_data, self.normalization, self.scale, self.clip)

    @t.observe("normalization", "scale", "clip")
    def _rescale(self, change: dict) -> None:
        with self.hold_sync():
            self._set_scales()

    @property
    def locked_value(self) -> tuple[int, int, str, float] | None:
        """(row, token index, token text, value) of the locked token, or None."""
        if len(self.locked) != 2:
            return None
        r, k = self.locked
        row = self.row_data[r]
        return r, k, row.tokens[k], row.values[k]

    def static_html(self) -> str:
        return heatmap_html(self.row_data, self.scales, self.caption, self.legend, self.normalization,
                            self.value_label, scale=self.scale, clip=self.clip, palette=self.palette,
                            kind=self.scale_kind)

    def save_html(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write this heatmap to ``path`` as one self-contained HTML page (inline CSS, no script, nothing fetched),
        every token included, and return the path. The folder must exist."""
        body = heatmap_html(self.row_data, self.scales, self.caption, self.legend, self.normalization,
                            self.value_label, max_tokens=sum(len(r.tokens) for r in self.row_data), scale=self.scale,
                            clip=self.clip, palette=self.palette, kind=self.scale_kind)
        return H.write_page(H.page(title or "Token heatmap", body), path)

    def _repr_html_(self) -> str:
        return self.static_html()

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = super()._repr_mimebundle_(**kwargs)
        data, meta = bundle if isinstance(bundle, tuple) else (bundle, {})
        data["text/html"] = self.static_html()
        return data, meta

    def __repr__(self) -> str:
        n_tok = sum(len(r.tokens) for r in self.row_data)
        lock = f"[{self.locked[0]}, {self.locked[1]}]" if self.locked else "none"
        return (f"TokenHeatmap(rows={len(self.row_data)}, tokens={n_tok}, normalization={self.normalization!r}, "
                f"locked={lock})")
