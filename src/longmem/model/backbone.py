"""FrozenBackbone: an HF causal LM -> raw residual stream H_0..H_L + memory-layer K/V.

With families.py (block layouts), hub.py (loading) and hf_cache.py (the decode cache) this is the
project's one seam to Hugging Face.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from longmem.model.attention import split_past_attention
from longmem.errors import LongMemError
from longmem.model.families import AttnShape, Family, family_of
from longmem.memory.tier import RecentCache

log = logging.getLogger(__name__)

ATTENTION = "longmem_sdpa"  # HF's sdpa attention, plus the split past path below
_SPLIT_PAST: ContextVar[int] = ContextVar("longmem_split_past", default=0)  # P while a full tier is read


def with_cache(module: nn.Module, cache) -> dict:
    """The keyword that hands an HF model its key/value cache: ``cache`` in newer transformers 5.x
    (where ``past_key_values`` is deprecated), ``past_key_values`` before."""
    return {_cache_keyword(type(module)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_of(output):
    """The key/value cache an HF forward returned, under either transformers 5.x name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass
class BackboneOutput:
    """What one frozen pass over a segment gives the SideNet and the memory."""

    hidden: list[torch.Tensor]  # L+1 x [B,T,D]: H_0 (embeddings) .. H_L (raw, before final norm)
    mem_keys: torch.Tensor  # [B,H_kv,T,Dh] memory layer keys (pre-rotary)
    mem_values: torch.Tensor  # [B,H_kv,T,Dh]
    layer_keys: torch.Tensor | None = None  # [L,B,H_kv,T,Dh] every layer's keys (rotated), with a past
    layer_values: torch.Tensor | None = None  # [L,B,H_kv,T,Dh]


def default_memory_layer(num_layers: int, reduction: int, allowed: list[int] | None = None) -> int:
    """0-based layer at ~70% depth whose SideNet copy is the memory block.

    SideNet block l (1-based) copies backbone layer r*l (1-based), so the memory layer m
    (0-based) must satisfy (m + 1) % r == 0. 24 layers, r=2 -> 17 (paper); 30 -> 21.
    ``allowed`` (a family's global layers, where some only see a sliding window): the
    nearest of them to that layer that r admits (the deeper one on a tie); Gemma 3 270M's
    18 layers, r=2 -> 11.
    """
    layer = reduction * math.ceil(0.7 * num_layers / reduction) - 1
    if allowed is None or layer in allowed:
        return layer
    fits = [m for m in allowed if (m + 1) % reduction == 0]
    if not fits:
        raise LongMemError(f"no global layer of {allowed} can be the memory layer with reduction r={reduction}: "
                           "(memory_layer + 1) must be a multiple of r")
    return min(fits, key=lambda m: (abs(m - layer), -m))


