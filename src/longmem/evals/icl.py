"""Memory-augmented in-context learning (the LongMem paper's ICL table).

Per task and seed, demonstrations are drawn from the training set without repeats: the
first k go in context (k = 20 and 4: the 4 are the first 4 of the 20) and the next
``memory_demos`` (2,000) are read into memory beforehand, chunk size 2. A test sentence
is scored after ``demo demo ... Review: {text} Sentiment:`` two ways:

* label-restricted: the label word (e.g. " positive") with the highest log-likelihood;
* full-vocabulary argmax (the paper): right when the most likely next token of the whole
  vocabulary is the first token of the true label word.

Modes: ``memory`` (demos in context + memory), ``no-memory`` (same scorer, memory empty,
demos in context only) and ``backbone`` (the frozen backbone, demos in context only).
Accuracy is averaged over seeds (mean and population std) and over tasks, each with a 95% interval: over
seeds (Student's t) where there are two or more, else over the test sentences (Wilson). The memory's
gain over the backbone is paired: per seed (t over the seeds' differences), or with one seed per
sentence (the normal interval of the mean paired difference).
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.evals.icl_data import Task, load_task
from longmem.evals.prefix import SharedPrefix
from longmem.evals.results import Z95, mean_interval, wilson
from longmem.evals.scoring import (Context, Mode, Scorer, parse_modes, prepare, stream_start, token_ids, variant,
                                   window_logits)

log = logging.getLogger(__name__)

TASKS = ["sst-2", "mr", "subj", "sst-5", "mpqa"]
DEFAULT_DATA = "../shared/data/icl"


@dataclass
class IclConfig:
    """Settings of one in-context-learning evaluation."""

    data: str = DEFAULT_DATA
    """Folder holding one sub-folder per task."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Task names (folders of ``data``, or paths to task folders)."""
    demos: list[int] = field(default_factory=lambda: [20, 4])
    """Demonstrations in context (each value is one setting)."""
    memory_demos: int = 2000
    """Demonstrations read into memory in the 'memory' mode."""
    chunk_size: int = 2
    """Memory chunk size for this evaluation (the paper uses 2 for ICL)."""
    seeds: int = 6
    """Seeds (demonstration draws) per task."""
    max_test: int | None = None
    """Score at most this many test examples per task (a fixed random subset; None: all)."""
    modes: list[str] = field(default_factory=lambda: ["memory", "no-memory", "backbone"])
    """Scoring modes: memory, no-memory, backbone, short-term-only (memory demos in the short-term tier only)."""
    labels: dict[str, str] | None = None
    """Label words for tasks without built-in ones, e.g. {'0': 'negative', '1': 'positive'}."""
    template: str | None = None
    """Prompt template with {text} for tasks without a built-in one (default 'Review: {text} Sentiment:')."""
    seed: int = 0
    """Base seed."""
    shared_prefix: bool = True
    """Compute the in-context demonstrations once per seed and mode (incremental decoding) instead
    of again for every test sentence; the same numbers, much faster."""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise LongMemError("no tasks given")
        if not self.demos or any(k < 0 for k in self.demos):
            raise LongMemError(f"demos must be >= 0, not {self.demos}")
        if self.memory_demos < 0 or self.seeds <= 0 or self.chunk_size <= 0:
            raise LongMemError(f"need memory_demos >= 0, seeds > 0 and chunk_size > 0, not "
                               f"{self.memory_demos} / {self.seeds} / {self.chunk_size}")
        if self.max_test is not None and self.max_test <= 0:
            raise LongMemError(f"max_test={self.max_test} must be positive")
        if any(m.startswith("window") for m in self.modes):
            raise LongMemError("ICL modes are memory, no-memory, backbone and short-term-only")


@dataclass
class Draw:
    """One seed's demonstrations of one task."""

    context: list[str]  # the max(demos) in-context demonstrations, formatted
    memory: list[str]  # the memory demonstrations, formatted


