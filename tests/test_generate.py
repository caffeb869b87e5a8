"""Sampling, stop strings, streaming and the generation config."""

import pytest
import torch

from conftest import make_model
from longmem.errors import LongMemError
from longmem.inference.generate import GenerationConfig, _safe_length, generate, sample, stream


def test_greedy_is_argmax_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, GenerationConfig()) == 1
    tiny_p = GenerationConfig(temperature=1.0, top_p=1e-6)
    assert {sample(logits, tiny_p, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    probs = torch.softmax(logits, -1)  # 0.024, 0.479, 0.065, 0.433: {1, 3} hold 0.911
    assert abs(float(probs[1] + probs[3]) - 0.911) < 1e-3
    for top_p, expected in ((0.9, {1, 3}), (0.95, {1, 2, 3})):
        cfg = GenerationConfig(temperature=1.0, top_p=top_p)
        assert {sample(logits, cfg, torch.Generator().manual_seed(s)) for s in range(300)} == expected
    hot = GenerationConfig(temperature=50.0)
    assert {sample(logits, hot, torch.Generator().manual_seed(s)) for s in range(300)} == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible_and_greedy_matches_argmax_decoding():
    model = make_model("llama")
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    a, b = generate(model, "Once upon", config=cfg), generate(model, "Once upon", config=cfg)
    assert a.text == b.text and a.tokens == 12 and a.finish_reason == "length"
    greedy = generate(model, "Once upon", config=GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    ids = list("Once upon".encode())
    for _ in range(6):  # the slow way: the whole sequence through the model each step
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy.text == model.tokenizer.decode(ids[9:], skip_special_tokens=True)


def test_stop_strings_end_generation_and_never_leak_into_the_stream():
    model = make_model("llama")
    free = generate(model, "Hello", config=GenerationConfig(max_new_tokens=30, stop_at_eos=False))
    stop = free.text[5:8]  # a string the greedy continuation is known to produce
    pieces = stream(model, "Hello", config=GenerationConfig(max_new_tokens=30, stop=[stop], stop_at_eos=False))
    text = "".join(pieces)
    assert text == free.text[: free.text.find(stop)] and stop not in text
    assert pieces.result.finish_reason == "stop" and pieces.result.text == text


def test_safe_length_holds_back_partial_stops_and_characters():
    assert _safe_length("hello wor", ["world"]) == len("hello ")
    assert _safe_length("abab", ["abac"]) == 2  # "ab" could still become "abac"
    assert _safe_length("caf\ufffd", []) == 3
    assert _safe_length("plain", ["xyz"]) == 5


def test_eos_ends_generation():
    model = make_model("llama")
    first = int(model(torch.tensor([list(b"Hi")])).logits[0, -1].argmax())
    model.tokenizer.eos_token = model.tokenizer.convert_ids_to_tokens(first)  # greedy's next token is now EOS
    assert model.tokenizer.eos_token_id == first
    out = generate(model, "Hi", config=GenerationConfig(max_new_tokens=5))
    assert out.finish_reason == "eos" and out.tokens == 0 and out.text == ""
    assert generate(model, "Hi", config=GenerationConfig(max_new_tokens=5, stop_at_eos=False)).tokens == 5


def test_streamed_pieces_add_up_to_the_text_and_long_generation_slides_the_window():
    model = make_model("gpt2")  # window 16 tokens: 40 tokens move 3 x 8 tokens into memory
    pieces = stream(model, "abc", config=GenerationConfig(max_new_tokens=40, stop_at_eos=False))
    parts = list(pieces)
    assert len(parts) > 1 and "".join(parts) == pieces.result.text
    assert pieces.result.tokens == 40 and pieces.result.memory_tokens > 0


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("stop", [""]), ("window", 0),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(LongMemError, match=field):
        GenerationConfig(**{field: value})


def test_empty_prompt_and_bad_window_are_clear_errors():
    model = make_model("llama", recent_tokens=0)  # without a tier the window keeps some local context
    with pytest.raises(LongMemError, match="prompt is empty"):
        generate(model, "")
    with pytest.raises(LongMemError, match="evict"):
        generate(model, "x", config=GenerationConfig(window=8, evict=8))
    with pytest.raises(LongMemError, match="evict"):
        generate(model, "x", config=GenerationConfig(window=8, evict=3))
