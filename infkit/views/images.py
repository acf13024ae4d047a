"""Images beside their influence: :class:`ImageInfluenceGrid`, the query image next to its top proponents and opponents.

    from infkit.views.images import ImageInfluenceGrid
    grid = ImageInfluenceGrid(result, query_images, train_images, queries=0, k=6,
                              train_captions=captions, marked=is_style, mark_label="style")
    grid                      # in a notebook: the static HTML form
    grid.to_html()            # the same, as a string (inline base64 PNGs, inline CSS, no script, no CDN)
    grid.save("grid.html")

The view only renders a :class:`~infkit.result.InfluenceResult`; it computes nothing. Colours follow infkit's sign
convention: red = proponent (up-weighting that training image lowers the query's loss), blue = opponent. Each card
shows the raw score and the score divided by the largest |score| of the query's row (shared by its proponents and
opponents). The output is deterministic (no ids, no timestamps, PNGs encoded here with fixed settings), so it can be
snapshot-tested and survives static export.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infkit import fmt
from infkit.errors import InfkitError

PROPONENT = "#b2182b"  # red, as infkit.views.html (ColorBrewer RdBu)
OPPONENT = "#2166ac"  # blue
NEUTRAL = "#555555"

CSS = """
.ikg{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:12px;color:#222;line-height:1.3}
.ikg-legend{margin:2px 0 6px 0;color:#444}
.ikg-swatch{display:inline-block;width:10px;height:10px;vertical-align:middle;margin:0 3px 0 8px}
.ikg-row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:10px;margin:6px 0 10px 0;
  padding:6px;border:1px solid #ddd;border-radius:4px}
.ikg-group{display:flex;flex-direction:column}
.ikg-title{font-weight:600;margin-bottom:3px}
.ikg-cards{display:flex;gap:6px}
.ikg-card{display:flex;flex-direction:column;align-items:center;padding:3px;border-radius:3px;
  border:2px solid transparent;max-width:110px;text-align:center}
.ikg-card img{image-rendering:pixelated;image-rendering:crisp-edges;display:block}
.ikg-score{font-variant-numeric:tabular-nums;font-weight:600}
.ikg-meta{color:#555;font-size:11px;word-break:break-word}
.ikg-mark{font-size:10px;font-weight:600;color:#fff;background:#7d3c98;border-radius:2px;padding:0 3px;margin-top:2px}
"""


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of a uint8 image [H, W, 3] (RGB) or [H, W] (grey), encoded deterministically (zlib level 9)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour_type = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type = 2
    else:
        raise InfkitError(f"an image for the grid must be [H, W, 3] or [H, W], got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def as_pixels(image: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """One image as uint8 [H, W, 3] (or [H, W]): a float tensor/array [C, H, W] or [H, W, C] scaled from
    ``value_range``, or uint8 as is. 1- and 3-channel images; other channel counts show their first three."""
    if isinstance(image, (tuple, list)) and len(image) >= 1 and not np.isscalar(image[0]):
        image = image[0]  # an (image, label) example
    if isinstance(image, dict):
        image = next((image[k] for k in ("image", "pixel_values", "sample", "latents") if k in image), None)
        if image is None:
            raise InfkitError("a dict example for the grid needs an 'image' entry")
    array = image.detach().cpu().float().numpy() if torch.is_tensor(image) else np.asarray(image)
    channels_first = torch.is_tensor(image) or (array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4))
    if array.ndim == 3 and channels_first:  # torch images are [C, H, W]; arrays are [H, W, C] unless clearly not
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] != 3:
        array = array[..., :3]
    if array.ndim not in (2, 3):
        raise InfkitError(f"cannot show an image of shape {tuple(array.shape)}; give [C, H, W] or [H, W, C]")
    if array.dtype == np.uint8:
        return array
    lo, hi = value_range
    scaled = (np.clip(array.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(scaled).astype(np.uint8)


def image_tag(image: Any, scale: int = 4, value_range=(-1.0, 1.0), title: str | None = None) -> str:
    pixels = as_pixels(image, value_range)
    height, width = pixels.shape[:2]
    data = base64.b64encode(png_bytes(pixels)).decode("ascii")
    alt = html.escape(title or "image", quote=True)
    return (f'<img src="data:image/png;base64,{data}" width="{width * scale}" height="{height * scale}" '
            f'alt="{alt}" title="{alt}">')


def _format(value: float) -> str:
    return fmt.num(value, sign=True)  # signed: a measurement, not an index (notebooks/conftest.py)


class ImageInfluenceGrid:
    """A query image beside its top-k proponents and opponents, with their scores (static HTML form).

    Args:
        result: an :class:`~infkit.result.InfluenceResult` (``an.scores(queries)``).
        query_images: the query examples or images, indexed like the result's rows (tensors [C, H, W] in
            ``value_range``, uint8 arrays [H, W, 3], or (image, label) examples).
        train_images: the train examples or images, indexed like the train data.
        queries: one query index or a list of them (one row each); default all of the result's queries, up to 8.
        k: proponents and opponents per query.
        query_captions / train_captions: short texts under the images (a list, or a callable index -> str).
        marked: optional [n_train] booleans (e.g. the style subset): marked train images get a badge
            ``mark_label``, and each row says how many of its top-k proponents are marked.
        scale: on-screen pixels per image pixel (the PNGs stay small; the browser scales them crisply).
        value_range: the range float images are scaled from (diffusers' [-1, 1] by default).
        title: a heading.
    """

    def __init__(
        self,
        result,
        query_images: Sequence[Any],
        train_images: Sequence[Any],
        queries: int | Sequence[int] | None = None,
        k: int = 5,
        query_captions=None,
        train_captions=None,
        marked: Sequence[bool] | torch.Tensor | None = None,
        mark_label: str = "marked",
        scale: int = 4,
        value_range: tuple[float, float] = (-1.0, 1.0),
        title: str | None = None,
    ):
        self.result = result
        if queries is None:
            queries = list(range(min(result.n_query, 8)))
        self.queries = [int(queries)] if isinstance(queries, (int, np.integer)) else [int(q) for q in queries]
        for q in self.queries:
            if not 0 <= q < result.n_query:
                raise InfkitError(f"query index {q} is out of range for a result with {result.n_query} queries")
        if len(query_images) < result.n_query:
            raise InfkitError(f"{len(query_images)} query images for a result with {result.n_query} queries")
        n_train = (max(result.train_indices) + 1) if result.train_indices else result.n_train
        if len(train_images) < n_train:
            raise InfkitError(f"{len(train_images)} train images for a result over {n_train} train examples")
        if k < 1:
            raise InfkitError(f"k must be >= 1, got {k}")
        self.query_images, self.train_images = query_images, train_images
        self.k = k
        self.query_captions, self.train_captions = query_captions, train_captions
        self.marked = None if marked is None else [bool(m) for m in (marked.tolist() if torch.is_tensor(marked)
                                                                     else marked)]
        if self.marked is not None and len(self.marked) < n_train:
            raise InfkitError(f"marked has {len(self.marked)} entries for {n_train} train examples")
        self.mark_label = mark_label
        self.scale, self.value_range, self.title = scale, value_range, title

    # -- data --------------------------------------------------------------------------------------------------
    def tops(self):
        """{query: Top} for the shown queries."""
        return {q: self.result.top(q, k=self.k) for q in self.queries}

    def marked_share(self, q: int) -> float | None:
        """The share of query q's top-k proponents that are marked (None without ``marked``)."""
        if self.marked is None:
            return None
        top = self.result.top(q, k=self.k)
        return sum(self.marked[i] for i in top.proponents.indices) / max(len(top.proponents), 1)

    @staticmethod
    def _caption(captions, i: int) -> str | None:
        if captions is None:
            return None
        return str(captions(i) if callable(captions) else captions[i])

    # -- HTML --------------------------------------------------------------------------------------------------
    def _card(self, image, score: float | None, peak: float, index: int | None, caption: str | None,
              mark: bool) -> str:
        if score is None:
            border, score_html = NEUTRAL, ""
        else:
            colour = PROPONENT if score > 0 else (OPPONENT if score < 0 else NEUTRAL)
            border = colour
            relative = score / peak if peak > 0 else 0.0
            score_html = (f'<span class="ikg-score" style="color:{colour}" title="score {score!r}">{_format(score)}'
                          f"</span><span class=\"ikg-meta\">{relative:+.2f} of max</span>")
        label = f"#{index}" if index is not None else "query"
        text = html.escape(caption) if caption else ""
        title = f"{label} {caption or ''}".strip()
        parts = [f'<div class="ikg-card" style="border-color:{border}">',
                 image_tag(image, self.scale, self.value_range, title), score_html,
                 f'<span class="ikg-meta">{html.escape(label)}{" · " + text if text else ""}</span>']
        if mark:
            parts.append(f'<span class="ikg-mark">{html.escape(self.mark_label)}</span>')
        parts.append("</div>")
        return "".join(parts)

    def _row(self, q: int) -> str:
        top = self.result.top(q, k=self.k)
        row = self.result.scores[q]
        peak = float(row.abs().max()) if row.numel() else 0.0
        query = self._card(self.query_images[q], None, peak, None, self._caption(self.query_captions, q), False)

        def group(name: str, ranked) -> str:
            cards = "".join(
                self._card(self.train_images[i], s, peak, i, self._caption(self.train_captions, i),
                           bool(self.marked[i]) if self.marked is not None else False)
                for i, s in ranked
            )
            return (f'<div class="ikg-group"><div class="ikg-title">{name}</div>'
                    f'<div class="ikg-cards">{cards}</div></div>')

        share = self.marked_share(q)
        note = (f'<div class="ikg-meta">{round(share * len(top.proponents))}/{len(top.proponents)} proponents '
                f"{html.escape(self.mark_label)}</div>") if share is not None else ""
        query_group = f'<div class="ikg-group"><div class="ikg-title">Query {q}</div>{query}{note}</div>'
        return (f'<div class="ikg-row">{query_group}{group(f"Top {self.k} proponents", top.proponents)}'
                f'{group(f"Top {self.k} opponents", top.opponents)}</div>')

    def to_html(self) -> str:
        """The static form: one self-contained <div> (inline CSS and PNGs; no scripts)."""
        estimator = html.escape(str(self.result.estimator))
        heading = f'<div class="ikg-title" style="font-size:14px">{html.escape(self.title)}</div>' if self.title else ""
        legend = (f'<div class="ikg-legend">estimator <b>{estimator}</b>; score = ∇f(query)ᵀ (G + λI)⁻¹ ∇L(train).'
                  f'<span class="ikg-swatch" style="background:{PROPONENT}"></span>proponent: training on it lowers '
                  f'the query\'s loss<span class="ikg-swatch" style="background:{OPPONENT}"></span>opponent: raises '
                  "it. Relative values are divided by the row's largest |score|.</div>")
        rows = "".join(self._row(q) for q in self.queries)
        return f'<div class="ikg"><style>{CSS}</style>{heading}{legend}{rows}</div>'

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | Path) -> Path:
        """Write a standalone HTML page."""
        path = Path(path)
        title = html.escape(self.title or "infkit image influence")
        path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head><body>"
                        f"{self.to_html()}</body></html>\n", encoding="utf-8")
        return path

    def __repr__(self) -> str:
        lines = [f"ImageInfluenceGrid(estimator={self.result.estimator!r}, queries={self.queries}, k={self.k})"]
        for q, top in self.tops().items():
            pro = ", ".join(f"{i}: {_format(s)}" for i, s in top.proponents)
            opp = ", ".join(f"{i}: {_format(s)}" for i, s in top.opponents)
            lines.append(f"  query {q}: proponents [{pro}]; opponents [{opp}]")
            share = self.marked_share(q)
            if share is not None:
                lines.append(f"    {round(share * len(top.proponents))}/{len(top.proponents)} proponents "
                             f"{self.mark_label}")
        return "\n".join(lines)
