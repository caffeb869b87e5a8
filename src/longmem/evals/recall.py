"""Keyed recall (RULER-style): statements hidden in filler text, then a question about some of them.

Six tasks, each a prompt of N tokens (intro + filler with the statements at random depths + question +
answer prefix) followed by greedy decoding of the answer:

* ``single``      one statement "One of the special magic numbers for {key} is: {value}."; ask for it;
* ``multikey``    ``keys`` statements of that form with different keys; ask for one of them;
* ``multivalue``  ``values`` statements with the same key; ask for all (scored as a set);
* ``multiquery``  ``keys`` statements with different keys; ask for ``queries`` of them (as a set);
* ``vartrack``    a chain "VAR A = 12345." "VAR B = A." ... (``hops`` links, ``chains`` chains);
                  ask which variables hold the first chain's value (as a set);
* ``update``      ``keys`` statements, then the asked key restated with a new value further on; the
                  latest value is the answer.

The default templates are RULER's (Hsieh et al., 2024); ``RecallTemplates`` takes a user's own wording
(every field a ``str.format`` template of the placeholders it names). Keys are adjective-noun pairs from
this module's word lists, values 7-digit numbers, variable names 5 capital letters, all drawn from the
seed, so every mode reads the same prompts.

Scoring (RULER's ``string_match_all`` and stricter): the first line of the generated text is parsed into items (numbers, or variable names); ``recall`` is the share of expected items found in it,
``correct`` that every expected item is found and, for a one-answer task, that the first item is it
(an answer that lists every number it saw is not a recall; an update answered with the old value is
wrong). Modes are those of :mod:`longmem.evals.scoring`: ``memory`` reads everything before its last
window into memory; ``backbone`` / ``no-memory`` see that last window only; ``window-W`` the backbone
with the last W tokens (the whole prompt when it fits its native context).
"""

from __future__ import annotations

import logging
import random
import re
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from longmem.errors import LongMemError
from longmem.evals.passkey import DEFAULT_FILLER, SENTENCE_ENDS
from longmem.evals.scoring import Scorer, decode, parse_modes, prepare, split_prefix, stream_start, token_ids
from longmem.files import read_text

log = logging.getLogger(__name__)

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "update")
ADJECTIVES = ("amber ancient bitter brave bright calm clever cold crimson curious dark dusty eager early "
              "faint fierce fragile gentle giant golden green hollow humble icy jolly lazy little lively lonely "
              "loud lucky marble mellow misty modest narrow noble odd orange pale patient plain polite proud "
              "purple quiet rapid restless rough round rusty sacred scarlet shallow sharp shiny silent silver "
              "simple sleepy slow smooth soft solid sour spare steady sticky stormy strange sturdy sudden sunny "
              "swift tall tender thin tidy tiny tired velvet violet warm wary weary wicked wild windy wise "
              "wooden young yellow zealous").split()
NOUNS = ("acorn anchor apple arrow badger barrel basket beacon bell blanket bottle bridge bucket butter cabin "
         "camel candle canyon carpet castle cellar chimney cloud compass copper cottage crayon crown cup "
         "dolphin drum eagle engine falcon feather fence fiddle forest fountain garden giraffe glacier goblet "
         "harbor hammer helmet hill island jacket kettle ladder lantern lemon lizard magnet maple meadow "
         "mirror mountain needle oak orchard otter oyster paddle parrot pebble pepper piano pillow pine "
         "planet pocket pond puzzle quarry rabbit ribbon river rocket saddle sail shovel spoon squirrel "
         "stable statue stone sugar tiger timber tower trumpet tulip tunnel turtle valley violin wagon "
         "walnut whistle window wolf zebra").split()
_ITEM = {"number": re.compile(r"\d+"), "name": re.compile(r"\b[A-Z]{5}\b")}


