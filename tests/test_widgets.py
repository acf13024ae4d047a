"""infkit.views on the Python side, without a browser: the widget models' state and traits, what a control change or
a selection triggers, errors shown inside the widget, NaN, analyses without a tokenizer, over-long queries, and the
static HTML every view renders for exports. (tests/test_browser.py drives the same views in Chromium.)"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import traitlets

from infkit import Analysis, tasks
from infkit.demo.tokenizer import build_tokenizer
from infkit.result import InfluenceResult
from infkit.views import (
    ASSETS,
    EstimatorComparison,
    HeatmapRow,
    InfluenceExplorer,
    TokenHeatmap,
    token_texts,
)
from infkit.views import html as H
from infkit.views.common import json_values, ranked

COUNTRIES = [("Veloria", "Parth"), ("Dunmar", "Kel"), ("Osta", "Rivon"), ("Tarn", "Mosk"), ("Ilia", "Sarn")]
TEXTS = ([f"The capital of {c} is {k}." for c, k in COUNTRIES] + [f"{k} is the capital of {c}." for c, k in COUNTRIES]
         + [f"People in {c} speak {c}ic." for c, _ in COUNTRIES] + [f"{a} plus {b} equals {a + b}." for a, b in
                                                                    [(1, 2), (2, 3), (3, 4), (1, 1), (2, 2)]])
QUERIES = [{"prompt": "The capital of Veloria is", "completion": " Parth"},
           {"prompt": "1 plus 2 equals", "completion": " 3"},
           {"prompt": "People in Osta speak", "completion": " Ostaic"}]
CONTEXT = 16


@pytest.fixture(scope="module")
def lm():
    """A 1-block GPT-2 from a config (context 16) with the demo's word-level tokenizer, trained a few steps."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    tok = build_tokenizer(TEXTS + ["Ostaic", "7"])
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2,
                                       n_inner=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    length = max(map(len, ids))
    batch = torch.full((len(ids), length), tok.pad_token_id)
    labels = torch.full((len(ids), length), -100)
    for r, row in enumerate(ids):
        batch[r, : len(row)] = torch.tensor(row)
        labels[r, : len(row)] = torch.tensor(row)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=batch, attention_mask=(labels != -100).long(), labels=labels).loss.backward()
        opt.step()
    model.eval()
    task = tasks.CausalLM(tokenizer=tok)
    ekfac = Analysis(model, task, TEXTS, estimator="ekfac", progress=False, fisher="empirical").fit()
    return model, tok, task, ekfac


@pytest.fixture
def explorer(lm):
    return InfluenceExplorer(lm[3], QUERIES, k=3)


def _no_address(text: str) -> None:
    assert not re.search(r"0x[0-9a-f]{6,}", text), text


def _row_indices(ex: InfluenceExplorer) -> list[int]:
    return [r["index"] for r in ex.heatmap.rows]


# -- assets and TokenHeatmap ---------------------------------------------------------------------------------------
def test_front_end_files_are_found():
    assert {p.name for p in ASSETS.iterdir()} >= {"heatmap.js", "scatter.js", "widgets.css"}
    w = TokenHeatmap(["a"], [1.0])
    assert "export default" in w._esm and "function render" in w._esm
    assert ".ik .ik-tok" in w._css and ".ikw-tip" in w._css  # infkit.views.html's stylesheet, then the widgets'


def test_heatmap_sends_nan_as_null_and_never_draws_it_white():
    w = TokenHeatmap(["<eos>", "The", "\n", " x", " y"], [0.5, float("nan"), -1.0, float("inf"), 2.0], special=[0])
    values = w.rows[0]["values"]
    assert values == [0.5, None, -1.0, "inf", 2.0]
    json.dumps(w.get_state(), allow_nan=False)  # what goes over the comm is strict JSON
    assert w.scales == [2.0]  # the largest finite |value|; inf saturates
    static = w.static_html()
    nan_span = re.search(r'<span class="ik-tok ik-nan"[^>]*>', static).group(0)
    assert "background:#ffffff" not in nan_span and "title=" in nan_span
    assert "NaN" in nan_span
    assert 'ik-special' in static and "&lt;eos&gt;" in static and "↵" in static
    assert "<script" not in static and "http" not in static


