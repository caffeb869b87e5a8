"""``longmem eval compare``: result files of several models in one table, plot and target check."""

import json

import pytest

from conftest import run_cli
from longmem.errors import LongMemError
from longmem.evals.compare import compare


def _ppl_totals(values: dict[str, tuple[float, float, float]]) -> dict:
    """{run: (all, bucket a, bucket b)} -> a totals dict as `eval ppl` writes it."""
    return {name: {"perplexity": v[0], "memory_size": 0, "chunk_size": 0,
                   "buckets": {"0-1k": {"perplexity": v[1]}, "1k+": {"perplexity": v[2]}}}
            for name, v in values.items()}


def _ppl(path, lead, values):
    path.write_text(json.dumps({"eval": "ppl", "results": {"lead": lead, "totals": _ppl_totals(values)}}))
    return path


def _cb(path, accuracies: dict[str, tuple[int, int]]):
    """{mode: (correct at 4096, correct at 8192)} of 10 examples each."""
    def acc(c, n):
        return {"accuracy": c / n, "correct": c, "n": n, "ci95": [0.0, 1.0]}
    modes = {m: {"all": acc(a + b, 20), "by_prefix": {"4096": acc(a, 10), "8192": acc(b, 10)}}
             for m, (a, b) in accuracies.items()}
    path.write_text(json.dumps({"eval": "chapterbreak", "results": {"summary": {"chance": 1 / 6, "modes": modes}}}))
    return path


def test_ppl_checks_the_lead_against_baselines_and_the_other_models_memory(tmp_path):
    a = _ppl(tmp_path / "a.json", "longmem-m64", {"backbone": (30, 31, 29), "longmem-m64": (25, 31.5, 22)})
    b = _ppl(tmp_path / "b.json", "longmem-m64", {"backbone": (30, 31, 29), "longmem-m64": (26, 30, 23)})
    result = compare([a, b], ["lm", "mt"])
    checks = result.checks["buckets"]
    assert checks["all"]["below_all"] and checks["1k+"]["below_all"]
    assert not checks["0-1k"]["below_all"] and checks["0-1k"]["mt/longmem-m64"] == 30  # MemTRM wins 0-1k
    assert result.checks["below_all_in_every_bucket"] is False
    assert set(result.merged["totals"]) == {"backbone", "lm/longmem-m64", "mt/longmem-m64"}  # backbone once
    assert "| lm/longmem-m64 | 25.00 | 31.50 | 22.00 |" in result.table


def test_chapterbreak_points_above_backbone_and_rival(tmp_path):
    a = _cb(tmp_path / "a.json", {"memory": (5, 4), "backbone": (3, 2)})
    b = _cb(tmp_path / "b.json", {"memory": (4, 4), "backbone": (3, 2)})
    checks = compare([a, b], ["lm", "mt"]).checks
    assert checks["minus_backbone_points"] == pytest.approx(20.0)
    assert checks["minus_mt/memory_points"] == pytest.approx(5.0)
    assert checks["P=8192"]["minus_mt/memory_points"] == 0.0


def test_cli_writes_comparison_and_plot_and_refuses_bad_input(tmp_path, capsys):
    a = _cb(tmp_path / "a.json", {"memory": (5, 4), "backbone": (3, 2)})
    b = _cb(tmp_path / "b.json", {"memory": (4, 4)})
    out = tmp_path / "cmp" / "cb.json"
    code, stdout, _ = run_cli(capsys, "eval", "compare", a, b, "--labels", "lm,mt", "--out", out)
    assert code == 0 and "| mt/memory |" in stdout
    record = json.loads(out.read_text())
    assert record["eval"] == "chapterbreak" and record["command"].startswith("longmem ")
    assert out.with_suffix(".png").exists()
    p = _ppl(tmp_path / "p.json", "x", {"x": (1, 1, 1)})
    (tmp_path / "junk.json").write_text("[1, 2]")
    for args, match in [([a, p], "different evaluations"), ([a, b, "--labels", "one"], "one distinct label"),
                        ([a, tmp_path / "junk.json"], "not a ppl, chapterbreak or icl"),
                        ([a, tmp_path / "none.json"], "cannot read")]:
        bad = tmp_path / "bad.json"
        code, _, err = run_cli(capsys, "eval", "compare", *args, "--out", bad)
        assert code == 2 and match in err and not bad.exists()


def test_same_labels_refused(tmp_path):
    a = _cb(tmp_path / "a.json", {"memory": (5, 4)})
    with pytest.raises(LongMemError, match="distinct"):
        compare([a, a], ["x", "x"])


def test_files_not_run_alike_are_named_in_table_and_record(tmp_path):
    a = _cb(tmp_path / "a.json", {"memory": (5, 4), "backbone": (3, 2)})
    b = _cb(tmp_path / "b.json", {"memory": (4, 4)})
    alike = compare([a, b], ["lm", "mt"])  # no configs: unknown settings are not called different
    assert alike.differences == {} and "Not run alike" not in alike.table
    for path, examples in ((a, 40), (b, 10)):
        record = json.loads(path.read_text())
        record["config"] = {"max_examples": examples, "seed": 0, "books": ["x.txt"]}
        path.write_text(json.dumps(record))
    result = compare([a, b], ["lm", "mt"])
    assert result.differences == {"max_examples": {"lm": 40, "mt": 10}}
    assert "Not run alike, so not directly comparable: max_examples lm=40, mt=10" in result.table
    assert result.to_dict()["differences"] == result.differences
