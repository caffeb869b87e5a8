"""One table, plot and target check from several result files of the same evaluation.

Each model (LongMem, MemTRM, ...) is evaluated by its own ``longmem eval`` run; ``compare`` puts
their numbers side by side. Runs are renamed ``<label>/<mode>``; the frozen baselines (the backbone and
its windows), identical in every file, are kept once, unlabelled, from the first file that has them.
The first file is the lead: its memory run is checked against every baseline and every other
model's memory run, as the issue's targets read (ppl: lower in every bucket; chapterbreak and icl:
accuracy points above the backbone and above the others).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from longmem.errors import LongMemError

KINDS = ("ppl", "chapterbreak", "icl")
# The settings that decide what a number means: files that differ in one are not measured alike.
SETTINGS = {
    "ppl": ("files", "max_tokens", "buckets"),
    "chapterbreak": ("books", "heading", "candidates", "max_examples", "prefix_lengths", "seed", "suffix_tokens"),
    "icl": ("data", "tasks", "demos", "memory_demos", "chunk_size", "max_test", "seed", "seeds", "template"),
}


def is_baseline(mode: str) -> bool:
    """The frozen backbone's runs: the same numbers whichever SideNet a file evaluated."""
    return mode == "backbone" or mode.startswith("window-")


@dataclass
class Comparison:
    eval: str
    labels: list[str]
    files: list[str]
    merged: dict  # the results of one evaluation, runs renamed: plots read it as they read one file's
    table: str  # markdown
    checks: dict
    differences: dict  # {setting: {label: value}} where the files were not run alike; {} if they were

    def to_dict(self) -> dict:
        return {"eval": self.eval, "labels": self.labels, "files": self.files, "checks": self.checks,
                "differences": self.differences, "table": self.table, "results": self.merged}


def load_records(paths: list[Path]) -> list[dict]:
    """Result files of one evaluation kind, or a LongMemError naming the bad one."""
    records = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise LongMemError(f"cannot read results file {path}: {e}") from None
        if not isinstance(record, dict) or record.get("eval") not in KINDS or "results" not in record:
            raise LongMemError(f"{path} is not a ppl, chapterbreak or icl results file of 'longmem eval'")
        records.append(record)
    kinds = {r["eval"] for r in records}
    if len(kinds) > 1:
        raise LongMemError(f"the files hold different evaluations ({', '.join(sorted(kinds))}): compare one kind")
    return records


def _merge(named: list[tuple[str, dict]]) -> dict:
    """{label/mode: value} over the files; baselines once, under their own name."""
    out: dict = {}
    for label, modes in named:
        for mode, value in modes.items():
            if is_baseline(mode):
                out.setdefault(mode, value)
            else:
                out[f"{label}/{mode}"] = value
    return out


def compare(paths: list[Path], labels: list[str] | None = None) -> Comparison:
    records = load_records(paths)
    labels = labels or [Path(p).stem for p in paths]
    if len(labels) != len(records) or len(set(labels)) != len(labels):
        raise LongMemError(f"need one distinct label per file: {len(records)} files, labels {labels}")
    kind = records[0]["eval"]
    results = [r["results"] for r in records]
    build = {"ppl": _ppl, "chapterbreak": _chapterbreak, "icl": _icl}[kind]
    merged, table, checks = build(labels, results)
    differences = setting_differences(labels, records)
    if differences:
        table += "\n\nNot run alike, so not directly comparable: " + "; ".join(
            f"{key} " + ", ".join(f"{label}={value}" for label, value in by_label.items())
            for key, by_label in differences.items())
    return Comparison(kind, labels, [str(p) for p in paths], merged, table, checks, differences)


