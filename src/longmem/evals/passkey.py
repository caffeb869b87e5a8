"""Passkey retrieval: a 5-digit key stated once, hidden at a depth in N tokens of filler.

Prompt (token ids, each part tokenized on its own): intro, filler up to the needle,
needle ("The pass key is 71432. Remember it. 71432 is the pass key."), the rest of the
filler, question ("What is the pass key? The pass key is") — N tokens in all — then the
answer " 71432". The needle goes to the first sentence or line end at or after ``depth``
of the filler (0: right after the intro, 1: right before the question).

Each mode reads the same prompt (see :mod:`longmem.evals.scoring`): ``memory`` reads
everything before its last window into memory, segment by segment; ``no-memory`` and
``backbone`` see only that same last window; ``window-W`` the backbone with W tokens.
A trial is correct when the model's argmax reproduces every answer token given the
prompt (teacher forcing), which is exactly when greedy decoding would produce the key;
``generate=True`` also decodes greedily and reports the text.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.files import read_text
from longmem.evals.scoring import Scorer, greedy, parse_modes, prepare, score, split_prefix, stream_start, token_ids

log = logging.getLogger(__name__)

DEFAULT_FILLER = "data/books/test/austen-emma.txt"
REPEAT = "repeat"
REPEAT_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
SENTENCE_ENDS = (".", "!", "?", "\n", '"')


@dataclass
class PasskeyConfig:
    """Settings of one passkey evaluation."""

    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384, 32768, 65536])
    """N: prompt lengths in tokens (intro + filler + needle + question)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the needle sits, as a fraction of the filler."""
    trials: int = 5
    """Prompts per (length, depth), each with its own key and filler stretch."""
    modes: list[str] = field(default_factory=lambda: ["memory", "no-memory", "backbone", "window"])
    """Scoring modes: memory, no-memory, backbone, window-W (backbone with a W-token window), window."""
    filler: str = DEFAULT_FILLER
    """UTF-8 prose file the filler is cut from, or 'repeat' for the classic repeated sentences."""
    digits: int = 5
    """Digits of the key."""
    seed: int = 0
    """Seeds keys and filler offsets; trials are identical across modes."""
    intro: str = INTRO
    """Text before the filler ('' for none)."""
    needle: str = NEEDLE
    """The statement hidden in the filler; ``{key}`` marks the key (another wording tests the
    recall without the default's phrasing, which a model may have met in training)."""
    question: str = QUESTION
    """The text after the filler, ending right before the answer."""
    answer: str = ANSWER
    """The expected continuation; ``{key}`` marks the key."""
    generate: bool = False
    """Also decode greedily and report the generated text (one extra pass per answer token)."""

    def __post_init__(self) -> None:
        if not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths):
            raise LongMemError(f"lengths must be positive integers, not {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise LongMemError(f"depths must lie in [0, 1], not {self.depths}")
        if self.trials <= 0:
            raise LongMemError(f"trials={self.trials} must be positive")
        if not 1 <= self.digits <= 18:
            raise LongMemError(f"digits={self.digits} must be between 1 and 18")
        for name in ("needle", "answer"):
            text = getattr(self, name)
            if text.count("{key}") < 1 or text.replace("{key}", "").count("{") or text.replace("{key}", "").count("}"):
                raise LongMemError(f"passkey {name} {text!r} must contain {{key}} and no other braces")
        if not self.question.strip():
            raise LongMemError("the passkey question is empty")


@dataclass
class PasskeyTrial:
    """One prompt scored in one mode."""

    mode: str
    length: int  # N prompt tokens
    depth: float
    trial: int
    passkey: str
    needle_at: int  # token index where the needle starts
    correct: bool  # argmax reproduces every answer token
    digit_accuracy: float  # share of answer tokens whose teacher-forced argmax is right
    answer_logprob: float  # log-probability of the whole answer
    predicted: str  # teacher-forced argmax text (greedy text with generate=True)
    seconds: float


@dataclass
class PasskeyResult:
    """All trials, with accuracy by mode, length and depth."""

    config: PasskeyConfig
    trials: list[PasskeyTrial]

    def accuracy(self, mode: str, length: int | None = None, depth: float | None = None) -> float:
        rows = [t for t in self.trials if t.mode == mode and (length is None or t.length == length)
                and (depth is None or t.depth == depth)]
        return sum(t.correct for t in rows) / len(rows) if rows else float("nan")

    def summary(self) -> dict:
        """{mode: {accuracy, by_length, by_depth, grid[length][depth]}} with string keys."""
        out = {}
        for mode in dict.fromkeys(t.mode for t in self.trials):  # resolved names, e.g. window-2048
            out[mode] = {
                "accuracy": self.accuracy(mode),
                "by_length": {str(n): self.accuracy(mode, length=n) for n in self.config.lengths},
                "by_depth": {f"{d:g}": self.accuracy(mode, depth=d) for d in self.config.depths},
                "grid": {str(n): {f"{d:g}": self.accuracy(mode, n, d) for d in self.config.depths}
                         for n in self.config.lengths},
            }
        return out

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "trials": [asdict(t) for t in self.trials]}


