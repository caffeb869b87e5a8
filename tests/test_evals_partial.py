"""Resumable evaluations: partial results kept per unit, read back only for the same run."""

import json

import pytest

from conftest import make_model, run_cli
from longmem.errors import LongMemError
from longmem.evals import icl as icl_module
from longmem.evals.icl import IclConfig, icl
from longmem.evals.partial import PartialLog, partial_path

HEADER = {"eval": "icl", "config": {"seeds": 2}}
TIMINGS = ("seconds", "tokens_per_s")


def untimed(value):
    """A result with its wall-clock fields dropped: two runs of the same work differ only in those."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def test_log_reads_back_units_and_seconds_drops_a_torn_line_and_refuses_other_runs(tmp_path):
    path = tmp_path / "r.partial.jsonl"
    log = PartialLog(path, HEADER)
    log.add({"task": "a"}, 1.5)
    log.add({"task": "b"}, 2.0)
    log.close()
    with path.open("a") as f:
        f.write('{"unit": {"task": "c"')  # the process died while writing this line
    with pytest.raises(LongMemError, match="add --resume"):
        PartialLog(path, HEADER)
    with pytest.raises(LongMemError, match="another run"):
        PartialLog(path, {"eval": "icl", "config": {"seeds": 6}}, resume=True)
    log = PartialLog(path, HEADER, resume=True)
    assert log.units == [{"task": "a"}, {"task": "b"}] and log.seconds == pytest.approx(3.5)
    log.add({"task": "c"}, 1.0)  # appended after the torn line was dropped
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()][-1]["unit"] == {"task": "c"}
    log = PartialLog(path, HEADER, resume=True)
    assert len(log.units) == 3
    log.finish()
    assert not path.exists()
    refused = PartialLog(path, HEADER)  # a run stopped before its first unit leaves no file behind
    refused.close()
    assert not path.exists()


def interrupt_at(monkeypatch, module, name: str, n: int):
    """Make module.name raise on its n-th call, as a killed run stops; returns the real function."""
    real, calls = getattr(module, name), []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise LongMemError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(module, name, dies)
    return real


def icl_data(tmp_path):
    task = tmp_path / "icl" / "mood"
    task.mkdir(parents=True)
    (task / "train.txt").write_text("".join(f"{'happy' if i % 2 else 'sad'} day {i}\n" for i in range(30)))
    (task / "test.txt").write_text("happy day x\nsad day y\nhappy day z\n")
    return tmp_path / "icl"


def test_icl_skips_done_units_and_gives_the_same_result(tmp_path):
    model = make_model("llama", segment_length=64)
    config = IclConfig(data=str(icl_data(tmp_path)), tasks=["mood"], demos=[2, 1], memory_demos=6, seeds=2)
    seen = []
    full = icl(model, config, on_score=lambda s, sec: seen.append((s, sec)))
    assert [s for s, _ in seen] == full.scores and all(sec >= 0 for _, sec in seen)
    again = []
    resumed = icl(model, config, done=full.scores[:5], on_score=lambda s, sec: again.append(s))
    assert again == full.scores[5:]  # only what was not done is scored, in the same order
    assert resumed.to_dict() == full.to_dict()


def test_cli_resumes_an_interrupted_icl_run(tmp_path, capsys, backbone_dir, monkeypatch):
    data = icl_data(tmp_path)
    args = ["eval", "icl", "--data", data, "--tasks", "mood", "--demos", "2", "--memory-demos", 6, "--seeds", 2,
            "--backbone", backbone_dir, "--dtype", "float32", "--segment", 32, "--memory-size", 128, "--quiet"]
    fresh = tmp_path / "fresh.json"
    assert run_cli(capsys, *args, "--out", fresh)[0] == 0 and not partial_path(fresh).exists()

    out = tmp_path / "icl.json"
    real = interrupt_at(monkeypatch, icl_module, "run_seed", 4)
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 2 and "interrupted" in err and not out.exists()
    assert len(partial_path(out).read_text().splitlines()) == 1 + 3  # header + 3 finished units
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 2 and "add --resume" in err
    monkeypatch.setattr(icl_module, "run_seed", real)
    assert run_cli(capsys, *args, "--out", out, "--resume")[0] == 0
    assert not partial_path(out).exists()
    assert json.loads(out.read_text())["results"] == json.loads(fresh.read_text())["results"]


def test_chapterbreak_skips_done_items_and_gives_the_same_result(tmp_path):
    from longmem.evals.chapterbreak import ChapterBreakConfig, chapterbreak
    from test_evals_chapterbreak import write_book

    model = make_model("llama")
    config = ChapterBreakConfig(books=[str(write_book(tmp_path / "a.txt"))], prefix_lengths=[64], suffix_tokens=12,
                                candidates=4, max_examples=2)
    seen = []
    full = chapterbreak(model, config, on_item=lambda item, sec: seen.append(item))
    assert seen == full.items and len(full.items) >= 6
    again = []
    resumed = chapterbreak(model, config, done=full.items[:4], on_item=lambda item, sec: again.append(item))
    assert again == full.items[4:] and resumed.to_dict() == full.to_dict()


def test_ppl_and_passkey_skip_done_units_and_give_the_same_result(tmp_path):
    from longmem.evals.passkey import PasskeyConfig, passkey
    from longmem.evals.ppl import PplConfig, ppl

    book = tmp_path / "b.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession. " * 4)
    model = make_model("llama", segment_length=32, trained=True, recent_tokens=0)
    config = PplConfig(files=[str(book)], memory_sizes=[0, 64], chunk_sizes=[1, 2], windows=[32])
    seen = []
    full = ppl(model, config, on_run=lambda run, sec: seen.append(run))
    assert seen == full.runs and len(full.runs) == 5
    again = []
    resumed = ppl(model, config, done=full.runs[:3], on_run=lambda run, sec: again.append(run))
    assert [r.name for r in again] == [r.name for r in full.runs[3:]] and resumed.runs[:3] == full.runs[:3]
    assert untimed(resumed.to_dict()) == untimed(full.to_dict())

    pk = PasskeyConfig(lengths=[128], depths=[0.0, 1.0], trials=1, filler="repeat", intro="",
                       modes=["memory", "no-memory"])
    seen = []
    full = passkey(model, pk, on_trial=lambda trial, sec: seen.append(trial))
    assert seen == full.trials and len(full.trials) == 4
    again = []
    resumed = passkey(model, pk, done=full.trials[:3], on_trial=lambda trial, sec: again.append(trial))
    assert len(again) == 1 and resumed.trials[:3] == full.trials[:3]
    assert untimed(resumed.to_dict()) == untimed(full.to_dict())


def test_cli_resumes_an_interrupted_ppl_run(tmp_path, capsys, backbone_dir, monkeypatch):
    from longmem.evals import ppl as ppl_module

    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession. " * 6)
    args = ["eval", "ppl", book, "--backbone", backbone_dir, "--dtype", "float32", "--segment", 32,
            "--memory-sizes", "0,64", "--chunk-sizes", "", "--quiet"]
    fresh = tmp_path / "fresh.json"
    assert run_cli(capsys, *args, "--out", fresh)[0] == 0 and not partial_path(fresh).exists()

    out = tmp_path / "ppl.json"
    real = interrupt_at(monkeypatch, ppl_module, "perplexity", 3)
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 2 and "interrupted" in err and not out.exists()
    assert len(partial_path(out).read_text().splitlines()) == 1 + 2  # header + backbone + longmem-empty
    monkeypatch.setattr(ppl_module, "perplexity", real)
    assert run_cli(capsys, *args, "--out", out, "--resume")[0] == 0 and not partial_path(out).exists()
    assert untimed(json.loads(out.read_text())["results"]) == untimed(json.loads(fresh.read_text())["results"])
