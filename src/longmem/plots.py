"""PNG plots of training runs and evaluations (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from .evals.plots import _pyplot, _save  # headless pyplot, atomic PNG writes


def training_curve(metrics: Path, out: Path) -> Path:
    """Training loss and validation perplexities against step, from a metrics.jsonl."""
    plt = _pyplot()

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "ppl_memory" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats)")
    ax1.legend()
    for key, label in (("ppl_memory", "with memory"), ("ppl_no_memory", "empty memory"),
                       ("ppl_backbone", "backbone")):
        ax2.plot([r["step"] for r in val], [r[key] for r in val], marker="o", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation perplexity")
    ax2.legend()
    fig.tight_layout()
    return _save(fig, out)


def position_loss(results: list[dict], out: Path) -> Path:
    """Per-position loss curves: each mode's mean NLL per segment against the segment's distance
    from the document start, one panel per file (rows as ``longmem ppl --json`` writes them)."""
    plt = _pyplot()

    files = list(dict.fromkeys(r["file"] for r in results))
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4), squeeze=False)
    for ax, name in zip(axes[0], files):
        for row in (r for r in results if r["file"] == name and r.get("segment_nll")):
            seg = row["segment_length"]
            ax.plot([i * seg for i in range(len(row["segment_nll"]))], row["segment_nll"], label=row["mode"])
        ax.set_title(Path(name).stem)
        ax.set_xlabel("segment start (tokens from the document start)")
        ax.set_ylabel("mean NLL (nats)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
