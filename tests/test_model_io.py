import json

import pytest
import torch

from conftest import make_model, tiny_llama
from longmem.model.backbone import FrozenBackbone
from longmem.errors import LongMemError
from longmem.model.longmem import LongMemModel


def test_sidenet_save_load_roundtrip_is_bit_exact(tmp_path, family):
    model = make_model(family, trained=True)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "sn")
    assert sorted(p.name for p in (tmp_path / "sn").iterdir()) == ["config.json", "model.safetensors"]
    back = LongMemModel.from_backbone(tmp_path / "sn", model.backbone, model.tokenizer)
    for (na, a), (nb, b) in zip(model.sidenet.state_dict().items(), back.sidenet.state_dict().items()):
        assert na == nb and torch.equal(a, b)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(ids).logits, back(ids).logits)
    saved = json.loads((tmp_path / "sn" / "config.json").read_text())
    assert saved["config"]["backbone_fingerprint"] == model.backbone.fingerprint


def test_sidenet_refuses_other_backbone_and_tampering(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "sn")
    other = FrozenBackbone(tiny_llama(seed=1), None, 2)
    with pytest.raises(LongMemError, match="trained for backbone"):
        LongMemModel.from_backbone(tmp_path / "sn", other)
    weights = tmp_path / "sn" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LongMemError, match="checksum"):
        LongMemModel.from_backbone(tmp_path / "sn", model.backbone)
    weights.write_bytes(raw)
    LongMemModel.from_backbone(tmp_path / "sn", model.backbone)  # intact again
    with pytest.raises(LongMemError, match="no SideNet directory"):
        LongMemModel.from_backbone(tmp_path / "missing", model.backbone)


def test_config_rejects_unknown_keys_and_bad_values():
    from longmem.config import LongMemConfig, from_dict

    with pytest.raises(LongMemError, match="unknown LongMemConfig keys: colour"):
        from_dict(LongMemConfig, {"colour": 1})
    with pytest.raises(LongMemError, match="topk"):
        LongMemConfig(topk=10, chunk_size=4)
    with pytest.raises(LongMemError, match="retrieval"):
        LongMemConfig(retrieval="sum")
    with pytest.raises(LongMemError, match="unknown LongMemConfig keys: init"):  # a switch that lost: deleted
        from_dict(LongMemConfig, {"init": "paper"})


def test_defaults_are_the_shipped_architecture():
    from longmem.config import LongMemConfig
    from longmem.model.saved import read_config, shipped_sidenet

    shipped = read_config(shipped_sidenet("smollm2-135m"))
    default = LongMemConfig()
    runtime = ("memory_size", "backbone_fingerprint", "memory_layer", "copy_layer")  # bound when built
    for name, value in default.to_dict().items():
        if name not in runtime:
            assert getattr(shipped, name) == value or (name == "recent_tokens" and value is None), name
    assert default.memory_size == 65536 and shipped.recent_tokens == shipped.segment_length


def test_memory_settings_are_chosen_at_load_time(tmp_path):
    model = make_model("llama", memory_size=64, retrieval="faiss")
    model.save_pretrained(tmp_path / "sn")
    back = LongMemModel.from_backbone(tmp_path / "sn", model.backbone)
    assert back.config.memory_size == 65536 and back.config.retrieval == "torch"  # the defaults, not the saved ones


def _as_format_1(path, **changes):
    """Rewrite a saved SideNet as longmem 0.1 wrote it (old config keys, 'pointer.' weight names)."""
    from safetensors.torch import load_file, save_file

    from longmem.files import sha256

    meta = json.loads((path / "config.json").read_text())
    cfg = meta["config"]
    cfg |= {"init": "delta", "fusion": "joint", "position_scheme": "true", "fixed_distance": 1024, "coupled": False,
            "search_positions": "absolute", "retrieval_heads": "query", "style_layers": "memory", "style_width": 0,
            "pointer": cfg.pop("copy_head"), "pointer_layer": cfg.pop("copy_layer"),
            "pointer_context": cfg.pop("copy_gate"), "pointer_ngram": 3, "pointer_local": True} | changes
    state = {k.replace("copy_head.", "pointer."): v for k, v in load_file(path / "model.safetensors").items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    meta |= {"format_version": 1, "weights_sha256": sha256(path / "model.safetensors")}
    (path / "config.json").write_text(json.dumps(meta))


def test_a_format_1_sidenet_loads_with_the_same_logits_or_names_what_was_removed(tmp_path):
    model = make_model("llama", trained=True)
    model.save_pretrained(tmp_path / "v1")
    _as_format_1(tmp_path / "v1")
    back = LongMemModel.from_backbone(tmp_path / "v1", model.backbone, model.tokenizer)
    ids = torch.randint(0, 8, (1, 16))
    assert torch.equal(model(ids).logits, back(ids).logits)
    model.save_pretrained(tmp_path / "paper")
    _as_format_1(tmp_path / "paper", init="paper")
    with pytest.raises(LongMemError, match="init='paper'"):
        LongMemModel.from_backbone(tmp_path / "paper", model.backbone)
    model.save_pretrained(tmp_path / "keys")
    _as_format_1(tmp_path / "keys", pointer_ngram=0)
    with pytest.raises(LongMemError, match="exact matches"):
        LongMemModel.from_backbone(tmp_path / "keys", model.backbone)


def test_memory_from_model_refuses_other_backbone(tmp_path):
    from longmem.memory import load_memory, save_memory

    model = make_model("llama")
    mem = model.new_memory(1)
    model.write_memory(mem, model(torch.randint(0, 256, (1, 16)), memory=mem))
    save_memory(mem, tmp_path / "m")
    other = make_model("gpt2")
    with pytest.raises(LongMemError, match="built for"):
        load_memory(tmp_path / "m", expect=other.memory_meta())
    assert load_memory(tmp_path / "m", expect=model.memory_meta()).num_tokens() == mem.num_tokens()


def test_the_shipped_sidenet_is_packaged_intact():
    from longmem.files import load_checked_safetensors, load_json
    from longmem.model.saved import FORMAT_VERSION, WEIGHTS, read_config, shipped_sidenet

    path = shipped_sidenet("smollm2-135m")
    assert path is not None and shipped_sidenet("no-such-backbone") is None
    config = read_config(path)
    assert config.recent_tokens == 1024 and config.copy_head and config.style_rank == 64
    assert config.backbone == "smollm2-135m" and load_json(path / "config.json")["format_version"] == FORMAT_VERSION
    weights = path / WEIGHTS
    assert weights.stat().st_size <= 60 * 2**20
    state = load_checked_safetensors(weights, load_json(path / "config.json")["weights_sha256"], "SideNet")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
