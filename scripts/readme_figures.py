"""Compute every figure README.md quotes from the shipped demo models, and check that the README says them.

    .venv/bin/python scripts/readme_figures.py           # print each figure's README phrase, as computed
    .venv/bin/python scripts/readme_figures.py --check   # exit 1, listing what differs, when the README is off

A figure is a README phrase with ``{}`` where its numbers go ("scores {}, {}, {}"). The phrase must occur exactly
once in README.md (whitespace, line breaks included, does not matter); each number there must agree with the
computed value to the digits the README prints: within half a unit of its last digit (plus a hair for last-bit
noise), so "420" holds for 420.3 but "421" does not. Whole numbers (indices, counts) must be equal. A phrase that
also makes a claim in words ("the three same-order paraphrases") carries a check of that claim.

The figures come from the public API only: :func:`infkit.demo.story.run` on the shipped weights (the demo's
analyses), the README's own code blocks executed as written (the digits example, the cache), and the diffusion
demo's notebook recipe (``notebooks/03_diffusion.ipynb``). ``tests/test_readme.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_NUMBER = r"([−-]?\d[\d,]*(?:\.\d+)?)"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


# -- README code blocks -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    heading: str  # the heading the block is under
    index: int  # the block's position among the python blocks under that heading
    language: str
    code: str

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return slug if self.index == 0 else f"{slug}-{self.index + 1}"


def blocks(text: str, language: str | None = "python") -> list[Block]:
    """The fenced code blocks of ``text`` (of ``language``; None: all), each with the heading above it."""
    headings = [(m.start(), m.group(1)) for m in _HEADING.finditer(text)]
    out: list[Block] = []
    counts: dict[str, int] = {}
    for m in _FENCE.finditer(text):
        lang = m.group(1)
        if language is not None and lang != language:
            continue
        heading = next((h for pos, h in reversed(headings) if pos < m.start()), "top")
        out.append(Block(heading, counts.get(heading, 0), lang, m.group(2)))
        counts[heading] = counts.get(heading, 0) + 1
    return out


def run_block(block: Block) -> dict[str, Any]:
    """Execute a block in a fresh namespace, as a notebook cell would; return the namespace."""
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    exec(compile(block.code, f"README.md [{block.heading}]", "exec"), namespace)  # noqa: S102 - the README's code
    return namespace


def block_under(text: str, heading: str) -> Block:
    found = [b for b in blocks(text) if b.heading == heading]
    if len(found) != 1:
        raise LookupError(f"expected one python block under the README heading {heading!r}, found {len(found)}")
    return found[0]


# -- figures --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    """A computed number and how the README must print it: ``digits`` significant digits, ``decimals`` places, or
    ``whole`` (equal); ``floor``: the README gives a lower bound (\u2265), which must be at most the value and within
    one unit of it; ``within``: the README gives a centre "c ± within" for a figure that moves from CPU to CPU (the
    value must lie in that interval)."""

    value: float
    digits: int | None = None
    decimals: int | None = None
    whole: bool = False
    floor: bool = False
    within: float | None = None

    def render(self) -> str:
        v = self.value
        if self.whole:
            return f"{int(round(v)):,}" if abs(v) >= 10_000 else str(int(round(v)))
        if self.floor:
            step = 10.0 ** -(self.decimals or 0)
            return f"{(v // step) * step:.{self.decimals or 0}f}"
        if self.decimals is not None:
            return f"{v:.{self.decimals}f}"
        if self.within is not None:
            return f"{v:.2f}"
        from infkit import fmt

        return fmt.num(v, self.digits or fmt.DIGITS)

    def agrees(self, printed: str) -> bool:
        text = printed.replace("−", "-").replace(",", "")
        try:
            shown = float(text)
        except ValueError:
            return False
        if self.whole:
            return shown == round(self.value)
        if self.within is not None:
            return abs(shown - self.value) <= self.within + 1e-9
        places = len(text.split(".")[1]) if "." in text else 0
        unit = 10.0 ** -places
        if self.floor:
            return shown <= self.value + 1e-12 and self.value - shown < unit
        return abs(shown - self.value) <= 0.5 * unit * 1.001 + 1e-6 * abs(self.value)


@dataclass(frozen=True)
class Figure:
    name: str
    template: str  # README text with {} for each number; whitespace-insensitive
    numbers: tuple[Num, ...] = ()
    claim: bool = True  # what the phrase says in words holds for the computed results
    claim_note: str = ""

    def phrase(self) -> str:
        return self.template.format(*(n.render() for n in self.numbers))

    def pattern(self) -> re.Pattern:
        parts = self.template.split("{}")
        literal = [r"\s+".join(re.escape(w) for w in re.split(r"\s+", p.replace("−", "-"))) for p in parts]
        body = _NUMBER.join(literal)
        return re.compile(body)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("−", "-"))


def check(text: str, figures: Sequence[Figure]) -> list[str]:
    """What is wrong with ``text`` (the README): one line per figure that is missing, ambiguous or off."""
    flat = _normalise(text)
    problems = []
    for fig in figures:
        matches = list(fig.pattern().finditer(flat))
        if not fig.claim:
            problems.append(f"{fig.name}: the README's claim no longer holds ({fig.claim_note}); computed: "
                            f"{fig.phrase()!r}")
        elif not matches:
            problems.append(f"{fig.name}: phrase not found; computed, it reads {fig.phrase()!r}")
        elif len(matches) > 1:
            problems.append(f"{fig.name}: phrase found {len(matches)} times; make it unique: {fig.phrase()!r}")
        else:
            shown = matches[0].groups()
            bad = [(s, n) for s, n in zip(shown, fig.numbers) if not n.agrees(s)]
            if bad:
                said = ", ".join(f"README {s} vs computed {n.value:.6g} (print {n.render()})" for s, n in bad)
                problems.append(f"{fig.name}: {said}; computed, it reads {fig.phrase()!r}")
    return problems


# -- computing them -------------------------------------------------------------------------------------------------
def _sig(v: float, digits: int = 3) -> Num:
    return Num(float(v), digits=digits)


def _dec(v: float, decimals: int) -> Num:
    return Num(float(v), decimals=decimals)


def _whole(v: float) -> Num:
    return Num(float(v), whole=True)


def story_figures(story) -> list[Figure]:
    """The figures of README's "What the demo shows", from :func:`infkit.demo.story.run`."""
    import numpy as np

    figs: list[Figure] = []
    corpus = story.models.corpus
    ex = corpus.pretrain
    views = {v.query.label: v for v in story.views}
    capital = views["capital"]
    country = corpus.countries[0]
    p = capital.proponents
    fact = f"The capital of {country.country} is {country.capital}."
    paraphrases = [r for r in p[1:4] if ex[r.index].kind == "capital" and ex[r.index].subject == country.country]
    others = [r for r in p[1:4] if r not in paraphrases]
    figs.append(Figure(
        "capital query: top proponents",
        'the top proponent is the fact itself (score {}); its two same-order paraphrases follow in the top four '
        '(scores {}, {}), with "' + (others[0].text if others else "") + '" between',
        (_sig(p[0].score), *(_sig(r.score) for r in paraphrases[:2])),
        p[0].text == fact and len(paraphrases) == 2 and len(others) == 1,
        "the fact ranks first and its two same-order paraphrases are in the top four"))
    figs.append(Figure("capital query: strongest opponent",
                       'the strongest opponent is "' + capital.opponents[0].text + '"'))
    arith = views["arithmetic"]
    row = story.result.scores[story.queries.index(arith.query)].numpy()
    sevens = [i for i, e in enumerate(ex) if e.kind == "arithmetic" and e.text.endswith(" 7.")]
    figs.append(Figure("sum query", 'all sums equal to 7 are proponents, "' + arith.opponents[0].text
                       + '" the strongest opponent', (), bool(sevens) and bool((row[sevens] > 0).all()),
                       f"{len(sevens)} sentences summing to 7, all with a positive score"))
    wo = story.word_order
    m = wo.means
    figs.append(Figure(
        "word order",
        "over the {} capital queries, same-order paraphrases score {} on average, the flipped sentences {} (mean "
        "|score| {}, about the {} median of unrelated sentences): {}× less, with every same-order sentence above "
        "every flipped one for {}/{} countries",
        (_whole(len(wo.countries)), _sig(m[1]), _dec(m[2], 1), _dec(np.abs(wo.flipped_scores).mean(), 1),
         _dec(m[4], 1), _whole(wo.ratio), _whole(wo.same_beats_flipped.sum()), _whole(len(wo.countries)))))
    figs.append(Figure("word order: rank of the flipped sentence",
                       '"' + f"{country.capital} is the capital of {country.country}." + '" ranks about the {}th of {}',
                       (_sig(np.median(wo.flipped_rank), 2), _whole(wo.n_train))))
    tf = story.tfidf
    kept = tf.kept.mean(axis=1)
    figs.append(Figure(
        "TF-IDF filter",
        "of the exact top {}, the filtered top {} keeps {} on average at m = {}% of the corpus, {} at {}% and {} at "
        "{}% ({} queries)",
        (_whole(tf.k), _whole(tf.k), _dec(kept[0], 1), _whole(100 * tf.fractions[0]), _dec(kept[1], 1),
         _whole(100 * tf.fractions[1]), _dec(kept[2], 1), _whole(100 * tf.fractions[2]),
         _whole(tf.kept.shape[1]))))
    exps = [f.exponent for f in story.fits]
    r2 = min(f.r2 for f in story.fits)
    figs.append(Figure("sparsity", "power-law exponents {}–{} over the top half of the ranks (R² ≥ {})",
                       (_dec(min(exps), 1), _dec(max(exps), 1), Num(r2, decimals=2, floor=True))))
    comp = story.comparison
    pearson = {(a, b): r for a, b, r, _, _ in comp.pairs}
    own = comp.own_fact
    figs.append(Figure(
        "estimators on the LoRA fine-tuning",
        "EK-FAC puts the queried country's three currency sentences on top for {}/{} queries, DataInf for {}%, "
        "identity for {}%; Pearson EK-FAC/DataInf {}, EK-FAC/identity {}, DataInf/identity {}",
        (_whole(own["ekfac"] * comp.n_query), _whole(comp.n_query), _whole(100 * own["datainf"]),
         _whole(100 * own["identity"]), _dec(pearson[("ekfac", "datainf")], 2),
         _dec(pearson[("ekfac", "identity")], 2), _dec(pearson[("datainf", "identity")], 2))))
    n_params = sum(p.numel() for p in story.models.base.parameters())
    cfg = story.models.base.config
    figs.append(Figure("demo model size", "({} blocks, width {}, {}k parameters)",
                       (_whole(cfg.n_layer), _whole(cfg.n_embd), _whole(n_params / 1000))))
    figs.append(Figure("demo corpus", "facts about {} fictional countries", (_whole(len(corpus.countries)),)))
    return figs