def setting_differences(labels: list[str], records: list[dict]) -> dict:
    """{setting: {label: value}} for every setting of SETTINGS on which the files disagree.

    A file without a config (older results) is not second-guessed: its settings count as unknown, not different.
    """
    configs = {label: r["config"] for label, r in zip(labels, records) if isinstance(r.get("config"), dict)}
    out = {}
    for key in SETTINGS[records[0]["eval"]]:
        values = {label: config.get(key) for label, config in configs.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            out[key] = values
    return out


def _ppl(labels: list[str], results: list[dict]) -> tuple[dict, str, dict]:
    totals = _merge([(label, r["totals"]) for label, r in zip(labels, results)])
    leads = [f"{label}/{r['lead']}" for label, r in zip(labels, results)]
    buckets = sorted(totals[leads[0]]["buckets"], key=_bucket_start)
    rows = ["| run | all | " + " | ".join(buckets) + " |", "|---" * (len(buckets) + 2) + "|"]
    for name, t in totals.items():
        cells = [f"{t['buckets'][b]['perplexity']:.2f}" if b in t["buckets"] else "-" for b in buckets]
        rows.append(f"| {name} | {t['perplexity']:.2f} | " + " | ".join(cells) + " |")
    rivals = [n for n in totals if is_baseline(n)] + leads[1:]
    checks = {}
    for b in [*buckets, "all"]:
        lead = totals[leads[0]] if b == "all" else totals[leads[0]]["buckets"][b]
        others = {n: (totals[n] if b == "all" else totals[n]["buckets"].get(b, {})).get("perplexity")
                  for n in rivals}
        others = {n: v for n, v in others.items() if v is not None}
        checks[b] = {leads[0]: lead["perplexity"], **others,
                     "below_all": all(lead["perplexity"] < v for v in others.values())}
    merged = {"totals": totals, "leads": leads, "buckets": buckets}
    return merged, "\n".join(rows), {"lead": leads[0], "buckets": checks,
                                      "below_all_in_every_bucket": all(c["below_all"] for c in checks.values())}


def _bucket_start(label: str) -> int:
    """'0-1k' -> 0, '1k-4k' -> 1000, '65k+' -> 65000: position buckets in reading order."""
    low = label.split("-")[0].rstrip("+")
    return int(low[:-1]) * 1000 if low.endswith("k") else int(low)


def _points(a: float, b: float) -> float:
    return round(100 * (a - b), 2)


def _chapterbreak(labels: list[str], results: list[dict]) -> tuple[dict, str, dict]:
    modes = _merge([(label, r["summary"]["modes"]) for label, r in zip(labels, results)])
    prefixes = sorted({p for s in modes.values() for p in s["by_prefix"]}, key=int)
    rows = ["| mode | all (95% CI) | " + " | ".join(f"P={p}" for p in prefixes) + " | PMI score |",
            "|---" * (len(prefixes) + 3) + "|"]
    for name, s in modes.items():
        a = s["all"]
        cells = [f"{s['by_prefix'][p]['correct']}/{s['by_prefix'][p]['n']}" if p in s["by_prefix"] else "-"
                 for p in prefixes]
        pmi = f"{s['pmi']['all']['accuracy']:.1%}" if "pmi" in s else "-"
        rows.append(f"| {name} | {a['accuracy']:.1%} ({a['ci95'][0]:.0%}-{a['ci95'][1]:.0%}), n={a['n']} | "
                    + " | ".join(cells) + f" | {pmi} |")
    lead, rivals = _memory_runs(labels)
    checks = _accuracy_checks(modes, lead, rivals, lambda s: s["all"]["accuracy"])
    for p in prefixes:
        checks[f"P={p}"] = _accuracy_checks({n: s for n, s in modes.items() if p in s["by_prefix"]}, lead, rivals,
                                            lambda s, p=p: s["by_prefix"][p]["accuracy"])
    if all("pmi" in modes.get(n, {}) for n in [lead, "backbone"]):
        checks["pmi"] = _accuracy_checks({n: s["pmi"] for n, s in modes.items() if "pmi" in s}, lead, rivals,
                                         lambda s: s["all"]["accuracy"])
    merged = {"summary": {"chance": results[0]["summary"]["chance"], "modes": modes}}
    return merged, "\n".join(rows), checks


def _memory_runs(labels: list[str]) -> tuple[str, list[str]]:
    """The lead file's memory run and every other file's."""
    return f"{labels[0]}/memory", [f"{label}/memory" for label in labels[1:]]


def _accuracy_checks(modes: dict, lead: str, rivals: list[str], value) -> dict:
    """Points of the lead above the backbone and above each rival (absent ones skipped)."""
    if lead not in modes:
        return {}
    out = {"lead": lead, "accuracy": value(modes[lead])}
    if "backbone" in modes:
        out["minus_backbone_points"] = _points(value(modes[lead]), value(modes["backbone"]))
    for rival in rivals:
        if rival in modes:
            out[f"minus_{rival}_points"] = _points(value(modes[lead]), value(modes[rival]))
    return out


def _icl(labels: list[str], results: list[dict]) -> tuple[dict, str, dict]:
    ks = [k for k in results[0]["summary"] if all(k in r["summary"] for r in results)]
    summary = {k: _merge([(label, r["summary"][k]) for label, r in zip(labels, results)]) for k in ks}
    rows = []
    checks = {}
    lead, rivals = _memory_runs(labels)
    for k in ks:
        tasks = list(next(iter(summary[k].values()))["tasks"])
        rows += [f"\n{k[1:]} demonstrations in context: label-restricted (full-vocabulary argmax), mean over seeds\n",
                 "| mode | " + " | ".join([*tasks, "average"]) + " |", "|---" * (len(tasks) + 2) + "|"]
        for name, m in summary[k].items():
            cells = [f"{m['tasks'][t]['accuracy']['mean']:.3f} ({m['tasks'][t]['accuracy_argmax']['mean']:.3f})"
                     for t in tasks]
            cells.append(f"{m['average']['accuracy']:.3f} ({m['average']['accuracy_argmax']:.3f})")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        for metric in ("accuracy", "accuracy_argmax"):
            checks[f"{k}/{metric}"] = _accuracy_checks(summary[k], lead, rivals,
                                                       lambda m, metric=metric: m["average"][metric])
    return {"summary": summary}, "\n".join(rows).strip(), checks
