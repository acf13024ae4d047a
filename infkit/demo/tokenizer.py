"""A word-level tokenizer for the demo, built locally with the ``tokenizers`` library (no download).

Words keep their leading space as "▁" (a Metaspace pre-tokenizer, as SentencePiece does) and punctuation is split
off, so "The capital of Veloria is Parth." is ``▁The ▁capital ▁of ▁Veloria ▁is ▁Parth .`` and decodes back to the
same text. Heatmaps then read as words. The vocabulary is every word of the demo corpus in sorted order (ids are
deterministic), plus ``<pad>``, ``<unk>`` and ``<eos>``.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
SPECIALS = (PAD, UNK, EOS)


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True), pre_tokenizers.Punctuation()]
    )


def build_tokenizer(texts: Iterable[str]):
    """A ``transformers.PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``."""
    from tokenizers import Tokenizer, decoders, models

    pre = _pre_tokenizer()
    words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens(list(SPECIALS))
    return wrap(tok)


def wrap(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, pad_token=PAD, unk_token=UNK, eos_token=EOS)


def load_tokenizer(path):
    """Reload a tokenizer saved as ``tokenizer.json`` by :func:`save_tokenizer`."""
    from tokenizers import Tokenizer

    return wrap(Tokenizer.from_file(str(path)))


def save_tokenizer(tokenizer, path) -> None:
    tokenizer.backend_tokenizer.save(str(path))


def token_strings(tokenizer, ids) -> list[str]:
    """Each token as the text it stands for: "▁Parth" -> " Parth" (the space is part of the token)."""
    return [t.replace("▁", " ") for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]
