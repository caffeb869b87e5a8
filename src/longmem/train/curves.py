"""The training curve of a run: loss and validation perplexities against step (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

from longmem.evals.plots import pyplot, save_png


def training_curve(metrics: Path, out: Path) -> Path:
    """Training loss and validation perplexities against step, from a metrics.jsonl."""
    plt = pyplot()

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
    return save_png(fig, out)
