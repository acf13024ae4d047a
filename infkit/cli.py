"""The ``infkit`` command (also ``python -m infkit``).

    infkit report [--out build/infkit-report.html] [--mkdir] [--analysis SAVED] [--cache-dir DIR] [--retrain] [-k 5]

``report`` runs the demo's analyses (:mod:`infkit.demo.story`) and writes one self-contained HTML file. It checks
that the output can be written before any work, shows a progress bar while it works and prints the path at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from infkit.errors import InfkitError

DEFAULT_OUT = "infkit-report.html"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infkit", description="Influence functions for notebooks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = sub.add_parser(
        "report",
        help="run the demo analyses and write a self-contained HTML report",
        description="Run the analyses of Grosse et al. 2023 on the embedded demo model (its trained weights ship "
        "with infkit) and write one self-contained HTML file: top influences with token heatmaps, layer and "
        "sparsity plots, word order, TF-IDF filtering, EK-FAC vs DataInf vs identity, settings and timings.",
    )
    report.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"the HTML file to write (default {DEFAULT_OUT}); "
                        "its folder must exist, unless --mkdir")
    report.add_argument("--mkdir", action="store_true", help="create the --out file's folder (and its parents) when "
                        "it does not exist")
    report.add_argument("--analysis", metavar="FOLDER",
                        help="a saved analysis (Analysis.save) of the demo's base model over its pretraining corpus "
                        "to use instead of fitting EK-FAC")
    report.add_argument("--cache-dir", metavar="FOLDER",
                        help="a folder of retrained demo weights (written by --retrain) to use instead of the shipped "
                        "ones; trained there when empty")
    report.add_argument("--retrain", action="store_true", help="train the demo model again on this machine (about "
                        "half a minute) into --cache-dir (default $INFKIT_CACHE_DIR/demo-v<version>, else "
                        "~/.cache/infkit/demo-v<version>); its numbers then differ slightly from the shipped model's")
    report.add_argument("-k", type=int, default=5, help="proponents and opponents shown per query (default 5)")
    report.add_argument("--query", nargs=2, action="append", metavar=("PROMPT", "COMPLETION"),
                        help="a prompt/completion query to show instead of the four default ones (repeatable), "
                        "e.g. --query 'The capital of Veloria is' ' Parth'")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def check_queries_fit(queries, tokenizer, context: int) -> None:
    """Refuse a --query longer than the demo model's context, naming it, before any analysis runs."""
    for q in queries:
        prompt, completion = (len(tokenizer(text, add_special_tokens=False)["input_ids"])
                              for text in (q.prompt, q.completion))
        if prompt + completion > context:
            shown = q.prompt if len(q.prompt) <= 40 else q.prompt[:40] + "…"
            fix = (f"shorten the prompt to at most {context - completion} tokens (the completion has {completion})"
                   if completion < context else f"shorten the completion ({completion} tokens) and the prompt")
            raise InfkitError(f"--query {shown!r} {q.completion!r} is {prompt + completion} tokens, longer than the "
                              f"demo model's context of {context} tokens: {fix}")


def report(args: argparse.Namespace) -> Path:
    from infkit.views.report import check_writable

    out = check_writable(args.out, mkdir=args.mkdir)  # before any work
    if args.k < 1:
        raise InfkitError(f"-k must be >= 1, got {args.k}")
    queries = None
    if args.query:
        from infkit.demo.story import Query

        for prompt, completion in args.query:
            if not completion.strip():
                raise InfkitError(f"--query {prompt!r} {completion!r}: the completion is empty; a query measures the "
                                  "loss of its completion, so give one (e.g. ' Parth')")
        queries = [Query(f"query {k + 1}", p, c) for k, (p, c) in enumerate(args.query)]
    if args.analysis and not Path(args.analysis).is_dir():
        raise InfkitError(f"--analysis {args.analysis}: no such folder (give a folder written by Analysis.save)")

    from tqdm.auto import tqdm

    from infkit.demo import load, story
    from infkit.views.report import render, write

    start = time.perf_counter()
    steps = list(story.STEPS) + ["write the report"]
    bar = tqdm(total=len(steps), desc="infkit report", unit="step", disable=args.no_progress,
               bar_format="infkit report {n_fmt}/{total_fmt} |{bar}| {elapsed} {desc}", file=sys.stderr)
    done = []

    def progress(name: str) -> None:
        if done:
            bar.update(1)
        done.append(name)
        bar.set_description_str(name)

    def train_progress(stage: str, epoch: int, total: int) -> None:
        bar.set_description_str(f"training the {stage}: epoch {epoch}/{total}")

    progress(steps[0])
    t = time.perf_counter()
    models = load(args.cache_dir, retrain=args.retrain, verbose=False, progress=train_progress)
    source = {"shipped": "the shipped weights", "cache": "from the cache"}.get(models.source, "trained now")
    before = {f"load the demo model ({source})":
              time.perf_counter() - t}
    for message in models.messages:
        if "cannot" not in message:  # the warnings already said those
            bar.write(message, file=sys.stderr)
    if queries:
        try:
            check_queries_fit(queries, models.tokenizer, models.base.config.n_positions)
        except InfkitError:
            bar.close()  # the error goes on its own line
            raise
    analysis = None
    if args.analysis:
        from infkit import Analysis

        t = time.perf_counter()
        analysis = Analysis.load(args.analysis, models.base, story.task_for(models), models.corpus.pretrain_texts,
                                 progress=False)
        before["load the saved analysis"] = time.perf_counter() - t
    st = story.run(models, analysis, k=args.k, progress=lambda name: progress(name) if name != steps[0] else None,
                   timings=before, queries=queries)
    progress(steps[-1])
    t = time.perf_counter()
    html_text = render(st, {"write the report": 0.0})
    path = write(html_text, out)
    total = time.perf_counter() - start
    html_text = render(st, {"render and write the report": time.perf_counter() - t, "total": total})
    path = write(html_text, out)
    bar.update(1)
    bar.set_description_str("done")
    bar.close()
    print(f"infkit report: wrote {path} ({len(html_text) / 1024:.0f} KiB) in {total:.0f} s")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warnings.formatwarning = _warning_line  # say "warning: ..." without file and line
    try:
        if args.command == "report":
            report(args)
    except InfkitError as err:
        print(f"infkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
