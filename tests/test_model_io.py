import json

import pytest
import torch

from conftest import make_model, tiny_llama
from longmem.model.backbone import FrozenBackbone
from longmem.errors import LongMemError
from longmem.model.longmem import LongMemModel


def test_sidenet_save_load_roundtrip_is_bit_exact(tmp_path, family):
    model = make_model(family, init="paper")
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
    with pytest.raises(LongMemError, match="fusion"):
        LongMemConfig(fusion="sum")


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
    from longmem.model.longmem import WEIGHTS, read_config, shipped_sidenet

    path = shipped_sidenet("smollm2-135m")
    assert path is not None and shipped_sidenet("no-such-backbone") is None
    config = read_config(path)
    assert config.init == "delta" and config.recent_tokens == 1024 and config.backbone == "smollm2-135m"
    weights = path / WEIGHTS
    assert weights.stat().st_size <= 60 * 2**20
    state = load_checked_safetensors(weights, load_json(path / "config.json")["weights_sha256"], "SideNet")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
