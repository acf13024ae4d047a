"""Matplotlib plots of influence results: the layer-wise distribution and the sparsity (power-law) plot.

Each function returns a ``matplotlib.figure.Figure`` built with the object API (no pyplot state, no backend
change), so it works the same in a script, a notebook and a headless report; embed it with
:func:`infkit.views.html.figure`. Figures are not closed for you when made with ``pyplot``; these are not registered
with pyplot at all, so nothing accumulates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PALETTE = ["#b2182b", "#2166ac", "#4d9221", "#7b3294", "#e08214", "#01665e"]  # distinct, colour-blind friendly


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


@dataclass(frozen=True)
class PowerLaw:
    """|influence| ≈ c · rank^(−exponent), fitted on log-log axes over ranks ``first``..``last``."""

    exponent: float
    intercept: float  # log10 c
    first: int
    last: int
    r2: float

    def __call__(self, rank):
        return 10 ** self.intercept * np.asarray(rank, dtype=float) ** (-self.exponent)


def fit_power_law(values: Sequence[float], first: int = 1, last: int | None = None) -> PowerLaw:
    """Least-squares line through (log10 rank, log10 |value|) of the values sorted by |value|, descending, over
    ranks ``first``..``last`` (default: the top half, where the tail's numerical floor does not bend the line)."""
    a = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
    a = a[np.isfinite(a)]
    last = last if last is not None else max(first + 1, len(a) // 2)
    ranks = np.arange(1, len(a) + 1)
    sel = slice(first - 1, last)
    x, y = np.log10(ranks[sel]), np.log10(np.maximum(a[sel], np.finfo(float).tiny))
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(float(-slope), float(intercept), first, int(min(last, len(a))), r2)


def sparsity_plot(rows: Sequence[Sequence[float]], labels: Sequence[str], fits: Sequence[PowerLaw] | None = None,
                  title: str = "Sparsity: sorted |influence| against rank"):
    """Sorted |score| against rank on log-log axes, one line per query, with the fitted power law dashed."""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for k, (row, label) in enumerate(zip(rows, labels)):
        a = np.sort(np.abs(np.asarray(row, dtype=np.float64)))[::-1]
        ranks = np.arange(1, len(a) + 1)
        colour = PALETTE[k % len(PALETTE)]
        fit = fits[k] if fits is not None else fit_power_law(a)
        ax.loglog(ranks, a, color=colour, lw=1.6, label=f"{label} (exponent {fit.exponent:.2f})")
        r = np.arange(fit.first, fit.last + 1)
        ax.loglog(r, fit(r), color=colour, lw=1.0, ls="--")
    ax.set_xlabel("rank of the training sequence (by |influence|)")
    ax.set_ylabel("|influence|")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return fig


def layer_plot(shares: np.ndarray, layer_names: Sequence[str], labels: Sequence[str],
               title: str = "Where the influence sits: share of the top proponents' influence per layer"):
    """Grouped bars: for each query (``labels``), each layer's share of its top proponents' total influence.

    ``shares`` is [n_query, n_layer]; rows sum to 1 (shares can be negative when a layer pulls the other way)."""
    shares = np.asarray(shares, dtype=np.float64)
    n_query, n_layer = shares.shape
    fig = _figure(max(6.4, 0.55 * n_layer + 2.5), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(n_query, 1)
    x = np.arange(n_layer)
    for k in range(n_query):
        ax.bar(x + (k - (n_query - 1) / 2) * width, shares[k], width, color=PALETTE[k % len(PALETTE)],
               label=labels[k])
    ax.axhline(0, color="#444", lw=0.8)
    ax.set_xticks(x, [short_layer_name(n) for n in layer_names], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("share of influence")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def short_layer_name(name: str) -> str:
    """"transformer.h.0.attn.c_attn" -> "h.0.attn.c_attn"; peft prefixes and ".default" dropped."""
    for prefix in ("base_model.model.", "transformer."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".default", "").replace("transformer.", "")