@dataclass
class RecallTemplates:
    """The wording of every part of a recall prompt (defaults: RULER's). ``{key}``, ``{value}``,
    ``{keys}`` (the asked keys joined by ``and``), ``{name}``, ``{source}``, ``{count}`` are filled in."""

    intro: str = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.\n")
    needle: str = "One of the special magic numbers for {key} is: {value}."
    question: str = "What is the special magic number for {key} mentioned in the provided text?"
    answer: str = " The special magic number for {key} mentioned in the provided text is"
    question_all: str = "What are all the special magic numbers for {keys} mentioned in the provided text?"
    answer_all: str = " The special magic numbers for {keys} mentioned in the provided text are"
    update: str = "The special magic number for {key} has changed: it is now {value}."
    var_intro: str = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    var_value: str = "VAR {name} = {value}."
    var_copy: str = "VAR {name} = VAR {source}."
    var_question: str = "Question: Find all variables that are assigned the value {value} in the text above."
    var_answer: str = (" Answer: According to the chain(s) of variable assignment in the text above, {count} "
                       "variables are assigned the value {value}, they are:")

    def __post_init__(self) -> None:
        need = {"needle": ("key", "value"), "question": ("key",), "question_all": ("keys",),
                "update": ("key", "value"), "var_value": ("name", "value"), "var_copy": ("name", "source"),
                "var_question": ("value",)}  # what a statement or a question cannot do without
        allowed = {"key", "value", "keys", "name", "source", "count"}
        for f in fields(self):
            text = getattr(self, f.name)
            if not isinstance(text, str):
                raise LongMemError(f"recall template {f.name} must be a string, not {type(text).__name__}")
            try:
                names = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
            except ValueError as e:
                raise LongMemError(f"recall template {f.name} {text!r}: {e}") from None
            if names - allowed:
                raise LongMemError(f"recall template {f.name} {text!r} names {sorted(names - allowed)}; "
                                   f"allowed: {sorted(allowed)}")
            missing = [n for n in need.get(f.name, ()) if n not in names]
            if missing:
                raise LongMemError(f"recall template {f.name} {text!r} must contain {{{missing[0]}}}")


HELD_OUT_TEMPLATES = RecallTemplates(
    intro="Below, a few secret codes are scattered through a long passage. Keep them in mind: questions about "
          "them follow.\n",
    needle="The secret code assigned to {key} reads as follows: {value}.",
    question="Which secret code was assigned to {key} in the passage above?",
    answer=" The secret code assigned to {key} in the passage above reads as follows:",
    question_all="List every secret code assigned to {keys} in the passage above.",
    answer_all=" The secret codes assigned to {keys} in the passage above read as follows:",
    update="A correction was issued: the secret code assigned to {key} now reads as follows: {value}.",
    var_intro="Follow the chain of assignments hidden in the passage below.\n\n",
    var_value="LET {name} BE {value}.",
    var_copy="LET {name} BE {source}.",
    var_question="Question: which names end up holding {value} in the passage above?",
    var_answer=" Answer: the {count} names holding {value} are:",
)
"""The project's own wording, never used in training or tuning: recall that holds only for RULER's wording
would be learned phrasing, not memory (``--templates heldout``)."""
TEMPLATE_SETS = {"ruler": RecallTemplates(), "heldout": HELD_OUT_TEMPLATES}


