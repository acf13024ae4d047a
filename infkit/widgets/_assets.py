"""Where the front-end files (anywidget ES modules and CSS) are: inside the installed wheel, or in the repository."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from infkit.errors import InfkitError

FILES = ("heatmap.js", "scatter.js", "widgets.css")


@lru_cache(maxsize=1)
def static_dir() -> Path:
    """The folder holding ``heatmap.js``, ``scatter.js`` and ``widgets.css``.

    A wheel ships the repository's ``widgets/`` folder as ``infkit/_widgets_static`` (pyproject's force-include);
    an editable install or a checkout uses ``widgets/`` next to the ``infkit`` package."""
    package = Path(__file__).resolve().parent.parent
    candidates = [package / "_widgets_static", package.parent / "widgets"]
    for folder in candidates:
        if all((folder / name).is_file() for name in FILES):
            return folder
    raise InfkitError(
        "the widgets' front-end files (" + ", ".join(FILES) + ") are missing: looked in "
        + " and ".join(str(c) for c in candidates)
        + ". Reinstall infkit (the wheel ships them as infkit/_widgets_static)"
    )


def asset(name: str) -> Path:
    return static_dir() / name


def read(name: str) -> str:
    return asset(name).read_text(encoding="utf-8")
