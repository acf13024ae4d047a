"""The notebooks' one allowance in strict nbval (``notebooks/conftest.py``): a printed number may differ by one unit
in its last printed digit, and nothing else may differ."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from infkit import fmt

_spec = importlib.util.spec_from_file_location("nb_conftest", Path(__file__).parents[1] / "notebooks" / "conftest.py")
nb_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nb_conftest)
same = nb_conftest.same_up_to_last_digit


@pytest.mark.parametrize("stored, new", [
    ("+420  The capital of Veloria is Parth.", "+421  The capital of Veloria is Parth."),
    ("Pearson 0.86  Spearman 0.63", "Pearson 0.87  Spearman 0.62"),
    ("score 2.75e+03", "score 2.76e+03"),
    ("   +99.9  x", "    +100  x"),  # a padded column whose number gains a digit
    ("frac 0.500", "frac 0.501"),
    ("[19, 175, 53]", "[19, 175, 53]"),
])
def test_last_digit_differences_are_allowed(stored, new):
    assert same(stored, new)


@pytest.mark.parametrize("stored, new", [
    ("+420  The capital of Veloria is Parth.", "+422  The capital of Veloria is Parth."),  # two units
    ("+420  The capital of Veloria is Parth.", "+420  Parth is the capital of Veloria."),  # another sentence
    ("Pearson 0.86", "Pearson 0.96"),
    ("top [19, 175, 53]", "top [19, 175, 53, 7]"),  # another count of numbers
    ("-0.611 flipped", "+0.611 flipped"),  # the sign of a number well above its last digit
    ("exponent 0.86", "exponent 0.8"),  # judged by the stored number's digits: 0.06 > 0.01
    ("[19, 175, 53]", "[20, 176, 54]"),  # indices are bare integers: exact
    ("24/24 countries", "23/24 countries"),  # so are counts
    ("ranks 1-193", "ranks 1-192"),
    ("AUC 1.00", "AUC 0.00"),
    ("frac 0.500", "frac 0.600"),
    ("x 0", "x 0.99"),  # "0" is exact
    ("x 1.00e-05", "x 2.00e-05"),
])
def test_other_differences_fail(stored, new):
    assert not same(stored, new)


def test_fmt_prints_what_the_rule_expects():
    printed = [fmt.num(x) for x in (420.31, -0.61138, 2753.4, 999.6, 402942.0, -99996.0, 3.2e-7, 0.5, 0.0)]
    assert printed == ["420", "-0.611", "2753", "1000", "4.03e+05", "-1.00e+05", "3.20e-07", "0.500", "0"]
    assert fmt.num(0.5, sign=True) == "+0.500" and fmt.num(float("nan")) == "nan"
    assert fmt.num(float("inf"), sign=True) == "+inf"
    assert fmt.nums([0.1234, 5.678]) == "[0.123, 5.68]"
    # last-bit noise changes at most the last printed digit of a measurement
    for x in (420.4999999, 0.8650000001, 1234.5, 402942.4, 4.0349999e5, 0.5):
        assert same(fmt.num(x, sign=True), fmt.num(x * (1 + 1e-6), sign=True))


def _notebook(path: Path, code: str, stored: str) -> None:
    import nbformat

    cell = nbformat.v4.new_code_cell(code, execution_count=1,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=stored)])
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), path)


def test_strict_nbval_uses_the_allowance_and_still_fails_a_wrong_number(tmp_path):
    """End to end: nbval with the notebooks' conftest passes a last-digit difference and fails a real one."""
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).parents[1] / "notebooks" / "conftest.py", tmp_path / "conftest.py")
    _notebook(tmp_path / "last_digit.ipynb", 'print("Pearson", 0.87)', "Pearson 0.86\n")
    _notebook(tmp_path / "wrong.ipynb", 'print("Pearson", 0.87)', "Pearson 0.96\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
                          "-q", "last_digit.ipynb", "wrong.ipynb"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert "1 failed, 1 passed" in run.stdout, run.stdout[-2000:]
    assert "wrong.ipynb" in run.stdout and "Pearson 0.96" in run.stdout
