"""`infkit report` and the static HTML renderers it is built from (infkit.views.html)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from infkit import cli, demo
from infkit.views import html as H

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


# -- renderers -------------------------------------------------------------------------------------------------------
def test_colour_scale_is_diverging_and_white_at_zero():
    assert H.color(0.0, 1.0) == (255, 255, 255)
    assert H.color(1.0, 1.0) == H.RED and H.color(-1.0, 1.0) == H.BLUE
    assert H.color(5.0, 1.0) == H.RED, "clipped beyond the scale"
    assert H.color(float("nan"), 1.0) is None
    r, g, b = H.color(0.5, 1.0)
    assert r > g and r > b and 200 < r < 255


def test_token_row_escapes_shows_whitespace_and_nan():
    tokens = [" <b>Parth</b>", "\n", "\t", "", "<eos>", ' "q"', "\x07"]
    values = [1.0, -0.5, 0.0, 0.2, float("nan"), 0.1, 0.0]
    out = H.token_row(tokens, values, scale=1.0, special_tokens=["<eos>"])
    assert "<b>" not in out and "&lt;b&gt;Parth&lt;/b&gt;" in out
    assert "↵" in out and "⇥" in out and "∅" in out and "⟨U+0007⟩" in out
    assert "&lt;eos&gt;" in out and "ik-special" in out
    nan_span = re.search(r'<span class="ik-tok ik-special ik-nan" title="([^"]*)"', out)
    assert nan_span and "NaN" in nan_span.group(1), "NaN is hatched grey with NaN on hover, never white"
    assert "background:#ffffff" in out, "exactly 0 is white"
    assert "background:#b2182b" in out and "ik-dark" in out
    assert "&quot;q&quot;" in out
    assert H.token_row(tokens, values, scale=1.0) == H.token_row(tokens, values, scale=1.0), "deterministic"
    with pytest.raises(ValueError):
        H.token_row(["a"], [1.0, 2.0])


def test_top_list_shares_one_scale_and_shows_raw_and_normalised():
    items = [H.TopItem(3, 10.0, "a b", [" a", " b"], [8.0, 2.0], "capital"),
             H.TopItem(7, -4.0, "c", [" c"], [-4.0])]
    out = H.top_list(items, caption="Top")
    assert out.count("<tr>") == 3 and "+10.00" in out and "+1.0" in out and "-0.40" in out
    assert "normalised +1.00 (of ±8.00)" in out, "hover: raw and normalised on the shared scale"
    assert "normalised -0.500 (of ±8.00)" in out
    page = H.page("T", out + H.legend(8.0) + H.figure(b"\x89PNG fake", "alt"))
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "data:image/png;base64," in page
    assert "blue: opponent" in page and "red: proponent" in page


def test_query_box_wraps_a_long_token():
    """A 10,000-character token must wrap inside the query box (as in the widgets), not make it 185,000 px wide."""
    box = H.query_box("In Velish, " + "x" * 10_000 + " is:", " lo piro", "a note")
    assert box.startswith('<div class="ik-query">') and "x" * 10_000 in box
    rule = re.search(r"\.ik \.ik-query \{([^}]*)\}", H.STYLE).group(1)
    assert "white-space: pre-wrap" in rule, "spaces kept, lines wrap"
    assert "overflow-wrap: anywhere" in rule and "word-break: break-word" in rule, "a single long token wraps too"
    assert "overflow-wrap: anywhere" in re.search(r"\.ik \.ik-seq \{([^}]*)\}", H.STYLE).group(1)
    assert rule in H.page("T", box), "the report page carries the rule inline"


def test_translation_query_note_is_a_whole_sentence_computed_from_the_corpus():
    from infkit.demo import build_corpus, story

    corpus = build_corpus()
    query = story.main_queries(corpus)[3]
    english, velish = corpus.untranslated[0]
    note = query.note
    assert note.startswith("this pair is not in the corpus, but its words are: ") and note.endswith(".")
    assert not note.rstrip(".").endswith(("are", "are:", ";"))
    whole = f"In Velish, {english} is: {velish}."
    assert whole not in corpus.pretrain_texts, "the pair really is not in the corpus"
    for word in velish.split()[1:]:  # the Velish noun, adjective and verb ("lo" is in every Velish sentence)
        n = sum(word in t.lower().replace(".", " ").split() for t in corpus.pretrain_texts)
        assert n > 0 and f"“{word}” (" in note and f") is in {n} training sentences" in note


def test_fmt():
    assert H.fmt(420.3123) == "+420" and H.fmt(-0.0451234) == "-0.0451" and H.fmt(0) == "0"
    assert H.fmt(float("nan")) == "NaN" and H.fmt(2745.2, 4) == "+2745" and H.fmt(1.5e-7) == "+1.50e-07"


# -- the command -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """`infkit report` once for the module (the demo model trained first if the cache is empty)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", demo.DemoCacheWarning)
        demo.load(verbose=False)
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["report", "--out", str(out), "--mkdir", "--no-progress", "-k", "3"]) == 0  # creates sub/
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def report_file(report_run):
    return report_run[0]


