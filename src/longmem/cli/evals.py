"""``longmem eval <name>``: thin commands over the evaluation functions.

Every command validates its inputs, loads the scorer (``--model-kind``, default
``longmem``: the LongMemModel of ``--sidenet``/``--backbone``), runs one library function,
writes ``--out`` (JSON + PNG beside it) and prints a summary (or the JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from longmem.cli.common import load_model, model_args
from longmem.errors import LongMemError
from longmem.evals.partial import PartialLog, partial_path
from longmem.evals.results import EvalRecord, check_out_path, git_commit, write_record



def _list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, not {text!r}") from None

    return parse


def _label_map(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"expected label=word,label=word, not {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``longmem eval passkey|ppl|chapterbreak|icl`` under the top-level parser."""
    harness = sub.add_parser("lm-eval", add_help=False, prefix_chars="\0",
                             help="lm-evaluation-harness with the model 'longmem' registered: "
                                  "longmem lm-eval run --model longmem --model_args memory=NAME --tasks ...")
    harness.add_argument("rest", nargs=argparse.REMAINDER, help="lm-eval's own arguments")
    harness.set_defaults(func=cmd_lm_eval)

    ev = sub.add_parser("eval", help="evaluations: passkey, recall, ppl, chapterbreak, icl (results JSON + plots)")
    names = ev.add_subparsers(title="evaluations")
    ev.set_defaults(func=lambda args: _usage(ev))

    pk = names.add_parser("passkey", help="passkey retrieval: accuracy by needle depth and prompt length")
    pk.add_argument("--lengths", type=_list(int), help="prompt lengths N in tokens (default 2048,...,65536)")
    pk.add_argument("--depths", type=_list(float), help="needle depths in [0,1] (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", type=int, help="prompts per length and depth (default 5)")
    pk.add_argument("--filler", help="prose file for the filler (default data/books/test/austen-emma.txt) "
                                     "or 'repeat' for the repeated 'The grass is green...' sentences")
    pk.add_argument("--needle", help="the hidden statement, with {key} for the key (default: 'The pass key is {key}. "
                                     "Remember it. {key} is the pass key.' on its own line)")
    pk.add_argument("--question", help="the text after the filler, ending right before the answer "
                                       "(default: 'What is the pass key? The pass key is' on a new line)")
    pk.add_argument("--answer", help="the expected continuation, with {key} (default: ' {key}')")
    pk.add_argument("--generate", action="store_true", help="also decode greedily and report the text")
    pk.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(pk, "passkey")
    pk.set_defaults(func=cmd_passkey)

    rc = names.add_parser("recall", help="keyed recall (RULER-style): single, multi-key, multi-value, multi-query "
                                         "needles, variable tracking, fact update")
    rc.add_argument("--tasks", type=_list(str), help="comma-separated tasks (default: all of "
                                                     "single,multikey,multivalue,multiquery,vartrack,update)")
    rc.add_argument("--lengths", type=_list(int), help="prompt lengths N in tokens (default 4096,8192,16384)")
    rc.add_argument("--trials", type=int, help="prompts per task and length (default 20)")
    rc.add_argument("--filler", help="prose file for the filler (default data/books/test/austen-emma.txt)")
    rc.add_argument("--keys", type=int, help="statements with different keys in multikey, multiquery, update "
                                             "(default 4)")
    rc.add_argument("--values", type=int, help="values of the one key in multivalue (default 4)")
    rc.add_argument("--queries", type=int, help="keys asked at once in multiquery (default 2)")
    rc.add_argument("--hops", type=int, help="links of a variable chain in vartrack (default 2)")
    rc.add_argument("--chains", type=int, help="variable chains in vartrack (default 1)")
    rc.add_argument("--digits", type=int, help="digits of a value (default 7)")
    rc.add_argument("--templates", help="the wording: 'ruler' (default), 'heldout' (the project's own, never "
                                        "trained on) or a JSON file of fields of longmem.evals.recall.RecallTemplates")
    rc.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(rc, "recall")
    rc.set_defaults(func=cmd_recall)

    pp = names.add_parser("ppl", help="perplexity of held-out books by length bucket, memory size, chunk size")
    pp.add_argument("files", nargs="*", type=Path, metavar="FILE",
                    help="UTF-8 text files (default: the held-out books data/books/test/*.txt)")
    pp.add_argument("--memory-sizes", type=_list(int), help="memory sizes in tokens (default 0,4096,16384,65536)")
    pp.add_argument("--chunk-sizes", type=_list(int), help="chunk-size ablation (default 1,2,4,8; '' for none)")
    pp.add_argument("--ablation-memory-size", type=int, help="memory size of the ablation (default: the largest)")
    pp.add_argument("--no-backbone", action="store_true", help="skip the backbone on the same segments")
    pp.add_argument("--windows", type=_list(int), help="backbone sliding windows in tokens, e.g. 2048,8192")
    pp.add_argument("--buckets", type=_list(int), help="bucket edges (default 0,1024,4096,16384,65536)")
    pp.add_argument("--max-tokens", type=int, help="read at most this many tokens of each file")
    pp.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(pp, "ppl", modes=False)
    pp.set_defaults(func=cmd_ppl)

    cb = names.add_parser("chapterbreak", help="ChapterBreak-style choice of the true next-chapter opening")
    cb.add_argument("books", nargs="*", type=Path, metavar="BOOK",
                    help=".txt files or folders (default: the held-out books data/books/test/*.txt)")
    cb.add_argument("--prefix-lengths", type=_list(int), help="prefix lengths in tokens (default 4096,8192,16384)")
    cb.add_argument("--suffix-tokens", type=int, help="tokens of every candidate opening (default 128)")
    cb.add_argument("--candidates", type=int, help="candidates per example, the true one included (default 6)")
    cb.add_argument("--max-examples", type=int, help="at most this many boundaries per book and prefix length")
    cb.add_argument("--heading", help="regex of a chapter heading line, e.g. '^(CHAPTER|Chapter) [IVXLC0-9]+' "
                                      "(default: CHAPTER/Chapter/ACT/BOOK + a number)")
    cb.add_argument("--no-pmi", action="store_true",
                    help="skip the second score (log-likelihood after the prefix minus after a blank line)")
    cb.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(cb, "chapterbreak")
    cb.set_defaults(func=cmd_chapterbreak)

    ic = names.add_parser("icl", help="memory-augmented in-context learning (SST-2, MR, Subj, SST-5, MPQA)")
    ic.add_argument("--data", help="folder with one sub-folder per task (default ../shared/data/icl)")
    ic.add_argument("--tasks", type=_list(str), help="task folders (default sst-2,mr,subj,sst-5,mpqa)")
    ic.add_argument("--demos", type=_list(int), help="demonstrations in context, one run each (default 20,4)")
    ic.add_argument("--memory-demos", type=int, help="demonstrations read into memory (default 2000)")
    ic.add_argument("--seeds", type=int, help="seeds per task (default 6)")
    ic.add_argument("--max-test", type=int, help="test examples per task (a fixed random subset; default all)")
    ic.add_argument("--labels", type=_label_map, help="label words of other tasks, e.g. 0=negative,1=positive")
    ic.add_argument("--template", help="prompt of other tasks with {text} (default 'Review: {text} Sentiment:')")
    ic.add_argument("--no-shared-prefix", action="store_true",
                    help="recompute the demonstrations for every test sentence (slow; same numbers)")
    ic.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(ic, "icl")
    ic.set_defaults(func=cmd_icl)

    cp = names.add_parser("compare", help="one table, plot and target check from result files of several models")
    cp.add_argument("files", nargs="+", type=Path, metavar="RESULT",
                    help="results JSON of one evaluation (ppl, chapterbreak or icl); the first is the lead")
    cp.add_argument("--labels", type=_list(str), help="a name per file (default: the file names)")
    cp.add_argument("--out", type=Path, required=True, help="comparison JSON; the plot goes beside it as .png")
    cp.add_argument("--json", action="store_true", help="print the comparison JSON on stdout")
    cp.set_defaults(func=cmd_compare)


