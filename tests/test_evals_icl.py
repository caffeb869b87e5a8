import pytest
import torch

from conftest import PLAIN, make_memtrm, make_model
from longmem.errors import LongMemError
from longmem.evals.icl import IclConfig, classify, draw, icl, window_classifier
from longmem.evals.icl_data import load_task, read_examples
from longmem.evals.plots import icl_bars
from longmem.evals.prefix import SharedPrefix
from longmem.evals.results import mean_interval, t95, wilson
from longmem.evals.scoring import parse_mode, prepare, score, window_logits

GOOD = ["a fine film", "lovely and warm", "great fun", "a joy", "well made", "sweet", "smart", "moving"]
BAD = ["a dull mess", "boring", "too long", "flat", "a bore", "sour", "dumb", "tedious"]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "icl"
    (root / "SST-2").mkdir(parents=True)
    rows = [f"{t}\t1" for t in GOOD] + [f"{t}\t0" for t in BAD]
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (root / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nnice\t1\nawful\t0\ngood\t1\n")
    (root / "mr").mkdir()
    csv_rows = [f'1,"{t}, really"' for t in GOOD] + [f"0,{t}" for t in BAD]
    (root / "mr" / "train.csv").write_text("\n".join(csv_rows) + "\n")
    (root / "mr" / "test.csv").write_text('1,"nice, really"\n0,awful\n')
    (root / "weather").mkdir()
    lines = [f"sunny {t}" for t in GOOD] + [f"rainy {t}" for t in BAD]
    (root / "weather" / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "weather" / "test.txt").write_text("sunny bright day\nrainy grey day\n")
    return root


def test_three_file_formats(data, tmp_path):
    assert read_examples(data / "SST-2" / "dev.tsv")[0] == ("nice", "1")
    (tmp_path / "gap.csv").write_text('1,good\n0,\n0,"bad, really"\n')  # a label without text is skipped
    assert read_examples(tmp_path / "gap.csv") == [("good", "1"), ("bad, really", "0")]
    (tmp_path / "none.csv").write_text("1,\n")
    with pytest.raises(LongMemError, match="no example has any text"):
        read_examples(tmp_path / "none.csv")
    assert read_examples(data / "mr" / "train.csv")[0] == ("a fine film, really", "1")
    assert read_examples(data / "weather" / "test.txt") == [("bright day", "sunny"), ("grey day", "rainy")]


def test_known_and_other_tasks(data):
    sst = load_task(data, "sst-2")
    assert sst.labels == {"0": "negative", "1": "positive"} and len(sst.test) == 3  # dev split
    assert sst.demo("great fun", "1") == "Review: great fun Sentiment: positive."
    weather = load_task(data, "weather", template="Sky: {text} Weather:")
    assert weather.labels == {"rainy": "rainy", "sunny": "sunny"}
    assert weather.demo("grey", "rainy") == "Sky: grey Weather: rainy."
    (data / "numbers").mkdir()
    (data / "numbers" / "train.txt").write_text("0 a\n1 b\n")
    (data / "numbers" / "test.txt").write_text("0 c\n")
    with pytest.raises(LongMemError, match="--labels"):
        load_task(data, "numbers")
    assert load_task(data, "numbers", labels={"0": "no", "1": "yes"}).labels == {"0": "no", "1": "yes"}
    with pytest.raises(LongMemError, match="no task folder"):
        load_task(data, "subj")
    (data / "broken").mkdir()
    (data / "broken" / "train.txt").write_text("lonely\n")
    (data / "broken" / "test.txt").write_text("x y\n")
    with pytest.raises(LongMemError, match="line 1"):
        load_task(data, "broken")


def test_draws_are_seeded_disjoint_and_nested(data):
    task = load_task(data, "sst-2")
    config = IclConfig(data=str(data), demos=[4, 2], memory_demos=6)
    a, b = draw(task, config, 0), draw(task, config, 1)
    assert len(a.context) == 4 and len(a.memory) == 6 and not set(a.context) & set(a.memory)
    assert a.context == draw(task, config, 0).context and a.context != b.context
    with pytest.raises(LongMemError, match="training examples"):
        draw(task, IclConfig(data=str(data), demos=[4], memory_demos=20), 0)


def test_one_pass_label_scoring_equals_per_label_scoring():
    model = make_model("llama", trained=True, segment_length=64)
    ctx = prepare(model, parse_mode(model, "memory"), torch.randint(0, 256, (40,)))
    pre, query = torch.randint(0, 256, (20,)), torch.randint(0, 256, (5,))
    logits_of, kept, cut = window_classifier(model, ctx, pre, query, keep=64)
    assert torch.equal(kept, query) and not cut
    single = [torch.tensor([97]), torch.tensor([98]), torch.tensor([99])]
    fast = classify(logits_of, query, single)
    slow = [score(model, ctx, torch.cat([pre, query]), ids) for ids in single]
    assert fast.label == max(range(3), key=lambda i: slow[i].logprob) and fast.token == slow[0].argmax[0]
    multi = [torch.tensor([97, 98]), torch.tensor([99, 100, 101])]
    pred = classify(logits_of, query, multi)
    want = [score(model, ctx, torch.cat([pre, query]), ids).logprob for ids in multi]
    assert pred.label == max(range(2), key=want.__getitem__)


@pytest.mark.parametrize("family, mode", [("llama", "memory"), ("llama", "short-term-only"), ("llama", "no-memory"),
                                          ("llama", "backbone"), ("gpt2", "memory"), ("gpt2", "backbone")])
def test_shared_prefix_equals_recomputing_the_window(family, mode):
    tier = {"recent_tokens": 16} if family == "llama" else {}
    model = make_model(family, trained=True, segment_length=48, **tier)
    m = parse_mode(model, mode)
    ctx = prepare(model, m, torch.randint(0, 256, (70,)))
    prefix = torch.randint(0, 256, (25,))
    shared = SharedPrefix(model, ctx, prefix)
    for q in (3, 7, 1, 7):  # the caches rewind after every query
        query = torch.randint(0, 256, (q,))
        want = window_logits(model, ctx, torch.cat([prefix, query]))[-q:]
        assert torch.allclose(shared.logits(query), want, atol=1e-4)


def test_shared_prefix_with_a_copy_head_equals_recomputing_the_window():
    """The copy head's match history rewinds with the caches: queries that restate text held in memory
    get the same log-probabilities as recomputing prefix + query (without the rewind: off by 0.56)."""
    torch.manual_seed(3)
    model = make_model("llama", trained=True, segment_length=48, recent_tokens=16)
    with torch.no_grad():
        model.sidenet.copy_head.offset.fill_(2.0)  # trust key matches: runs and follows change the logits
    text = torch.randint(0, 256, (60,))
    ctx = prepare(model, parse_mode(model, "memory"), text[:40])
    prefix = torch.cat([text[40:], text[:5]])
    shared = SharedPrefix(model, ctx, prefix)
    for a, q in ((5, 6), (20, 7), (11, 4)):  # the caches rewind after every query
        query = text[a : a + q]
        want = window_logits(model, ctx, torch.cat([prefix, query]))[-q:]
        torch.testing.assert_close(shared.logits(query), want, atol=1e-3, rtol=1e-4)  # bf16 match-score ties


def test_long_prompts_fall_back_and_are_cut_from_the_left():
    model = make_model("llama", segment_length=16)
    ctx = prepare(model, parse_mode(model, "no-memory"), torch.zeros(0, dtype=torch.long))
    logits_of, kept, cut = window_classifier(model, ctx, torch.arange(20), torch.arange(30, 36), keep=16)
    assert cut and torch.equal(kept, torch.arange(30, 36)) and logits_of(kept).shape == (6, 260)
    _, kept, _ = window_classifier(model, ctx, torch.arange(5), torch.arange(40, 60), keep=16)
    assert torch.equal(kept, torch.arange(44, 60))


def test_icl_scores_every_task_seed_k_and_mode(data, tmp_path):
    model = make_model("llama", segment_length=256, **PLAIN)  # a bare SideNet: empty memory = the backbone
    config = IclConfig(data=str(data), tasks=["sst-2", "weather"], demos=[3, 0], memory_demos=8, seeds=2,
                       max_test=2, template="Sky: {text} Weather:")
    result = icl(model, config)
    assert len(result.scores) == 2 * 2 * 2 * 3
    assert {s.n for s in result.scores} == {2} and all(s.truncated == 0 for s in result.scores)
    memory = [s for s in result.scores if s.mode == "memory"]
    assert all(s.memory_tokens > 0 for s in memory)
    summary = result.summary()
    assert set(summary) == {"k3", "k0"} and set(summary["k3"]["memory"]["tasks"]) == {"sst-2", "weather"}
    for k in summary.values():
        for metric in ("accuracy", "accuracy_argmax"):
            assert k["no-memory"]["average"][metric] == pytest.approx(k["backbone"]["average"][metric])
    stats = summary["k3"]["memory"]["tasks"]["sst-2"]["accuracy"]
    assert len(stats["per_seed"]) == 2 and stats["std"] >= 0
    assert set(result.to_dict()["memory_minus_backbone_points"]) == {"k3", "k0"}
    assert icl_bars(result.to_dict(), tmp_path / "icl.png").stat().st_size > 1000


def test_shared_prefix_gives_the_same_accuracies(data):
    model = make_model("llama", trained=True, segment_length=200, recent_tokens=32)
    config = dict(data=str(data), tasks=["sst-2"], demos=[3], memory_demos=8, seeds=1,
                  modes=["memory", "no-memory", "backbone", "short-term-only"])
    fast = icl(model, IclConfig(**config))
    slow = icl(model, IclConfig(**config, shared_prefix=False))
    assert all(s.truncated == 0 for s in fast.scores)  # every prompt took the shared-prefix path
    assert [(s.accuracy, s.accuracy_argmax) for s in fast.scores] == [(s.accuracy, s.accuracy_argmax)
                                                                      for s in slow.scores]


def test_long_prompts_are_truncated_from_the_left(data):
    model = make_model("llama", segment_length=32)
    result = icl(model, IclConfig(data=str(data), tasks=["sst-2"], demos=[4], memory_demos=4, seeds=1,
                                  modes=["memory"]))
    assert result.scores[0].truncated == 3


def test_bad_configs(data):
    with pytest.raises(LongMemError, match="ICL modes"):
        IclConfig(modes=["window-64"])
    with pytest.raises(LongMemError, match="does not exist"):
        icl(make_model("llama"), IclConfig(data=str(data / "nowhere"), tasks=["sst-2"]))


def test_icl_runs_the_memtrm_layout_without_incremental_decoding(data):
    """MemTRM cannot decode incrementally: its LongMem modes recompute the window per sentence."""
    model = make_memtrm(segment_length=256)
    assert not model.decodes_incrementally and make_model("llama").decodes_incrementally
    config = IclConfig(data=str(data), tasks=["sst-2"], demos=[3], memory_demos=8, seeds=1, max_test=2,
                       modes=["memory", "no-memory"])
    result = icl(model, config)
    assert [s.mode for s in result.scores] == ["memory", "no-memory"] and result.scores[0].memory_tokens > 0


def test_intervals_and_paired_gains_are_computed_from_the_scores():
    """The 95% intervals: t over seeds (two or more), Wilson over sentences (one seed); the memory's gain
    over the backbone paired by task and seed, or by sentence with one seed. Numbers checked by hand."""
    from longmem.evals.icl import IclResult, SeedScore

    def score(task, seed, mode, correct):
        acc = correct.count("1") / len(correct)
        return SeedScore(task, seed, 4, mode, acc, acc, len(correct), 0, 0, correct)

    config = IclConfig(tasks=["a", "b"], demos=[4], seeds=2, modes=["memory", "backbone"])
    scores = [score("a", 0, "memory", "1110"), score("a", 1, "memory", "1100"),
              score("a", 0, "backbone", "1000"), score("a", 1, "backbone", "1100"),
              score("b", 0, "memory", "1111"), score("b", 1, "memory", "1111"),
              score("b", 0, "backbone", "1111"), score("b", 1, "backbone", "0111")]
    result = IclResult(config, scores)
    stats = result.summary()["k4"]["memory"]["tasks"]["a"]["accuracy"]
    assert stats["mean"] == pytest.approx(0.625)  # 0.75, 0.5: se 0.125, half-width 12.706 * 0.125, clipped
    assert stats["ci95"] == pytest.approx([0.0, 1.0])
    lo, hi = mean_interval([0.5, 0.6, 0.7])  # sd 0.1, se 0.0577, t(2) = 4.303
    assert (lo, hi) == pytest.approx((0.6 - 0.2484, 0.6 + 0.2484), abs=1e-4)
    gain = result.gain(4)
    assert gain["tasks"]["a"]["points"] == pytest.approx(25.0)  # +50 and 0
    assert gain["tasks"]["b"]["points"] == pytest.approx(12.5)  # 0 and +25
    assert gain["accuracy"] == pytest.approx(18.75)
    # the average over tasks per seed: (50 + 0) / 2 = 25 and (0 + 25) / 2 = 12.5: se 6.25
    assert gain["ci95"] == pytest.approx([18.75 - t95(1) * 6.25, 18.75 + t95(1) * 6.25])
    one = IclResult(IclConfig(tasks=["a"], demos=[4], seeds=1, modes=["memory", "backbone"]), scores[:1] + scores[2:3])
    assert one.summary()["k4"]["memory"]["tasks"]["a"]["accuracy"]["ci95"] == pytest.approx(list(wilson(3, 4)))
    lo, hi = one.gain(4)["tasks"]["a"]["ci95"]  # differences 0, 1, 1, 0: mean 0.5, sd 0.577
    assert (lo + hi) / 2 == pytest.approx(50.0) and (hi - lo) / 2 == pytest.approx(100 * 1.96 * 0.5774 / 2, rel=1e-3)
    assert one.gain(4)["ci95"] is None  # one seed: no interval of the average over seeds