def draw(task: Task, config: IclConfig, s: int) -> Draw:
    k = max(config.demos)
    need = k + config.memory_demos
    if need > len(task.train):
        raise LongMemError(f"task {task.name} has {len(task.train)} training examples; {need} are needed")
    order = random.Random(f"{config.seed}-{task.name}-{s}").sample(range(len(task.train)), need)
    demos = [task.demo(*task.train[i]) for i in order]
    return Draw(demos[:k], demos[k:])


def test_subset(task: Task, config: IclConfig) -> list[tuple[str, str]]:
    if config.max_test is None or config.max_test >= len(task.test):
        return task.test
    picked = random.Random(f"{config.seed}-{task.name}-test").sample(range(len(task.test)), config.max_test)
    return [task.test[i] for i in sorted(picked)]


def encode(model: Scorer, text: str) -> torch.Tensor:
    return token_ids(model.tokenizer, text)


@dataclass
class Prediction:
    label: int  # index of the best label word (label-restricted)
    token: int  # argmax over the whole vocabulary after the prompt


LogitsOf = Callable[[torch.Tensor], torch.Tensor]
"""ids [N] placed after the demonstrations -> their next-token logits [N,V]."""


def classify(logits_of: LogitsOf, query: torch.Tensor, label_ids: list[torch.Tensor]) -> Prediction:
    """Label-restricted choice and full-vocabulary argmax after query [Q] (Q >= 1)."""
    q = query.shape[0]
    if all(ids.shape[0] == 1 for ids in label_ids):  # one pass serves every label
        logits = logits_of(query)[-1]  # [V]
        logp = torch.log_softmax(logits, -1)[torch.cat(label_ids).to(logits.device)]  # [labels]
        return Prediction(int(logp.argmax()), int(logits.argmax()))
    scores, token = [], None
    for ids in label_ids:
        logits = logits_of(torch.cat([query, ids[:-1]]))[q - 1 :]  # [C,V]
        scores.append(float(torch.log_softmax(logits, -1).gather(1, ids[:, None].to(logits.device)).sum()))
        token = int(logits[0].argmax()) if token is None else token
    return Prediction(max(range(len(scores)), key=scores.__getitem__), token)


def window_classifier(model: Scorer, ctx: Context, prefix: torch.Tensor, query: torch.Tensor,
                      keep: int) -> tuple[LogitsOf, torch.Tensor, bool]:
    """The slow path: prefix [P] + query [Q] recomputed for every call, cut from the left to
    ``keep`` tokens. Returns (logits_of, the query as kept, whether anything was cut)."""
    full = torch.cat([prefix, query])
    cut = full.shape[0] > keep
    full = full[-keep:]
    q = min(query.shape[0], keep)
    pre, query = full[: full.shape[0] - q], full[full.shape[0] - q :]

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return window_logits(model, ctx, torch.cat([pre, ids]))[pre.shape[0] :]

    return logits_of, query, cut


@dataclass
class SeedScore:
    """Accuracy of one task, seed, k and mode."""

    task: str
    seed: int
    demos: int
    mode: str
    accuracy: float  # label-restricted
    accuracy_argmax: float  # full-vocabulary argmax (paper)
    n: int
    truncated: int  # prompts whose oldest context tokens did not fit the window
    memory_tokens: int
    correct: str = ""  # '1' / '0' per test sentence, in order (label-restricted); '' in older result files