RESUME_HELP = ("skip what an interrupted run with the same settings already scored (kept in <out>.partial.jsonl, "
               "which every run writes as it goes and a finished run deletes)")


def _run_resumable(args: argparse.Namespace, name: str, config: Any, model: Any, unit: type,
                   run: Callable[[list, Callable], Any]) -> tuple[Any, float, PartialLog]:
    """run(done units, hook) with its finished units kept in <out>.partial.jsonl as it goes (read back
    with --resume). Returns (result, seconds over every session of the run, the log to finish)."""
    weights = {k: str(getattr(args, k, None)) for k in ("model_kind", "sidenet", "backbone", "dtype")}
    header = {"eval": name, "config": dataclasses.asdict(config), "model": model.config.to_dict(), "weights": weights}
    partial = PartialLog(partial_path(args.out), header, resume=args.resume)
    start = time.perf_counter()
    try:
        result = run([unit(**u) for u in partial.units], lambda u, sec: partial.add(dataclasses.asdict(u), sec))
    finally:
        partial.close()
    return result, time.perf_counter() - start + partial.seconds, partial


def _common(p: argparse.ArgumentParser, name: str, modes: bool = True) -> None:
    if modes:
        p.add_argument("--modes", type=_list(str),
                       help="comma-separated: memory, no-memory, backbone, short-term-only (memory without the "
                            "chunk bank), window-W (the backbone with a W-token window), window (W = what the "
                            "memory mode sees exactly: segment + short-term tier)")
        p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--model-kind", choices=("longmem", "memtrm"),
                   help="what --sidenet holds: LongMem or the MemTRM baseline (default: the kind its directory names)")
    model_args(p)
    p.add_argument("--memory-size", type=int, help="memory capacity in tokens")
    p.add_argument("--chunk-size", type=int, help="memory chunk size")
    p.add_argument("--segment", type=int, help="segment length T (the local window) in tokens")
    p.add_argument("--out", type=Path, default=Path(f"results/{name}.json"),
                   help=f"results JSON (default results/{name}.json); plots go beside it as .png")
    p.add_argument("--json", action="store_true", help="print the results JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _config(cls: type, **fields) -> Any:
    """cls(**fields), leaving out options the user did not give (dataclass defaults apply)."""
    return cls(**{k: v for k, v in fields.items() if v is not None})


def _unescape(text: str | None) -> str | None:
    """A command-line text with '\\n' for line breaks (None stays None)."""
    return None if text is None else text.replace("\\n", "\n")


def _load(args: argparse.Namespace, **overrides) -> Any:
    git_commit()  # the code this run uses, read before it starts (results name it)
    for name in ("memory_size", "chunk_size", "segment"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise LongMemError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")
    config = {"memory_size": args.memory_size, "chunk_size": args.chunk_size, "segment_length": args.segment}
    config |= overrides
    return load_model(args, **{k: v for k, v in config.items() if v is not None})


def _finish(args: argparse.Namespace, name: str, model: Any, config: Any, results: dict, seconds: float,
            plot: Callable | None, summary: str) -> int:
    record = EvalRecord(name, dataclasses.asdict(config), model.config.to_dict(), results,
                        command="longmem " + shlex.join(sys.argv[1:]), seconds=seconds)
    paths = write_record(record, args.out, plot)
    if args.json:
        print(json.dumps(record.to_dict()))
    else:
        print(summary)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    from longmem.evals.passkey import PasskeyConfig, PasskeyTrial, check_filler, passkey
    from longmem.evals.plots import passkey_heatmap

    config = _config(PasskeyConfig, lengths=args.lengths, depths=args.depths, trials=args.trials,
                     modes=args.modes, filler=args.filler, seed=args.seed, generate=args.generate or None,
                     needle=_unescape(args.needle), question=_unescape(args.question), answer=_unescape(args.answer))
    check_filler(config)
    check_out_path(args.out)
    model = _load(args)
    result, seconds, partial = _run_resumable(
        args, "passkey", config, model, PasskeyTrial,
        lambda done, hook: passkey(model, config, progress=not args.quiet, done=done, on_trial=hook))
    lines = [f"{'mode':>14}  accuracy  " + "  ".join(f"{n:>7}" for n in config.lengths)]
    for mode, s in result.summary().items():
        lines.append(f"{mode:>14}  {s['accuracy']:8.1%}  " + "  ".join(f"{v:7.0%}" for v in s["by_length"].values()))
    code = _finish(args, "passkey", model, config, result.to_dict(), seconds, passkey_heatmap, "\n".join(lines))
    partial.finish()
    return code


def cmd_recall(args: argparse.Namespace) -> int:
    from longmem.evals.plots import recall_bars
    from longmem.evals.recall import TEMPLATE_SETS, RecallConfig, RecallTrial, check_filler, recall
    from longmem.files import load_json

    templates = args.templates
    if templates is not None and templates not in TEMPLATE_SETS:
        templates = load_json(Path(templates))
    config = _config(RecallConfig, tasks=args.tasks, lengths=args.lengths, trials=args.trials, modes=args.modes,
                     filler=args.filler, seed=args.seed, keys=args.keys, values=args.values, queries=args.queries,
                     hops=args.hops, chains=args.chains, digits=args.digits, templates=templates)
    check_filler(config)
    check_out_path(args.out)
    model = _load(args)
    result, seconds, partial = _run_resumable(
        args, "recall", config, model, RecallTrial,
        lambda done, hook: recall(model, config, progress=not args.quiet, done=done, on_trial=hook))
    summary = result.summary()
    lines = [f"{'task':>11}  {'mode':>14}  accuracy  " + "  ".join(f"{n:>7}" for n in config.lengths)]
    for task, modes in summary.items():
        for mode, s in modes.items():
            lines.append(f"{task:>11}  {mode:>14}  {s['accuracy']:8.1%}  "
                         + "  ".join(f"{v:7.0%}" for v in s["by_length"].values()))
    code = _finish(args, "recall", model, config, result.to_dict(), seconds, recall_bars, "\n".join(lines))
    partial.finish()
    return code


def cmd_ppl(args: argparse.Namespace) -> int:
    from longmem.files import read_text
    from longmem.evals.plots import ppl_curves
    from longmem.evals.ppl import PplConfig, PplRun, ppl

    files = [str(f) for f in args.files] or None
    config = _config(PplConfig, files=files, memory_sizes=args.memory_sizes, chunk_sizes=args.chunk_sizes,
                     ablation_memory_size=args.ablation_memory_size, backbone=False if args.no_backbone else None,
                     windows=args.windows, buckets=args.buckets, max_tokens=args.max_tokens)
    for path in config.files:
        read_text(path)
    check_out_path(args.out)
    model = _load(args)
    result, seconds, partial = _run_resumable(
        args, "ppl", config, model, PplRun,
        lambda done, hook: ppl(model, config, progress=not args.quiet, done=done, on_run=hook))
    totals = result.totals()
    labels = list(next(iter(totals.values()))["buckets"])
    lines = [f"{'run':>22}  {'all':>8}  " + "  ".join(f"{label:>8}" for label in labels)]
    for name, t in totals.items():
        cells = [f"{t['buckets'][label]['perplexity']:8.3f}" if label in t["buckets"] else f"{'-':>8}"
                 for label in labels]
        lines.append(f"{name:>22}  {t['perplexity']:8.3f}  " + "  ".join(cells))
    code = _finish(args, "ppl", model, config, result.to_dict(), seconds, ppl_curves, "\n".join(lines))
    partial.finish()
    return code


def cmd_chapterbreak(args: argparse.Namespace) -> int:
    from longmem.evals.chapterbreak import ChapterBreakConfig, ChapterBreakItem, book_files, chapterbreak
    from longmem.evals.plots import chapterbreak_accuracy

    config = _config(ChapterBreakConfig, books=[str(b) for b in args.books] or None,
                     prefix_lengths=args.prefix_lengths, suffix_tokens=args.suffix_tokens,
                     candidates=args.candidates, max_examples=args.max_examples, modes=args.modes,
                     heading=args.heading, seed=args.seed, pmi=False if args.no_pmi else None)
    book_files(config.books)
    check_out_path(args.out)
    model = _load(args)
    result, seconds, partial = _run_resumable(
        args, "chapterbreak", config, model, ChapterBreakItem,
        lambda done, hook: chapterbreak(model, config, progress=not args.quiet, done=done, on_item=hook))
    summary = result.summary()
    lines = [f"{'mode':>14}  {'all':>22}  " + "  ".join(f"{'P=' + str(p):>10}" for p in config.prefix_lengths)]
    for mode, s in summary["modes"].items():
        a = s["all"]
        lines.append(f"{mode:>14}  {a['accuracy']:6.1%} [{a['ci95'][0]:5.1%}, {a['ci95'][1]:5.1%}] n={a['n']:<4}  "
                     + "  ".join(f"{v['accuracy']:10.1%}" for v in s["by_prefix"].values())
                     + (f"  pmi {s['pmi']['all']['accuracy']:6.1%}" if "pmi" in s else ""))
    lines.append(f"chance {summary['chance']:.1%}")
    code = _finish(args, "chapterbreak", model, config, result.to_dict(), seconds, chapterbreak_accuracy,
                   "\n".join(lines))
    partial.finish()
    return code


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from longmem.evals import harness
    except ImportError as exc:
        raise LongMemError(f"lm-eval is not installed ({exc}): pip install lm-eval") from None
    return harness.main(args.rest)


def _points(gain: dict) -> str:
    """A gain in accuracy points with its 95% interval, e.g. '+4.4 [-1,+9]'."""
    ci = gain.get("ci95")
    return f"{gain['points']:+.1f}" + (f" [{ci[0]:+.0f},{ci[1]:+.0f}]" if ci else "")


def cmd_icl(args: argparse.Namespace) -> int:
    from longmem.evals.icl import IclConfig, SeedScore, icl
    from longmem.evals.icl_data import load_task
    from longmem.evals.plots import icl_bars

    config = _config(IclConfig, data=args.data, tasks=args.tasks, demos=args.demos, memory_demos=args.memory_demos,
                     seeds=args.seeds, max_test=args.max_test, modes=args.modes, labels=args.labels,
                     template=args.template, seed=args.seed, chunk_size=args.chunk_size,
                     shared_prefix=False if args.no_shared_prefix else None)
    for name in config.tasks:  # every task file must load before a model is
        load_task(Path(config.data), name, config.labels, config.template)
    check_out_path(args.out)
    args.chunk_size = None  # the evaluation sets the chunk size of its own memory
    model = _load(args)
    result, seconds, partial = _run_resumable(
        args, "icl", config, model, SeedScore,
        lambda done, hook: icl(model, config, progress=not args.quiet, done=done, on_score=hook))
    lines = []
    for k, modes in result.summary().items():
        tasks = list(next(iter(modes.values()))["tasks"])
        lines.append(f"{k[1:]} demonstrations in context: label-restricted (full-vocabulary argmax)")
        lines.append(f"{'mode':>10}  " + "  ".join(f"{t:>15}" for t in [*tasks, "average"]))
        for mode, m in modes.items():
            cells = [f"{m['tasks'][t]['accuracy']['mean']:6.1%} ({m['tasks'][t]['accuracy_argmax']['mean']:5.1%})"
                     for t in tasks]
            cells.append(f"{m['average']['accuracy']:6.1%} ({m['average']['accuracy_argmax']:5.1%})")
            lines.append(f"{mode:>10}  " + "  ".join(f"{c:>15}" for c in cells))
        if "memory" in modes and "backbone" in modes:
            gain = result.gain(int(k[1:]))
            cells = [_points(gain["tasks"][t]) for t in tasks] + [_points({"points": gain["accuracy"], **gain})]
            lines.append(f"{'mem - bb':>10}  " + "  ".join(f"{c:>15}" for c in cells))
    code = _finish(args, "icl", model, config, result.to_dict(), seconds, icl_bars, "\n".join(lines))
    partial.finish()
    return code


def cmd_compare(args: argparse.Namespace) -> int:
    from longmem.files import save_json
    from longmem.evals import plots
    from longmem.evals.compare import compare

    check_out_path(args.out)
    result = compare(args.files, args.labels)
    plot = {"ppl": plots.ppl_compare, "chapterbreak": plots.chapterbreak_accuracy, "icl": plots.icl_bars}[result.eval]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(result.merged, args.out.with_suffix(".png"))
    record = result.to_dict() | {"command": "longmem " + shlex.join(sys.argv[1:]), "commit": git_commit()}
    save_json(args.out, record)
    if args.json:
        print(json.dumps(record))
    else:
        print(result.table)
        print(json.dumps(result.checks, indent=1))
        print(f"wrote {args.out}, {png}")
    return 0