def test_heatmap_normalisation_shared_row_fixed_and_clipped():
    rows = [HeatmapRow(["a", "b"], [1.0, -4.0], label="first"), HeatmapRow(["c"], [0.5])]
    w = TokenHeatmap(rows=rows)
    assert w.normalization == "shared" and w.scales == [4.0, 4.0]
    w.normalization = "row"  # what the front-end's "per-row scale" checkbox sets
    assert w.scales == [4.0, 0.5]
    w.scale = 2.0
    assert w.scales == [2.0, 2.0]
    w.scale = None
    w.normalization = "shared"
    w.clip = 0.5
    assert w.scales[0] == pytest.approx(1.0)  # the median of |1|, |4|, |0.5|
    assert "one colour scale" in w.static_html()
    with pytest.raises(traitlets.TraitError):
        w.normalization = "column"


def test_heatmap_click_lock_and_selection_sync_from_the_front_end():
    w = TokenHeatmap(rows=[HeatmapRow(["a", "b", "c"], [1, 2, 3]), HeatmapRow(["d"], [-1])])
    seen = []
    w.observe(lambda change: seen.append(change["new"]), names="locked")
    w.set_state({"locked": [0, 2], "selected_row": 0})  # the comm message a click sends
    assert w.locked == [0, 2] and w.selected_row == 0 and seen == [[0, 2]]
    assert w.locked_value == (0, 2, "c", 3.0)
    assert repr(w) == "TokenHeatmap(rows=2, tokens=4, normalization='shared', locked=[0, 2])"
    w.set_rows([HeatmapRow(["x"], [0.1])])  # the locked token is gone: the lock is cleared
    assert w.locked == [] and w.locked_value is None


