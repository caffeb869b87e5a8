import random

import pytest
import torch

from conftest import PLAIN, byte_tokenizer, make_model
from longmem.errors import LongMemError
from longmem.evals.passkey import PasskeyConfig, PromptBuilder, passkey
from longmem.evals.scoring import greedy, parse_mode, prepare, score, split_prefix, variant

SMALL = dict(lengths=[128, 200], depths=[0.0, 0.5, 1.0], trials=2, filler="repeat", intro="")


def test_prompts_have_the_exact_length_and_the_needle_at_its_depth():
    config = PasskeyConfig(**SMALL | {"intro": "Find the key.\n"})
    builder = PromptBuilder(byte_tokenizer(), config)
    tok = byte_tokenizer()
    first = builder.build(200, 0.0, random.Random(0))
    last = builder.build(200, 1.0, random.Random(0))
    assert first.ids.shape[0] == last.ids.shape[0] == 200
    text = tok.decode(first.ids)
    assert text.startswith("Find the key.\n\nThe pass key is " + first.passkey)
    assert tok.decode(last.ids).endswith(f"{last.passkey} is the pass key.\n\nWhat is the pass key? The pass key is")
    assert tok.decode(first.answer) == " " + first.passkey and len(first.passkey) == 5
    mid = builder.build(200, 0.5, random.Random(1))
    assert first.needle_at < mid.needle_at < last.needle_at
    assert tok.decode(mid.ids[mid.needle_at - 2 : mid.needle_at]).endswith((". ", ".", "\n"))  # at a sentence end