@dataclass
class IclResult:
    """Every (task, seed, k, mode) accuracy; means and stds over seeds, averages over tasks."""

    config: IclConfig
    scores: list[SeedScore]

    def summary(self) -> dict:
        """{k{k}: {mode: {task: {accuracy, accuracy_argmax: {mean, std, per_seed}}, average: {...}}}}."""
        out: dict = {}
        for k in self.config.demos:
            per_k = out.setdefault(f"k{k}", {})
            for mode in self.config.modes:
                rows = [s for s in self.scores if s.demos == k and s.mode == mode]
                tasks = {}
                for task in dict.fromkeys(s.task for s in rows):
                    mine = [s for s in rows if s.task == task]
                    tasks[task] = {m: _stats([getattr(s, m) for s in mine], [s.n for s in mine])
                                   for m in ("accuracy", "accuracy_argmax")}
                average = {m: statistics.fmean(t[m]["mean"] for t in tasks.values()) for m in
                           ("accuracy", "accuracy_argmax")} if tasks else {}
                per_k[mode] = {"tasks": tasks, "average": average}
        return out

    def gain(self, k: int, mode: str = "memory", against: str = "backbone") -> dict:
        """``mode`` minus ``against`` at k demonstrations, in accuracy points, paired by task and seed:
        {accuracy, accuracy_argmax, ci95 (of accuracy; None where it cannot be had), tasks: {task:
        {points, ci95}}}; the average is over tasks (its interval: per seed, over the seeds)."""
        mine = {(s.task, s.seed): s for s in self.scores if s.demos == k and s.mode == mode}
        theirs = {(s.task, s.seed): s for s in self.scores if s.demos == k and s.mode == against}
        pairs = [(mine[key], theirs[key]) for key in mine if key in theirs]
        tasks = list(dict.fromkeys(a.task for a, _ in pairs))
        out: dict = {"tasks": {}}
        for task in tasks:
            mine_t = [(a, b) for a, b in pairs if a.task == task]
            diffs = [100 * (a.accuracy - b.accuracy) for a, b in mine_t]
            out["tasks"][task] = {"points": statistics.fmean(diffs), "ci95": _paired_interval(mine_t, diffs)}
        for m in ("accuracy", "accuracy_argmax"):
            out[m] = statistics.fmean(statistics.fmean(100 * (getattr(a, m) - getattr(b, m)) for a, b in pairs
                                                       if a.task == t) for t in tasks) if tasks else float("nan")
        seeds = sorted({a.seed for a, _ in pairs})
        per_seed = [statistics.fmean(100 * (a.accuracy - b.accuracy) for a, b in pairs if a.seed == s)
                    for s in seeds if all(any(a.seed == s and a.task == t for a, _ in pairs) for t in tasks)]
        interval = mean_interval(per_seed)
        out["ci95"] = list(interval) if interval else None
        return out

    def to_dict(self) -> dict:
        summary = self.summary()
        checks = {}
        for k, modes in summary.items():
            if "memory" in modes and "backbone" in modes and modes["memory"]["average"]:
                checks[k] = self.gain(int(k[1:]))
        return {"summary": summary, "memory_minus_backbone_points": checks,
                "scores": [asdict(s) for s in self.scores]}


def _stats(values: list[float], sentences: list[int]) -> dict:
    """Per-seed accuracies -> mean, population std, the values and a 95% interval of the mean (over seeds;
    with one seed, Wilson over its ``sentences``)."""
    interval = mean_interval(values)
    if interval is None:
        interval = wilson(round(values[0] * sentences[0]), sentences[0])
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "per_seed": values,
            "ci95": [max(0.0, interval[0]), min(1.0, interval[1])]}


def _paired_interval(pairs: list[tuple[SeedScore, SeedScore]], diffs: list[float]) -> list[float] | None:
    """95% interval of one task's mean difference in points: over seeds (t) with two or more; with one seed,
    over its sentences (the normal interval of the mean paired difference; None without per-sentence marks)."""
    interval = mean_interval(diffs)
    if interval is not None:
        return list(interval)
    a, b = pairs[0]
    if not a.correct or len(a.correct) != len(b.correct) or len(a.correct) < 2:
        return None
    d = [int(x) - int(y) for x, y in zip(a.correct, b.correct)]  # per sentence: -1, 0, 1
    n, mean = len(d), statistics.fmean(d)
    half = Z95 * statistics.stdev(d) / n**0.5
    return [100 * (mean - half), 100 * (mean + half)]


