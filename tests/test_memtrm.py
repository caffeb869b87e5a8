"""The MemTRM baseline layout: the backbone's upper layers fine-tuned, memory written by its own memory layer."""

import pytest
import torch

from conftest import make_model
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.inference.session import read_into
from longmem.train.trainer import Trainer
from test_train import config, setup_dirs  # noqa: F401  (fixture)


def memtrm(**kw):
    return make_model("llama", init="upper", reduction=1, memory_layer=2, coupled=True, fusion="gated", **kw)


def test_upper_layout_with_empty_memory_is_the_backbone():
    torch.manual_seed(0)
    model = memtrm()
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, memory=model.new_memory(2), backbone_logits=True)
    torch.testing.assert_close(out.logits, out.backbone_logits, atol=1e-4, rtol=1e-4)
    assert [b.layer_index for b in model.sidenet.blocks if hasattr(b, "layer_index")] == [2]
    assert len(model.sidenet.blocks) == 2  # layers 2 and 3 of 4


def test_coupled_memory_is_written_by_the_trainable_layer_and_goes_stale():
    torch.manual_seed(0)
    model = memtrm()
    ids = torch.randint(0, 256, (1, 16))
    out = model(ids)
    torch.testing.assert_close(out.mem_keys, model.backbone(ids).mem_keys)  # untrained: the backbone's
    with torch.no_grad():
        model.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)  # a "weight update"
    moved = model(ids)
    torch.testing.assert_close(moved.mem_keys, 2 * out.mem_keys)  # new entries follow the weights
    decoupled = make_model("llama", init="delta", fusion="joint", memory_layer=1, reduction=2)
    with torch.no_grad():
        decoupled.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)
    assert torch.equal(decoupled(ids).mem_keys, decoupled.backbone(ids).mem_keys)  # LongMem: never stale
    # MemTRM's layout with LongMem's memory (configs/longmem-upper.yaml): written by the frozen backbone
    upper = make_model("llama", init="upper", reduction=1, memory_layer=2, coupled=False, fusion="gated")
    with torch.no_grad():
        upper.sidenet.memory_block.attn.k_proj.weight.mul_(2.0)
    assert torch.equal(upper(ids).mem_keys, upper.backbone(ids).mem_keys)


def test_memtrm_config_errors_and_unsupported_paths():
    with pytest.raises(LongMemError, match="reduction 1"):
        LongMemConfig(init="upper", reduction=2)
    with pytest.raises(LongMemError, match="coupled"):
        LongMemConfig(init="paper", coupled=True)
    model = memtrm()
    with pytest.raises(LongMemError, match="MemTRM"):
        read_into(model, torch.randint(0, 256, (32,)), model.new_memory(1), 0)


def test_memtrm_trains_its_upper_layers_through_the_trainer(setup_dirs):  # noqa: F811
    root, backbone = setup_dirs
    model = dict(backbone=str(backbone), segment_length=16, memory_size=64, chunk_size=2, topk=8,
                 memory_dtype="float32", init="upper", reduction=1, memory_layer=2, coupled=True, fusion="gated")
    cfg = config(root, backbone, "memtrm", steps=4, eval_every=-1, save_every=0, batch_size=1, model=model)
    trainer = Trainer(cfg, progress=False).setup()
    before = {k: v.clone() for k, v in trainer.model.sidenet.state_dict().items()}
    trainer.train()
    after = trainer.model.sidenet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))  # layer 3 moved
