"""The widgets in a real browser: JupyterLab 4 (and Notebook 7, served by the same server) in Debian's Chromium,
driven by Playwright for Python; and the static HTML exports of every view, opened offline.

Needs /usr/bin/chromium (``scripts/ensure_chromium.sh`` installs it; ``make test`` runs that first); skipped, saying
so, only when it is absent. Never runs ``playwright install``. Screenshots and timings go to test-output/browser/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infkit.views import ASSETS
from infkit.views import html as H

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_widgets.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
OUT = ROOT / "test-output" / "browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium "
                       "(run scripts/ensure_chromium.sh as root, or apt-get install -y chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: dict | None = None, timeout: float = 5.0) -> dict:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


def _rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return r, g, b


@pytest.fixture(scope="module")
def timings():
    OUT.mkdir(parents=True, exist_ok=True)
    found: dict[str, float] = {}
    yield found
    (OUT / "timings.json").write_text(json.dumps(found, indent=1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """JupyterLab on 127.0.0.1, a free port, no token, in a temporary root holding a copy of 02_widgets.ipynb."""
    from infkit import demo

    demo.load(verbose=False)  # train the demo model now if no cache holds it, outside the browser's timings
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "02_widgets.ipynb")
    nb7 = {"cells": [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source":
         "from infkit.views import TokenHeatmap\n"
         "TokenHeatmap(['<eos>', 'The', ' capital', ' is', ' Parth', '.'], [0.0, -0.9, 0.2, float('nan'), 1.0, -0.3],"
         " special=[0])"}],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}
    (root / "nb7.ipynb").write_text(json.dumps(nb7))
    settings = base / "settings"
    for plugin, value in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings / (plugin + ".jupyterlab-settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port = _free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(base / "ws"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("MPLBACKEND", None)
    log = (base / "lab.log").open("w")
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ServerApp.open_browser=False",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
           f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                _request(f"{url}/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    pytest.fail(f"JupyterLab did not start:\n{(base / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str, path: str, kind: str = "lab"):
    """A page on the notebook, its session (kernel) created first through the REST API, waiting for "Idle"."""
    _request(f"{url}/api/sessions", {"path": path, "type": "notebook", "name": path, "kernel": {"name": "python3"}})
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(f"{url}/lab/tree/{path}" if kind == "lab" else f"{url}/notebooks/{path}")
    idle = "#jp-main-statusbar >> text=Idle" if kind == "lab" else '.jp-Notebook-ExecutionIndicator[data-status="idle"]'
    page.wait_for_selector(idle, timeout=60_000)
    return page, errors


def _run_all(page, timeout_ms: int) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""", timeout=timeout_ms, polling=250)


def _token_colours(page, scope: str) -> list[dict]:
    return page.evaluate(
        """(scope) => [...document.querySelectorAll(scope + ' .ikw-row')].flatMap(row =>
            [...row.querySelectorAll('.ik-tok')].map(t => ({
                row: Number(row.dataset.r), t: Number(t.dataset.t), v: Number(t.dataset.v),
                scale: Number(row.dataset.scale), bg: getComputedStyle(t).backgroundColor,
                image: getComputedStyle(t).backgroundImage, nan: t.classList.contains('ik-nan')})))""", scope)


def _rows_text(page) -> str:
    return page.evaluate("""() => [...document.querySelectorAll('.ikw-explorer .ikw-topk .ikw-rowhead .ikw-label')]
        .map(e => e.textContent).join('|')""")