ScoreHook = Callable[[SeedScore, float], None]
"""Called with every newly scored (task, seed, k, mode) and the seconds it took."""


@torch.no_grad()
def icl(model: Scorer, config: IclConfig | None = None, progress: bool = False,
        done: list[SeedScore] | None = None, on_score: ScoreHook | None = None) -> IclResult:
    """Run every task, seed, demonstration count and mode (see the module docstring).

    ``done``: scores of an interrupted run of the same config, kept instead of scored again.
    """
    config = config or IclConfig()
    tasks = [load_task(Path(config.data), t, config.labels, config.template) for t in config.tasks]
    modes = parse_modes(model, config.modes)
    finished = {(d.task, d.seed, d.demos, d.mode): d for d in done or []}
    scores = []
    for task in tasks:
        tests = test_subset(task, config)
        label_ids = [encode(model, " " + word) for word in task.labels.values()]
        keys = list(task.labels)
        for s in range(config.seeds):
            if any((task.name, s, k, m.name) not in finished for m in modes for k in config.demos):
                demos = draw(task, config, s)
                memory_ids = (torch.cat([stream_start(model.tokenizer), encode(model, " ".join(demos.memory))])
                              if demos.memory else torch.zeros(0, dtype=torch.long, device="cpu"))
                csz = config.chunk_size
                scorer = variant(model, chunk_size=csz, memory_size=max(csz, -(-memory_ids.shape[0] // csz) * csz))
            for mode in modes:
                start, ctx = time.perf_counter(), None
                for k in config.demos:
                    if (task.name, s, k, mode.name) in finished:
                        scores.append(finished[task.name, s, k, mode.name])
                        continue
                    if ctx is None:
                        ctx = prepare(scorer, mode, memory_ids if mode.reads_memory else memory_ids[:0])
                    scores.append(run_seed(scorer, ctx, mode, task, tests, demos.context[:k], label_ids, keys,
                                           s, config, progress))
                    log.info("%s seed %d k=%d %s: %.3f (argmax %.3f)", task.name, s, k, mode.name,
                             scores[-1].accuracy, scores[-1].accuracy_argmax)
                    if on_score is not None:
                        on_score(scores[-1], time.perf_counter() - start)
                    start = time.perf_counter()
    return IclResult(config, scores)


def run_seed(model: Scorer, ctx: Context, mode: Mode, task: Task, tests: list[tuple[str, str]], context: list[str],
             label_ids: list[torch.Tensor], keys: list[str], s: int, config: IclConfig, progress: bool) -> SeedScore:
    keep = mode.window - (max(ids.shape[0] for ids in label_ids) - 1)  # prompt tokens that fit with a label
    prefix = encode(model, " ".join(context)) if context else torch.zeros(0, dtype=torch.long, device="cpu")
    fast = config.shared_prefix and (mode.backbone_only or getattr(model, "decodes_incrementally", False))
    shared = SharedPrefix(model, ctx, prefix) if fast and 0 < prefix.shape[0] < keep else None
    right = right_argmax = truncated = 0
    marks = []
    desc = f"{task.name} seed {s} k={len(context)} {mode.name}"
    for text, label in tqdm(tests, desc=desc, unit="ex", disable=not progress, leave=False):
        query = encode(model, (" " if context else "") + task.prompt(text))
        if shared is not None and prefix.shape[0] + query.shape[0] <= keep:
            pred = classify(shared.logits, query, label_ids)
        else:
            logits_of, query, cut = window_classifier(model, ctx, prefix, query, keep)
            truncated += cut
            pred = classify(logits_of, query, label_ids)
        gold = keys.index(label)
        right += pred.label == gold
        marks.append("1" if pred.label == gold else "0")
        right_argmax += pred.token == int(label_ids[gold][0])
    memory_tokens = ctx.memory.num_tokens() if ctx.memory is not None else 0
    n = len(tests)
    return SeedScore(task.name, s, len(context), mode.name, right / n, right_argmax / n, n, truncated, memory_tokens,
                     "".join(marks))
