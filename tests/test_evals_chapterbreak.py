import pytest
import torch

from conftest import PLAIN, byte_tokenizer, make_model
from longmem.errors import LongMemError
from longmem.evals.chapterbreak import ChapterBreakConfig, chapterbreak, examples, load_book
from longmem.evals.plots import chapterbreak_accuracy
from longmem.evals.results import wilson
from longmem.evals.scoring import parse_mode, prepare, score, split_prefix

ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII"]


def write_book(path, heading="CHAPTER", chapters=8):
    parts = ["A NOVEL\n\n"]
    for i in range(chapters):
        body = " ".join(f"Story {i} line {j} of chapter {ROMAN[i]}." for j in range(4))
        parts.append(f"{heading} {ROMAN[i] if heading == 'CHAPTER' else i + 1}\n\n{body}\n\n")
    path.write_text("".join(parts))
    return path


def config(**kw):
    return ChapterBreakConfig(**dict(prefix_lengths=[64, 128], suffix_tokens=12, candidates=4) | kw)


def test_book_boundaries_fall_on_headings_and_openings_skip_them(tmp_path):
    path = write_book(tmp_path / "novel.txt")
    tok = byte_tokenizer()
    book = load_book(path, tok, config())
    assert tok.decode(book.ids) == path.read_text()
    assert len(book.heading_at) == len(book.openings) == 8
    for i, at in enumerate(book.heading_at):
        assert tok.decode(book.ids[at : at + 14]).startswith(f"CHAPTER {ROMAN[i]}\n")
        assert tok.decode(book.openings[i]) == f"Story {i} line 0 "[:12]


def test_examples_end_at_the_boundary_and_negatives_were_not_read(tmp_path):
    book = load_book(write_book(tmp_path / "novel.txt"), byte_tokenizer(), config())
    exs = examples(book, 128, config())
    assert exs and all(ex.prefix.shape[0] == 128 for ex in exs)
    for ex in exs:
        at = book.heading_at[ex.chapter]
        assert torch.equal(ex.prefix, book.ids[at - 128 : at])
        assert ex.chapters[ex.gold] == ex.chapter and len(set(ex.chapters)) == 4
        for j in ex.chapters:
            assert j == ex.chapter or not at - 128 - 12 <= book.heading_at[j] < at
    assert [e.chapters for e in exs] == [e.chapters for e in examples(book, 128, config())]  # seeded
    assert len(examples(book, 128, config(max_examples=2))) == 2


def test_backbone_scores_are_the_hf_log_likelihood():
    model = make_model("llama")
    mode = parse_mode(model, "backbone")
    prefix, cont = torch.randint(0, 256, (40,)), torch.randint(0, 256, (5,))
    head, local = split_prefix(prefix, mode.window, 5)
    got = score(model, prepare(model, mode, head), local, cont).logprob
    ids = torch.cat([local, cont])
    logp = torch.log_softmax(model.backbone.model(ids[None]).logits[0, :-1].float(), -1)
    want = float(logp[local.shape[0] - 1 :].gather(1, cont[:, None]).sum())
    assert got == pytest.approx(want, abs=1e-4)


def test_chapterbreak_scores_every_example_in_every_mode(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    write_book(folder / "a.txt")
    write_book(folder / "b.txt")
    model = make_model("llama", **PLAIN)  # a bare SideNet: with its memory empty it is the backbone
    result = chapterbreak(model, config(books=[str(folder)], prefix_lengths=[64], max_examples=2))
    by_key = {}
    for item in result.items:
        by_key.setdefault((item.book, item.chapter, item.prefix_length), {})[item.mode] = item
        assert len(item.scores) == 4 and item.correct == (max(item.scores) == item.scores[item.gold])
    for rows in by_key.values():
        assert rows["memory"].scores != pytest.approx(rows["backbone"].scores, abs=1e-3)  # the memory was read
        assert rows["no-memory"].scores == pytest.approx(rows["backbone"].scores, abs=1e-3)
    summary = result.to_dict()["summary"]
    assert summary["chance"] == 0.25 and set(summary["modes"]["memory"]["by_book"]) == {"a", "b"}
    acc = summary["modes"]["memory"]["all"]
    assert acc["n"] == len(by_key) and acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1]
    assert "memory_minus_backbone_points" in summary
    assert chapterbreak_accuracy(result.to_dict(), tmp_path / "cb.png").stat().st_size > 1000


def test_a_custom_heading_regex(tmp_path):
    path = write_book(tmp_path / "parts.txt", heading="Part")
    book = load_book(path, byte_tokenizer(), config(heading=r"^Part [0-9]+$"))
    assert len(book.heading_at) == 8
    with pytest.raises(LongMemError, match="no usable chapter boundary"):
        chapterbreak(make_model("llama"), config(books=[str(path)]))  # default headings find no chapter


def test_bad_inputs():
    with pytest.raises(LongMemError, match="regex"):
        config(heading="(")
    with pytest.raises(LongMemError, match="no such file"):
        chapterbreak(make_model("llama"), config(books=["missing.txt"]))


def test_wilson_interval():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_pmi_score_subtracts_each_candidates_likelihood_after_a_blank_line(tmp_path):
    path = write_book(tmp_path / "a.txt")
    model = make_model("llama")
    result = chapterbreak(model, config(books=[str(path)], prefix_lengths=[64], max_examples=2,
                                        modes=["memory", "backbone"]))
    book = load_book(path, model.tokenizer, config())
    blank = torch.tensor(model.tokenizer("\n\n", add_special_tokens=False)["input_ids"][-1:])
    for item in result.items:
        assert len(item.unconditional) == len(item.scores) == 4
        diff = [a - b for a, b in zip(item.scores, item.unconditional)]
        assert item.correct_pmi == (max(diff) == diff[item.gold])
    item = next(i for i in result.items if i.mode == "backbone")
    ex = next(e for e in examples(book, 64, config()) if e.chapter == item.chapter)
    mode = parse_mode(model, "backbone")
    expected = [score(model, prepare(model, mode, blank[:0]), blank, book.openings[j]).logprob for j in ex.chapters]
    assert item.unconditional == pytest.approx(expected)
    assert "pmi" in result.summary()["modes"]["memory"]
    plain = chapterbreak(model, config(books=[str(path)], prefix_lengths=[64], max_examples=1, pmi=False))
    assert all(i.unconditional == [] and i.correct_pmi is None for i in plain.items)
    assert "pmi" not in plain.summary()["modes"]["memory"]


def test_add_pmi_to_items_of_a_run_without_it_gives_the_same_as_scoring_it(tmp_path):
    from longmem.evals.chapterbreak import add_pmi

    path = write_book(tmp_path / "a.txt")
    model = make_model("llama")
    cfg = config(books=[str(path)], prefix_lengths=[64], max_examples=2, modes=["memory", "backbone"])
    with_pmi = chapterbreak(model, cfg)
    plain = chapterbreak(model, config(books=[str(path)], prefix_lengths=[64], max_examples=2,
                                       modes=["memory", "backbone"], pmi=False))
    added = add_pmi(model, cfg, plain.items)
    assert [i.correct_pmi for i in added] == [i.correct_pmi for i in with_pmi.items]
    for a, b in zip(added, with_pmi.items):
        assert a.unconditional == pytest.approx(b.unconditional)
