import pytest
import torch

from conftest import make_model, tiny_gpt2, tiny_llama
from longmem.model.backbone import FrozenBackbone, default_memory_layer, with_cache
from longmem.errors import LongMemError


def test_default_memory_layer_matches_paper_and_smollm2():
    assert default_memory_layer(24, 2) == 17  # paper: 18th of 24, SideNet block 9 of 12
    assert default_memory_layer(30, 2) == 21  # SmolLM2: ~70% depth
    for layers in (4, 12, 24, 30, 32):
        assert (default_memory_layer(layers, 2) + 1) % 2 == 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_residual_stream_is_raw_and_logits_match_hf(make):
    hf = make()
    frozen = FrozenBackbone(hf, None, 2)
    ids = torch.randint(0, 256, (2, 12))
    out = frozen(ids)
    ref = hf(ids, output_hidden_states=True)
    assert len(out.hidden) == frozen.num_layers + 1
    for i in range(frozen.num_layers):  # inputs of every layer are raw block outputs
        torch.testing.assert_close(out.hidden[i], ref.hidden_states[i])
    # H_L is before the final norm: it differs from HF's last hidden state, its logits do not
    assert not torch.allclose(out.hidden[-1], ref.hidden_states[-1])
    torch.testing.assert_close(frozen.logits(out.hidden[-1]), ref.logits)


def test_memory_keys_are_pre_rotary_k_proj_outputs():
    hf = tiny_llama()
    frozen = FrozenBackbone(hf, 1, 2)
    seen = {}
    hf.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", o))
    hf.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, a, o: seen.setdefault("v", o))
    ids = torch.randint(0, 256, (1, 10))
    hf(ids)
    out = frozen(ids)
    b, h, t, d = out.mem_keys.shape  # [B,Hkv,T,Dh]
    assert (h, d) == (2, 8)
    torch.testing.assert_close(out.mem_keys.transpose(1, 2).reshape(b, t, h * d), seen["k"])
    torch.testing.assert_close(out.mem_values.transpose(1, 2).reshape(b, t, h * d), seen["v"])


def test_backbone_is_frozen_and_gets_no_gradients(family):
    model = make_model(family, trained=True)
    model.train()
    assert not model.backbone.model.training
    ids = torch.randint(0, 256, (2, 16))
    mem = model.new_memory(2)
    for _ in range(2):  # the first segment leaves the short-term tier for the bank
        model.write_memory(mem, model(ids, memory=mem))
    out = model(ids, memory=mem, labels=ids)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    # the whole SideNet trains but its final norm (the backbone's: with no memory nothing may change)
    assert trainable == {id(p) for n, p in model.sidenet.named_parameters() if not n.startswith("norm.")}
    assert trainable.isdisjoint({id(p) for p in model.backbone.parameters()})
    assert all(p.grad is not None for p in model.trainable_parameters())
    gate = model.sidenet.memory_block.gate
    assert gate.grad.abs().sum() > 0


def test_bad_memory_layer_and_unsupported_family():
    with pytest.raises(LongMemError, match="outside"):
        FrozenBackbone(tiny_llama(), 9, 2)
    with pytest.raises(LongMemError, match="multiple of r"):
        make_model("llama", memory_layer=2)
    hf = tiny_llama()
    hf.config.model_type = "bert"
    with pytest.raises(LongMemError, match="not supported"):
        FrozenBackbone(hf, None, 2)


def test_segment_longer_than_native_context_is_refused():
    with pytest.raises(LongMemError, match="native context"):
        make_model("gpt2", segment_length=512)


def test_one_decoded_token_takes_the_unmasked_gqa_call_with_the_same_logits(monkeypatch):
    import longmem.model.backbone as backbone

    shapes = []
    real = backbone.F.scaled_dot_product_attention
    monkeypatch.setattr(backbone.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: shapes.append(q.shape) or real(q, *a, **k))
    hf = tiny_llama()
    wrapped = FrozenBackbone(hf, None, 2)  # routes the model's attention through longmem's function
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = hf(input_ids=ids).logits[:, -1]
        cache = wrapped.new_cache()
        hf(input_ids=ids[:, :-1], use_cache=True, **with_cache(hf, cache))
        shapes.clear()
        step = hf(input_ids=ids[:, -1:], use_cache=True, **with_cache(hf, cache)).logits[:, -1]
    assert len(shapes) == 4 and all(s[1:3] == (2, 2) for s in shapes)  # per layer [B, KV heads, G, Dh]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
