"""PNG plots of the evaluations (matplotlib, headless), drawn from the results dicts."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: Path) -> Path:
    """Save atomically: a temporary PNG replaced into place."""
    plt = pyplot()
    tmp = out.with_name(f".{out.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def _length_labels(lengths: list[str]) -> list[str]:
    """Prompt lengths as results keys ("4096") -> tick labels ("4k"; short ones as they are)."""
    return [f"{int(n) // 1024}k" if int(n) >= 1024 else n for n in lengths]


def passkey_heatmap(results: dict, out: Path) -> Path:
    """One accuracy heatmap (depth x length) per mode."""
    plt = pyplot()
    summary = results["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary) + 1, 3.6), squeeze=False,
                             layout="constrained")
    for ax, (mode, s) in zip(axes[0], summary.items()):
        lengths = list(s["grid"])
        depths = list(next(iter(s["grid"].values())))
        grid = [[s["grid"][n][d] for n in lengths] for d in depths]  # [depth][length]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), _length_labels(lengths))
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{mode}: {s['accuracy']:.0%}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    return save_png(fig, out)


def recall_bars(results: dict, out: Path) -> Path:
    """One panel per recall task: accuracy by prompt length, one bar per mode."""
    plt = pyplot()
    summary = results["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(3.4 * len(summary) + 1, 3.4), squeeze=False,
                             layout="constrained")
    for ax, (task, modes) in zip(axes[0], summary.items()):
        width = 0.8 / max(1, len(modes))
        for i, (mode, m) in enumerate(modes.items()):
            lengths = list(m["by_length"])
            ax.bar([j + (i - (len(modes) - 1) / 2) * width for j in range(len(lengths))],
                   list(m["by_length"].values()), width, label=mode)
            ax.set_xticks(range(len(lengths)), _length_labels(lengths))
        ax.set_ylim(0, 1)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(task)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_png(fig, out)


def ppl_curves(results: dict, out: Path) -> Path:
    """Perplexity vs memory size per length bucket (backbone dashed, short-term tier only dotted);
    chunk-size ablation."""
    plt = pyplot()
    totals, lead = results["totals"], results["lead"]
    chunk = totals[lead]["chunk_size"] if lead in totals else None
    sweep = sorted((t["memory_size"], n) for n, t in totals.items()
                   if n.startswith(("longmem-m", "longmem-empty")) and t["chunk_size"] in (0, chunk))
    ablation = sorted((t["chunk_size"], n) for n, t in totals.items()
                      if n.startswith("longmem-m") and t["memory_size"] == totals.get(lead, {}).get("memory_size"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    labels = list(totals[sweep[0][1]]["buckets"]) if sweep else []
    for i, label in enumerate(labels + ["all"]):
        colour = f"C{i}"
        ys = [(totals[n] if label == "all" else totals[n]["buckets"].get(label, {})).get("perplexity")
              for _, n in sweep]
        ax1.plot(range(len(sweep)), ys, marker="o", color=colour, label=f"{label} tokens")
        for name, style in (("backbone", "--"), ("longmem-short-term", ":")):
            base = totals.get(name)
            y = base and (base if label == "all" else base["buckets"].get(label, {})).get("perplexity")
            if y:
                ax1.axhline(y, color=colour, linestyle=style, linewidth=0.8)
    ax1.set_xticks(range(len(sweep)), [f"{m // 1024}k" if m else "empty" for m, _ in sweep])
    ax1.set_xlabel(f"memory size (chunk size {chunk}); dashed: backbone; dotted: short-term tier only")
    ax1.set_ylabel("perplexity")
    ax1.legend(fontsize=7)
    if ablation:
        ax2.plot([c for c, _ in ablation], [totals[n]["perplexity"] for _, n in ablation], marker="o", label="LongMem")
        for j, name in enumerate(n for n in totals if n == "backbone" or n.startswith("window-")):
            ax2.axhline(totals[name]["perplexity"], linestyle="--", linewidth=0.8, label=name, color=f"C{j + 1}")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks([c for c, _ in ablation], [str(c) for c, _ in ablation])
        ax2.legend(fontsize=7)
    ax2.set_xlabel(f"chunk size (memory {totals.get(lead, {}).get('memory_size', 0) // 1024}k tokens)")
    ax2.set_ylabel("perplexity, all tokens")
    return save_png(fig, out)


def chapterbreak_accuracy(results: dict, out: Path) -> Path:
    """Accuracy (95% Wilson interval) against prefix length, one line per mode; chance dashed. With the
    PMI score, a second panel."""
    plt = pyplot()
    summary = results["summary"]
    modes = summary["modes"]
    panels = [("log-likelihood", None)] + ([("PMI score", "pmi")] if any("pmi" in s for s in modes.values()) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False, layout="constrained")
    n_modes = len(modes)
    prefixes = sorted({int(p) for s in modes.values() for p in s["by_prefix"]})
    for ax, (title, key) in zip(axes[0], panels):
        for i, (mode, s) in enumerate(modes.items()):
            s = s if key is None else s.get(key)
            if s is None:  # this mode has no PMI score
                continue
            points = [(int(p), a) for p, a in s["by_prefix"].items() if a["n"]]
            xs = [p * (1 + (i - (n_modes - 1) / 2) * 0.03) for p, _ in points]  # offsets keep error bars apart
            ys = [a["accuracy"] for _, a in points]
            err = [[a["accuracy"] - a["ci95"][0] for _, a in points],
                   [a["ci95"][1] - a["accuracy"] for _, a in points]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}",
                        label=f"{mode} ({s['all']['accuracy']:.0%})")
        ax.axhline(summary["chance"], color="grey", linestyle="--", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlim(prefixes[0] / 1.4, prefixes[-1] * 1.4)  # room around the offsets, also for a single length
        ax.set_xticks(prefixes, [f"{p // 1024}k" if p >= 1024 else str(p) for p in prefixes])
        ax.set_xlabel("prefix length (tokens)")
        ax.set_ylabel("accuracy (95% CI)")
        ax.set_title(f"scored by {title}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    return save_png(fig, out)


def icl_bars(results: dict, out: Path) -> Path:
    """Grouped bars: accuracy per task (+ average) and mode, mean +- std over seeds; one column per k."""
    plt = pyplot()
    summary = results["summary"]
    metrics = [("accuracy", "label-restricted"), ("accuracy_argmax", "full-vocabulary argmax")]
    fig, axes = plt.subplots(2, len(summary), figsize=(6 * len(summary), 7), squeeze=False, layout="constrained")
    for col, (k, modes) in enumerate(summary.items()):
        tasks = list(next(iter(modes.values()))["tasks"])
        width = 0.8 / max(1, len(modes))
        for row, (metric, title) in enumerate(metrics):
            ax = axes[row][col]
            for i, (mode, m) in enumerate(modes.items()):
                ys = [m["tasks"][t][metric]["mean"] for t in tasks] + [m["average"].get(metric, 0.0)]
                err = [m["tasks"][t][metric]["std"] for t in tasks] + [0.0]
                ax.bar([j + (i - (len(modes) - 1) / 2) * width for j in range(len(ys))], ys, width, yerr=err,
                       capsize=2, label=mode)
            ax.set_xticks(range(len(tasks) + 1), tasks + ["average"])
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            ax.set_title(f"{k[1:]} demonstrations in context: {title}", fontsize=10)
            ax.legend(fontsize=7)
    return save_png(fig, out)


def ppl_compare(results: dict, out: Path) -> Path:
    """Perplexity per position bucket (and over all tokens), one bar per run of ``eval compare``."""
    plt = pyplot()
    totals = results["totals"]
    names = [n for n in totals if n in results["leads"] or "/" not in n or n.endswith(("/longmem-empty",
                                                                                          "/longmem-short-term"))]
    labels = [*results["buckets"], "all"]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3, 4.2), layout="constrained")
    width = 0.8 / max(1, len(names))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # one colour per run, none repeated up to 20
    for i, name in enumerate(names):
        t = totals[name]
        ys = [(t if b == "all" else t["buckets"].get(b, {})).get("perplexity", 0.0) for b in labels]
        ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))], ys, width, label=name,
               color=cmap(i % cmap.N))
    ax.set_xticks(range(len(labels)), [f"{b} tokens" if b != "all" else b for b in labels])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_ylim(0.6 * min(totals[n]["perplexity"] for n in names), None)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return save_png(fig, out)


def position_loss(results: list[dict], out: Path) -> Path:
    """Per-position loss curves: each mode's mean NLL per segment against the segment's distance
    from the document start, one panel per file (rows as ``longmem ppl --json`` writes them)."""
    plt = pyplot()

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
    return save_png(fig, out)
