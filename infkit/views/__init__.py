"""The picture side of infkit: static HTML, plots, the report and the notebook widgets. Nothing here computes
influence; it renders what the public API returns.

Static (no ipywidgets, no anywidget, no script in the output):

* :mod:`infkit.views.html` — the HTML renderers: token rows, top-k lists, legend, tables, figures, page shell.
* :mod:`infkit.views.plots` — matplotlib plots (layer-wise distribution, sparsity with a power-law fit).
* :mod:`infkit.views.images` — :class:`~infkit.views.images.ImageInfluenceGrid`, images beside their influence.
* :mod:`infkit.views.report` — the self-contained HTML report of ``infkit report``.
* :mod:`infkit.views.static` — the static HTML of every widget view (and ``InfluenceResult._repr_html_``).
* :mod:`infkit.views.common` — what the widgets share: token text, JSON-safe values, score modes, queries.

Notebook widgets: look at influence, not just compute it.

* :class:`TokenHeatmap` — token sequences coloured on a diverging scale (red proponent, blue opponent, white 0,
  NaN hatched grey); hover for the value and token index, click to lock; shared or per-row colour scale.
* :class:`InfluenceExplorer` — pick or type a query, an estimator and k; the top proponents and opponents as
  heatmaps, the query's own tokens, the layer-wise split of the selected pair; raw or normalised scores.
* :class:`EstimatorComparison` — scatter of two estimators' scores, Pearson / Spearman / top-k overlap, time and
  cache memory per estimator; click a point for that pair's heatmaps.

Front-end choice: the custom views (heatmap, scatter) are `anywidget <https://anywidget.dev>`_ ES modules, package
data in ``infkit/views/assets`` (:data:`ASSETS`): plain JavaScript, no build step, no nbextension or labextension of
our own, and the same module runs wherever anywidget runs (JupyterLab 4, Notebook 7, VS Code, Colab). The controls
(dropdowns, sliders, toggles, text boxes, buttons) are plain ipywidgets: users know them, they are accessible and
keyboard-driven, and they need no code of ours in the browser.

Every view also renders itself as static HTML (``text/html`` next to the widget view in its mime bundle, and
``_repr_html_``) built from :mod:`infkit.views.html`, so nbconvert, nbviewer, GitHub and saved reports still show the
heatmaps. ``__repr__`` is deterministic (no addresses), as nbval compares ``text/plain``.

The widget classes are imported lazily, so the static modules (``infkit.views.static``, used by
``InfluenceResult._repr_html_``) do not need ipywidgets or anywidget.
"""

from __future__ import annotations

from typing import Any

from infkit.views.common import ASSETS, MODES, SIGN_LEGEND, HeatmapRow, token_texts

_LAZY = {
    "TokenHeatmap": "infkit.views.heatmap",
    "InfluenceExplorer": "infkit.views.explorer",
    "EstimatorComparison": "infkit.views.comparison",
    "ScoreScatter": "infkit.views.comparison",
}

__all__ = ["ASSETS", "MODES", "SIGN_LEGEND", "EstimatorComparison", "HeatmapRow", "InfluenceExplorer",
           "ScoreScatter", "TokenHeatmap", "token_texts"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'infkit.views' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
