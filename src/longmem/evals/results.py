"""Result files of the evaluations: one JSON per run (config, command, commit, seconds,
numbers) plus PNG plots, written so that a failed run leaves nothing half-written."""

from __future__ import annotations

import functools
import math
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from longmem.errors import LongMemError
from longmem.files import save_json

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) of a binomial proportion correct / n."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)  # Student's t, two-sided 95%, degrees of freedom 1..30


def t95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (a table to 30, then the
    Cornish-Fisher expansion, within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


def mean_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval (low, high) of the mean of ``values`` (e.g. one accuracy per seed); None for < 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


@functools.cache
def git_commit() -> str:
    """The commit of the checkout holding this package ('+dirty' with local changes), or 'unknown'.

    Read once per process: a long run that calls it at its start reports the code it ran, even if
    the checkout changes before it finishes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@dataclass
class EvalRecord:
    """Everything a result file holds."""

    eval: str  # 'passkey' | 'ppl' | 'chapterbreak' | 'icl'
    config: dict  # the resolved evaluation config
    model: dict  # the scorer's resolved model config
    results: dict  # the numbers
    command: str | None = None  # the command line that made it (None: called from Python)
    commit: str = field(default_factory=git_commit)
    seconds: float = 0.0
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict:
        return asdict(self)


def check_out_path(path: Path) -> Path:
    """Fail before a long run, not after it, if ``path`` cannot take a results JSON."""
    path = Path(path)
    if path.suffix != ".json":
        raise LongMemError(f"--out {path} must end in .json (plots go beside it as .png)")
    if path.is_dir():
        raise LongMemError(f"--out {path} is a directory")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise LongMemError(f"cannot create a directory under {parent}: it is a file")
    return path


def write_record(record: EvalRecord, path: Path, plot: Callable[[dict, Path], Any] | None = None) -> list[Path]:
    """Plot(s) beside ``path`` (``<stem>.png``) first, then the JSON, each atomically."""
    path = check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if plot is not None:
        png = path.with_suffix(".png")
        plot(record.results, png)
        written.append(png)
    save_json(path, record.to_dict())
    return [path, *written]