class FrozenBackbone(nn.Module):
    """A frozen HF causal LM used only as an encoder of hidden states and memory K/V."""

    def __init__(self, model: nn.Module, memory_layer: int | None, reduction: int, name: str = ""):
        super().__init__()
        self.model = model
        self.family: Family = family_of(model.config)
        self.name = name
        self.layers = self.family.layers(model)
        self.num_layers = len(self.layers)
        allowed = self.family.global_layers(model.config)
        self.memory_layer = (
            default_memory_layer(self.num_layers, reduction, allowed) if memory_layer is None else memory_layer
        )
        if not 0 <= self.memory_layer < self.num_layers:
            raise LongMemError(
                f"memory_layer={self.memory_layer} is outside the backbone's {self.num_layers} layers"
            )
        if allowed is not None and self.memory_layer not in allowed:
            raise LongMemError(f"memory_layer={self.memory_layer} is a sliding-window layer; the memory layer must "
                               f"see every token (one of the global layers {allowed})")
        self.bos_id = self.family.bos_id(model.config)  # prepended to a window that starts without it
        _, attn, _, _ = self.family.parts(self.layers[self.memory_layer])
        self.attn_shape: AttnShape = self.family.attn_shape(attn, model.config)
        self.native_context = self.family.native_context(model.config)
        model.requires_grad_(False)
        model.eval()
        if self.family.rotary:
            _use_split_attention(model)
        self._fingerprint: str | None = None

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """The backbone stays in eval mode whatever the caller asks (no dropout)."""
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    def new_cache(self, capacity: int = 0):
        """An empty key/value cache of the frozen model, for incremental decoding (room for
        ``capacity`` tokens per layer before it grows)."""
        from longmem.model.hf_cache import growing_cache

        return growing_cache(self.model.config, capacity)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        position_ids: torch.Tensor | None = None,
        past: RecentCache | None = None,
    ) -> BackboneOutput:
        """input_ids [B,T] -> H_0..H_L [B,T,D] and memory-layer K/V [B,H_kv,T,Dh].

        With ``cache`` (from ``new_cache``) the tokens extend the cached ones: only they are
        computed, at position_ids [B,T] (their places in the cached window).
        With ``past`` (a memory's short-term tier of P slots; rotary backbones only) the
        segment sits at positions P..P+T-1 after the tier's valid slots, and every layer's
        keys/values of the segment are returned too.
        """
        seen = cache.get_seq_length() if cache is not None else (past.slots if past is not None else 0)
        if seen + input_ids.shape[1] > self.native_context:
            raise LongMemError(
                f"segment of {input_ids.shape[1]} tokens after {seen} cached exceeds the backbone's "
                f"native context of {self.native_context}"
            )
        hidden: list[torch.Tensor] = []

        def grab_input(_module, args, kwargs):
            hidden.append(args[0] if args else kwargs["hidden_states"])

        def grab_output(_module, _args, output):
            hidden.append(output[0] if isinstance(output, tuple) else output)

        hooks = [layer.register_forward_pre_hook(grab_input, with_kwargs=True) for layer in self.layers]
        hooks.append(self.layers[-1].register_forward_hook(grab_output))
        layer_keys = layer_values = None
        lead = 0
        try:
            if past is not None:
                layer_keys, layer_values = self._forward_with_past(input_ids, past)
            else:
                base = self.family.base(self.model)
                if cache is None:
                    input_ids, lead = self.with_bos(input_ids)
                    position_ids = None
                base(input_ids=input_ids, position_ids=position_ids, use_cache=cache is not None,
                     **with_cache(base, cache))
        finally:
            for hook in hooks:
                hook.remove()
        hidden = [h[:, lead:] for h in hidden]  # without a <bos> this pass put ahead
        norm, attn, _, _ = self.family.parts(self.layers[self.memory_layer])
        x = norm(hidden[self.memory_layer])  # [B,T,D] input of the memory layer's attention
        keys, values = self.family.keys_values(attn, x, self.attn_shape)
        return BackboneOutput(hidden, keys, values, layer_keys, layer_values)

    def _forward_with_past(self, input_ids: torch.Tensor, past: RecentCache):
        """Run the HF model on a segment after the tier's slots -> every layer's K/V [L,B,Hkv,T,Dh]."""
        from transformers import DynamicCache

        if not self.family.rotary:
            raise LongMemError(f"a short-term tier needs a rotary backbone, not {self.family.name}")
        b, t = input_ids.shape
        p = past.slots
        positions = torch.arange(p, p + t, device=input_ids.device)[None, :].expand(b, t)  # [B,T]
        kwargs: dict = {"position_ids": positions, "use_cache": True}
        if past.is_empty():
            cache = self.new_cache()  # every layer keeps every entry (HF's own would crop sliding-window layers)
        else:
            dt = self.dtype
            cache = DynamicCache(
                ddp_cache_data=[(past.keys[i].to(dt), past.values[i].to(dt)) for i in range(self.num_layers)]
            )
            if not bool(past.valid.all()):
                seen = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
                kwargs["attention_mask"] = torch.cat([past.valid, seen], 1).long()
        token = _SPLIT_PAST.set(p if not past.is_empty() and bool(past.valid.all()) else 0)
        try:
            base = self.family.base(self.model)
            cache = cache_of(base(input_ids=input_ids, **kwargs, **with_cache(base, cache)))
        finally:
            _SPLIT_PAST.reset(token)
        keys = torch.stack([layer.keys[:, :, -t:] for layer in cache.layers])  # [L,B,Hkv,T,Dh]
        values = torch.stack([layer.values[:, :, -t:] for layer in cache.layers])
        return keys, values

    def keys_at(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """H_layer [B,T,D] (layer ``layer``'s input) -> that layer's pre-rotary keys [B,H_kv,T,Dh]."""
        norm, attn, _, _ = self.family.parts(self.layers[layer])
        return self.family.keys_values(attn, norm(hidden), self.attn_shape)[0]  # every layer has one shape

    def with_bos(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A window that nothing precedes -> (the window with the model's <bos> ahead of it where it needs
        one and lacks it, how many tokens were put ahead). Gemma without its <bos>: 49.0 instead of 25.8
        perplexity on 1,024 tokens of Emma."""
        if self.bos_id is None or bool((input_ids[:, 0] == self.bos_id).all()):
            return input_ids, 0
        bos = torch.full((input_ids.shape[0], 1), self.bos_id, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([bos, input_ids], 1), 1

    @torch.no_grad()
    def memory_kv(self, input_ids: torch.Tensor, match_layer: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """input_ids [B,T] -> memory-layer K/V [B,H_kv,T,Dh], as ``forward`` gives them, and the
        pre-rotary keys [B,H_kv,T,Dh] of layer ``match_layer`` (None if not asked for).

        Runs only the layers up to the memory layer (what reading into memory needs).
        """
        if input_ids.shape[1] > self.native_context:
            raise LongMemError(
                f"segment of {input_ids.shape[1]} tokens exceeds the backbone's native context of {self.native_context}"
            )
        wanted = {self.memory_layer} | ({match_layer} if match_layer is not None else set())
        grabbed: dict[int, torch.Tensor] = {}

        def grab(layer: int):
            def hook(_module, args, kwargs):
                grabbed[layer] = args[0] if args else kwargs["hidden_states"]
                if len(grabbed) == len(wanted):
                    raise _StopForward
            return hook

        hooks = [self.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in wanted]
        input_ids, lead = self.with_bos(input_ids)
        try:
            self.family.base(self.model)(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        grabbed = {i: h[:, lead:] for i, h in grabbed.items()}
        norm, attn, _, _ = self.family.parts(self.layers[self.memory_layer])
        keys, values = self.family.keys_values(attn, norm(grabbed[self.memory_layer]), self.attn_shape)
        match = self.keys_at(grabbed[match_layer], match_layer) if match_layer is not None else None
        return keys, values, match

    @torch.no_grad()
    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """H_L [B,T,D] -> the backbone's own logits [B,T,V] (final norm + LM head)."""
        return self.head(self.family.final_norm(self.model)(h_last))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden [B,T,D] -> logits [B,T,V] through the frozen LM head."""
        return self.model.get_output_embeddings()(h)


def _split_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF attention function: sdpa, except for one decoded token that sees every key (one GQA call
    without a mask) and while a fully valid short-term tier of P slots is read.

    Then query [B,H,T,Dh] attends to keys [B,H_kv,P+T,Dh] with the standard mask (all P
    visible, causal within the segment), computed as two unmasked flash calls merged by
    log-sum-exp (bench/README.md: ~25% faster per call than one masked call here).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    hkv = key.shape[1]
    window = getattr(module, "sliding_window", None)
    hidden = window is not None and key.shape[2] > window  # known from shapes: no need to read the mask
    if t == 1 and not torch.is_grad_enabled() and not hidden and (attention_mask is None
                                                                  or _all_visible(attention_mask)):
        # one decoded token sees every cached key: its G query heads per KV head are rows of one
        # unmasked call, so the KV heads are not copied G times (the masked call costs ~0.5 ms per
        # layer per 1,000 cached keys here, this one a small fraction of that)
        out = F.scaled_dot_product_attention(query.reshape(b, hkv, h // hkv, d), key, value, scale=scaling)
        return out.reshape(b, h, 1, d).transpose(1, 2), None  # [B,1,H,Dh] as HF expects
    p = 0 if window else _SPLIT_PAST.get()  # a window needs the mask
    if p and key.shape[2] - query.shape[2] == p and not torch.is_grad_enabled() and query.device.type == "cpu":
        out = split_past_attention(query, key[:, :, :p], value[:, :, :p], key[:, :, p:], value[:, :, p:], scaling)
        if out is not None:
            return out[0].transpose(1, 2).contiguous(), None  # [B,T,H,Dh] as HF expects
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _all_visible(mask: torch.Tensor) -> bool:
    """An HF attention mask (bool: True = visible; float: 0 = visible) that hides nothing."""
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def _use_split_attention(model: nn.Module) -> None:
    """Route an sdpa model's attention through ``_split_attention`` (same results otherwise)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(ATTENTION, _split_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
    except (ImportError, AttributeError, ValueError) as err:  # another transformers: plain sdpa
        log.debug("split tier attention unavailable: %s", err)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the memory layer's input is known."""


def fingerprint(model: nn.Module) -> str:
    """A dtype-independent hash of a model's architecture and (sampled) weights."""
    digest = hashlib.sha256()
    cfg = model.config
    digest.update(f"{cfg.model_type}|{cfg.vocab_size}|{cfg.hidden_size}".encode())
    return weights_digest(digest, model.state_dict())


def weights_digest(digest, state: dict[str, torch.Tensor]) -> str:
    """Add every tensor's name, shape and 4,096 sampled values (rounded to bf16: dtype- and device-independent)
    to ``digest`` (a hashlib object) -> "sha256:" + its first 32 hex digits."""
    for name, param in sorted(state.items()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16).to("cpu", torch.float32)
        digest.update(f"{name}|{tuple(param.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]