def test_jupyterlab_explorer_colours_selection_and_lock(server, browser, timings):
    url, _root = server
    start = time.perf_counter()
    page, errors = _open(browser, url, "02_widgets.ipynb")
    timings["lab: open notebook (s)"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    _run_all(page, timeout_ms=150_000)
    timings["lab: run all cells (s)"] = round(time.perf_counter() - start, 2)
    explorer = page.locator(".ikw-explorer")
    explorer.wait_for(timeout=20_000)
    page.wait_for_selector(".ikw-explorer .ikw-topk .ikw-row .ik-tok", timeout=20_000)
    # The heatmap rows are drawn with the diverging colours of infkit.views.html: exact RGB for the given scale.
    tokens = [t for t in _token_colours(page, ".ikw-explorer .ikw-topk") if not t["nan"]]
    assert len(tokens) > 20
    hi = max(tokens, key=lambda t: t["v"])
    lo = min(tokens, key=lambda t: t["v"])
    assert hi["v"] > 0 > lo["v"]
    for tok in (hi, lo):
        assert _rgb(tok["bg"]) == H.color(tok["v"], tok["scale"]), tok
    r, g, b = _rgb(hi["bg"])
    assert r > b + 60 and r > g, f"the strongest proponent token is not red: {hi}"
    r, g, b = _rgb(lo["bg"])
    assert b > r, f"the strongest opponent token is not blue: {lo}"
    # Whitespace, special tokens and NaN in the hand-made heatmap: NaN hatched grey, never white.
    first = page.locator(".ikw-heatmap").first
    nan_style = first.locator(".ik-tok.ik-nan").first.evaluate("e => getComputedStyle(e).backgroundImage")
    assert "repeating-linear-gradient" in nan_style
    assert first.locator(".ik-tok.ik-special").count() == 1
    assert "↵" in first.inner_text() and "⇥" in first.inner_text()
    # Hover shows the value and the token index.
    strongest = page.locator(f'.ikw-explorer .ikw-topk .ikw-row[data-r="{hi["row"]}"] .ik-tok[data-t="{hi["t"]}"]')
    strongest.scroll_into_view_if_needed()
    strongest.hover()
    tip = page.locator(".ikw-explorer .ikw-topk .ikw-tip")
    tip.wait_for(state="visible", timeout=5_000)
    assert f"token {hi['t']}" in tip.inner_text() and "influence" in tip.inner_text()
    page.mouse.move(5, 5)
    # Changing the query updates the top-k list.
    before = _rows_text(page)
    select = explorer.locator("select").first
    start = time.perf_counter()
    select.select_option(index=1)
    page.wait_for_function("(old) => { const t = [...document.querySelectorAll("
                           "'.ikw-explorer .ikw-topk .ikw-rowhead .ikw-label')].map(e => e.textContent).join('|');"
                           " return t.length > 0 && t !== old; }", arg=before, timeout=30_000, polling="raf")
    timings["lab: query change -> updated top-k (ms)"] = round((time.perf_counter() - start) * 1000, 1)
    after = _rows_text(page)
    assert after != before and after.count("|") == before.count("|")
    # The first visit of a query computed its token scores; a second visit comes from the memo.
    select.select_option(index=2)
    page.wait_for_function("(old) => [...document.querySelectorAll('.ikw-explorer .ikw-topk .ikw-rowhead .ikw-label')]"
                           ".map(e => e.textContent).join('|') !== old", arg=after, timeout=30_000, polling="raf")
    third = _rows_text(page)
    start = time.perf_counter()
    select.select_option(index=1)
    page.wait_for_function("(old) => [...document.querySelectorAll('.ikw-explorer .ikw-topk .ikw-rowhead .ikw-label')]"
                           ".map(e => e.textContent).join('|') !== old", arg=third, timeout=30_000, polling="raf")
    timings["lab: query change, memoised (ms)"] = round((time.perf_counter() - start) * 1000, 1)
    assert _rows_text(page) == after
    # Click to lock: the lock shows in the browser and reaches the kernel.
    token = page.locator('.ikw-explorer .ikw-topk .ikw-row[data-r="0"] .ik-tok').nth(1)
    token.click()
    page.wait_for_selector(".ikw-explorer .ikw-topk .ik-tok.ikw-locked", timeout=5_000)
    assert "locked:" in explorer.locator(".ikw-topk .ikw-info").inner_text()
    long_ms = float(page.locator('.ikw-heatmap[data-tokens="3000"]').get_attribute("data-render-ms"))
    timings["lab: 3000-token heatmap build (ms)"] = long_ms
    assert long_ms < 500
    # The query row has its own one-sided legend (−log p, white 0 … dark ≥ 5), not the influence colours; the top-k
    # legend says how its scale was chosen (the 99th-percentile clip).
    query_legend = explorer.locator(".ikw-querymap .ikw-legend").first
    assert "ikw-seqlegend" in query_legend.get_attribute("class")
    assert "dark ≥ 5" in query_legend.inner_text() and "proponent" not in query_legend.inner_text()
    assert "percentile" in explorer.locator(".ikw-topk .ikw-legend").first.inner_text()
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(OUT / "jupyterlab.png"))
    explorer.screenshot(path=str(OUT / "explorer.png"))
    page.locator(".ikw-comparison").screenshot(path=str(OUT / "comparison.png"))
    # Ask the kernel: a new cell below the last one prints what the click synced back.
    page.locator(".jp-CodeCell .jp-InputArea-editor").last.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.type("print('LOCKED', explorer.heatmap.locked, explorer.heatmap.selected_row)")
    page.keyboard.press("Shift+Enter")
    page.wait_for_selector("text=/LOCKED \\[0, 1\\] 0/", timeout=20_000)
    assert not [e for e in errors if "ikw" in e or "anywidget" in e.lower()], errors
    _comparison_table_fits_at_1280(page)
    page.close()


