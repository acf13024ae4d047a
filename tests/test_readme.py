"""README.md as a test: every ```python block runs as written, and every figure it quotes is what the code computes.

Each python block runs in a fresh namespace, as a reader's notebook cell would, one test per block (named by the
heading it is under), on one torch thread, in a temporary working directory with ``INFKIT_CACHE_DIR`` there too.
The figures come from ``scripts/readme_figures.py`` (the demo's analyses on the shipped weights, the diffusion
notebook's recipe, and the namespaces the README's own blocks leave, so those blocks run once).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _load_figures_module():
    spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts" / "readme_figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rf = _load_figures_module()
BLOCKS = rf.blocks(README)
NEEDS_REAL_MODELS = "Real pretrained models, offline"

_namespaces: dict[str, dict] = {}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """One thread, a temporary working directory and cache folder: what a block saves lands in tmp."""
    folder = tmp_path_factory.mktemp("readme")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("INFKIT_CACHE_DIR", str(folder / "cache"))
        mp.setenv("MPLBACKEND", "Agg")
        torch.set_num_threads(1)
        try:
            yield folder
        finally:
            torch.set_num_threads(threads)


def _namespace(heading: str) -> dict:
    """The namespace the README block under ``heading`` left (run now unless a test already ran it)."""
    if heading not in _namespaces:
        _namespaces[heading] = rf.run_block(rf.block_under(README, heading))
    return _namespaces[heading]


def test_readme_has_its_blocks():
    """The README's code is in fenced blocks marked python or bash, and the python ones are the snippets."""
    fences = re.findall(r"^```(\w*)", README, re.M)
    opening = fences[::2]
    assert set(opening) <= {"python", "bash"}, f"untagged or other code blocks: {opening}"
    assert len(BLOCKS) >= 8
    for block in rf.blocks(README, "bash"):
        assert "import " not in block.code, f"a python snippet marked bash under {block.heading!r}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block, sandbox):
    if block.heading == NEEDS_REAL_MODELS:
        from infkit.demo import real

        if not real.available():
            pytest.skip("the real models are not installed: make real")
    _namespaces[block.heading] = rf.run_block(block)


# -- figures ------------------------------------------------------------------------------------------------------
def test_number_agreement_rules():
    assert rf.Num(420.3, digits=3).render() == "420" and rf.Num(420.3, digits=3).agrees("420")
    assert not rf.Num(420.3, digits=3).agrees("421")
    assert rf.Num(-0.61, decimals=1).agrees("−0.6") and not rf.Num(-0.61, decimals=1).agrees("-0.7")
    assert rf.Num(832, whole=True).agrees("832") and not rf.Num(832, whole=True).agrees("833")
    assert rf.Num(0.9712, decimals=2, floor=True).agrees("0.97")
    assert not rf.Num(0.9712, decimals=2, floor=True).agrees("0.98")  # a bound above the value
    assert not rf.Num(0.9712, decimals=2, floor=True).agrees("0.95")  # true but loose


@pytest.fixture(scope="module")
def figures(sandbox):
    from infkit.demo import single_thread, story

    with single_thread():
        told = story.run()
        diffusion = rf.diffusion_run()
    return rf.all_figures(README, told, diffusion, namespace=_namespace)


def test_readme_figures_are_computed(figures):
    problems = rf.check(README, figures)
    assert not problems, "README.md disagrees with what the code computes:\n" + "\n".join(problems)


def test_a_wrong_figure_fails(figures):
    """Editing any one number of any figure (or its words) makes the check fail, naming that figure."""
    flat = rf._normalise(README)
    for fig in figures:
        match = fig.pattern().search(flat)
        assert match is not None, fig.name
        if fig.numbers:
            for g, num in enumerate(fig.numbers, start=1):
                shown = match.group(g)
                wrong = _wrong(shown) if num.within is None else f"{num.value + 2 * num.within:.2f}"
                edited = flat[: match.start(g)] + wrong + flat[match.end(g):]
                assert not num.agrees(wrong), (fig.name, shown, wrong)
                assert any(p.startswith(fig.name + ":") for p in rf.check(edited, [fig])), (fig.name, wrong)
        else:
            phrase = flat[match.start():match.end()]
            edited = flat[: match.start()] + phrase.replace(" ", " x ", 1) + flat[match.end():]
            assert rf.check(edited, [fig]), fig.name


def _wrong(shown: str) -> str:
    """Another number of the same form: the last digit moved by 3 (so a rounding unit never covers it)."""
    i = max(k for k, c in enumerate(shown) if c.isdigit())
    return shown[:i] + str((int(shown[i]) + 3) % 10) + shown[i + 1:]


def test_docs_are_in_the_project():
    """README and code point to docs/design.md, which exists; no reference to a design note outside the project."""
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in README
    outside = re.compile(r"(?<!docs/)" + "DESIGN" + r"\.md")  # spelled in pieces, so this file does not match
    offenders = [str(p.relative_to(ROOT)) for pattern in ("infkit/**/*.py", "tests/*.py", "benchmarks/*.py")
                 for p in ROOT.glob(pattern) if outside.search(p.read_text())]
    offenders += ["README.md"] if outside.search(README) else []
    assert not offenders, f"references to a design note the project does not contain: {offenders}"


def test_constraints_mention_only_what_the_setup_reads():
    text = (ROOT / "constraints.txt").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text() + (ROOT / "Makefile").read_text()
    for variable in set(re.findall(r"\b([A-Z][A-Z_]{3,})=", text)):
        assert variable in setup, f"constraints.txt mentions {variable}, which nothing reads"