@dataclass
class Prompt:
    """One passkey prompt as token ids."""

    ids: torch.Tensor  # [N]
    answer: torch.Tensor  # [A]
    passkey: str
    needle_at: int


class PromptBuilder:
    """Builds prompts from a tokenizer and a filler token stream."""

    def __init__(self, tokenizer, config: PasskeyConfig):
        self.tokenizer, self.config = tokenizer, config
        text = REPEAT_TEXT * 64 if config.filler == REPEAT else read_text(config.filler)
        self.filler = self.encode(text)
        self.intro = torch.cat([stream_start(tokenizer), self.encode(config.intro)])  # a prompt starts a stream
        self.question = self.encode(config.question)
        if self.filler.shape[0] < 16:
            raise LongMemError(f"filler {config.filler} has only {self.filler.shape[0]} tokens")

    def encode(self, text: str) -> torch.Tensor:
        return token_ids(self.tokenizer, text)

    def build(self, length: int, depth: float, rng: random.Random) -> Prompt:
        key = str(rng.randrange(10 ** (self.config.digits - 1), 10**self.config.digits))
        needle = self.encode(self.config.needle.format(key=key))
        n_fill = length - self.intro.shape[0] - needle.shape[0] - self.question.shape[0]
        if n_fill < 1:
            raise LongMemError(f"length {length} is too short for the intro, needle and question")
        filler = self.stretch(n_fill, rng)
        cut = self.boundary(filler, round(depth * n_fill))
        ids = torch.cat([self.intro, filler[:cut], needle, filler[cut:], self.question])  # [N]
        return Prompt(ids, self.encode(self.config.answer.format(key=key)), key, self.intro.shape[0] + cut)

    def stretch(self, n: int, rng: random.Random) -> torch.Tensor:
        """n consecutive filler tokens from a random offset (wrapping round only when the file is too short)."""
        f = self.filler
        if self.config.filler == REPEAT:
            return f.repeat(n // f.shape[0] + 1)[:n]
        start = rng.randrange(max(1, f.shape[0] - n))
        return torch.cat([f[start:], f.repeat(n // f.shape[0] + 1)])[:n]

    def boundary(self, filler: torch.Tensor, i: int) -> int:
        """The first index >= i (within 64 tokens) right after a sentence or line end."""
        for j in range(i, min(i + 64, filler.shape[0])):
            if j == 0 or self.tokenizer.decode(filler[j - 1 : j]).rstrip(" ").endswith(SENTENCE_ENDS):
                return j
        return i


TrialHook = Callable[[PasskeyTrial, float], None]
"""Called with every newly run trial and the seconds it took."""


@torch.no_grad()
def passkey(model: Scorer, config: PasskeyConfig | None = None, progress: bool = False,
            done: list[PasskeyTrial] | None = None, on_trial: TrialHook | None = None) -> PasskeyResult:
    """Run the passkey evaluation on ``model`` (a LongMemModel or any Scorer).

    ``done``: trials of an interrupted run of the same config, kept instead of run again.
    """
    config = config or PasskeyConfig()
    modes = parse_modes(model, config.modes)
    builder = PromptBuilder(model.tokenizer, config)
    finished = {(d.length, d.depth, d.trial, d.mode): d for d in done or []}
    trials = []
    grid = [(n, di, depth, t) for n in config.lengths for di, depth in enumerate(config.depths)
            for t in range(config.trials)]
    for n, di, depth, t in tqdm(grid, desc="passkey", unit="prompt", disable=not progress, leave=False):
        prompt = None
        for mode in modes:
            if (n, depth, t, mode.name) in finished:
                trials.append(finished[n, depth, t, mode.name])
                continue
            prompt = prompt or builder.build(n, depth, random.Random(f"{config.seed}-{n}-{di}-{t}"))
            trials.append(run_trial(model, mode, prompt, n, depth, t, config.generate))
            log.info("passkey N=%d depth=%g trial %d %s: %s (key %s)", n, depth, t, mode.name,
                     "ok" if trials[-1].correct else repr(trials[-1].predicted), prompt.passkey)
            if on_trial is not None:
                on_trial(trials[-1], trials[-1].seconds)
    return PasskeyResult(config, trials)


def run_trial(model: Scorer, mode, prompt: Prompt, n: int, depth: float, t: int, generate: bool) -> PasskeyTrial:
    start = time.perf_counter()
    head, local = split_prefix(prompt.ids, mode.window, prompt.answer.shape[0])
    ctx = prepare(model, mode, head)
    res = score(model, ctx, local, prompt.answer)
    tokens = greedy(model, ctx, local, prompt.answer.shape[0]) if generate else res.argmax
    hits = sum(int(a == b) for a, b in zip(res.argmax, prompt.answer.tolist()))
    return PasskeyTrial(
        mode=mode.name, length=n, depth=depth, trial=t, passkey=prompt.passkey, needle_at=prompt.needle_at,
        correct=res.exact, digit_accuracy=hits / res.tokens, answer_logprob=res.logprob,
        predicted=model.tokenizer.decode(tokens), seconds=time.perf_counter() - start,
    )


def check_filler(config: PasskeyConfig) -> None:
    """Validate the filler file before loading a model."""
    if config.filler != REPEAT:
        read_text(Path(config.filler))
