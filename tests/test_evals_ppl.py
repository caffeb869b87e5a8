import math

import pytest
import torch

from conftest import PLAIN, make_model
from longmem.errors import LongMemError
from longmem.evals.plots import ppl_curves
from longmem.evals.ppl import PplConfig, bucket_stats, ppl
from longmem.evals.scoring import variant
from longmem.inference.reader import perplexity, sliding_window_perplexity, tokenize

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3


def test_bucket_stats_assign_each_scored_token_by_its_position():
    token_nll = torch.arange(1, 10, dtype=torch.float32)  # NLL of tokens 1..9
    stats = bucket_stats(token_nll, [0, 4, 8])
    assert list(stats) == ["0-4", "4-8", "8+"]
    assert stats["0-4"]["tokens"] == 3 and stats["0-4"]["nll"] == pytest.approx(2.0)  # tokens 1,2,3
    assert stats["4-8"]["tokens"] == 4 and stats["8+"]["nll_sum"] == pytest.approx(8 + 9)
    assert bucket_stats(token_nll, [0, 1024, 65536])["0-1k"]["perplexity"] == pytest.approx(math.exp(5.0))


def test_reader_keeps_token_nll_only_when_asked():
    model = make_model("llama", trained=True)
    ids = tokenize(model, TEXT)
    res = perplexity(model, ids, "memory", token_nll=True)
    assert res.token_nll.shape == (ids.shape[0] - 1,)
    assert float(res.token_nll.sum()) / res.tokens == pytest.approx(res.nll, rel=1e-5)
    assert "token_nll" not in res.to_dict() and perplexity(model, ids, "memory").token_nll is None
    win = sliding_window_perplexity(model, ids, 32, token_nll=True)
    assert float(win.token_nll.mean()) == pytest.approx(win.nll, rel=1e-5)


def test_runs_buckets_and_totals(tmp_path):
    books = []
    for i in range(2):
        books.append(tmp_path / f"book{i}.txt")
        books[-1].write_text(TEXT[: 120 * (i + 1)])
    model = make_model("llama", segment_length=32, **PLAIN)  # a bare SideNet: its empty memory is the backbone
    config = PplConfig(files=[str(b) for b in books], memory_sizes=[0, 32, 64], chunk_sizes=[1, 2, 4],
                       windows=[32], buckets=[0, 16, 100])
    result = ppl(model, config)
    names = [r.name for r in result.runs[: len(result.runs) // 2]]
    assert names == ["backbone", "window-32", "longmem-empty", "longmem-m32-c2", "longmem-m64-c2",
                     "longmem-m64-c1", "longmem-m64-c4"]
    assert result.lead == "longmem-m64-c2"
    for run in result.runs:
        assert sum(b["tokens"] for b in run.buckets.values()) == run.tokens
        assert set(run.buckets) == {"0-16", "16-100", "100+"}
    totals = result.totals()
    assert totals["backbone"]["tokens"] == sum(r.tokens for r in result.runs if r.name == "backbone")
    for label, b in totals["longmem-empty"]["buckets"].items():
        assert b["perplexity"] == pytest.approx(totals["backbone"]["buckets"][label]["perplexity"], rel=1e-4)
    checks = result.checks()
    assert set(checks) == {"0-16", "16-100", "100+"}
    assert {"longmem", "backbone", "longmem-empty", "window-32", "below_all_baselines"} <= set(checks["0-16"])
    png = ppl_curves(result.to_dict(), tmp_path / "ppl.png")
    assert png.stat().st_size > 1000


def test_memory_size_changes_what_is_read():
    model = make_model("gpt2", trained=True)
    ids = tokenize(model, "abcdefghijklmnopqrstuvwxyz0123456789" * 8)
    small = perplexity(variant(model, memory_size=16), ids, "memory")
    large = perplexity(variant(model, memory_size=64), ids, "memory")
    assert small.memory_tokens == 16 and large.memory_tokens == 64
    assert small.nll != pytest.approx(large.nll, abs=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(files=[]), "no files"), (dict(buckets=[1, 5]), "buckets"), (dict(memory_sizes=[-1]), "memory sizes"),
    (dict(max_tokens=1), "max_tokens"),
])
def test_bad_configs(bad, match):
    with pytest.raises(LongMemError, match=match):
        PplConfig(**dict(files=["x.txt"]) | bad)


def test_bad_window_and_missing_file(tmp_path):
    model = make_model("llama")
    book = tmp_path / "b.txt"
    book.write_text(TEXT)
    with pytest.raises(LongMemError, match="native context"):
        ppl(model, PplConfig(files=[str(book)], windows=[4096]))
    with pytest.raises(LongMemError, match="no such file"):
        ppl(model, PplConfig(files=[str(tmp_path / "nope.txt")]))


def test_a_short_term_tier_adds_the_short_term_only_run(tmp_path):
    book = tmp_path / "b.txt"
    book.write_text(TEXT)
    config = PplConfig(files=[str(book)], memory_sizes=[0, 32], chunk_sizes=[], backbone=False)
    result = ppl(make_model("llama", recent_tokens=16), config)
    assert [r.name for r in result.runs] == ["longmem-empty", "longmem-short-term", "longmem-m32-c2"]
    assert "longmem-short-term" in result.checks()["0-1k"]
    assert ppl_curves(result.to_dict(), tmp_path / "p.png").exists()
    assert "longmem-short-term" not in [r.name for r in ppl(make_model("llama", recent_tokens=0), config).runs]