def _comparison_table_fits_at_1280(page) -> None:
    """At 1280 px with the file browser open, the comparison's agreement table is not cut off: its box ends inside
    the notebook, and the table either fits or scrolls sideways in it."""
    page.set_viewport_size({"width": 1280, "height": 1000})
    if not page.locator("#filebrowser").is_visible():
        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="filebrowser"]').first.click()
    page.locator("#filebrowser").wait_for(state="visible", timeout=5_000)
    table = page.locator(".ikw-comparison .ikw-wide table").first
    table.scroll_into_view_if_needed()
    page.wait_for_timeout(300)  # the layout settles after the resize
    box = table.evaluate("""t => {
        const scroll = t.closest('.ik-scroll'), area = t.closest('.jp-Notebook').getBoundingClientRect();
        return {table: t.getBoundingClientRect().right, box: scroll.getBoundingClientRect().right, area: area.right,
                scrolls: scroll.scrollWidth > scroll.clientWidth, overflow: getComputedStyle(scroll).overflowX};
    }""")
    page.screenshot(path=str(OUT / "comparison_1280.png"))
    assert box["box"] <= box["area"] + 1, f"the agreement table's box runs past the notebook: {box}"
    assert box["table"] <= box["area"] + 1 or (box["scrolls"] and box["overflow"] in ("auto", "scroll")), box


def test_notebook7_renders_the_heatmap(server, browser, timings):
    url, _root = server
    start = time.perf_counter()
    page, errors = _open(browser, url, "nb7.ipynb", kind="notebook")
    _run_all(page, timeout_ms=60_000)
    page.wait_for_selector(".ikw-heatmap .ik-tok", timeout=30_000)
    tokens = _token_colours(page, ".ikw-heatmap")
    assert len(tokens) == 6
    by_t = {t["t"]: t for t in tokens}
    assert _rgb(by_t[4]["bg"]) == H.color(1.0, 1.0) == H.RED
    assert _rgb(by_t[1]["bg"]) == H.color(-0.9, 1.0)
    assert "repeating-linear-gradient" in by_t[3]["image"]
    page.locator('.ikw-heatmap .ik-tok[data-t="4"]').click()
    page.wait_for_selector(".ikw-heatmap .ik-tok.ikw-locked", timeout=5_000)
    page.screenshot(path=str(OUT / "notebook7.png"))
    timings["notebook 7: open, run, check (s)"] = round(time.perf_counter() - start, 2)
    page.close()