def digits_figures(ns: dict[str, Any]) -> list[Figure]:
    """The digits example of "What a score means", from the namespace its README block left."""
    top, res, train = ns["top"], ns["res"], ns["train"]

    def listing(ranked) -> tuple[str, tuple[Num, ...]]:
        nums: list[Num] = []
        for i, s in ranked:
            nums += [_whole(i), _dec(s, 1), _whole(int(train[i][1]))]
        return "[" + ", ".join(["({}, {}, {})"] * len(ranked)) + "]", tuple(nums)

    pro_t, pro_n = listing(top.proponents)
    opp_t, opp_n = listing(top.opponents)
    median = float(res.scores.abs().median())
    return [
        Figure("digits: proponents", "top.proponents] # " + pro_t, pro_n),
        Figure("digits: opponents", "top.opponents] # " + opp_t, opp_n),
        Figure("digits: median |score| (code)", "res.scores.abs().median() # tensor({})", (_dec(median, 4),)),
        Figure("digits: median |score| (text)", "The median |score| over the training set is {}", (_sig(median),),
               float(top.proponents.scores[0]) > 100 * median, "the top score is hundreds of times the median"),
    ]


def cache_figures(ns: dict[str, Any]) -> list[Figure]:
    """The Cache repr quoted in "Fit once, ask many times", from the namespace its README block left."""
    cache_text = repr(ns["an"].cache)
    m = re.search(r"factors=([\d.]+) (\w+), train_side=([\d.]+) (\w+)", cache_text)
    return [Figure("cache repr", "an.cache # Cache(device=cpu, dtype=torch.float32, factors={} " + m.group(2)
                   + ", train_side={} " + m.group(4) + ", ...)",
                   (_dec(float(m.group(1)), 1), _dec(float(m.group(3)), 1)))]


