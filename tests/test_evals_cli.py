"""``longmem eval ...`` end to end on a tiny saved Llama with a byte tokenizer."""

import json

import pytest

from conftest import run_cli


run = run_cli


def model_args(backbone_dir):
    return ["--backbone", backbone_dir, "--dtype", "float32", "--segment", 32, "--memory-size", 128, "--quiet"]


def test_passkey_writes_json_with_provenance_and_a_heatmap(tmp_path, capsys, backbone_dir):
    out = tmp_path / "res" / "passkey.json"
    code, stdout, _ = run(capsys, "eval", "passkey", *model_args(backbone_dir), "--lengths", "300,400",
                          "--depths", "0,1", "--trials", 1, "--filler", "repeat", "--modes",
                          "memory,backbone,window-128", "--out", out, "--json")
    assert code == 0
    record = json.loads(stdout)
    assert record == json.loads(out.read_text())
    assert record["eval"] == "passkey" and record["command"].startswith("longmem ")
    assert record["commit"] and record["seconds"] > 0
    assert record["config"]["lengths"] == [300, 400] and record["model"]["segment_length"] == 32
    assert set(record["results"]["summary"]) == {"memory", "backbone", "window-128"}
    assert len(record["results"]["trials"]) == 2 * 2 * 3
    assert out.with_suffix(".png").stat().st_size > 1000


def test_passkey_text_summary(tmp_path, capsys, backbone_dir):
    out = tmp_path / "pk.json"
    code, stdout, _ = run(capsys, "eval", "passkey", *model_args(backbone_dir), "--lengths", "300",
                          "--depths", "0.5", "--trials", 1, "--filler", "repeat", "--out", out)
    assert code == 0 and "accuracy" in stdout and "no-memory" in stdout and out.exists()


@pytest.mark.parametrize("extra, match", [
    (["--filler", "missing.txt"], "no such file"),
    (["--modes", "window-100000"], "native context"),
    (["--lengths", "20"], "too short"),
    (["--memory-size", "0"], "--memory-size"),
    (["--needle", "no key in it"], "must contain {key}"),
])
def test_passkey_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, backbone_dir, extra, match):
    out = tmp_path / "pk.json"
    args = ["eval", "passkey", *model_args(backbone_dir), "--lengths", "300", "--depths", "0", "--trials", 1,
            "--filler", "repeat", "--out", out]
    code, _, err = run(capsys, *args, *extra)
    assert code == 2 and err.startswith("longmem: error:") and match in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_passkey_in_another_wording(tmp_path, capsys, backbone_dir):
    out = tmp_path / "pk.json"
    code, _, _ = run(capsys, "eval", "passkey", *model_args(backbone_dir), "--lengths", "300", "--depths", "0.5",
                     "--trials", 1, "--filler", "repeat", "--needle", "\\nThe vault opens with {key}.\\n",
                     "--question", "\\nThe vault opens with", "--out", out)
    record = json.loads(out.read_text())
    assert code == 0 and record["config"]["needle"] == "\nThe vault opens with {key}.\n"
    assert record["config"]["question"] == "\nThe vault opens with" and record["config"]["answer"] == " {key}"


def test_out_must_be_a_json_file(tmp_path, capsys, backbone_dir):
    code, _, err = run(capsys, "eval", "passkey", *model_args(backbone_dir), "--filler", "repeat", "--out", tmp_path)
    assert code == 2 and "must end in .json" in err


def test_ppl_writes_buckets_and_plot(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession. " * 6)
    out = tmp_path / "ppl.json"
    code, stdout, _ = run(capsys, "eval", "ppl", book, *model_args(backbone_dir), "--memory-sizes", "0,64,128",
                          "--chunk-sizes", "2,4", "--windows", "64", "--buckets", "0,100,300", "--out", out, "--json")
    assert code == 0
    record = json.loads(stdout)
    assert record["eval"] == "ppl" and record["config"]["files"] == [str(book)]
    totals = record["results"]["totals"]
    assert set(totals) == {"backbone", "window-64", "longmem-empty", "longmem-short-term", "longmem-m64-c4",
                           "longmem-m128-c4", "longmem-m128-c2"}  # a rotary backbone has a short-term tier
    assert set(totals["backbone"]["buckets"]) == {"0-100", "100-300", "300+"}
    assert set(record["results"]["checks"]) == {"0-100", "100-300", "300+"}
    assert out.with_suffix(".png").exists()


def test_chapterbreak_on_a_folder(tmp_path, capsys, backbone_dir):
    folder = tmp_path / "books"
    folder.mkdir()
    parts = [f"Chapter {i}\n\n" + f"Text of chapter {i}, told slowly and at length. " * 4 + "\n\n" for i in range(1, 9)]
    (folder / "novel.txt").write_text("".join(parts))
    out = tmp_path / "cb.json"
    code, stdout, _ = run(capsys, "eval", "chapterbreak", folder, *model_args(backbone_dir), "--prefix-lengths", 200,
                          "--max-examples", 2, "--suffix-tokens", 16, "--heading", "^Chapter [0-9]+", "--out", out)
    assert code == 0 and "chance 16.7%" in stdout
    summary = json.loads(out.read_text())["results"]["summary"]
    assert summary["modes"]["memory"]["all"]["n"] > 0 and out.with_suffix(".png").exists()


def test_icl_on_a_small_task(tmp_path, capsys, backbone_dir):
    task = tmp_path / "icl" / "mood"
    task.mkdir(parents=True)
    (task / "train.txt").write_text("".join(f"{'happy' if i % 2 else 'sad'} day {i}\n" for i in range(20)))
    (task / "test.txt").write_text("happy day x\nsad day y\n")
    out = tmp_path / "icl.json"
    code, stdout, _ = run(capsys, "eval", "icl", "--data", tmp_path / "icl", "--tasks", "mood", "--demos", "2",
                          "--memory-demos", 6, "--seeds", 2, *model_args(backbone_dir), "--out", out, "--json")
    assert code == 0
    record = json.loads(stdout)
    assert record["config"]["chunk_size"] == 2 and record["config"]["tasks"] == ["mood"]
    assert set(record["results"]["summary"]["k2"]) == {"memory", "no-memory", "backbone"}
    gain = record["results"]["memory_minus_backbone_points"]["k2"]
    assert len(gain["ci95"]) == 2 and gain["ci95"][0] <= gain["accuracy"] <= gain["ci95"][1]  # over the 2 seeds
    assert out.with_suffix(".png").exists()
    code, stdout, _ = run(capsys, "eval", "icl", "--data", tmp_path / "icl", "--tasks", "mood", "--demos", "2",
                          "--memory-demos", 6, "--seeds", 1, *model_args(backbone_dir), "--out", tmp_path / "one.json")
    assert code == 0 and "mem - bb" in stdout  # the gain per task, with its interval over the sentences


@pytest.mark.parametrize("args, match", [
    (["icl", "--data", "nowhere", "--tasks", "sst-2"], "does not exist"),
    (["chapterbreak", "missing-folder"], "no such file or folder"),
    (["ppl", "missing.txt"], "no such file"),
    (["icl", "--modes", "window-64"], "ICL modes"),
])
def test_bad_input_of_the_other_evals(tmp_path, capsys, backbone_dir, args, match):
    out = tmp_path / "r.json"
    code, _, err = run(capsys, "eval", *args, *model_args(backbone_dir), "--out", out)
    assert code == 2 and err.startswith("longmem: error:") and match in err
    assert not out.exists()
