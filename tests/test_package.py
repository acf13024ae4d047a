"""The package imports, says its version, and declares what it needs."""

import re
from importlib import metadata
from pathlib import Path

import torch

import infkit


def test_version_matches_metadata():
    assert re.fullmatch(r"\d+\.\d+\.\d+", infkit.__version__)
    assert metadata.version("infkit") == infkit.__version__


def test_metadata_lists_runtime_dependencies():
    requires = metadata.requires("infkit") or []
    names = {re.split(r"[ <>=!;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    for needed in ["torch", "transformers", "peft", "diffusers", "ipywidgets", "matplotlib", "safetensors",
                   "tqdm", "numpy", "scikit-learn"]:
        assert needed in names, f"{needed} missing from infkit's dependencies"
    dev_requires = [r for r in requires if "extra == 'dev'" in r.replace('"', "'")]
    dev = {re.split(r"[ <>=!;\[]", r, maxsplit=1)[0].lower() for r in dev_requires}
    assert {"pytest", "nbval", "jupyterlab", "hypothesis", "ruff", "playwright"} <= dev


def test_torch_is_the_pinned_cpu_build():
    # The set-up pins torch in constraints.txt; CI runs on CPU and must not have pulled a CUDA build.
    pinned = open("constraints.txt").read()
    assert f"torch=={torch.__version__.split('+')[0]}" in pinned
    assert not torch.version.cuda, "the venv's torch is a CUDA build; the set-up should have kept the CPU wheel"


def test_public_names():
    for name in ["Analysis", "tasks", "InfluenceResult", "InfkitError"]:
        assert hasattr(infkit, name)
    assert {"ekfac", "kfac", "identity", "exact"} <= set(infkit.ESTIMATORS)


def test_front_end_files_are_package_data():
    # The widgets' JavaScript and CSS live inside the package (infkit/views/assets), so a wheel holds them like any
    # other file of the package: no force-include, no second place to look for them.
    from infkit.views import ASSETS

    package = Path(infkit.__file__).resolve().parent
    assert ASSETS.resolve() == package / "views" / "assets"
    assert {p.name for p in ASSETS.iterdir()} >= {"heatmap.js", "scatter.js", "widgets.css"}
    assert "force-include" not in open("pyproject.toml").read()
