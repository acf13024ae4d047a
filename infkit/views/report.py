"""``infkit report``: one self-contained HTML file with the demo's analyses (:mod:`infkit.demo.story`).

Everything is inline — CSS, figures as base64 PNG — and nothing needs a script or the network to be read. Built only
from the renderers of :mod:`infkit.views.html` and the plots of :mod:`infkit.views.plots`.
"""

from __future__ import annotations

import errno
import getpass
import os
import tempfile
from pathlib import Path

import numpy as np

from infkit.errors import InfkitError
from infkit.views import html as H
from infkit.views.plots import layer_plot, short_layer_name, sparsity_plot

TITLE = "infkit report: which training sequences made the demo model say this?"


def _filesystem(folder: Path) -> tuple[str, str] | None:
    """(mount point, file-system type) of ``folder`` from /proc/self/mounts; None where that cannot be read."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best = None
    where = str(folder.resolve())
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        inside = where == mount or where.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > len(best[0])):
            best = (mount, fields[2])
    return best


VIRTUAL = {"proc", "sysfs", "devtmpfs", "cgroup", "cgroup2", "debugfs", "securityfs", "tracefs", "configfs",
           "devpts", "pstore", "bpf", "mqueue", "hugetlbfs", "fusectl", "binfmt_misc"}


def _why_not_writable(folder: Path, err: OSError) -> str:
    """The real reason no file can be created in ``folder`` (an existing folder), from the error and the folder."""
    code = err.errno
    fs = _filesystem(folder)
    if fs is not None and fs[1] in VIRTUAL:
        return (f"{folder} is on {fs[0]}, a virtual '{fs[1]}' file system of the kernel, where no file can be "
                "created; choose a folder on a disk")
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system; choose a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name to be found: say it without one
            user = "this user"
        return (f"permission denied: {user} may not create files in {folder}; choose another folder or change its "
                "permissions")
    if code == errno.ENOSPC:
        return f"no space is left on the device holding {folder}"
    if code == errno.EDQUOT:
        return f"the disk quota of the device holding {folder} is used up"
    return f"creating a file in {folder} failed: {err.strerror or err}"


def check_writable(path: str | os.PathLike, mkdir: bool = False) -> Path:
    """Fail early (before any work) when the report cannot be written to ``path``; return it resolved.

    Checks that ``path`` is not a folder, that its folder exists (``mkdir=True``: creates it, as ``--mkdir`` does) and
    that a file can be created there — by creating and removing a temporary one, which is what the final write does
    too. The error says what is wrong and what to do."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise InfkitError(f"cannot write the report to {target}: it is a folder; give a file name like report.html")
    folder = target.parent
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InfkitError(f"cannot write the report to {target}: {existing} is a file, not a folder")
    if not folder.is_dir():
        if not mkdir:
            missing = next(p for p in [*reversed(folder.parents), folder] if not p.exists())
            first = "" if missing == folder else f" (nor does {missing})"
            raise InfkitError(f"cannot write the report to {target}: the folder {folder} does not exist{first}. "
                              f"Create it first (mkdir -p {folder}), or pass --mkdir to have it created")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InfkitError(f"cannot write the report to {target}: cannot create the folder {folder}: "
                              f"{_why_not_writable(existing or Path('/'), err)}") from err
    if target.exists() and not os.access(target, os.W_OK):
        raise InfkitError(f"cannot write the report to {target}: the file exists and is read-only")
    try:
        fd, probe = tempfile.mkstemp(prefix=".infkit-report-", suffix=".tmp", dir=folder)
    except OSError as err:
        raise InfkitError(f"cannot write the report to {target}: {_why_not_writable(folder, err)}") from err
    os.close(fd)
    os.unlink(probe)
    return target.resolve()


