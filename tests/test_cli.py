import json

import pytest

from conftest import make_model, run_cli, tiny_llama

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3


run = run_cli


def base(backbone_dir):
    return ["--backbone", backbone_dir, "--dtype", "float32", "--segment", 32, "--memory-size", 128]


def test_ppl_json_has_the_promised_fields(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, out, _ = run(capsys, "ppl", book, *base(backbone_dir), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["tokens"] == len(TEXT.encode()) - 1
    assert result["perplexity"] > 1 and result["tokens_per_s"] > 0
    assert result["results"][0]["memory_tokens"] > 0


def test_ppl_compare_runs_every_mode_and_a_fresh_copy_head_copies(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, out, _ = run(capsys, "ppl", book, *base(backbone_dir), "--compare", "--json", "--plot", tmp_path / "loss.png")
    assert code == 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"  # per-position loss curves
    rows = {r["mode"]: r for r in json.loads(out)["results"]}
    assert set(rows) == {"memory", "no-memory", "backbone", "short-term-only"}  # a rotary backbone has a tier
    # the text says one sentence three times, each a whole segment or more after the last: a fresh SideNet's
    # copy head copies the repeats from memory; the short-term tier alone keeps no log to copy from
    assert rows["memory"]["nll"] < rows["short-term-only"]["nll"] - 1
    assert rows["no-memory"]["memory_tokens"] == 0 and rows["memory"]["memory_tokens"] > 0


def test_ppl_with_a_saved_sidenet(tmp_path, capsys, backbone_dir):
    from longmem.model.backbone import FrozenBackbone
    from longmem.model.longmem import LongMemModel

    hf = type(tiny_llama()).from_pretrained(backbone_dir)
    model = LongMemModel(make_model("llama").config.__class__(backbone=str(backbone_dir), style_rank=8,
                                                              segment_length=32),
                         FrozenBackbone(hf, None, 2))
    model.save_pretrained(tmp_path / "sn")
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, out, err = run(capsys, "ppl", book, "--sidenet", tmp_path / "sn", "--dtype", "float32",
                         "--memory-size", 128, "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["style_rank"] == 8


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\t  \n", "is empty"),
    (b"\x00\x01binary\x00", "binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_text_files_fail_with_one_line(tmp_path, capsys, backbone_dir, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, "ppl", bad, *base(backbone_dir))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert bad.read_bytes() == content


def test_directory_missing_file_and_missing_model(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    for args, message in [
        (["ppl", tmp_path, *base(backbone_dir)], "is a directory"),
        (["ppl", tmp_path / "nope.txt", *base(backbone_dir)], "no such file"),
        (["ppl", book, "--backbone", tmp_path / "no-model"], "no such model directory"),
        (["ppl", book, "--backbone", tmp_path / "x.gguf"], "no such GGUF file"),
        (["ppl", book, "--sidenet", tmp_path / "no-sidenet"], "no SideNet directory"),
        (["ppl", book, *base(backbone_dir), "--segment", "0"], "positive"),
    ]:
        code, out, err = run(capsys, *args)
        assert code == 2, args
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_sidenet_for_another_backbone_fails_cleanly(tmp_path, capsys, backbone_dir):
    other = make_model("llama", backbone=str(backbone_dir))  # random weights != saved backbone
    other.backbone._fingerprint = "sha256:someone-else"
    other.config.backbone_fingerprint = "sha256:someone-else"
    other.save_pretrained(tmp_path / "sn")
    before = (tmp_path / "sn" / "model.safetensors").read_bytes()
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, _, err = run(capsys, "ppl", book, "--sidenet", tmp_path / "sn", "--dtype", "float32")
    assert code == 2 and "trained for backbone" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "sn" / "model.safetensors").read_bytes() == before


def test_probe_cli_json(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 3)
    code, out, err = run(capsys, "probe", book, "--backbone", backbone_dir, "--dtype", "float32", "--segment", 32,
                         "--window", 128, "--windows", 2, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["windows"]) == 2 and 0 <= result["captured"] <= 1


def test_data_folder_writes_a_manifest_with_token_counts(tmp_path, capsys, backbone_dir):
    src = tmp_path / "texts"
    src.mkdir()
    (src / "a.txt").write_text("CHAPTER I\n\nHello there.\n\nCHAPTER II\n\nAgain.\n")
    code, out, err = run(capsys, "data", "folder", "--src", src, "--out", tmp_path / "corpus",
                         "--backbone", backbone_dir)
    assert code == 0, err
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    written = (tmp_path / "corpus" / manifest[0]["file"]).read_bytes()
    assert manifest[0]["tokens"] == len(written)  # the byte tokenizer: one token per byte
    assert len(manifest[0]["chapters"]) == 2


def test_foreign_memory_control(tmp_path, capsys, backbone_dir):
    book, other = tmp_path / "book.txt", tmp_path / "other.txt"
    book.write_text(TEXT)
    other.write_text("A completely different story about ships and the sea. " * 8)
    code, out, err = run(capsys, "ppl", book, *base(backbone_dir), "--foreign-memory", other, "--json")
    assert code == 0, err
    rows = {r["mode"]: r for r in json.loads(out)["results"]}
    assert rows["foreign-memory"]["memory_tokens"] > 0
    assert rows["foreign-memory"]["nll"] > 0  # identity ignores the bank, but the tier holds the other text


def test_sliding_window_rows(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    code, out, err = run(capsys, "ppl", book, *base(backbone_dir), "--compare", "--window", 64, "--json")
    assert code == 0, err
    modes = [r["mode"] for r in json.loads(out)["results"]]
    assert modes == ["memory", "no-memory", "backbone", "short-term-only", "window-64"]


def test_data_folder_with_a_bad_file_fails_cleanly(tmp_path, capsys, backbone_dir):
    src = tmp_path / "texts"
    src.mkdir()
    (src / "bad.txt").write_bytes(b"caf\xe9")
    code, out, err = run(capsys, "data", "folder", "--src", src, "--out", tmp_path / "corpus", "--backbone", backbone_dir)
    assert code == 2 and "UTF-8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "corpus").exists()


def test_approximate_search_flags_reach_the_model(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 4)
    code, out, _ = run(capsys, "ppl", book, *base(backbone_dir), "--retrieval", "torch-ivf", "--nprobe", 3, "--json")
    assert code == 0
    assert json.loads(out)["results"][0]["memory_tokens"] > 0
    code, _, err = run(capsys, "ppl", book, *base(backbone_dir), "--retrieval", "torch-ivf", "--nprobe", 0)
    assert code != 0 and "nprobe" in err and "Traceback" not in err


def test_demo_prints_the_four_readings_and_what_they_show(tmp_path, capsys, backbone_dir):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 2)
    args = ["demo", book, "--backbone", backbone_dir, "--dtype", "float32", "--max-tokens", 300, "--window", 64,
            "--segment", 32, "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "300 tokens" in lines[0] and len(lines) == 7
    assert [line.split()[0] for line in lines[2:6]] == ["LongMem,", "LongMem,", "backbone", "backbone,"]
    assert lines[-1].startswith("The memory takes") and "64-token sliding window" in lines[-1]
    code, out, _ = run(capsys, *args, "--json")
    result = json.loads(out)
    assert code == 0 and [r["mode"] for r in result["results"]] == ["memory", "no-memory", "backbone", "window-64"]
    assert result["tokens"] == 300 and all(r["tokens"] == 299 for r in result["results"])


def test_demo_without_the_books_says_what_to_run(tmp_path, capsys, monkeypatch, backbone_dir):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "demo", "--backbone", backbone_dir)
    assert code == 2 and out == "" and "longmem data books" in err and len(err.strip().splitlines()) == 1