def test_report_is_one_self_contained_file(report_file, capsys):
    text = report_file.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "no external resources"
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "@import" not in text and "<link" not in text
    assert text.count("data:image/png;base64,") == 2, "layer and sparsity plots embedded"
    for heading in ["Top influences and token-wise attribution", "Layer-wise distribution", "Sparsity", "Word order",
                    "TF-IDF candidate filtering", "EK-FAC vs DataInf vs identity", "Settings and timings"]:
        assert heading in text
    assert "The capital of Veloria is" in text and "ik-tok" in text and "title=" in text
    for est in ["ekfac vs datainf", "ekfac vs identity", "datainf vs identity"]:
        assert est in text
    assert "fit EK-FAC" in text and "total" in text
    assert "this pair is not in the corpus, but its words are: “" in text, "the translation note is whole"
    assert "white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word;" in text, "query boxes wrap"
    assert "clipped at the 99th percentile of |value|" in text, "the legend says how the colour scale was chosen"


def test_report_prints_its_path(report_run):
    out, printed = report_run
    assert f"wrote {out.resolve()}" in printed


def test_queries_from_the_command_line(tmp_path, monkeypatch):
    """--query PROMPT COMPLETION replaces the default queries (the run itself is stubbed: it is tested above)."""
    from infkit.demo import story

    seen = {}

    def fake_run(models, analysis, k, progress, timings, queries):
        seen.update(queries=queries, k=k)
        raise KeyboardInterrupt

    monkeypatch.setattr(story, "run", fake_run)
    code = cli.main(["report", "-o", str(tmp_path / "r.html"), "--no-progress", "-k", "2",
                     "--query", "Mira Tallow was born in", " Veloria", "--query", "3 plus 4 equals", " 7"])
    assert code == 130
    assert [(q.prompt, q.completion) for q in seen["queries"]] == [
        ("Mira Tallow was born in", " Veloria"), ("3 plus 4 equals", " 7")]
    assert seen["k"] == 2


def _no_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the demo was loaded before the output path was checked")

    monkeypatch.setattr("infkit.demo.load", no_work)
    monkeypatch.setattr("infkit.demo.model.load", no_work)


def test_missing_output_folder_is_an_error_naming_it_and_the_fix(tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    folder = tmp_path / "nonexistent" / "dir"
    assert cli.main(["report", "--out", str(folder / "r.html"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the folder {folder} does not exist (nor does {tmp_path / 'nonexistent'})" in err
    assert f"mkdir -p {folder}" in err and "--mkdir" in err
    assert not (tmp_path / "nonexistent").exists(), "no folder tree is created silently"


def test_mkdir_creates_the_output_folder(tmp_path, monkeypatch):
    from infkit.demo import story

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the path check passed and the work began: stop there

    monkeypatch.setattr(story, "run", stop)
    monkeypatch.setattr("infkit.demo.load", lambda *a, **k: stop())
    folder = tmp_path / "new" / "dir"
    assert cli.main(["report", "--out", str(folder / "r.html"), "--mkdir", "--no-progress"]) == 130
    assert folder.is_dir()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_location_gives_the_real_reason(monkeypatch, capsys):
    _no_work(monkeypatch)
    assert cli.main(["report", "--out", "/proc/x.html", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report to /proc/x.html" in err
    assert "virtual 'proc' file system" in err and "No such file or directory" not in err


def test_reasons_for_an_unwritable_folder(tmp_path):
    import errno

    from infkit.views.report import _why_not_writable

    assert "read-only file system" in _why_not_writable(tmp_path, OSError(errno.EROFS, "Read-only file system"))
    assert "permission denied" in _why_not_writable(tmp_path, OSError(errno.EACCES, "Permission denied"))
    assert "no space is left" in _why_not_writable(tmp_path, OSError(errno.ENOSPC, "No space left on device"))


@pytest.mark.parametrize("where", ["folder", "under a file", "read-only file"])
def test_unwritable_output_fails_before_any_work(tmp_path, monkeypatch, capsys, where):
    def no_work(*args, **kwargs):
        raise AssertionError("the demo was loaded before the output path was checked")

    monkeypatch.setattr("infkit.demo.load", no_work)
    monkeypatch.setattr("infkit.demo.model.load", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    if where == "folder":
        out = tmp_path
    elif where == "under a file":
        out = blocker / "report.html"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores file permissions")
        out = tmp_path / "ro.html"
        out.write_text("old")
        out.chmod(0o444)
    assert cli.main(["report", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the report" in err


def test_empty_completion_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("infkit.demo.load", lambda *a, **k: pytest.fail("loaded"))
    assert cli.main(["report", "-o", str(tmp_path / "r.html"), "--query", "The capital of Veloria is", " "]) == 2
    assert "completion is empty" in capsys.readouterr().err


def test_python_dash_m_and_console_script():
    result = subprocess.run([sys.executable, "-m", "infkit", "report", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "--out" in result.stdout
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "infkit"]
    assert scripts and scripts[0].value == "infkit.cli:main"
    assert cli.main([]) == 2, "no command: help and exit code 2"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_offline(report_file):
    """Open the report in headless Chromium: the plots decode, the heatmaps show, nothing but the file is fetched.
    The full-page screenshot goes to test-output/report.png for a person to look at."""
    playwright = pytest.importorskip("playwright.sync_api")
    requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report_file.as_uri())
            page.wait_for_load_state("load")
            widths = page.locator("img").evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
            tokens = page.locator(".ik-tok").count()
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) == 2 and all(w > 300 for w in widths)
    assert tokens > 100
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