def test_static_exports_render_offline(browser, tmp_path, timings):
    """The stored notebook exported with nbconvert (what GitHub / nbviewer / a saved report show): every view
    falls back to its static HTML, readable with the network cut off."""
    start = time.perf_counter()
    out = tmp_path / "02_widgets.html"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--output", str(out), str(NOTEBOOK)],
                   check=True, capture_output=True, timeout=120)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    blocked: list[str] = []

    def block(route):
        if not route.request.url.startswith(("file:", "data:")):
            blocked.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", block)
    page.goto(out.as_uri())
    # The explorer: proponent and opponent tables whose tokens are coloured.
    assert page.locator("table.ik-top").count() >= 4  # the explorer's two, and the InfluenceResult's
    colours = page.evaluate("""() => [...document.querySelectorAll('table.ik-top .ik-tok')]
        .map(t => getComputedStyle(t).backgroundColor)""")
    rgb = [_rgb(c) for c in colours]
    assert any(r > b + 60 for r, g, b in rgb), "no red token in the exported explorer"
    # opponents are paler than the top proponent on the shared scale (its strongest token reads b - r = 26)
    assert any(b > r + 20 for r, g, b in rgb), "no blue token in the exported explorer"
    # The heatmap: NaN hatched, special outlined; the comparison: its scatter image decoded offline.
    assert "repeating-linear-gradient" in page.locator(".ik-tok.ik-nan").first.evaluate(
        "e => getComputedStyle(e).backgroundImage")
    assert page.locator(".ik-tok.ik-special").count() >= 1
    image = page.locator('img[alt^="scatter of"]')
    assert image.count() == 1 and image.evaluate("e => e.naturalWidth") > 100
    assert page.locator("text=Pearson / query").count() >= 1
    assert page.locator("text=/more tokens: this static copy stops/").count() == 1
    page.locator(".jp-OutputArea-output", has=page.locator("table.ik-top")).first.screenshot(
        path=str(OUT / "static_export_explorer.png"))
    page.locator(".jp-OutputArea-output", has=page.locator('img[alt^="scatter of"]')).first.screenshot(
        path=str(OUT / "static_export_comparison.png"))
    timings["static export: nbconvert + checks (s)"] = round(time.perf_counter() - start, 2)
    page.close()


def test_a_10000_character_token_wraps_inside_the_query_box(browser):
    """The report's query box (infkit.views.html.query_box) wraps one very long token instead of growing to
    185,000 px."""
    box = H.query_box("In Velish, " + "x" * 10_000 + " is:", " lo piro", "this pair is not in the corpus.")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_content(H.page("wrap", f'<div id="box" style="width: 700px">{box}</div>'))
    width, inner, page_width = page.evaluate("""() => { const q = document.querySelector('.ik-query');
        return [q.scrollWidth, q.clientWidth, document.documentElement.scrollWidth]; }""")
    page.close()
    assert width <= inner <= 700 and page_width <= 1280


def test_a_long_token_row_wraps_inside_its_box(browser):
    """A 200-token heatmap row (a news article, say) wraps at the tokens' spaces instead of running off the page;
    each token keeps its own spaces."""
    tokens = [f" word{i}" for i in range(200)]
    row = H.token_row(tokens, [float(i % 7 - 3) for i in range(200)])
    page = browser.new_page()
    page.set_content(H.page("wrap", f'<div id="box" style="width: 600px">{row}</div>'))
    scroll_width, client_width, height = page.evaluate(
        "() => { const b = document.getElementById('box'); return [b.scrollWidth, b.clientWidth, b.scrollHeight]; }")
    assert scroll_width <= client_width == 600
    assert height > 10 * 20  # many lines
    assert page.locator(".ik-tok").first.inner_text() == " word0"


def test_the_widget_formats_numbers_as_python_does(browser):
    """heatmap.js's fmt (what the live widget shows) and infkit.views.html.fmt (its static copy) print the same text."""
    source = (ASSETS / "heatmap.js").read_text()
    function = re.search(r"export function fmt\(.*?\n}\n", source, re.S).group(0).replace("export ", "")
    values = [5.0, 0.5, -0.0451234, 420.3123, 999.6, 2745.2, 12345.0, -402942.0, 1.5e-7, 3.2e-4, 0.0, float("nan")]
    page = browser.new_page()
    shown = page.evaluate(f"(values) => {{ {function}; return values.map(Number).map((v) => [fmt(v), fmt(v, 4)]); }}",
                          [v if v == v else "NaN" for v in values])
    page.close()
    # NaN does not survive JSON: it travels as the string "NaN", which Number() turns back into NaN
    assert shown == [[H.fmt(v), H.fmt(v, 4)] for v in values]
