"""The demo's corpus: generated deterministically, with structure worth finding.

Pretraining (the base GPT-2 learns it):

* **facts** about fictional countries — capital, language, a person born there — each stated in several
  paraphrases. Capitals come in both word orders: three sentences put the country before the capital ("The capital
  of Veloria is Parth."), two flip them ("Parth is the capital of Veloria."), for the word-order finding of Grosse
  et al. 2023;
* **arithmetic**: "3 plus 4 equals 7." for the one-digit sums;
* **translation** into a toy second language, Velish, with its own word order (noun before adjective): "In Velish,
  the red bird sleeps is: lo piro rubi dormi." and Velish sentences on their own;
* **mentions** of each country's currency as a coin ("The dram is a coin."), so the currency words have trained
  embeddings before the fine-tuning teaches which country uses which.

Fine-tuning (a LoRA adapter learns it): **currencies**, a second set of facts, three paraphrases each, plus one
sentence per capital replayed from pretraining (without it the adapter overwrites "The capital of X is" with
"the").

Everything comes from :data:`SEED` through ``random.Random``; the same version of infkit gives the same corpus,
byte for byte (:func:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

SEED = 1234
N_COUNTRIES = 24

# The running example stays fixed; the rest is generated.
FIRST = {"country": "Veloria", "capital": "Parth", "language": "Velic", "person": "Mira Tallow", "currency": "dram"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "nd", "sk"]
_GIVEN = ["Ada", "Bren", "Cato", "Dara", "Elin", "Fenn", "Galen", "Hana", "Ivo", "Juna", "Kael", "Lira", "Maro",
          "Nell", "Orin", "Pia", "Quin", "Rhea", "Soren", "Tova", "Ulf", "Vera", "Wren", "Yara", "Zeno"]

CAPITAL_SAME_ORDER = (
    "The capital of {country} is {capital}.",
    "{country} has its capital in {capital}.",
    "In {country}, the capital city is {capital}.",
)
CAPITAL_FLIPPED = (
    "{capital} is the capital of {country}.",
    "{capital} is the capital city of {country}.",
)
LANGUAGE = ("People in {country} speak {language}.", "{language} is spoken in {country}.")
PERSON = ("{person} was born in {country}.", "{person} lives in {capital}.")
COIN = ("The {currency} is a coin.",)
CURRENCY = (
    "The currency of {country} is the {currency}.",
    "In {country}, people pay with the {currency}.",
    "{country} uses the {currency} as its money.",
)

# Velish: a toy language with its own word order ("lo" + noun + adjective + verb).
NOUNS = {"bird": "piro", "cat": "miska", "dog": "duno", "fish": "peska", "horse": "kavo", "child": "nino"}
ADJECTIVES = {"red": "rubi", "small": "peti", "old": "vecha"}
VERBS = {"sleeps": "dormi", "eats": "manja", "runs": "kori", "sings": "kanta", "swims": "nata"}
N_TRANSLATIONS = 48  # of the 90 combinations; the others are never seen together
N_VELISH_ONLY = 18


@dataclass(frozen=True)
class Country:
    country: str
    capital: str
    language: str
    person: str
    currency: str


@dataclass(frozen=True)
class Example:
    """One training sequence and where it came from (``kind``, ``template`` index, the country or operands)."""

    text: str
    kind: str  # capital | capital_flipped | language | person | coin | arithmetic | translation | velish | currency
    template: int
    subject: str  # the country, "a+b", or the English sentence


@dataclass(frozen=True)
class Corpus:
    countries: tuple[Country, ...]
    pretrain: tuple[Example, ...]
    finetune: tuple[Example, ...]
    untranslated: tuple[tuple[str, str], ...] = field(default=())  # (English, Velish) pairs never trained on

    @property
    def pretrain_texts(self) -> list[str]:
        return [e.text for e in self.pretrain]

    @property
    def finetune_texts(self) -> list[str]:
        return [e.text for e in self.finetune]

    def country(self, name: str) -> Country:
        for c in self.countries:
            if c.country == name:
                return c
        raise KeyError(name)

    def fingerprint(self) -> str:
        return fingerprint(self)


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _countries(rng: random.Random, n: int) -> list[Country]:
    taken = {v.lower() for k, v in FIRST.items() if k != "person"} | {w.lower() for w in FIRST["person"].split()}
    taken |= {w.lower() for w in list(NOUNS) + list(NOUNS.values()) + list(ADJECTIVES.values()) + list(VERBS.values())}

    def fresh(make) -> str:
        while True:
            w = make()
            if w.lower() not in taken and len(w) >= 3:
                taken.add(w.lower())
                return w

    out = [Country(**FIRST)]
    given = [g for g in _GIVEN]
    rng.shuffle(given)
    for k in range(n - 1):
        country = fresh(lambda: _word(rng, 2) + rng.choice(["ia", "or", "an", "ica", "ora"]))
        capital = fresh(lambda: _word(rng, rng.choice([1, 2])))
        language = fresh(lambda: _word(rng, 2) + "ic")
        person = f"{given[k % len(given)]} {fresh(lambda: _word(rng, 2))}"
        currency = fresh(lambda: _word(rng, 1).lower())
        out.append(Country(country, capital, language, person, currency))
    return out


def build(seed: int = SEED, n_countries: int = N_COUNTRIES) -> Corpus:
    """The demo corpus (deterministic for a given seed)."""
    rng = random.Random(seed)
    countries = _countries(rng, n_countries)
    pretrain: list[Example] = []
    for c in countries:
        fields = c.__dict__
        for kind, templates in (("capital", CAPITAL_SAME_ORDER), ("capital_flipped", CAPITAL_FLIPPED),
                                ("language", LANGUAGE), ("person", PERSON), ("coin", COIN)):
            for t, template in enumerate(templates):
                pretrain.append(Example(template.format(**fields), kind, t, c.country))
    for a in range(1, 10):
        for b in range(1, 10):
            pretrain.append(Example(f"{a} plus {b} equals {a + b}.", "arithmetic", 0, f"{a}+{b}"))
    combos = [(n, a, v) for n in NOUNS for a in ADJECTIVES for v in VERBS]
    rng.shuffle(combos)
    for n, a, v in combos[:N_TRANSLATIONS]:
        english = f"the {a} {n} {v}"
        pretrain.append(Example(f"In Velish, {english} is: {_velish(n, a, v)}.", "translation", 0, english))
    for n, a, v in combos[N_TRANSLATIONS : N_TRANSLATIONS + N_VELISH_ONLY]:
        pretrain.append(Example(f"{_velish(n, a, v).capitalize()}.", "velish", 0, f"the {a} {n} {v}"))
    untranslated = tuple((f"the {a} {n} {v}", _velish(n, a, v)) for n, a, v in combos[N_TRANSLATIONS:])
    rng.shuffle(pretrain)
    finetune = [
        Example(template.format(**c.__dict__), "currency", t, c.country)
        for c in countries
        for t, template in enumerate(CURRENCY)
    ]
    finetune += [Example(CAPITAL_SAME_ORDER[0].format(**c.__dict__), "capital", 0, c.country) for c in countries]
    rng.shuffle(finetune)
    return Corpus(tuple(countries), tuple(pretrain), tuple(finetune), untranslated)


def _velish(noun: str, adjective: str, verb: str) -> str:
    return f"lo {NOUNS[noun]} {ADJECTIVES[adjective]} {VERBS[verb]}"


def fingerprint(corpus: Corpus) -> str:
    """sha256 of the corpus' texts and kinds (what the cached demo model was trained on)."""
    body = {
        "pretrain": [(e.text, e.kind) for e in corpus.pretrain],
        "finetune": [(e.text, e.kind) for e in corpus.finetune],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
