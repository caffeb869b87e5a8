"""Gemma 3's layout in the family seam: sliding-window layers, two rotary tables, sandwich norms, <bos>.

The shared tests (the ``family`` fixture) run every generic check on a tiny Gemma 3 too; these check what
only Gemma has, against Hugging Face's own Gemma 3 on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from longmem.errors import LongMemError
from longmem.model.backbone import FrozenBackbone, default_memory_layer

from conftest import PLAIN, make_model, tiny_gemma3

T = 16
BOS = 257


def test_the_memory_layer_is_a_global_layer():
    assert default_memory_layer(18, 2, [5, 11, 17]) == 11  # Gemma 3 270M: 0.7 x 18 -> 13 is a local layer
    assert default_memory_layer(30, 2, None) == 21  # SmolLM2 unchanged
    assert FrozenBackbone(tiny_gemma3(), None, 2).memory_layer in (1, 3)
    with pytest.raises(LongMemError, match="sliding-window layer"):
        FrozenBackbone(tiny_gemma3(), 2, 1)


def test_a_window_without_bos_gets_one_ahead_of_it():
    model = make_model("gemma3", **PLAIN)
    ids = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        got = model.backbone.logits(model.backbone(ids).hidden[-1])
        with_bos = torch.cat([torch.full((2, 1), BOS), ids], 1)
        want = model.backbone.model(input_ids=with_bos).logits[:, 1:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        same = model.backbone.logits(model.backbone(with_bos).hidden[-1])  # one <bos> only
        torch.testing.assert_close(same, model.backbone.model(input_ids=with_bos).logits, atol=1e-4, rtol=1e-4)
        keys, _, _ = model.backbone.memory_kv(ids)
        torch.testing.assert_close(keys, model.backbone(ids).mem_keys, atol=1e-5, rtol=1e-5)


def _banded(model, n: int, window: int | None) -> torch.Tensor:
    """[1,1,N,N] additive mask: each segment sees itself and the previous one (the tier, R = T, no sinks),
    and a sliding-window layer only its last ``window`` positions."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i // T == j // T) | (i // T == j // T + 1))
    if window is not None:
        allowed &= i - j < window
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]


def test_the_short_term_tier_respects_the_local_layers_windows():
    model = make_model("gemma3", recent_tokens=T, sink_tokens=0, **{k: v for k, v in PLAIN.items()
                                                                    if k != "recent_tokens"})
    ids = torch.randint(0, 256, (1, 3 * T))
    memory, got = model.new_memory(1), []
    with torch.no_grad():
        for a in range(0, ids.shape[1], T):
            out = model(ids[:, a : a + T], memory=memory, backbone_logits=True)
            model.write_memory(memory, out)
            got.append(out.backbone_logits)
        window = model.backbone.model.config.sliding_window
        masks = {"full_attention": _banded(model, 3 * T, None), "sliding_attention": _banded(model, 3 * T, window)}
        want = model.backbone.model(input_ids=ids, attention_mask=masks).logits
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-4, rtol=1e-4)


def test_copied_local_and_global_layers_read_the_tier_as_the_backbone_does():
    model = make_model("gemma3", recent_tokens=T, sink_tokens=0, **{k: v for k, v in PLAIN.items()
                                                                    if k != "recent_tokens"})
    ids = torch.randint(0, 256, (1, 2 * T))
    memory = model.new_memory(1)
    with torch.no_grad():
        model.write_memory(memory, model(ids[:, :T], memory=memory))
        frozen = model.backbone(ids[:, T:], past=memory.recent)
        rope = model._rope(T, memory.recent.slots)
        windows = set()
        for layer in range(model.backbone.num_layers):  # every layer, as a SideNet block would copy it
            from longmem.model.blocks import SideBlock

            family = model.backbone.family
            config = model.backbone.model.config
            block = SideBlock(model.backbone.layers[layer], family, model.backbone.attn_shape, layer,
                              family.window(config, layer))
            windows.add(block.window)
            cos, sin = model._rope_at(("local", T, memory.recent.slots),
                                      torch.arange(memory.recent.slots, memory.recent.slots + T), layer)
            got = block(frozen.hidden[layer], (cos, sin), memory.recent.layer(layer))
            torch.testing.assert_close(got, frozen.hidden[layer + 1], atol=1e-4, rtol=1e-4)
    assert windows == {None, config.sliding_window}
    assert set(rope) == {b.layer_index for b in model.sidenet.blocks}


def test_local_and_global_layers_use_their_own_rotary_tables():
    model = make_model("gemma3", **PLAIN)
    family, hf = model.backbone.family, model.backbone.model
    pos = torch.arange(5)
    local, _ = family.rope_cos_sin(hf, pos, torch.float32, 0)
    glob, _ = family.rope_cos_sin(hf, pos, torch.float32, 1)
    assert not torch.allclose(local, glob)
    exact, _ = family.rope_exact(hf, pos, torch.float32, 0)
    torch.testing.assert_close(exact, local)


def test_documents_start_with_bos_only_where_the_tokenizer_puts_one():
    from transformers import AutoTokenizer  # noqa: F401  (the byte tokenizer adds nothing)

    from longmem.data.tokens import document_ids, leading_bos
    from conftest import byte_tokenizer

    plain = byte_tokenizer()
    assert leading_bos(plain) is None and document_ids(plain, "ab") == [97, 98]

    class WithBos:  # a Gemma-like tokenizer: <bos> first by default
        bos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return {"input_ids": ([2] if add_special_tokens else []) + ids}

    tok = WithBos()
    assert leading_bos(tok) == 2
    assert document_ids(tok, "ab") == [2, 97, 98]
    assert document_ids(tok, "ab", start=False) == [97, 98]  # a text continuing a memory's stream


def test_the_gemma_backbone_without_its_packages_is_one_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from longmem.model import hub

    monkeypatch.setenv("LONGMEM_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    with pytest.raises(LongMemError, match="setup.sh --gemma"):
        hub.load_model_and_tokenizer("gemma3-270m")
    assert not any(tmp_path.rglob("*.safetensors"))


def bos_tokenizer():
    """The byte tokenizer, putting <s> (257) first by default as Gemma's does."""
    from tokenizers import processors

    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def test_evaluation_prompts_start_with_one_bos_and_their_pieces_with_none(tmp_path):
    import random

    from longmem.evals.passkey import PasskeyConfig, PromptBuilder as PasskeyPrompts
    from longmem.evals.recall import PromptBuilder, RecallConfig, TaskMaker
    from longmem.evals.scoring import stream_start, token_ids

    tok = bos_tokenizer()
    assert tok("ab")["input_ids"] == [BOS, 97, 98]
    assert token_ids(tok, " ab").tolist() == [32, 97, 98] and stream_start(tok).tolist() == [BOS]
    filler = tmp_path / "filler.txt"
    filler.write_text("Some plain prose sentence here. " * 40)
    config = RecallConfig(filler=str(filler))
    rng = random.Random(0)
    prompt = PromptBuilder(tok, config).build(TaskMaker(config)("multikey", rng), 1024, rng)
    assert prompt.ids[0] == BOS and int((prompt.ids == BOS).sum()) == 1
    passkey = PasskeyPrompts(tok, PasskeyConfig(filler=str(filler))).build(512, 0.5, random.Random(0))
    assert passkey.ids[0] == BOS and int((passkey.ids == BOS).sum()) == 1
    assert BOS not in passkey.answer.tolist()