def test_heatmap_mime_bundle_has_widget_view_static_html_and_plain_text():
    w = TokenHeatmap(["a", " b"], [1.0, -1.0], caption="two")
    data, _meta = w._repr_mimebundle_()
    assert set(data) >= {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"}
    assert data["text/plain"] == repr(w)
    _no_address(data["text/plain"])
    assert data["text/html"] == w._repr_html_()
    # The colours are infkit.views.html's.
    assert H.hex_color(H.color(1.0, 1.0)) in data["text/html"] and H.hex_color(H.color(-1.0, 1.0)) in data["text/html"]


def test_static_heatmap_is_capped_with_a_note():
    w = TokenHeatmap([f" w{k}" for k in range(1000)], [math.sin(k) for k in range(1000)])
    static = w.static_html()
    assert static.count('class="ik-tok') == 400
    assert "600 more tokens" in static
    assert len(w.rows[0]["tokens"]) == 1000  # the live view has them all


def test_token_texts_keep_spaces_specials_and_show_ids_without_a_tokenizer(lm):
    tok = lm[1]
    ids = tok("The capital of Veloria is Parth.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    texts, special = token_texts(tok, ids)
    assert texts == ["The", " capital", " of", " Veloria", " is", " Parth", ".", "<eos>"]
    assert special == [7]
    assert token_texts(None, [3, 14]) == (["[3]", "[14]"], [])


# -- InfluenceExplorer ---------------------------------------------------------------------------------------------
def test_explorer_initial_state_matches_the_public_api(lm, explorer):
    an = lm[3]
    result = an.scores(QUERIES)
    top = result.top(0, 3)
    assert _row_indices(explorer) == top.proponents.indices + top.opponents.indices
    assert [r["score"] for r in explorer.heatmap.rows] == pytest.approx(top.proponents.scores + top.opponents.scores,
                                                                        rel=1e-4)
    # Each row's tokens sum to its score (raw mode), and the shared colour scale covers all rows.
    for row in explorer.heatmap.row_data:
        assert sum(row.values) == pytest.approx(row.score, rel=1e-3, abs=1e-6)
    assert len(set(explorer.heatmap.scales)) == 1
    assert explorer.heatmap.rows[0]["group"].startswith("Top 3 proponents")
    # The query's own tokens: only the completion is measured, its value is its -log p.
    query = explorer.query_map.row_data[0]
    assert query.tokens == ["The", " capital", " of", " Veloria", " is", " Parth"]
    assert query.values[:5] == [0.0] * 5 and query.values[5] > 0
    assert explorer.selected == (0, top.proponents.indices[0])  # the top proponent's layers are shown
    assert "raw scores" in explorer.view.state_line and "Error" not in explorer.error_box.value
    assert repr(explorer) == ("InfluenceExplorer(estimators=['ekfac'], queries=3, query=0, estimator='ekfac', k=3, "
                              "scores='raw')")


def test_changing_the_query_recomputes_only_what_is_shown_and_memoises(lm, explorer, monkeypatch):
    an = lm[3]
    calls = {"scores": 0, "token_scores": 0}
    scores, token_scores = an.scores, an.token_scores

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(an, "scores", count("scores", scores))
    monkeypatch.setattr(an, "token_scores", count("token_scores", token_scores))
    before = _row_indices(explorer)
    explorer.query_picker.value = 1  # what picking "1 plus 2 equals" in the dropdown sends
    assert calls == {"scores": 0, "token_scores": 6}  # prepared queries were scored in one batch; 2 x k rows
    assert _row_indices(explorer) != before
    assert explorer.last_update_seconds > 0 and set(explorer.timings) >= {"token_scores", "query_tokens", "total"}
    explorer.query_picker.value = 0
    explorer.query_picker.value = 1
    assert calls["token_scores"] == 6  # memoised
    explorer.k_picker.value = 4
    assert len(explorer.heatmap.rows) == 8 and calls["token_scores"] == 8  # only the two new rows


def test_selecting_a_row_shows_that_pairs_layer_split(lm, explorer):
    an = lm[3]
    result = an.scores(QUERIES)
    explorer.heatmap.set_state({"selected_row": 4})  # a click on the second opponent's row
    i = explorer.heatmap.row_data[4].index
    assert explorer.selected == (0, i)
    assert set(explorer.view.layers) == set(result.per_layer)
    assert sum(explorer.view.layers.values()) == pytest.approx(float(result.scores[0, i]), rel=1e-4, abs=1e-6)
    assert "Layer-wise split of #2" in explorer.layers_box.value


def test_score_modes_say_what_they_show(lm, explorer):
    an = lm[3]
    row = an.scores(QUERIES).scores[0].double()
    explorer.mode_picker.value = "std"
    std = float(row.std())
    top = sorted(range(len(row)), key=lambda c: -float(row[c]))[:3]
    assert _row_indices(explorer)[:3] == top
    assert explorer.heatmap.rows[0]["score"] == pytest.approx(float(row[top[0]]) / std, rel=1e-5)
    assert "standard deviation" in explorer.view.state_line and "raw " in explorer.heatmap.rows[0]["detail"]
    explorer.mode_picker.value = "self"
    self_inf = an.self_influence().double()
    shown = row / self_inf
    assert explorer.heatmap.rows[0]["score"] == pytest.approx(float(shown.max()), rel=1e-5)
    assert "self-influence" in explorer.view.state_line
    assert any("self-influence" in m for m in explorer.busy_log)
    # Token values follow the shown value: they still sum to it.
    for r in explorer.heatmap.row_data:
        assert sum(r.values) == pytest.approx(r.score, rel=1e-3, abs=1e-6)


def test_typed_query_goes_through_the_cache_with_a_busy_indicator(lm, explorer):
    busy = []
    explorer.observe(lambda change: busy.append(change["new"]), names="busy")
    pos = explorer.add_query("The capital of Dunmar is", " Kel")
    assert pos == 3 and explorer.query_picker.value == 3 and explorer.error == ""
    assert explorer.query_picker.options[3][0].endswith("(typed)")
    assert busy[0] is True and busy[-1] is False
    assert any("scoring" in m for m in explorer.busy_log)
    expected = lm[3].scores([{"prompt": "The capital of Dunmar is", "completion": " Kel"}]).top(0, 3)
    assert _row_indices(explorer)[:3] == expected.proponents.indices


def test_errors_are_shown_inside_the_widget(lm, explorer, monkeypatch):
    assert explorer.add_query("The capital of", "") is None
    assert "completion is empty" in explorer.error
    assert "ikw-error" in explorer.error_box.value and "completion is empty" in explorer.error_box.value
    explorer.query_picker.value = 1  # a later successful update clears it
    assert explorer.error == "" and explorer.error_box.value == ""

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory on the device")

    monkeypatch.setattr(lm[3], "scores", broken)
    assert explorer.add_query("People in Tarn speak", " Tarnic") is None  # raised inside the callback
    assert "RuntimeError: out of memory on the device" in explorer.error
    assert "out of memory" in explorer.error_box.value
    assert explorer.busy is False and explorer.heatmap.busy is False


def test_over_long_query_is_cut_from_the_left_with_a_visible_note(lm, explorer):
    prompt = " ".join(["The capital of Veloria is"] * 4)  # 20 tokens + the completion: more than the context of 16
    assert explorer.add_query(prompt, " Parth") == 3
    assert explorer.error == ""
    note = explorer.view.notes[0]
    assert "more than the model's context of 16" in note and "first 5 prompt tokens were cut" in note
    assert note in explorer.status.value or H.esc(note) in explorer.status.value
    assert len(explorer.query_map.row_data[0].tokens) == CONTEXT
    assert explorer.query_map.row_data[0].tokens[-1] == " Parth"
    assert H.esc(note) in explorer.static_html()
    # A completion that cannot fit is refused, saying why.
    assert explorer.add_query("The capital of", " Parth" * 20) is None
    assert "more than the model's context of 16" in explorer.error


def test_nan_scores_are_ranked_last_and_shown_as_nan(lm, monkeypatch):
    an = lm[3]
    real = an.scores

    def with_nan(queries, **kwargs):
        res = real(queries, **kwargs)
        res.scores[:, :3] = float("nan")
        for part in res.per_layer.values():
            part[:, :3] = float("nan")
        return res

    monkeypatch.setattr(an, "scores", with_nan)
    ex = InfluenceExplorer(an, QUERIES, k=len(TEXTS) - 1)
    assert any("3 of 20 shown scores are NaN" in n for n in ex.view.notes)
    rows = ex.heatmap.rows
    pro = [r for r in rows if r["group"].startswith("Top") and "proponents" in r["group"]]
    assert [r["index"] for r in pro[-2:]] == [0, 1] and pro[-1]["score"] is None  # NaN as null, ranked last
    json.dumps(ex.heatmap.get_state(), allow_nan=False)
    assert "NaN" in ex.static_html()
    pro_values, opp_values, n_nan = ranked(torch.tensor([1.0, float("nan"), -2.0]), 3)
    assert [c for c, _ in pro_values] == [0, 2, 1] and [c for c, _ in opp_values] == [2, 0, 1] and n_nan == 1


def test_estimator_switch_fits_on_first_use(lm):
    model, _tok, task, ekfac = lm
    identity = Analysis(model, task, TEXTS, estimator="identity", progress=False)
    ex = InfluenceExplorer({"ekfac": ekfac, "identity": identity}, QUERIES, k=2)
    assert ex.estimator_picker.layout.display == ""  # shown: there is a choice
    assert not identity.fitted
    ex.estimator_picker.value = "identity"
    assert identity.fitted and ex.estimator == "identity"
    assert _row_indices(ex)[:2] == identity.scores(QUERIES).top(0, 2).proponents.indices
    assert "Estimator identity" in ex.summary()
    # identity ignores λ: its raw scores are a plain gradient dot product, and the status line says so.
    assert "1/λ" not in ex.view.state_line and "1/λ" not in ex.status.value
    assert "plain gradient dot product" in ex.view.state_line and "no curvature" in ex.view.state_line
    assert "1/λ" not in ex.heatmap.caption and "1/λ" not in ex.layers_box.value
    ex.estimator_picker.value = "ekfac"
    assert "units of 1/λ" in ex.view.state_line


def test_typed_words_outside_the_vocabulary_are_named_in_the_widget(lm, explorer):
    assert explorer.add_query("The capital of Zzyzx is", " Qwerty") == 3
    assert explorer.error == ""
    warning = next(n for n in explorer.view.notes if "vocabulary" in n)
    assert "'Zzyzx'" in warning and "'Qwerty'" in warning and "<unk>" in warning
    assert H.esc(warning) in explorer.status.value and "ikw-note" in explorer.status.value
    assert H.esc(warning) in explorer.static_html()
    assert explorer.add_query("The capital of Veloria is", " Parth") == 4
    assert not any("vocabulary" in n for n in explorer.view.notes), "known words: no warning"


def test_query_row_has_its_own_legend_and_an_absolute_scale(lm, explorer):
    from infkit.views.common import LOSS_TOP

    qmap = explorer.query_map
    assert qmap.scale_kind == "sequential" and qmap.scales == [LOSS_TOP]
    assert qmap.legend.startswith("−log p of each measured token, nats; white 0 … dark ≥ 5")
    assert "proponent" not in qmap.legend.lower()
    explorer.query_picker.value = 1  # another query: the scale stays absolute, not its own largest −log p
    assert qmap.scales == [LOSS_TOP]
    assert max(qmap.row_data[0].values) != LOSS_TOP


def test_no_tokenizer_shows_token_ids_and_refuses_typed_text(lm):
    model, tok = lm[0], lm[1]
    train = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS]
    an = Analysis(model, tasks.CausalLM(), train, estimator="ekfac", progress=False, fisher="empirical").fit()
    queries = [{"input_ids": torch.tensor([1, 3, 5, 7]), "labels": torch.tensor([-100, -100, 5, 7])}]
    ex = InfluenceExplorer(an, queries, k=2)
    assert ex.error == ""
    assert all(re.fullmatch(r"\[\d+\]", t) for r in ex.heatmap.rows for t in r["tokens"])
    assert ex.query_map.row_data[0].tokens == ["[1]", "[3]", "[5]", "[7]"]
    assert ex.query_map.row_data[0].values[:2] == [0.0, 0.0] and ex.query_map.row_data[0].values[2] > 0
    assert ex.add_query("some text", " more") is None and "no tokenizer" in ex.error


def test_explorer_static_html_and_mime_bundle(lm, explorer):
    data = explorer._repr_mimebundle_()
    assert set(data) >= {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"}
    assert data["text/plain"] == repr(explorer)
    static = data["text/html"]
    assert static.count("table class=\"ik-table ik-top\"") == 2 and "Layer-wise split" in static
    assert "<script" not in static and "http" not in static
    _no_address(static)
    assert explorer.static_html() == static  # deterministic


# -- EstimatorComparison -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(lm):
    model, _tok, task, ekfac = lm
    analyses = {"ekfac": ekfac}
    for name in ("identity", "exact"):
        analyses[name] = Analysis(model, task, TEXTS, estimator=name, progress=False, fisher="empirical")
    return EstimatorComparison(analyses, QUERIES)


def test_comparison_tables_scatter_and_selection(comparison):
    from infkit.metrics import agreement

    c = comparison
    assert c.x_picker.value == "exact" and c.y_picker.value == "ekfac"  # exact on x when present
    assert len(c.scatter.x) == len(c.scatter.y) == 3 * len(TEXTS)
    rows = {r[0].replace("\u00a0", " "): r for r in c.agreement_rows()}
    assert set(rows) == {"ekfac vs identity", "ekfac vs exact", "identity vs exact"}
    expected = agreement(c.results["ekfac"].scores, c.results["exact"].scores, k=(10, 100))
    assert rows["ekfac vs exact"][1] == pytest.approx(expected.pearson)
    assert rows["ekfac vs exact"][3] == pytest.approx(expected.mean_spearman)
    assert rows["ekfac vs exact"][4] == pytest.approx(expected.top_k[10])
    assert rows["ekfac vs exact"][5] == "n/a"  # k = 100 >= 20 train examples: not meaningful
    assert "n/a: k ≥ the 20 train examples" in c._agreement_html()
    costs = {r[0]: r for r in c.cost_rows()}
    assert costs["exact"][4].endswith("KiB") or costs["exact"][4].endswith("MiB")
    # A click on a point (what the scatter sends) shows that pair under x and y.
    c.scatter.set_state({"selected": [1, 4]})
    assert c.selected == (1, 4)
    assert [r.label for r in c.pair_map.row_data] == ["exact", "ekfac"]
    assert c.pair_map.normalization == "row"
    assert c.pair_map.row_data[1].score == pytest.approx(float(c.results["ekfac"].scores[1, 4]))
    # One query, another mode: the correlations are those of what is shown.
    c.query_picker.value = 2
    assert len(c.scatter.x) == len(TEXTS) and set(c.scatter.query) == {2}
    c.mode_picker.value = "std"
    assert "std of query" in c.scatter.xlabel
    assert c.error == ""
    assert "ekfac vs exact" in c.summary()
    c.mode_picker.value = "raw"
    c.query_picker.value = -1


def test_comparison_static_html_and_repr(comparison):
    data = comparison._repr_mimebundle_()
    assert data["text/plain"] == repr(comparison)
    _no_address(data["text/plain"])
    static = data["text/html"]
    assert 'src="data:image/png;base64,' in static and "Pearson / query" in static and "cache total" in static
    assert "<script" not in static
    assert "1/λ for the curvature-based ones, a plain gradient dot product for identity" in static


def test_comparison_tables_wrap_or_scroll_when_narrow(comparison):
    """At 1280 px with the file browser open the agreement table must not be cut off: the scatter's row wraps (the
    table goes under the scatter) and each wide table sits in a box that scrolls sideways."""
    row = comparison.children[3]
    assert comparison.scatter in row.children and comparison.agreement_box in row.children
    assert row.layout.flex_flow == "row wrap"
    for box in (comparison.agreement_box, comparison.cost_box):
        assert box.layout.min_width == "0" and box.layout.max_width == "100%"
        assert "ikw-wide" in box._dom_classes
        assert box.value.startswith('<div class="ik"><div class="ik-scroll"><table')
    assert ".ik .ik-scroll { overflow-x: auto; max-width: 100%; }" in H.STYLE
    css = comparison.pair_map._css
    assert ".ikw-wide > .jupyter-widget-html-content" in css and "min-width: 0" in css
    assert comparison.static_html().count('<div class="ik-scroll"><table') == 2


def test_comparison_needs_two_analyses_on_the_same_data(lm):
    from infkit.errors import InfkitError

    with pytest.raises(InfkitError, match="two or more"):
        EstimatorComparison({"ekfac": lm[3]}, QUERIES)


def test_scatter_sends_nan_as_null():
    assert json_values([1.0, float("nan"), float("-inf")]) == [1.0, None, "-inf"]
    assert json_values(np.array([0.5])) == [0.5]


# -- InfluenceResult._repr_html_ -----------------------------------------------------------------------------------
def test_result_renders_its_top_k_as_static_html(lm):
    res = lm[3].scores(QUERIES)
    assert isinstance(res, InfluenceResult)
    static = res._repr_html_()
    top = res.top(0, 5)
    assert re.search(rf'<td class="ik-(idx|num)">{top.proponents.indices[0]}</td>', static)
    assert TEXTS[top.proponents.indices[0]] in static
    assert static.count('class="ik-table ik-top"') == 6  # 3 queries x (proponents, opponents)
    assert "<script" not in static
    _no_address(static)
