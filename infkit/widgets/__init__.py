"""Notebook widgets: look at influence, not just compute it.

* :class:`TokenHeatmap` — token sequences coloured on a diverging scale (red proponent, blue opponent, white 0,
  NaN hatched grey); hover for the value and token index, click to lock; shared or per-row colour scale.
* :class:`InfluenceExplorer` — pick or type a query, an estimator and k; the top proponents and opponents as
  heatmaps, the query's own tokens, the layer-wise split of the selected pair; raw or normalised scores.
* :class:`EstimatorComparison` — scatter of two estimators' scores, Pearson / Spearman / top-k overlap, time and
  cache memory per estimator; click a point for that pair's heatmaps.

Front-end choice: the custom views (heatmap, scatter) are `anywidget <https://anywidget.dev>`_ ES modules in the
repository's ``widgets/`` folder (shipped in the wheel as ``infkit/_widgets_static``): plain JavaScript, no build step,
no nbextension or labextension of our own, and the same module runs wherever anywidget runs (JupyterLab 4, Notebook 7,
VS Code, Colab). The controls (dropdowns, sliders, toggles, text boxes, buttons) are plain ipywidgets: users know
them, they are accessible and keyboard-driven, and they need no code of ours in the browser.

Every view also renders itself as static HTML (``text/html`` next to the widget view in its mime bundle, and
``_repr_html_``) built from :mod:`infkit.ui.html`, so nbconvert, nbviewer, GitHub and saved reports still show the
heatmaps. ``__repr__`` is deterministic (no addresses), as nbval compares ``text/plain``.

The widget classes are imported lazily, so ``infkit.widgets.static`` (used by ``InfluenceResult._repr_html_``) does
not need ipywidgets or anywidget.
"""

from __future__ import annotations

from typing import Any

from infkit.widgets._assets import static_dir
from infkit.widgets.common import MODES, SIGN_LEGEND, HeatmapRow, token_texts

_LAZY = {
    "TokenHeatmap": "infkit.widgets.heatmap",
    "InfluenceExplorer": "infkit.widgets.explorer",
    "EstimatorComparison": "infkit.widgets.comparison",
    "ScoreScatter": "infkit.widgets.comparison",
}

__all__ = ["MODES", "SIGN_LEGEND", "EstimatorComparison", "HeatmapRow", "InfluenceExplorer", "ScoreScatter",
           "TokenHeatmap", "static_dir", "token_texts"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'infkit.widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
