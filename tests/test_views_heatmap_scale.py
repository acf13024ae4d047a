"""Token heatmaps of real texts: the default colour scale survives one outlier token (a percentile clip, stated in the
legend) in the static HTML and in what the live widget is sent; one call saves a heatmap as a self-contained page;
the explorer's query row has its own, absolute −log p scale. (No browser: tests/test_browser.py draws them.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from infkit.errors import InfkitError
from infkit.views import ASSETS, HeatmapRow, TokenHeatmap
from infkit.views import html as H
from infkit.views.common import LOSS_PALETTE, LOSS_TOP, scales_for
from infkit.views.static import explorer_html

ROOT = Path(__file__).resolve().parent.parent


def article(n: int = 300, outlier: float = 40.0) -> tuple[list[str], list[float]]:
    """A news-like row: a "###" heading token that takes a big share of the score, then ordinary words."""
    tokens = ["###"] + [f" word{k}" for k in range(n - 1)]
    values = [outlier] + [((k % 7) - 3) * 0.1 for k in range(n - 1)]  # ordinary tokens: |value| <= 0.3
    return tokens, values


def _backgrounds(html_text: str) -> list[str]:
    return re.findall(r"background:(#[0-9a-f]{6})", html_text)


def test_one_outlier_does_not_wash_out_the_other_tokens():
    tokens, values = article()
    sc = H.scale_of([values])
    assert sc.clip == 0.99 and sc.value == pytest.approx(0.3) and sc.beyond == 1
    row = H.token_row(tokens, values)  # the default scale is the clipped one
    colours = _backgrounds(row)
    assert colours[0] == H.hex_color(H.RED), "the outlier is drawn at full colour"
    strongest_ordinary = max(range(1, len(values)), key=lambda k: values[k])
    assert colours[strongest_ordinary] == H.hex_color(H.RED), "not pale: the scale is not the outlier's"
    # The old scale, the largest |value|, on request: every ordinary token is then nearly white.
    old = H.token_row(tokens, values, scale=H.scale_of([values], clip=None).value)
    assert H.scale_of([values], clip=None).value == 40.0 and H.scale_of([values], clip=1.0).value == 40.0
    r, g, b = H.color(0.3, 40.0)
    assert min(r, g, b) > 245 and _backgrounds(old)[strongest_ordinary] == H.hex_color((r, g, b))


def test_the_clip_is_a_nearest_rank_percentile_and_short_rows_keep_their_largest():
    assert H.scale_of([[1.0] * 99 + [50.0]]).value == 1.0  # 100 values: the single largest is beyond the clip
    assert H.scale_of([[1.0] * 98 + [50.0]]).value == 50.0  # 99 values: the 99th percentile is the largest itself
    assert H.scale_of([[1.0, -4.0, 0.5]], clip=0.5) == H.Scale(1.0, 0.5, 1)
    assert H.scale_of([[0.0, float("nan")]]).value == 1.0
    assert H.scale_of([[2.0, float("inf")]]) == H.Scale(2.0, 0.99, 1), "inf saturates and is counted"
    with pytest.raises(ValueError, match="quantile"):
        H.scale_of([[1.0]], clip=0.0)


def test_legend_states_the_clip_and_how_many_tokens_are_beyond_it():
    _tokens, values = article()
    text = H.legend(H.scale_of([values]), "shared by all rows")
    assert "clipped at the 99th percentile of |value|: 1 token beyond it drawn at full colour" in text
    assert "scale −0.300 … 0 … +0.300" in text and "shared by all rows" in text
    assert "clipped" not in H.legend(H.scale_of([values], clip=None))
    assert H.count(1) == "1 token" and H.count(0) == "0 tokens"
    assert H.ordinal(0.99) == "99th" and H.ordinal(0.995) == "99.5th" and H.ordinal(0.91) == "91st"


def test_top_list_defaults_to_the_clipped_scale():
    tokens, values = article()
    items = [H.TopItem(0, sum(values), None, tokens, values), H.TopItem(1, 1.0, None, [" a"], [0.2])]
    assert H.top_list(items) == H.top_list(items, scale=H.clipped_scale([values, [0.2]]))


def test_widget_default_scale_is_clipped_and_said_in_the_static_html_and_to_the_front_end():
    tokens, values = article()
    w = TokenHeatmap(rows=[HeatmapRow(tokens, values, label="article"), HeatmapRow([" x"], [0.1])])
    assert w.clip == 0.99 and w.scales == [pytest.approx(0.3)] * 2
    note = w.scale_note  # synced: the front-end's legend shows it
    assert note == ("one colour scale shared by all rows, ±0.300, clipped at the 99th percentile of |value|: 1 token "
                    "beyond it drawn at full colour")
    assert "scale_note" in w.keys and "scale_note" in w.get_state()
    static = w.static_html()
    assert H.esc(note) in static and "clipped at the 99th percentile of |value|: 1 token beyond it" in static
    # clip= and scale= still work; clip=None (or 1.0) gives the old largest-|value| scale.
    w.clip = None
    assert w.scales == [40.0, 40.0] and "the largest |value|" in w.scale_note and "clipped" not in w.static_html()
    w.clip = 1.0
    assert w.scales == [40.0, 40.0]
    w.clip = 0.5
    assert w.scales[0] == pytest.approx(H.scale_of([values, [0.1]], 0.5).value)
    w.scale = 2.0
    assert w.scales == [2.0, 2.0] and w.scale_note == "fixed colour scale ±2.00"
    w.scale, w.clip, w.normalization = None, 0.99, "row"
    assert w.scales == [pytest.approx(0.3), pytest.approx(0.1)]
    assert w.scale_note.startswith("one colour scale per row, clipped at the 99th percentile")
    with pytest.raises(Exception, match="quantile"):
        w.clip = 1.5
    assert scales_for(w.row_data, "shared", clip=None) == [40.0, 40.0]


def test_front_end_draws_the_scale_note_in_its_legend():
    js = (ASSETS / "heatmap.js").read_text(encoding="utf-8")
    assert 'model.get("scale_note")' in js and 'model.on("change:scale_note"' in js
    assert 'model.get("scale_kind") === "sequential"' in js


def test_save_html_is_one_call_and_writes_a_self_contained_page(tmp_path):
    tokens, values = article(600)
    w = TokenHeatmap(tokens, values, caption="an article")
    path = w.save_html(tmp_path / "heatmap.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "<script" not in text.lower() and not re.search(r"https?://", text) and "<link" not in text
    assert "<style>" in text and ".ik .ik-tok" in text, "inline CSS"
    assert text.count('class="ik-tok') == 600, "every token, not the notebook copy's first 400"
    assert "clipped at the 99th percentile" in text and "an article" in text
    with pytest.raises(InfkitError, match="does not exist"):
        w.save_html(tmp_path / "missing" / "x.html")


def test_query_row_has_its_own_absolute_loss_scale_and_legend():
    """A confident answer (loss 0.03 nats) is pale, not saturated; the legend is not the influence one."""
    from infkit.views.explorer import ExplorerView

    confident = HeatmapRow(["The", " capital", " is", " Parth"], [0.0, 0.0, 0.0, 0.03], label="query")
    view = ExplorerView(query_row=confident, query_caption="q")
    assert view.query_scale == LOSS_TOP == 5.0
    static = explorer_html(view)
    colour = H.color(0.03, LOSS_TOP, *[tuple(c) for c in LOSS_PALETTE.values()])
    assert min(colour) > 250, "a confident answer is nearly white"
    assert f"background:{H.hex_color(colour)}" in static
    assert "white 0" in static and "dark ≥ 5" in static and "ik-seqbar" in static
    query_part = static.split("ik-seqbar")[1].split("ik-table")[0]
    assert "proponent" not in query_part.split("blue: opponent")[0], "the query row does not carry the sign legend"
    wrong = HeatmapRow(["x", " y"], [0.0, 9.0])
    assert f"background:{H.hex_color(H.DARK)}" in explorer_html(ExplorerView(query_row=wrong))


def test_query_map_widget_is_sequential_with_a_fixed_scale():
    from infkit.views.common import LOSS_LEGEND

    w = TokenHeatmap(rows=[HeatmapRow(["a", " b"], [0.0, 0.03])], scale=LOSS_TOP, palette=LOSS_PALETTE,
                     scale_kind="sequential", legend=LOSS_LEGEND, value_label="−log p")
    assert w.scales == [5.0] and w.scale_kind == "sequential" and w.palette == LOSS_PALETTE
    assert LOSS_LEGEND.startswith("−log p of each measured token, nats; white 0 … dark ≥ 5")
    static = w.static_html()
    assert "white 0" in static and "dark ≥ 5" in static and "red: proponent" not in static


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_make_lab_passes_allow_root_only_as_root(tmp_path, uid):
    """`make lab` as root (containers, sessions) passes --allow-root, which JupyterLab needs there; nothing else."""
    import os

    fake = tmp_path / "id"  # `id -u` as the Makefile calls it, answering as root or as a user
    fake.write_text(f"#!/bin/sh\necho {uid}\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "jupyterlab" in ln)
    assert line.split() == [".venv/bin/python", "-m", "jupyterlab", "--notebook-dir=notebooks"] + (
        ["--allow-root"] if uid == "0" else []), line