def write(html_text: str, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file in the same folder, renamed over ``path``."""
    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=".infkit-report-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html_text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target.resolve()


# -- pieces ----------------------------------------------------------------------------------------------------------
def query_view_html(view, special_tokens=(), heading: str = "") -> str:
    """A query, the model's answer, and its top proponents and opponents as token heatmaps on one shared scale."""
    rows = view.rows
    scale = H.scale_of([r.values for r in rows])  # the 99th percentile of |value|: one outlier token does not rule
    score_scale = H.shared_scale([[r.score for r in rows]])
    q = view.query
    answer_ok = view.answer.strip() == q.completion.strip()
    answer = f"model's greedy answer: {view.answer!r} ({'right' if answer_ok else 'differs'})"
    if q.note:
        answer += f"; {q.note}"

    def items(rs):
        return [H.TopItem(r.index, r.score, r.text, r.tokens, r.values, r.kind.replace("_", " ")) for r in rs]

    return (
        H.query_box(q.prompt, q.completion, answer)
        + H.top_list(items(view.proponents), scale, score_scale, special_tokens=special_tokens,
                     caption=f"Top {len(view.proponents)} proponents", heading=heading)
        + H.top_list(items(view.opponents), scale, score_scale, special_tokens=special_tokens,
                     caption=f"Top {len(view.opponents)} opponents", heading=heading)
        + H.legend(scale, "shared by all rows of this query")
    )


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def render(story, timings: dict[str, float] | None = None) -> str:
    """The report's HTML for a :class:`infkit.demo.story.Story`; ``timings`` adds rows to the timing table."""
    from infkit.demo.story import SPECIAL_TOKENS

    models, corpus = story.models, story.models.corpus
    parts: list[str] = []
    n = len(corpus.pretrain)

    intro = (
        H.note(
            f"A GPT-2 with {story.settings['model'].split(': ', 1)[1]} was trained here, from scratch, on {n} "
            f"generated sentences: facts about {len(corpus.countries)} fictional countries in several paraphrases, "
            "one-digit sums, and translations into a toy language (Velish); then a LoRA adapter taught it the "
            f"countries' currencies ({len(corpus.finetune)} sentences). Influence functions (EK-FAC, Grosse et al. "
            "2023) ask which training sentences made it give each answer."
        )
        + H.note(
            "score(q, i) = ∇f(q)ᵀ (G + λI)⁻¹ ∇L(i), with f the query's loss: a positive score (red) means training "
            "more on sentence i lowers the query's loss — a proponent; negative (blue), an opponent. Scores are "
            "unnormalised (units of 1/λ): compare within a query. Each token is coloured by its term s_tᵀ Ṽ a_t, "
            "which comes mostly from predicting the next token — so the word before the answer lights up. One colour "
            "scale is shared by all rows of a query, clipped at the 99th percentile of their |token values| (the "
            "few tokens beyond it are drawn at full colour); hover a token for its raw and normalised value."
        )
        + H.legend(None)
    )
    parts.append(intro)

    # 1-2: queries
    body = []
    for view in story.views:
        body.append(H.section(f"“{view.query.prompt}” → “{view.query.completion.strip()}”",
                              query_view_html(view, SPECIAL_TOKENS), level=3))
    parts.append(H.section("Top influences and token-wise attribution", "".join(body), "queries"))

    # 3: layers
    labels = [v.query.label for v in story.views]
    fig = layer_plot(story.layer_shares, story.layer_names, labels)
    leaders = ", ".join(f"{label}: {short_layer_name(story.layer_names[int(np.argmax(row))])}"
                        for label, row in zip(labels, story.layer_shares))
    rows = [[short_layer_name(name)] + [float(story.layer_shares[q, j]) for q in range(len(labels))]
            for j, name in enumerate(story.layer_names)]
    parts.append(H.section(
        "Layer-wise distribution",
        H.figure(fig, "bar chart of each layer's share of the influence per query",
                 "Each tracked layer's share of the summed influence of a query's top 10 proponents (per-layer scores "
                 f"sum to the total). Largest share: {leaders}.")
        + "<details><summary>Table</summary>"
        + H.table(["layer"] + labels, rows, numeric=[False] + [True] * len(labels), digits=2)
        + "</details>",
        "layers",
    ))

    # 4: sparsity
    fig = sparsity_plot([story.result.scores[q].numpy() for q in range(len(labels))], labels, story.fits)
    rows = [[label, f.exponent, f"{f.first}–{f.last}", f.r2] for label, f in zip(labels, story.fits)]
    parts.append(H.section(
        "Sparsity",
        H.figure(fig, "log-log plot of sorted absolute influence against rank",
                 f"|influence| of all {n} training sequences, sorted, against rank, on log-log axes; dashed: the "
                 "power law |s| ≈ c·rank^(−exponent) fitted by least squares over the top half of the ranks.")
        + H.table(["query", "exponent", "ranks fitted", "R²"], rows, numeric=[False, True, True, True]),
        "sparsity",
    ))

    # 5: word order
    wo = story.word_order
    means = wo.means
    first = corpus.countries[0]
    rows = [[col, float(v)] for col, v in zip(wo.COLUMNS, means)]
    per_country = [[c] + [float(x) for x in wo.table[k]] + [f"{wo.flipped_rank[k]} / {wo.n_train}"]
                   for k, c in enumerate(wo.countries)]
    parts.append(H.section(
        "Word order",
        H.note(
            f"Grosse et al. found that a sequence with the query's key phrases in the other order has far less "
            f"influence. Here each country's capital is stated in three sentences that keep the query's order "
            f"(“The capital of {first.country} is {first.capital}.”, “{first.country} has its capital in "
            f"{first.capital}.”, ...) and two that flip it (“{first.capital} is the capital of {first.country}.”). "
            f"For the query “The capital of X is” → “Y”, over all {len(wo.countries)} countries:"
        )
        + H.table(["sentences about the queried country", "mean score"], rows, numeric=[False, True])
        + H.note(
            f"Same-order paraphrases score {wo.ratio:.0f}× the mean |score| of the flipped sentences; every "
            f"same-order sentence outscores every flipped one for {int(wo.same_beats_flipped.sum())} of "
            f"{len(wo.countries)} countries. The flipped sentence with exactly the query's words ranks "
            f"{int(np.median(wo.flipped_rank))} of {wo.n_train} (median). "
            + ("The finding holds on the demo model, although it answers the flipped question too (it was trained on "
               "both orders)." if wo.ratio > 3 and wo.same_beats_flipped.mean() > 0.75 else
               "The finding does not clearly hold on this model.")
        )
        + "<details><summary>Per country</summary>"
        + H.table(["country", *wo.COLUMNS, "rank of the flipped sentence"], per_country,
                  numeric=[False] + [True] * 6, digits=3)
        + "</details>",
        "word-order",
    ))

    # 6: TF-IDF
    tf = story.tfidf
    rows = [[f"{f:.0%}", m, float(tf.kept[j].mean()), int(tf.kept[j].min()), int(tf.kept[j].max()),
             _seconds(tf.seconds_filtered[j])]
            for j, (f, m) in enumerate(zip(tf.fractions, tf.m))]
    parts.append(H.section(
        "TF-IDF candidate filtering",
        H.note(
            f"infkit.retrieval ranks the {tf.n_train} training sequences by TF-IDF cosine similarity to each query "
            f"(scikit-learn's TfidfVectorizer) and scores only the top m with Analysis.scores(train_indices=...). "
            f"Of the exact top {tf.k} proponents (from scoring everything), how many the filtered top {tf.k} keeps, "
            f"over {tf.kept.shape[1]} queries (the {len(wo.countries)} capital queries and the "
            f"{len(story.queries)} above):"
        )
        + H.table([f"m (share of {tf.n_train})", "candidates", f"kept of top {tf.k} (mean)", "min", "max",
                   "time, all queries"], rows, numeric=[False, True, True, True, True, True], digits=2)
        + H.note(
            f"Cost, honestly: here every train gradient is cached after the fit, so scoring all {tf.n_train} "
            f"sequences for all queries took {_seconds(tf.seconds_full)} and the filter saves nothing (it costs one "
            "call per query). It pays when the train data is streamed (no cache, or over the memory budget): then "
            "only the candidates go through the model. The lexical filter keeps the paraphrases of the same fact "
            "but misses influential sequences that share no words with the query."
        ),
        "tfidf",
    ))

    # 7: estimators
    cmp = story.comparison
    rows = [[f"{a} vs {b}", p, s, o] for a, b, p, s, o in cmp.pairs]
    own = [[est, f"{cmp.own_fact[est]:.0%}", _seconds(cmp.seconds[est])] for est in cmp.estimators]
    parts.append(H.section(
        "EK-FAC vs DataInf vs identity, on the LoRA fine-tuning",
        H.note(
            f"Each estimator scores the {cmp.n_query} currency queries (“The currency of X is the” → the currency) "
            f"against the {cmp.n_train} fine-tuning sentences, tracking the adapter's {cmp.layers} LoRA blocks "
            f"({cmp.params:,} parameters). Correlations are per query, then averaged; top-10 overlap is the shared "
            "share of the 10 strongest proponents. Identity is the plain gradient dot product."
        )
        + H.table(["pair", "Pearson", "Spearman", "top-10 overlap"], rows, numeric=[False, True, True, True], digits=3)
        + H.table(["estimator", "top 3 = the queried country's 3 currency sentences", "fit + score time"], own,
                  numeric=[False, True, True])
        + H.section(f"EK-FAC on the LoRA model: “{story.lora_view.query.prompt}” → "
                    f"“{story.lora_view.query.completion.strip()}”",
                    query_view_html(story.lora_view, SPECIAL_TOKENS), level=3),
        "estimators",
    ))

    # settings and timings
    acc = models.train_info.get("accuracy", {})
    settings_rows = [[k, str(v)] for k, v in story.settings.items()]
    times = dict(story.timings)
    times.update(timings or {})
    timing_rows = [[k, _seconds(v)] for k, v in times.items()]
    parts.append(H.section(
        "Settings and timings",
        H.table(["setting", "value"], settings_rows)
        + H.table(["what the models answer (greedy next word)", "right"], [[k, v] for k, v in acc.items()])
        + H.table(["step", "time"], timing_rows, numeric=[False, True]),
        "settings",
    ))
    subtitle = ("Self-contained: no scripts, no network. Made by infkit " + story.settings["infkit"] +
                " from the embedded demo; rerun with `infkit report`.")
    return H.page(TITLE, "\n".join(parts), subtitle)
