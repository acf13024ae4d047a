"""Where the demos' trained weights live: shipped in the package, or retrained into a cache folder.

Both demos (the text one in :mod:`infkit.demo.model`, the diffusion one in :mod:`infkit.demo.diffusion`) keep their
weights in one folder per model and version: a few safetensors files and ``manifest.json`` with the version, the
fingerprint of the training data, the recipe and a sha256 of every file. The package ships that folder for the
default recipe (``infkit/demo/weights/<name>``), so every machine loads the same bytes and no result depends on how
this machine's CPU kernels round during training. Retraining (``load(retrain=True)``) writes the same layout to the
cache folder (``$INFKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/infkit``, else ``~/.cache/infkit``).

This module holds what both demos share: the folder mechanics (checksums, atomic writes, manifest checks), what
``load()`` says (:class:`Say`) and the context their training runs in (:func:`threads`, :func:`quiet`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from infkit.errors import InfkitError
from infkit.persist import sha256_file

CACHE_ENV = "INFKIT_CACHE_DIR"
MANIFEST = "manifest.json"
SHIPPED = Path(__file__).with_name("weights")


class DemoCacheWarning(UserWarning):
    """A demo's cached weights could not be used or written; it retrained (or keeps the model in memory)."""


class ShippedWeightsError(InfkitError):
    """The weights shipped in the package are missing or damaged."""


def cache_root() -> Path:
    """``$INFKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/infkit``, else ``~/.cache/infkit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "infkit"
    return Path.home() / ".cache" / "infkit"


def plain_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing with a manifest."""
    return json.loads(json.dumps(value))


def write_folder(path: Path, files: Iterable[str], write: Callable[[Path], None], manifest: dict[str, Any]) -> Path:
    """Write a weights folder atomically: ``write(tmp)`` fills a temporary sibling folder with ``files``, the
    manifest (``manifest`` plus the files' checksums) is added, and the folder is renamed into place. An
    interrupted write leaves the previous folder as it was (or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        manifest = {**manifest, "files": {name: sha256_file(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if not (path / MANIFEST).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same weights meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_folder(path: Path, files: Iterable[str], expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a weights folder, after checking that each key of ``expected`` (version, data fingerprint,
    recipe) matches and every file is there with its checksum. Raises ``ValueError`` saying why it cannot be used."""
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise ValueError(f"no {MANIFEST} in {path}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_file} is not valid JSON ({err})") from err
    why = {"version": "it was written by version {found!r}, this is version {want!r}",
           "recipe": "it was trained with other settings"}
    for key, want in expected.items():
        found = manifest.get(key)
        if found != plain_json(want):
            raise ValueError(why.get(key, "it was trained on other data ({key} differs)").format(
                found=found, want=want, key=key))
    for name in files:
        file = path / name
        if not file.exists():
            raise ValueError(f"{name} is missing")
        if sha256_file(file) != manifest.get("files", {}).get(name):
            raise ValueError(f"{name} does not match its checksum (corrupt or truncated)")
    return manifest


def shipped_folder(name: str, files: Iterable[str], expected: dict[str, Any], root: Path | None = None) -> Path:
    """The package's own weights folder ``name``, checked; a :class:`ShippedWeightsError` naming the fix if it is
    missing or damaged (a shipped file is never silently replaced by a retrain: that would give other numbers)."""
    path = (root or SHIPPED) / name
    try:
        check_folder(path, files, expected)
    except ValueError as err:
        raise ShippedWeightsError(
            f"the demo weights shipped with infkit in {path} cannot be used ({err}). Reinstall infkit "
            "(pip install --force-reinstall, or `git checkout -- infkit/demo/weights` in a clone), or train them "
            "again on this machine with load(retrain=True) (numbers will then differ slightly from the "
            "documented ones)."
        ) from err
    return path


class Say:
    """What a demo's ``load()`` tells: ``say(text)`` keeps the message (the demo's ``messages``) and prints it when
    ``verbose``; ``say(text, warn=True)`` keeps it and warns with a :class:`DemoCacheWarning` pointing at the code that
    called ``load()``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.messages: list[str] = []

    def __call__(self, text: str, warn: bool = False) -> None:
        self.messages.append(text)
        if warn:
            warnings.warn(text, DemoCacheWarning, stacklevel=3)  # 1: here, 2: load(), 3: load()'s caller
        elif self.verbose:
            print(text, flush=True)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch on ``n`` CPU threads (at most the machine's cores) inside the block; the previous count after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers, peft and diffusers warn about things that are expected here (Conv1D fan_in_fan_out, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield
