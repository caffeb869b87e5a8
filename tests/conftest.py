"""Tiny random Hugging Face models and a byte-level tokenizer: no downloads needed."""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from longmem.model.backbone import FrozenBackbone
from longmem.config import LongMemConfig
from longmem.model.longmem import LongMemModel

VOCAB = 260


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 4, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                        bos_token_id=257, eos_token_id=258)
    return GPT2LMHeadModel(config).eval()


def tiny_gemma3(layers: int = 4, seed: int = 0) -> Gemma3ForCausalLM:
    """Gemma 3's layout: sliding-window layers (a window of 6 tokens, shorter than the tests' segments)
    around global ones (layers 1 and 3), two rotary tables, sandwich norms, QK-norm, <bos> = 257."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=6,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        query_pre_attn_scalar=8, bos_token_id=257, eos_token_id=258, pad_token_id=259, tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms (Gemma's are 1 + w, with w = 0 at init)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


TINY = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma3": tiny_gemma3}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 0..255) plus specials."""
    return PreTrainedTokenizerFast(tokenizer_object=_bytes_tokenizer(), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _bytes_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[i]: i for i in range(256)} | {"<unk>": 256, "<s>": 257, "</s>": 258, "<pad>": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


PLAIN = dict(copy_head=False, copy_gate=False, style_rank=0, recent_tokens=0)
"""The bare memory-delta SideNet: no copy head, no style adapter, no short-term tier (with an empty memory it
is the backbone exactly)."""


def make_model(family: str = "llama", dtype=torch.float32, trained: bool = False, **config) -> LongMemModel:
    """A LongMemModel on a tiny random backbone, in the shipped layout unless ``config`` says otherwise (memory
    layer 1 of 4, so that one later copied block follows the memory block; copy head on layer 1; a short-term
    tier on Llama). ``trained``: the parts that start at zero (style adapter, context gates, memory log-bias)
    get random values and the keyed matches are trusted, so that every path of the shipped layout is at work."""
    hf = TINY[family]().to(dtype)
    defaults = dict(backbone=f"tiny-{family}", chunk_size=2, topk=8, memory_size=64, segment_length=16,
                    memory_dtype="float32", memory_layer=1, style_rank=8)
    cfg = LongMemConfig(**(defaults | config))
    model = LongMemModel(cfg, FrozenBackbone(hf, cfg.memory_layer, cfg.reduction, cfg.backbone), byte_tokenizer())
    if trained:
        perturb(model)
    return model


def make_memtrm(family: str = "llama", **config):
    """The MemTRM baseline on a tiny random backbone (memory layer 2 of 4: layers 2 and 3 fine-tuned)."""
    from longmem.baselines.memtrm import MemTRM, MemTRMConfig

    hf = tiny_llama() if family == "llama" else tiny_gpt2()
    defaults = dict(backbone=f"tiny-{family}", chunk_size=2, topk=8, memory_size=64, segment_length=16,
                    memory_dtype="float32", memory_layer=2)
    cfg = MemTRMConfig(**(defaults | config))
    return MemTRM(cfg, FrozenBackbone(hf, cfg.memory_layer, cfg.reduction, cfg.backbone), byte_tokenizer())


def perturb(model: LongMemModel, seed: int = 0, scale: float = 0.1) -> LongMemModel:
    """Give the SideNet's zero-initialised parts (style adapter's up, context gates, memory gate) random values,
    and trust the copy head's keyed matches (a fresh head barely does)."""
    g = torch.Generator().manual_seed(seed)
    sidenet = model.sidenet
    with torch.no_grad():
        params = [sidenet.memory_block.gate]
        if sidenet.style is not None:
            params.append(sidenet.style.up.weight)
        if sidenet.copy_head is not None and sidenet.copy_head.context is not None:
            params += [sidenet.copy_head.context.weight, sidenet.copy_head.keyed_context.weight]
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
        if sidenet.copy_head is not None:
            sidenet.copy_head.keyed_bias.fill_(0.0)
    return model


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A tiny Llama + byte tokenizer saved as an HF directory (for CLI tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the `longmem` CLI in-process -> (exit code, stdout, stderr)."""
    from longmem.cli.main import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