@dataclass
class DiffusionRun:
    style: dict[str, list[float]]  # estimator -> style fraction of the top-10 proponents per query
    spearman: list[float]  # EK-FAC vs DataInf per query
    n_base_params: int
    n_blocks: int
    n_tracked: int
    queries: list[str] = field(default_factory=list)


def diffusion_run(k: int = 10) -> DiffusionRun:
    """The recipe of ``notebooks/03_diffusion.ipynb``: generate the four striped shapes with the LoRA UNet, attribute
    them with EK-FAC and DataInf on the adapter (2 draws per training image, 16 per query). About a minute on a core."""
    import torch

    from infkit import Analysis, tasks
    from infkit.demo import diffusion

    demo = diffusion.load(verbose=False)
    labels = [4, 5, 6, 7]
    generated = diffusion.sample(demo.lora, demo.scheduler, labels, seed=0)
    task = tasks.Diffusion(demo.scheduler, n_draws=2, seed=0, query_draws=16)
    # an index seeds a query's draws (not its content, whose last bits depend on the CPU that sampled it)
    queries = [{"image": generated[j], "class_labels": labels[j], "index": j} for j in range(len(labels))]
    train, is_style = demo.dataset.train, demo.dataset.is_style
    results, style = {}, {}
    an = None
    for est in ("ekfac", "datainf"):
        an = Analysis(demo.lora, task, train, estimator=est, progress=False, batch_size=16).fit()
        results[est] = an.scores(queries)
        style[est] = [sum(bool(is_style[i]) for i in results[est].top(q, k).proponents.indices) / k
                      for q in range(len(labels))]

    def spearman(a, b):
        ranks = [x.argsort().argsort().double() for x in (a, b)]
        return float(torch.corrcoef(torch.stack(ranks))[0, 1])

    rho = [spearman(results["ekfac"].scores[q], results["datainf"].scores[q]) for q in range(len(labels))]
    return DiffusionRun(style, rho, sum(p.numel() for p in demo.base.parameters()), len(an.layers), an.n_params,
                        [diffusion.class_name(c) for c in labels])


