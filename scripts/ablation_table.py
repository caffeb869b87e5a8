"""Summarise scripts/ablations.sh: results/ablations/summary.json and table.md.

Per variant: the validation perplexity with memory, with the memory kept empty and of the bare
backbone (the trainer's end-of-run evaluation, 8,192 tokens of the validation novel), the memory
gain, the bf16 re-read of scripts/ablation_tier.py (memory, short-term tier alone, empty; the
long-term bank's own gain), and the means over the last 10 logged training steps of the recall-span loss (tokens only
memory can predict), the memory's share of the memory block's attention and the gate.
    python scripts/ablation_table.py [--root results/ablations]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarise(folder: Path) -> dict | None:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "validation"]
    if not val:
        return None
    train = [r for r in rows if "split" not in r][-10:]
    mean = lambda key: round(sum(r[key] for r in train) / len(train), 4) if train and key in train[0] else None
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    v = val[-1]
    tier = json.loads((folder / "tier.json").read_text()) if (folder / "tier.json").exists() else {}
    return {"variant": folder.name, "set": run.get("set", ""), "steps": v["step"], "seconds": run.get("seconds"),
            "ppl_memory": round(v["ppl_memory"], 3), "ppl_no_memory": round(v["ppl_no_memory"], 3),
            "ppl_backbone": round(v["ppl_backbone"], 3), "memory_gain": round(v["memory_gain"], 4),
            "bf16_ppl_memory": tier.get("ppl_memory"), "bf16_ppl_tier_only": tier.get("ppl_short_term_only"),
            "bf16_ppl_empty": tier.get("ppl_no_memory"), "bank_gain": tier.get("bank_gain"),
            "recall_loss_last10": mean("recall_loss"), "loss_last10": mean("loss"),
            "memory_share_last10": mean("memory_share"), "gate_mean_last10": mean("gate_mean")}


def bf16(s: dict) -> str:
    keys = ("bf16_ppl_memory", "bf16_ppl_tier_only", "bf16_ppl_empty")
    return " / ".join(f"{s[k]:.2f}" for k in keys) if s["bf16_ppl_memory"] is not None else "-"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("results/ablations"))
    args = parser.parse_args()
    found = [s for d in sorted(args.root.iterdir()) if (d / "metrics.jsonl").exists() and (s := summarise(d))]
    found.sort(key=lambda s: s["ppl_memory"])
    (args.root / "summary.json").write_text(json.dumps(
        {"command": "bash scripts/ablations.sh && python scripts/ablation_table.py", "variants": found}, indent=2) + "\n")
    lines = ["| variant | --set | ppl memory | ppl empty | backbone | memory gain | bf16: memory / tier only / empty "
             "| bank gain | recall-span loss | memory share | gate | min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in found:
        minutes = f"{s['seconds'] / 60:.0f}" if s["seconds"] else ""
        lines.append(f"| {s['variant']} | `{s['set'] or '(base)'}` | {s['ppl_memory']:.2f} | {s['ppl_no_memory']:.2f} "
                     f"| {s['ppl_backbone']:.2f} | {100 * s['memory_gain']:.1f}% | {bf16(s)} "
                     f"| {pct(s['bank_gain'])} | {s['recall_loss_last10']} "
                     f"| {s['memory_share_last10']} | {s['gate_mean_last10']} | {minutes} |")
    (args.root / "table.md").write_text("\n".join(lines) + "\n")
    plot(found, args.root / "ablations.png")
    print("\n".join(lines))


def plot(found: list[dict], out: Path) -> None:
    """Bars per variant: validation perplexity with memory, with the short-term tier alone, empty."""
    from longmem.evals.plots import _pyplot, _save

    rows = [s for s in found if s["bf16_ppl_memory"] is not None]
    if not rows:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.27
    for i, (key, label) in enumerate((("bf16_ppl_memory", "memory (tier + bank)"),
                                      ("bf16_ppl_tier_only", "short-term tier only"), ("bf16_ppl_empty", "empty"))):
        ax.bar([j + (i - 1) * width for j in range(len(rows))], [s[key] for s in rows], width, label=label)
    ax.axhline(rows[0]["ppl_backbone"], color="grey", linestyle="--", linewidth=1, label="backbone")
    ax.set_xticks(range(len(rows)), [s["variant"] for s in rows], rotation=25, ha="right")
    ax.set_ylim(20, max(s["bf16_ppl_empty"] for s in rows) + 2)
    ax.set_ylabel("validation perplexity (8,192 tokens)")
    ax.set_title("50 steps each (0.1M tokens); lower is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)


if __name__ == "__main__":
    main()
