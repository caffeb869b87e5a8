"""The MemTRM baseline: the backbone's upper layers fine-tuned, memory written by its own memory layer."""

import pytest
import torch

from conftest import make_memtrm, make_model
from longmem.baselines.memtrm import MemTRMConfig
from longmem.errors import LongMemError
from longmem.inference.session import read_into
from longmem.train.trainer import Trainer
from test_train import config, setup_dirs  # noqa: F401  (fixture)


def test_upper_layout_with_empty_memory_is_the_backbone():
    torch.manual_seed(0)
    model = make_memtrm()
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, memory=model.new_memory(2), backbone_logits=True)
    torch.testing.assert_close(out.logits, out.backbone_logits, atol=1e-4, rtol=1e-4)
    assert [b.layer_index for b in model.sidenet.blocks] == [2, 3]  # layers 2 and 3 of 4


def test_memory_changes_memtrm_through_its_gate():
    model = make_memtrm()
    mem = model.new_memory(1)
    for _ in range(3):
        model.write_memory(mem, model(torch.randint(0, 256, (1, 16)), memory=mem))
    ids = torch.randint(0, 256, (1, 16))
    out = model(ids, memory=mem, backbone_logits=True)
    assert out.stats is not None and out.stats.memory_share > 0
    assert (out.logits - out.backbone_logits).abs().max() > 1e-3


def test_coupled_memory_is_written_by_the_trainable_layer_and_goes_stale():
    torch.manual_seed(0)
    model = make_memtrm()
    ids = torch.randint(0, 256, (1, 16))
    out = model(ids)
    torch.testing.assert_close(out.mem_keys, model.backbone(ids).mem_keys)  # untrained: the backbone's
    with torch.no_grad():
        model.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)  # a "weight update"
    moved = model(ids)
    torch.testing.assert_close(moved.mem_keys, 2 * out.mem_keys)  # new entries follow the weights
    longmem = make_model("llama")
    with torch.no_grad():
        longmem.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)
    assert torch.equal(longmem(ids).mem_keys, longmem.backbone(ids).mem_keys)  # LongMem: never stale
    # MemTRM's layout with LongMem's memory: written by the frozen backbone
    decoupled = make_memtrm(coupled=False)
    with torch.no_grad():
        decoupled.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)
    assert torch.equal(decoupled(ids).mem_keys, decoupled.backbone(ids).mem_keys)


def test_memtrm_config_errors_and_unsupported_paths(tmp_path):
    with pytest.raises(LongMemError, match="reduction 1"):
        MemTRMConfig(reduction=2)
    with pytest.raises(LongMemError, match="no copy head"):
        MemTRMConfig(copy_head=True)
    model = make_memtrm()
    with pytest.raises(LongMemError, match="MemTRM"):
        read_into(model, torch.randint(0, 256, (32,)), model.new_memory(1), 0)
    with pytest.raises(LongMemError, match="incremental decoding"):
        model.new_cache(1, 0)
    model.save_pretrained(tmp_path / "m")  # its own kind: LongMem does not load it, and it loads back
    from longmem.kinds import kind_of
    from longmem.model.longmem import LongMemModel

    assert kind_of(tmp_path / "m") == "memtrm"
    with pytest.raises(LongMemError, match="not a longmem-sidenet directory"):
        LongMemModel.from_backbone(tmp_path / "m", model.backbone)
    back = type(model).from_backbone(tmp_path / "m", model.backbone)
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(back(ids).logits, model(ids).logits) and back.config.coupled


def test_memtrm_trains_its_upper_layers_through_the_trainer(setup_dirs):  # noqa: F811
    root, backbone = setup_dirs
    model = dict(backbone=str(backbone), segment_length=16, memory_size=64, chunk_size=2, topk=8,
                 memory_dtype="float32", memory_layer=2)
    cfg = config(root, backbone, "memtrm", steps=4, eval_every=-1, save_every=0, batch_size=1, model=model,
                 kind="memtrm")
    trainer = Trainer(cfg, progress=False).setup()
    before = {k: v.clone() for k, v in trainer.model.sidenet.state_dict().items()}
    trainer.train()
    after = trainer.model.sidenet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))  # layer 3 moved