@dataclass
class RecallConfig:
    """Settings of one recall evaluation."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Which tasks (see the module docstring)."""
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    """Prompt lengths N in tokens."""
    trials: int = 20
    """Prompts per (task, length)."""
    modes: list[str] = field(default_factory=lambda: ["memory", "no-memory", "window-8192"])
    """Scoring modes: memory, no-memory, backbone, short-term-only, window-W, window."""
    filler: str = DEFAULT_FILLER
    """UTF-8 prose file the filler is cut from."""
    seed: int = 0
    """Seeds keys, values, depths and filler offsets."""
    keys: int = 4
    """Statements with different keys (multikey, multiquery, update)."""
    values: int = 4
    """Values of the one key (multivalue)."""
    queries: int = 2
    """Keys asked for at once (multiquery)."""
    hops: int = 2
    """Links of a variable chain after its first assignment (vartrack)."""
    chains: int = 1
    """Variable chains (vartrack; the question asks for the first one's value)."""
    digits: int = 7
    """Digits of a value."""
    templates: RecallTemplates = field(default_factory=RecallTemplates)
    """The wording (default: RULER's); a dict of fields, or a name of ``TEMPLATE_SETS``."""

    def __post_init__(self) -> None:
        if isinstance(self.templates, str):
            if self.templates not in TEMPLATE_SETS:
                raise LongMemError(f"templates {self.templates!r} is not one of {', '.join(TEMPLATE_SETS)} "
                                   "(or a JSON file of wordings)")
            self.templates = TEMPLATE_SETS[self.templates]
        if isinstance(self.templates, dict):
            unknown = sorted(set(self.templates) - {f.name for f in fields(RecallTemplates)})
            if unknown:
                raise LongMemError(f"recall templates have no field {', '.join(unknown)}")
            self.templates = RecallTemplates(**self.templates)
        bad = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or bad:
            raise LongMemError(f"recall tasks must be among {', '.join(TASKS)}, not {bad or self.tasks}")
        if len(set(self.tasks)) != len(self.tasks):
            raise LongMemError(f"duplicate recall tasks in {self.tasks}")
        if not self.lengths or any(not isinstance(n, int) or n <= 0 for n in self.lengths):
            raise LongMemError(f"lengths must be positive integers, not {self.lengths}")
        for name, low, high in (("trials", 1, 10**6), ("keys", 1, 64), ("values", 1, 64), ("queries", 1, 64),
                                ("hops", 1, 32), ("chains", 1, 16), ("digits", 3, 18)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise LongMemError(f"{name}={value!r} must be an integer between {low} and {high}")
        if self.queries > self.keys:
            raise LongMemError(f"queries={self.queries} cannot exceed keys={self.keys}")


@dataclass
class Task:
    """One prompt's parts as text: statements in order, the question (with its answer prefix), answers."""

    intro: str
    statements: list[str]
    question: str
    expected: list[str]
    kind: str  # what the answer's items are: 'number' | 'name'
    ordered: bool  # one answer: the first item must be it


class TaskMaker:
    """Draws the statements, question and answers of each task from a random generator."""

    def __init__(self, config: RecallConfig):
        self.c, self.t = config, config.templates

    def __call__(self, task: str, rng: random.Random) -> Task:
        return getattr(self, task)(rng)

    def value(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            v = str(rng.randrange(10 ** (self.c.digits - 1), 10**self.c.digits))
            if v not in taken:
                taken.add(v)
                return v

    def keys(self, rng: random.Random, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            if k not in out:
                out.append(k)
        return out

    def _ask(self, key: str, value: str, statements: list[str]) -> Task:
        q = "\n" + self.t.question.format(key=key) + self.t.answer.format(key=key)
        return Task(self.t.intro, statements, q, [value], "number", True)

    def _ask_all(self, keys: list[str], expected: list[str], statements: list[str]) -> Task:
        joined = " and ".join([", ".join(keys[:-1]), keys[-1]]) if len(keys) > 1 else keys[0]
        q = "\n" + self.t.question_all.format(keys=joined) + self.t.answer_all.format(keys=joined)
        return Task(self.t.intro, statements, q, expected, "number", False)

    def single(self, rng: random.Random) -> Task:
        key, value = self.keys(rng, 1)[0], self.value(rng, set())
        return self._ask(key, value, [self.t.needle.format(key=key, value=value)])

    def multikey(self, rng: random.Random) -> Task:
        keys, taken = self.keys(rng, self.c.keys), set()
        values = [self.value(rng, taken) for _ in keys]
        asked = rng.randrange(len(keys))
        return self._ask(keys[asked], values[asked], [self.t.needle.format(key=k, value=v) for k, v in zip(keys, values)])

    def multivalue(self, rng: random.Random) -> Task:
        key, taken = self.keys(rng, 1)[0], set()
        values = [self.value(rng, taken) for _ in range(self.c.values)]
        return self._ask_all([key], values, [self.t.needle.format(key=key, value=v) for v in values])

    def multiquery(self, rng: random.Random) -> Task:
        keys, taken = self.keys(rng, self.c.keys), set()
        values = [self.value(rng, taken) for _ in keys]
        asked = sorted(rng.sample(range(len(keys)), self.c.queries))
        statements = [self.t.needle.format(key=k, value=v) for k, v in zip(keys, values)]
        return self._ask_all([keys[i] for i in asked], [values[i] for i in asked], statements)

    def update(self, rng: random.Random) -> Task:
        keys, taken = self.keys(rng, self.c.keys), set()
        values = [self.value(rng, taken) for _ in keys]
        asked, new = rng.randrange(len(keys)), self.value(rng, taken)
        statements = [self.t.needle.format(key=k, value=v) for k, v in zip(keys, values)]
        statements.append(self.t.update.format(key=keys[asked], value=new))  # after every first statement
        return self._ask(keys[asked], new, statements)

    def vartrack(self, rng: random.Random) -> Task:
        taken: set[str] = set()
        names: list[str] = []
        while len(names) < self.c.chains * (self.c.hops + 1):
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.append(n)
        chains = [names[i * (self.c.hops + 1):(i + 1) * (self.c.hops + 1)] for i in range(self.c.chains)]
        values = [self.value(rng, taken) for _ in chains]
        links = [[self.t.var_value.format(name=c[0], value=v)]
                 + [self.t.var_copy.format(name=c[j], source=c[j - 1]) for j in range(1, len(c))]
                 for c, v in zip(chains, values)]
        statements = []  # the chains interleaved at random, each in its own order
        order = [i for i, chain in enumerate(links) for _ in chain]
        rng.shuffle(order)
        nxt = [0] * len(links)
        for i in order:
            statements.append(links[i][nxt[i]])
            nxt[i] += 1
        q = ("\n" + self.t.var_question.format(value=values[0])
             + self.t.var_answer.format(value=values[0], count=len(chains[0])))
        return Task(self.t.var_intro, statements, q, chains[0], "name", False)


@dataclass
class RecallTrial:
    """One prompt scored in one mode."""

    task: str
    mode: str
    length: int  # N prompt tokens
    trial: int
    expected: list[str]
    predicted: str  # the first line of the greedy answer
    correct: bool
    recall: float  # share of expected items in the answer
    depths: list[float]  # where each statement starts, as a fraction of the prompt
    seconds: float


@dataclass
class RecallResult:
    """All trials, with accuracy by task, mode and length."""

    config: RecallConfig
    trials: list[RecallTrial]

    def accuracy(self, task: str, mode: str, length: int | None = None) -> float:
        rows = [t for t in self.trials if t.task == task and t.mode == mode and (length is None or t.length == length)]
        return sum(t.correct for t in rows) / len(rows) if rows else float("nan")

    def summary(self) -> dict:
        """{task: {mode: {accuracy, recall, n, by_length}}} with string keys."""
        out: dict = {}
        for task in self.config.tasks:
            out[task] = {}
            for mode in dict.fromkeys(t.mode for t in self.trials):
                rows = [t for t in self.trials if t.task == task and t.mode == mode]
                if not rows:
                    continue
                out[task][mode] = {
                    "accuracy": self.accuracy(task, mode), "recall": sum(t.recall for t in rows) / len(rows),
                    "n": len(rows),
                    "by_length": {str(n): self.accuracy(task, mode, n) for n in self.config.lengths},
                }
        return out

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "trials": [asdict(t) for t in self.trials]}


@dataclass
class Prompt:
    """One recall prompt as token ids."""

    ids: torch.Tensor  # [N]
    task: Task
    depths: list[float]


class PromptBuilder:
    """Lays a task's statements into filler: token ids of N tokens in all."""

    def __init__(self, tokenizer, config: RecallConfig):
        self.tokenizer, self.config = tokenizer, config
        self.filler = self.encode(read_text(config.filler))
        if self.filler.shape[0] < 256:
            raise LongMemError(f"filler {config.filler} has only {self.filler.shape[0]} tokens (256 at least)")
        self.ends = self._sentence_ends()

    def encode(self, text: str) -> torch.Tensor:
        return token_ids(self.tokenizer, text)

    def _sentence_ends(self) -> torch.Tensor:
        """Indices j of the filler right after a sentence or line end (where a statement may go)."""
        pieces = self.tokenizer.convert_ids_to_tokens(self.filler.tolist())
        ok = [j + 1 for j, p in enumerate(pieces) if self.tokenizer.convert_tokens_to_string([p]).rstrip(" ")
              .endswith(SENTENCE_ENDS)]
        return torch.tensor(ok, dtype=torch.long, device="cpu")

    def build(self, task: Task, length: int, rng: random.Random) -> Prompt:
        intro = torch.cat([stream_start(self.tokenizer), self.encode(task.intro)])
        question = self.encode(task.question)
        statements = [self.encode(" " + s) for s in task.statements]
        n_fill = length - intro.shape[0] - question.shape[0] - sum(s.shape[0] for s in statements)
        if n_fill < len(statements) * 8:
            raise LongMemError(f"length {length} is too short for this task's {len(statements)} statements")
        start = rng.randrange(max(1, self.filler.shape[0] - n_fill))
        fill = torch.cat([self.filler[start:], self.filler.repeat(n_fill // self.filler.shape[0] + 1)])[:n_fill]
        ends = self.ends[(self.ends > start) & (self.ends < start + n_fill)] - start  # boundaries inside fill
        if ends.numel() < len(statements):
            ends = torch.arange(1, n_fill, device="cpu")
        cuts = sorted(int(ends[i]) for i in rng.sample(range(ends.numel()), len(statements)))
        parts, depths, a = [intro], [], 0
        for cut, s in zip(cuts, statements):
            parts.append(fill[a:cut])
            depths.append(sum(p.shape[0] for p in parts) / length)
            parts.append(s)
            a = cut
        parts += [fill[a:], question]
        return Prompt(torch.cat(parts), task, depths)


def answer_tokens(task: Task, digits: int) -> int:
    """Tokens to decode: room for every expected item with separators (digits may be one token each)."""
    per = digits + 3 if task.kind == "number" else 6
    return len(task.expected) * per + 8


def grade(task: Task, text: str) -> tuple[bool, float]:
    """The answer's first line -> (correct, recall)."""
    items = _ITEM[task.kind].findall(text)
    found = sum(e in items for e in task.expected) / len(task.expected)
    if task.ordered:
        return bool(items) and items[0] == task.expected[0], found
    return found == 1.0, found


TrialHook = Callable[[RecallTrial, float], None]
"""Called with every newly run trial and the seconds it took."""


@torch.no_grad()
def recall(model: Scorer, config: RecallConfig | None = None, progress: bool = False,
           done: list[RecallTrial] | None = None, on_trial: TrialHook | None = None) -> RecallResult:
    """Run the recall suite on ``model``. ``done``: trials of an interrupted run of the same config."""
    config = config or RecallConfig()
    modes = parse_modes(model, config.modes)
    builder, maker = PromptBuilder(model.tokenizer, config), TaskMaker(config)
    finished = {(d.task, d.length, d.trial, d.mode): d for d in done or []}
    trials = []
    grid = [(task, n, t) for task in config.tasks for n in config.lengths for t in range(config.trials)]
    for task, n, t in tqdm(grid, desc="recall", unit="prompt", disable=not progress, leave=False):
        prompt = None
        for mode in modes:
            if (task, n, t, mode.name) in finished:
                trials.append(finished[task, n, t, mode.name])
                continue
            if prompt is None:
                rng = random.Random(f"{config.seed}-{task}-{n}-{t}")
                prompt = builder.build(maker(task, rng), n, rng)
            trials.append(run_trial(model, mode, prompt, task, n, t, config.digits))
            log.info("recall %s N=%d trial %d %s: %r (expected %s)", task, n, t, mode.name,
                     trials[-1].predicted, prompt.task.expected)
            if on_trial is not None:
                on_trial(trials[-1], trials[-1].seconds)
    return RecallResult(config, trials)


def run_trial(model: Scorer, mode, prompt: Prompt, task: str, n: int, t: int, digits: int) -> RecallTrial:
    start = time.perf_counter()
    room = answer_tokens(prompt.task, digits)
    head, local = split_prefix(prompt.ids, mode.window, room)
    ctx = prepare(model, mode, head)
    tokens = decode(model, ctx, local, room)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip().split("\n")[0]  # its first line
    correct, found = grade(prompt.task, text)
    return RecallTrial(task=task, mode=mode.name, length=n, trial=t, expected=prompt.task.expected,
                       predicted=text.strip(), correct=correct, recall=found, depths=prompt.depths,
                       seconds=time.perf_counter() - start)


def check_filler(config: RecallConfig) -> None:
    """Validate the filler file before loading a model."""
    read_text(config.filler)