def diffusion_figures(run: DiffusionRun) -> list[Figure]:
    """The diffusion demo's figures. A top-10 list of one query is a few near-ties away from another (the query's
    loss is a 16-draw Monte-Carlo estimate), so the README states the means as "centre ± tolerance" (the notebook
    asserts the same intervals), and the check is that the computed value lies inside."""
    ekfac, datainf = (sum(run.style[e]) / len(run.style[e]) for e in ("ekfac", "datainf"))
    rho = sum(run.spearman) / len(run.spearman)
    return [
        Figure("diffusion: style fractions",
               "EK-FAC {} ± 0.15, DataInf {} ± 0.15",
               (Num(ekfac, within=0.15), Num(datainf, within=0.15)),
               min(ekfac, datainf) > 2 * 0.2, "both far above the style subset's 0.20 share"),
        Figure("diffusion: Spearman", "(mean Spearman {} ± 0.1 over the queries)", (Num(rho, within=0.1),)),
        Figure("diffusion: model sizes",
               "class-conditional `UNet2DModel` ({}k parameters) trained on the plain ones, and a rank-8 LoRA "
               "adapter (attention, resnet convolutions, time-embedding projections: {} tracked blocks, {}k "
               "parameters)",
               (_whole(run.n_base_params / 1000), _whole(run.n_blocks), _dec(run.n_tracked / 1000, 1))),
    ]


def all_figures(text: str, story=None, diffusion: DiffusionRun | None = None,
                namespace: Callable[[str], dict[str, Any]] | None = None) -> list[Figure]:
    """Every figure README.md quotes. ``namespace(heading)`` gives the namespace the README block under that heading
    left (default: run it now)."""
    from infkit.demo import single_thread
    from infkit.demo import story as story_module

    namespace = namespace or (lambda heading: run_block(block_under(text, heading)))
    with single_thread():
        story = story if story is not None else story_module.run()
        diffusion = diffusion if diffusion is not None else diffusion_run()
        return (story_figures(story) + digits_figures(namespace("What a score means"))
                + cache_figures(namespace("Fit once, ask many times: the cache, the plan, save and load"))
                + diffusion_figures(diffusion))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README disagrees, listing how")
    args = parser.parse_args(argv)
    import os
    import tempfile

    text = README.read_text()
    with tempfile.TemporaryDirectory() as tmp:  # the README's blocks save to the working directory
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            figures = all_figures(text)
        finally:
            os.chdir(cwd)
    for fig in figures:
        print(f"{fig.name}: {fig.phrase()}")
    problems = check(text, figures)
    if problems:
        print("\nREADME.md disagrees:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1 if args.check else 0
    print(f"\nREADME.md agrees with all {len(figures)} figures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
