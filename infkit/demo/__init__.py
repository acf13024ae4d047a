"""The embedded default: a small language model, its corpus and the analyses of Grosse et al. 2023, offline.

    from infkit import demo
    models = demo.load()          # trains once (~30 s on a CPU core), then loads from ~/.cache/infkit in ~1 s
    story = demo.run(models)      # every analysis of the report, through the public API

See :mod:`infkit.demo.corpus` for what the model learns, :mod:`infkit.demo.model` for training and the cache, and
:mod:`infkit.demo.story` for the analyses.
"""

from infkit.demo.corpus import Corpus, Country, Example
from infkit.demo.corpus import build as build_corpus
from infkit.demo.model import (
    CACHE_ENV,
    VERSION,
    DemoCacheWarning,
    DemoModels,
    Recipe,
    cache_path,
    cache_root,
    load,
    next_word,
    single_thread,
)
from infkit.demo.tokenizer import build_tokenizer, token_strings

__all__ = [
    "CACHE_ENV", "VERSION", "Corpus", "Country", "DemoCacheWarning", "DemoModels", "Example", "Recipe",
    "build_corpus", "build_tokenizer", "cache_path", "cache_root", "load", "next_word", "single_thread",
    "token_strings",
]
