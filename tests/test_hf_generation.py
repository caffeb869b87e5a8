"""Hugging Face-style ``model.generate``: against the backbone's own ``generate()``, with transformers' streamers,
processors and stopping criteria, and with a memory."""

import threading

import pytest
import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          TextIteratorStreamer)

from conftest import PLAIN, TINY, byte_tokenizer, make_model
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.model.backbone import FrozenBackbone
from longmem.model.longmem import LongMemModel
from test_decode import filled, trained


SPREAD = {"llama": 0.3, "gpt2": 0.3, "gemma3": 0.03}  # weight std at which greedy output varies (measured)


def lively(family: str) -> LongMemModel:
    """The bare SideNet (with an empty memory: the backbone exactly) on a tiny backbone whose matrices are drawn
    wider, so that greedy decoding does not settle on one token at once and a mismatch would show."""
    hf = TINY[family]()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * SPREAD[family])
    cfg = LongMemConfig(**(dict(backbone=f"tiny-{family}", chunk_size=2, topk=8, memory_size=64, segment_length=64,
                                memory_dtype="float32", memory_layer=1) | PLAIN))
    return LongMemModel(cfg, FrozenBackbone(hf, cfg.memory_layer, cfg.reduction, cfg.backbone), byte_tokenizer())


def prompt(family: str, n: int = 12, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))
    if family == "gemma3":  # Gemma's documents start with <bos> (the backbone alone would get one too)
        ids[0, 0] = 257
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_greedy_with_an_empty_memory_is_the_backbones_own_generate(family):
    model, ids = lively(family), prompt(family)
    options = dict(max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = model.backbone.model.generate(ids, **options)
    got = model.generate(ids, GenerationConfig(**options))
    assert torch.equal(got, want)
    assert len(set(want[0, 12:].tolist())) > 3  # not one token repeated: a real comparison
    penalised = dict(options, repetition_penalty=1.3)
    assert torch.equal(model.generate(ids, **penalised), model.backbone.model.generate(ids, **penalised))


def test_sampling_with_a_seed_reproduces_and_options_apply():
    model, ids = lively("llama"), prompt("llama")
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(model.generate(ids, max_new_tokens=16, do_sample=True, temperature=0.9, top_k=20, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 28)
    torch.manual_seed(12)
    assert not torch.equal(model.generate(ids, max_new_tokens=16, do_sample=True, temperature=2.0), runs[0])
    greedy = model.generate(ids, max_new_tokens=16, do_sample=False)
    stop = int(greedy[0, 15])  # the 4th new token as end-of-sequence: generation ends there
    ended = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=stop)
    assert torch.equal(ended[0], greedy[0, :16])
    text = model.tokenizer.decode(greedy[0, 12:])
    cut = model.generate(ids, max_new_tokens=16, do_sample=False, stop_strings=text[2:4])
    assert model.tokenizer.decode(cut[0, 12:]).endswith(text[2:4]) and cut.shape[1] < greedy.shape[1]


def test_streamer_processors_and_criteria_are_transformers_own():
    model, ids = lively("llama"), prompt("llama")
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("ids", model.generate(ids, max_new_tokens=10,
                                                                                   streamer=streamer)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == model.tokenizer.decode(out["ids"][0, 12:])

    class Ban(LogitsProcessor):  # never the token greedy decoding picks first
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores):
            scores[:, self.token] = -float("inf")
            return scores

    first = int(out["ids"][0, 12])
    banned = model.generate(ids, max_new_tokens=10, logits_processor=LogitsProcessorList([Ban(first)]))
    assert first not in banned[0, 12:].tolist()

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 15, dtype=torch.bool)

    assert model.generate(ids, max_new_tokens=10, stopping_criteria=[AfterThree()]).shape == (1, 15)


def test_a_memory_is_read_and_left_unchanged():
    model = trained("llama")
    memory = filled(model, tokens=64)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    held = memory.num_tokens()
    with_memory = model.generate(ids, max_new_tokens=40, memory=memory)  # past the window: evictions
    assert memory.num_tokens() == held  # the window's evictions went to a copy
    assert not torch.equal(with_memory, model.generate(ids, max_new_tokens=40))
    assert torch.equal(with_memory, model.generate(ids, max_new_tokens=40, memory=memory))
    batch = model.generate(torch.cat([ids, ids.flip(1)]), max_new_tokens=5, memory=memory)
    assert torch.equal(batch[:1], model.generate(ids, max_new_tokens=5, memory=memory))


def test_bad_options_are_refused_by_name():
    model = make_model("llama", **PLAIN)
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(LongMemError, match="num_beams=4"):
        model.generate(ids, num_beams=4)
    with pytest.raises(LongMemError, match="not generation options: max_new_tokns"):
        model.generate(ids, max_new_tokns=4)
    with pytest.raises(LongMemError, match="one sequence"):
        model.generate(torch.cat([ids, ids]), streamer=TextIteratorStreamer(model.tokenizer))
    with pytest.raises(LongMemError, match="length >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
