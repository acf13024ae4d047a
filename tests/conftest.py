import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def report():
    """Append a line to test-output/report.md: the figures the tests measured (correlations, timings)."""
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / "report.md"
    path.write_text("# Figures measured by the test suite\n\n")

    def write(line: str) -> None:
        with path.open("a") as f:
            f.write(line.rstrip() + "\n")
        print(line)

    return write