def test_prose_filler_comes_from_the_file_and_wraps(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("Emma was handsome. She was clever. ")
    builder = PromptBuilder(byte_tokenizer(), PasskeyConfig(**SMALL | {"filler": str(prose)}))
    prompt = builder.build(300, 0.5, random.Random(3))
    text = byte_tokenizer().decode(prompt.ids)
    assert "handsome" in text and "The pass key is" in text and prompt.ids.shape[0] == 300


def test_every_trial_is_scored_in_every_mode_and_empty_memory_is_the_backbone():
    model = make_model("llama", **PLAIN)  # a bare SideNet: with its memory empty, logits equal the backbone's
    result = passkey(model, PasskeyConfig(**SMALL | {"modes": ["memory", "no-memory", "backbone", "window-64"]}))
    assert len(result.trials) == 2 * 3 * 2 * 4
    by_mode = {}
    for t in result.trials:
        by_mode.setdefault((t.length, t.depth, t.trial), {})[t.mode] = t
    for rows in by_mode.values():
        assert len({r.passkey for r in rows.values()}) == 1  # same prompt in every mode
        assert rows["no-memory"].answer_logprob == pytest.approx(rows["backbone"].answer_logprob, abs=1e-4)
    summary = result.summary()
    assert set(summary) == {"memory", "no-memory", "backbone", "window-64"}
    assert set(summary["memory"]["grid"]) == {"128", "200"}
    assert set(summary["memory"]["by_depth"]) == {"0", "0.5", "1"}
    assert 0.0 <= summary["memory"]["accuracy"] <= 1.0


def test_memory_mode_reads_the_head_and_only_the_head():
    model = make_model("llama", trained=True)  # memory changes the logits
    memory, empty = parse_mode(model, "memory"), parse_mode(model, "no-memory")
    ids = torch.randint(0, 256, (100,))
    answer = torch.tensor([49, 50, 51])
    head, local = split_prefix(ids, memory.window, answer.shape[0])
    assert local.shape[0] == 16 - 3 and head.shape[0] + local.shape[0] == 100
    ctx = prepare(model, memory, head)
    assert ctx.start == head.shape[0] and ctx.memory.num_tokens() > 0
    with_memory = score(model, ctx, local, answer).logprob
    without = score(model, prepare(model, empty, head), local, answer).logprob
    assert with_memory != pytest.approx(without, abs=1e-5)
    short_head, short_local = split_prefix(ids[:10], memory.window, answer.shape[0])  # fits the window
    a = score(model, prepare(model, memory, short_head), short_local, answer).logprob
    b = score(model, prepare(model, empty, short_head), short_local, answer).logprob
    assert a == pytest.approx(b, abs=1e-6)


def test_exact_match_is_greedy_decoding():
    model = make_model("gpt2", trained=True)
    mode = parse_mode(model, "memory")
    ids = torch.randint(0, 256, (60,))
    head, local = split_prefix(ids, mode.window, 4)
    ctx = prepare(model, mode, head)
    decoded = torch.tensor(greedy(model, ctx, local, 4))
    assert score(model, ctx, local, decoded).exact
    other = decoded.clone()
    other[1] = (other[1] + 1) % 256
    res = score(model, ctx, local, other)
    assert not res.exact and res.argmax[0] == int(decoded[0])


def test_variant_changes_memory_settings_without_touching_the_model():
    model = make_model("llama")
    small = variant(model, memory_size=32, chunk_size=4)
    assert small.config.memory_size == 32 and model.config.memory_size == 64
    assert small.sidenet is model.sidenet and small.new_memory(1).capacity == 8
    with pytest.raises(LongMemError, match="multiple"):
        variant(model, memory_size=30, chunk_size=4)
    with pytest.raises(LongMemError, match="no field"):
        variant(model, colour="red")


def test_another_wording_of_needle_question_and_answer():
    config = PasskeyConfig(**SMALL | {"needle": "\nThe vault code is {key}.\n", "question": "\nThe vault code is",
                                       "answer": " {key}."})
    tok = byte_tokenizer()
    prompt = PromptBuilder(tok, config).build(200, 0.5, random.Random(2))
    text = tok.decode(prompt.ids)
    assert f"The vault code is {prompt.passkey}." in text and "pass key" not in text
    assert text.endswith("\nThe vault code is") and tok.decode(prompt.answer) == f" {prompt.passkey}."


@pytest.mark.parametrize("bad, match", [
    (dict(lengths=[]), "lengths"), (dict(depths=[1.5]), "depths"), (dict(trials=0), "trials"),
    (dict(needle="no key here"), "needle"), (dict(answer=" {key} {oops}"), "answer"), (dict(question=" "), "question"),
])
def test_bad_configs_are_clear_errors(bad, match):
    with pytest.raises(LongMemError, match=match):
        PasskeyConfig(**SMALL | bad)


def test_bad_modes_and_short_lengths_are_clear_errors():
    model = make_model("llama")
    with pytest.raises(LongMemError, match="native context"):
        passkey(model, PasskeyConfig(**SMALL | {"modes": ["window-999"]}))
    with pytest.raises(LongMemError, match="not one of"):
        passkey(model, PasskeyConfig(**SMALL | {"modes": ["memroy"]}))
    with pytest.raises(LongMemError, match="too short"):
        passkey(model, PasskeyConfig(**SMALL | {"lengths": [40]}))


def test_window_mode_matches_the_exact_context_of_the_memory_mode():
    assert parse_mode(make_model("llama", recent_tokens=0), "window").name == "window-16"  # segment only
    tiered = make_model("llama", recent_tokens=16)  # + a 16-token short-term tier
    assert parse_mode(tiered, "window").name == "window-32"
    with pytest.raises(LongMemError, match="duplicate"):
        passkey(tiered, PasskeyConfig(**SMALL | {"modes": ["window", "window-32"]}))


def test_memory_mode_with_a_short_term_tier():
    model = make_model("llama", trained=True, recent_tokens=16)
    result = passkey(model, PasskeyConfig(**SMALL | {"modes": ["memory", "no-memory", "window"], "trials": 1}))
    rows = {(t.mode, t.length, t.depth): t for t in result.trials}
    assert set(result.summary()) == {"memory", "no-memory", "window-32"}
    assert any(rows["memory", n, d].answer_logprob != pytest.approx(rows["no-memory", n, d].answer_logprob, abs=1e-5)
               for n in (128, 200) for d in (0.0, 0.5, 1.0))


def test_short_term_only_keeps_the_tier_and_leaves_the_bank_empty():
    # without a copy head: its token log is long-term memory too (short-term-only keeps none)
    model = make_model("llama", trained=True, recent_tokens=16, copy_head=False, copy_gate=False)
    memory, short = parse_mode(model, "memory"), parse_mode(model, "short-term-only")
    ids, answer = torch.randint(0, 256, (120,)), torch.tensor([49, 50])
    head, local = split_prefix(ids, memory.window, 2)
    full, tier = prepare(model, memory, head), prepare(model, short, head)
    assert full.memory.num_tokens() > 0 and tier.memory.num_tokens() == 0 and tier.start == full.start
    assert score(model, full, local, answer).logprob != pytest.approx(score(model, tier, local, answer).logprob)
    head, local = split_prefix(ids[:30], memory.window, 2)  # the head fits the tier: nothing reaches the bank
    a = score(model, prepare(model, memory, head), local, answer).logprob
    assert a == pytest.approx(score(model, prepare(model, short, head), local, answer).logprob, abs=1e-6)
    with pytest.raises(LongMemError, match="short-term tier"):
        prepare(make_model("llama", recent_tokens=0), parse_mode(model, "short-term-only"), head)


def test_scoring_never_changes_the_memory():
    model = make_model("llama", trained=True, recent_tokens=16)
    mode = parse_mode(model, "memory")
    ids = torch.randint(0, 256, (90,))
    head, local = split_prefix(ids, mode.window, 3)
    ctx = prepare(model, mode, head)
    tokens, end = ctx.memory.num_tokens(), int(ctx.memory.end_position[0])
    first = [score(model, ctx, local, torch.tensor(c)).logprob for c in ([1, 2, 3], [4, 5, 6], [1, 2, 3])]
    assert first[0] == first[2] and ctx.memory.num_tokens() == tokens and int(ctx.memory.end_position[0]) == end
