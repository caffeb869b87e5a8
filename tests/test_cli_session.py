"""`longmem remember / memories / forget / generate` on a tiny saved backbone."""

import json

import pytest

from conftest import run_cli

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3


run = run_cli


def test_remember_list_generate_forget(tmp_path, capsys, backbone_dir):
    model = ["--backbone", backbone_dir, "--dtype", "float32", "--segment", 32]
    home = ["--memory-dir", tmp_path / "mem"]
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, out, err = run(capsys, "remember", "book", book, book, *model, *home, "--memory-size", 128, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["tokens"] for r in results] == [len(TEXT)] * 2
    assert results[1]["memory"]["end_position"] == 2 * len(TEXT)  # the second file continued the first
    code, out, _ = run(capsys, "memories", *home, "--json")
    (info,) = json.loads(out)
    assert info["name"] == "book" and info["tokens_read"] == 2 * len(TEXT) and info["capacity_tokens"] == 128
    code, out, _ = run(capsys, "memories", *home)
    assert code == 0 and "book" in out and "capacity" in out
    code, out, err = run(capsys, "generate", "It is", "--memory", "book", *model, *home, "--max-tokens", 40,
                         "--temperature", 0.8, "--seed", 1)
    assert code == 0 and "40 tokens" in err and len(out) > 1
    code, out, _ = run(capsys, "generate", "It is", "--memory", "book", *model, *home, "--max-tokens", 5,
                       "--greedy", "--json")
    result = json.loads(out)
    assert code == 0 and result["tokens"] == 5 and result["memory"] == "book" and result["memory_tokens"] > 0
    assert run(capsys, "forget", "book", *home)[0] == 0
    assert json.loads(run(capsys, "memories", *home, "--json")[1]) == []


@pytest.mark.parametrize("args, message", [
    (["remember", "../evil", "BOOK"], "bad memory name"),
    (["remember", "ok", "MISSING"], "no such file"),
    (["generate", "hi", "--memory", "nope"], "no memory named 'nope'"),
    (["generate", "hi", "--top-p", "0"], "top_p"),
    (["forget", "nope"], "no memory named 'nope'"),
    (["remember", "ok", "BOOK", "--memory-size", "0"], "--memory-size"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, backbone_dir, args, message):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    args = [str(book) if a == "BOOK" else str(tmp_path / "missing.txt") if a == "MISSING" else a for a in args]
    model = [] if args[0] == "forget" else ["--backbone", backbone_dir, "--dtype", "float32", "--segment", 32]
    code, out, err = run(capsys, *args, *model, "--memory-dir", tmp_path / "mem")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "mem").exists() or not any((tmp_path / "mem").iterdir())
