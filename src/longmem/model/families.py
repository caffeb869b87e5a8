"""Model-family specifics: the only module (with backbone.py) that knows HF block layouts.

A family tells how to find a model's layers and norms, how to split one decoder layer
into (attention norm, attention, MLP norm, MLP), how to project queries/keys/values
and the attention output, and how to apply its positional scheme. The SideNet runs
every block through these functions, so it works on any supported family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longmem.errors import LongMemError


@dataclass(frozen=True)
class AttnShape:
    """Head layout of one attention module."""

    num_heads: int  # H
    num_kv_heads: int  # H_kv (== H without grouped-query attention)
    head_dim: int  # Dh
    scaling: float  # softmax scale (usually Dh ** -0.5)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., Dh] -> [..., Dh]: (x1, x2) -> (-x2, x1), the RoPE companion vector."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Family:
    """Interface; see GPT2Family and LlamaFamily."""

    name = ""
    rotary = False

    def base(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """(attention norm, attention, MLP norm, MLP) of one decoder layer."""
        raise NotImplementedError

    def attn_shape(self, attn: nn.Module, config) -> AttnShape:
        raise NotImplementedError

    def queries(self, attn: nn.Module, x: torch.Tensor, shape: AttnShape) -> torch.Tensor:
        """x [B,T,D] -> q [B,H,T,Dh] (before any positional rotation)."""
        raise NotImplementedError

    def keys_values(
        self, attn: nn.Module, x: torch.Tensor, shape: AttnShape
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> k, v [B,H_kv,T,Dh] (k before any positional rotation)."""
        raise NotImplementedError

    def attn_output(self, attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """o [B,T,H*Dh] -> [B,T,D]."""
        raise NotImplementedError

    def output_projections(self, attn: nn.Module, mlp: nn.Module) -> list[nn.Module]:
        """Modules whose zeroing makes the block an identity map."""
        raise NotImplementedError

    def native_context(self, config) -> int:
        raise NotImplementedError

    def window(self, config, layer: int) -> int | None:
        """How many tokens back layer ``layer`` attends (a sliding-window layer), or None (every token)."""
        return None

    def rope_kind(self, config, layer: int | None) -> str:
        """Which rotary table layer ``layer`` uses ("" where every layer uses the one table)."""
        return ""

    def global_layers(self, config) -> list[int] | None:
        """The layers that see every token (where a memory layer may sit), or None when all of them do."""
        return None

    def bos_id(self, config) -> int | None:
        """The token every window must start with for the model to work (Gemma's <bos>), or None."""
        return None

    def rope_cos_sin(
        self, model: nn.Module, positions: torch.Tensor, dtype: torch.dtype, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (any ints, may be negative) -> cos, sin [..., Dh], as the model computes them for
        layer ``layer`` (None: a global layer's; families with one table ignore it)."""
        raise LongMemError(f"{self.name} backbones have no rotary positions")

    def rope_exact(
        self, model: nn.Module, positions: torch.Tensor, dtype: torch.dtype, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like rope_cos_sin, with angles in float64 (for absolute positions up to millions)."""
        raise LongMemError(f"{self.name} backbones have no rotary positions")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., Dh] by the angles whose cos/sin broadcast against it."""
    return x * cos + rotate_half(x) * sin


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` with half-width tables: cos/sin [..., Dh/2] (HF tables repeat their halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class GPT2Family(Family):
    """GPT-2: learned absolute positions, fused qkv Conv1D, LayerNorm, multi-head."""

    name = "gpt2"

    def layers(self, model):
        return model.transformer.h

    def final_norm(self, model):
        return model.transformer.ln_f

    def parts(self, layer):
        if getattr(layer, "crossattention", None) is not None:
            raise LongMemError("GPT-2 models with cross-attention are not supported")
        return layer.ln_1, layer.attn, layer.ln_2, layer.mlp

    def attn_shape(self, attn, config):
        return AttnShape(attn.num_heads, attn.num_heads, attn.head_dim, float(attn.scaling))

    def queries(self, attn, x, shape):
        q = attn.c_attn(x)[..., : attn.split_size]  # [B,T,D]
        return _heads(q, shape.num_heads, shape.head_dim)

    def keys_values(self, attn, x, shape):
        _, k, v = attn.c_attn(x).split(attn.split_size, dim=-1)  # 3 x [B,T,D]
        return _heads(k, shape.num_kv_heads, shape.head_dim), _heads(v, shape.num_kv_heads, shape.head_dim)

    def attn_output(self, attn, o):
        return attn.c_proj(o)

    def output_projections(self, attn, mlp):
        return [attn.c_proj, mlp.c_proj]

    def native_context(self, config):
        return int(config.n_positions)


class LlamaFamily(Family):
    """Llama and look-alikes (Mistral, Qwen2, Qwen3): RoPE, grouped-query attention, RMSNorm."""

    name = "llama"
    rotary = True

    def layers(self, model):
        return model.model.layers

    def final_norm(self, model):
        return model.model.norm

    def parts(self, layer):
        return layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, layer.mlp

    def attn_shape(self, attn, config):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return AttnShape(
            config.num_attention_heads, config.num_key_value_heads, head_dim, float(attn.scaling)
        )

    def queries(self, attn, x, shape):
        q = _heads(attn.q_proj(x), shape.num_heads, shape.head_dim)  # [B,H,T,Dh]
        return attn.q_norm(q) if hasattr(attn, "q_norm") else q

    def keys_values(self, attn, x, shape):
        k = _heads(attn.k_proj(x), shape.num_kv_heads, shape.head_dim)  # [B,Hkv,T,Dh]
        v = _heads(attn.v_proj(x), shape.num_kv_heads, shape.head_dim)
        return (attn.k_norm(k) if hasattr(attn, "k_norm") else k), v

    def attn_output(self, attn, o):
        return attn.o_proj(o)

    def output_projections(self, attn, mlp):
        return [attn.o_proj, mlp.down_proj]

    def native_context(self, config):
        return int(config.max_position_embeddings)

    def rope_exact(self, model, positions, dtype, layer=None):
        """cos/sin [..., Dh] at any (large) positions, angles computed in float64."""
        inv_freq, scaling = self._frequencies(model, layer)
        angles = positions.double()[..., None] * inv_freq.double()  # [..., Dh/2]
        emb = torch.cat([angles, angles], dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    def rope_cos_sin(self, model, positions, dtype, layer=None):
        flat = positions.reshape(1, -1).to(torch.long)  # [1, N]
        probe = torch.empty(0, dtype=torch.float32, device=positions.device)
        cos, sin = model.model.rotary_emb(probe, flat, *self._rope_args(model, layer))  # [1, N, Dh] each
        shape = (*positions.shape, cos.shape[-1])
        return cos.reshape(shape).to(dtype), sin.reshape(shape).to(dtype)

    def _rope_args(self, model, layer):
        """Extra arguments of the model's rotary module for layer ``layer``."""
        kind = self.rope_kind(model.config, layer)
        return (kind,) if kind else ()

    def _frequencies(self, model, layer):
        """(inv_freq [Dh/2], attention scaling) of layer ``layer``'s rotary positions."""
        rot = model.model.rotary_emb
        return rot.inv_freq, rot.attention_scaling


class PostNormed(nn.Module):
    """A module followed by a norm of its output (Gemma's sandwich norms): y = norm(inner(x))."""

    def __init__(self, inner: nn.Module, norm: nn.Module):
        super().__init__()
        self.inner, self.norm = inner, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(x))


class Gemma3Family(LlamaFamily):
    """Gemma 3: Llama's layout plus sandwich norms (after attention and after the MLP), QK-norm, a scaled
    embedding (inside the embedding module: H_0 is already scaled), a <bos> every window needs, and
    sliding-window (local) layers interleaved with global ones, each kind with its own rotary table.

    ``parts`` hands out the attention and the MLP wrapped with their post-norms, so that the SideNet's
    blocks (pre-norm, attention, residual, pre-norm, MLP, residual) compute Gemma's layer exactly."""

    name = "gemma3"

    def parts(self, layer):
        attn = PostNormed(layer.self_attn, layer.post_attention_layernorm)
        mlp = PostNormed(layer.mlp, layer.post_feedforward_layernorm)
        return layer.input_layernorm, attn, layer.pre_feedforward_layernorm, mlp

    def attn_shape(self, attn, config):
        if getattr(config, "attn_logit_softcapping", None):
            raise LongMemError("Gemma models with attention logit soft-capping (Gemma 2) are not supported")
        return super().attn_shape(attn.inner, config)

    def queries(self, attn, x, shape):
        return super().queries(attn.inner, x, shape)

    def keys_values(self, attn, x, shape):
        return super().keys_values(attn.inner, x, shape)

    def attn_output(self, attn, o):
        return attn.norm(attn.inner.o_proj(o))

    def output_projections(self, attn, mlp):
        return [attn.inner.o_proj, mlp.inner.down_proj]

    def window(self, config, layer):
        return int(config.sliding_window) if _layer_type(config, layer) == "sliding_attention" else None

    def global_layers(self, config):
        return [i for i in range(config.num_hidden_layers) if _layer_type(config, i) != "sliding_attention"]

    def bos_id(self, config):
        return int(config.bos_token_id)

    def rope_kind(self, config, layer):
        return _layer_type(config, layer)

    def _frequencies(self, model, layer):
        rot, kind = model.model.rotary_emb, _layer_type(model.config, layer)
        return getattr(rot, f"{kind}_inv_freq"), getattr(rot, f"{kind}_attention_scaling")


def _layer_type(config, layer: int | None) -> str:
    """"sliding_attention" or "full_attention" for layer ``layer`` (None: a global layer)."""
    return "full_attention" if layer is None else config.layer_types[layer]


def _heads(x: torch.Tensor, n: int, dh: int) -> torch.Tensor:
    """[B,T,n*Dh] -> [B,n,T,Dh]."""
    b, t, _ = x.shape
    return x.view(b, t, n, dh).transpose(1, 2)


FAMILIES: dict[str, Family] = {
    "gpt2": GPT2Family(),
    "llama": LlamaFamily(),
    "mistral": LlamaFamily(),
    "qwen2": LlamaFamily(),
    "qwen3": LlamaFamily(),
    "gemma3_text": Gemma3Family(),
}


def family_of(config) -> Family:
    """The family adapter for an HF config, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise LongMemError(
            f"model type {model_type!r} is not supported: the SideNet needs to know its layer layout, attention "
            f"projections and positions (supported: {', '.join(sorted(FAMILIES))}; a new family is one class in "
            "longmem/model/families.py)"
        )
    return FAMILIES[model_type]
