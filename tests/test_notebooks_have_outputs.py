"""nbval compares stored outputs; a notebook saved without them would pass trivially. Each notebook must be stored
executed (``make notebooks``), with outputs."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, f"{path.name} has no code"
    not_run = [k for k, c in enumerate(code) if c.get("execution_count") is None]
    assert not not_run, f"{path.name}: code cells {not_run} were never executed; run `make notebooks`"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name} was not run top to bottom in one go: {counts}"
    with_output = [c for c in code if c.get("outputs")]
    assert len(with_output) >= 0.8 * len(code), f"{path.name}: most code cells should show something"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} was stored with an error"
    stderr = [o for c in code for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert not stderr, f"{path.name} writes to stderr (warnings fail strict nbval): {stderr[0].get('text', '')[:200]}"
