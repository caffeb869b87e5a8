"""LongMemModel: frozen backbone + SideNet -> logits, loss, and the K/V to store.

Data flow for one segment: ids -> backbone (H_0..H_L, K/V of layer m) -> SideNet (the memory block
reads the short-term tier and retrieves from the bank; its change rides on the residual stream) ->
norm -> LM head -> copy head. The forward pass only *reads* the memory; ``write_memory`` stores the
segment afterwards. The same forward decodes incrementally when given a ``DecodeCache``
(``new_cache``): only the new tokens are computed, against the window cached so far.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longmem.config import DEFAULT_BACKBONE, RUNTIME_FIELDS, LongMemConfig, from_dict
from longmem.devices import resolve_device
from longmem.errors import LongMemError
from longmem.memory.bank import MemoryBank, float_dtype
from longmem.memory.search.exact import IndexConfig
from longmem.memory.tier import RecentCache
from longmem.memory.token_log import TokenLog
from longmem.model import saved
from longmem.model.backbone import FrozenBackbone
from longmem.model.blocks import MemoryContext, Ropes
from longmem.model.cache import DecodeCache, new_cache
from longmem.model.copy_head import RUN
from longmem.model.families import apply_rope
from longmem.model.hub import load_model_and_tokenizer
from longmem.model.outputs import LongMemOutput
from longmem.model.sidenet import SideNet

logger = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = ("backbone", "backbone_fingerprint", "memory_layer", "reduction")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LongMemModel(nn.Module):
    """A frozen causal LM with a long-term memory read by a trainable SideNet."""

    kind = saved.KIND

    def __init__(self, config: LongMemConfig, backbone: FrozenBackbone, tokenizer=None):
        super().__init__()
        if config.segment_length > backbone.native_context:
            raise LongMemError(
                f"segment_length={config.segment_length} exceeds the backbone's native context "
                f"{backbone.native_context}"
            )
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = dataclasses.replace(
            config,
            memory_layer=backbone.memory_layer,
            copy_layer=_copy_layer(config, backbone.num_layers),
            backbone_fingerprint=config.backbone_fingerprint or backbone.fingerprint,
        )
        self.sidenet = self.build_sidenet(backbone, self.config).to(backbone.device, backbone.dtype)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recent_tokens = self._resolve_recent()
        self.copy_head_enabled = True
        """False leaves the copy head's mixture out (an ablation; the token log is still kept): the logits
        are the SideNet's alone."""

    @staticmethod
    def build_sidenet(backbone: FrozenBackbone, config: LongMemConfig) -> nn.Module:
        """The trainable part (a baseline builds its own)."""
        return SideNet(backbone, config.reduction, config.style_rank, config.copy_head, config.copy_gate)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        backbone: str | None = None,
        dtype: str = "bfloat16",
        device: str | torch.device = "auto",
        **overrides,
    ) -> "LongMemModel":
        """Load a saved SideNet directory (or build a fresh one when ``path`` is None).

        ``path`` may also be ``"default"``: the SideNet shipped with this package for the backbone
        (a fresh one when none ships for it), or ``"fresh"``: a new SideNet. ``overrides`` set config
        fields (memory_size, segment_length, retrieval, ...; of a saved SideNet only those that are not
        its architecture). The memory settings (``RUNTIME_FIELDS``: memory_size, retrieval, memory_dtype)
        are never taken from a directory: without an override they are the defaults (65,536 tokens).
        ``device``: where the model (and every memory it makes) computes, ``longmem.devices.resolve_device``:
        "auto" is CUDA when present, else the CPU.
        """
        if dtype not in DTYPES:
            raise LongMemError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        device = resolve_device(device)
        if path == "default":
            path = saved.shipped_sidenet(backbone or DEFAULT_BACKBONE)
            if path is None:
                logger.warning("no trained SideNet ships for backbone %r: using a fresh (untrained) one; train one "
                               "with scripts/train-default.sh --backbone %s", backbone, backbone)
        elif path == "fresh":
            path = None
        config_cls = cls.config_class()
        if path is None:
            config = from_dict(config_cls, ({"backbone": backbone} if backbone else {}) | overrides)
            model, tokenizer = load_model_and_tokenizer(config.backbone, DTYPES[dtype])
            frozen = FrozenBackbone(model.to(device), config.memory_layer, config.reduction, config.backbone)
            return cls(config, frozen, tokenizer)
        path = Path(path)
        config = cls.read_config(path)
        fixed = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
        if fixed:
            raise LongMemError(f"cannot override {', '.join(fixed)} of a trained SideNet")
        config = dataclasses.replace(config, **overrides)
        name = backbone or config.backbone
        model, tokenizer = load_model_and_tokenizer(name, DTYPES[dtype])
        frozen = FrozenBackbone(model.to(device), config.memory_layer, config.reduction, name)
        return cls.from_backbone(path, frozen, tokenizer, config)

    @staticmethod
    def config_class() -> type:
        return LongMemConfig

    @classmethod
    def read_config(cls, path: Path) -> LongMemConfig:
        """The config of a saved directory of this model's kind, its memory settings (``RUNTIME_FIELDS``) at their
        defaults: they belong to the memory a model reads, not to the model."""
        config = saved.read_config(path, cls.config_class(), cls.kind)
        fields = cls.config_class().__dataclass_fields__
        return dataclasses.replace(config, **{name: fields[name].default for name in RUNTIME_FIELDS})

    @classmethod
    def from_backbone(
        cls, path: str | Path, backbone: FrozenBackbone, tokenizer=None, config: LongMemConfig | None = None
    ) -> "LongMemModel":
        """Load SideNet weights from ``path`` onto an already loaded backbone.

        Parts the directory lacks start fresh when their fresh form changes nothing (a copy head added to a
        SideNet without one, its context gate, a style adapter); any other mismatch is an error.
        """
        path = Path(path)
        config = config or cls.read_config(path)
        if backbone.fingerprint != config.backbone_fingerprint:
            raise LongMemError(
                f"SideNet {path} was trained for backbone {config.backbone_fingerprint}, "
                f"not {backbone.fingerprint} ({backbone.name or 'given model'})"
            )
        model = cls(config, backbone, tokenizer)
        state = saved.read_weights(path, cls.kind)
        missing, unexpected = model.sidenet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _fresh_part(k, state)]
        if missing or unexpected:
            raise LongMemError(f"SideNet weights {path / saved.WEIGHTS} do not fit this architecture "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(backbone.device, backbone.dtype)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + SideNet ``model.safetensors`` (the backbone is referenced)."""
        state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.sidenet.state_dict().items()}
        return saved.write(Path(path), state, self.config.to_dict(), kind=self.kind)

    # ------------------------------------------------------------------ memory
    def new_memory(
        self, batch_size: int = 1, capacity: int | None = None, index: str | IndexConfig | None = None
    ) -> MemoryBank:
        """An empty memory bank for ``batch_size`` sequences, bound to this backbone."""
        shape = self.backbone.attn_shape
        recent = None
        if self.recent_tokens:
            recent = RecentCache(batch_size, self.backbone.num_layers, shape.num_kv_heads, shape.head_dim,
                                 self.recent_tokens, self.config.sink_tokens, float_dtype(self.config.memory_dtype),
                                 self.device)
        return MemoryBank(
            batch_size,
            shape.num_kv_heads,
            shape.head_dim,
            capacity or self.config.memory_size,
            self.config.chunk_size,
            dtype=self.config.memory_dtype,
            index=index or self.config.index_config(),
            meta=self.memory_meta(),
            recent=recent,
            token_log=self.new_token_log(batch_size, capacity),
            device=self.device,
        )

    def new_token_log(self, batch_size: int, capacity: int | None = None) -> TokenLog | None:
        """A copy head's token log for a bank of ``capacity`` tokens (None without a head): it keeps
        everything the bank, the tier and two segments can hold."""
        if not self.config.copy_head:
            return None
        span = (capacity or self.config.memory_size) + (self.recent_tokens or 0) + 2 * self.config.segment_length
        shape = self.backbone.attn_shape
        return TokenLog(batch_size, span, shape.num_kv_heads, shape.head_dim, self.device)

    @property
    def device(self) -> torch.device:
        """Where the model computes (the backbone's device); its memories, caches and logs live there too."""
        return self.backbone.device

    def memory_meta(self) -> dict:
        """What a memory must match to be read by this model."""
        return {"backbone_fingerprint": self.backbone.fingerprint, "memory_layer": self.backbone.memory_layer,
                "recent_tokens": self.recent_tokens}

    def _resolve_recent(self) -> int:
        """R of the short-term tier: config value, or T on rotary backbones with room for S+R+T."""
        r, t, native = self.config.recent_tokens, self.config.segment_length, self.backbone.native_context
        if r is None:
            fits = self.config.sink_tokens + 2 * t <= native
            return t if self.backbone.family.rotary and fits else 0
        if r and not self.backbone.family.rotary:
            raise LongMemError(f"recent_tokens={r}: a short-term tier needs a rotary backbone "
                               f"({self.backbone.family.name} keys cannot be moved to new positions)")
        if r and self.config.sink_tokens + r + t > native:
            raise LongMemError(f"sink_tokens + recent_tokens + segment_length = {self.config.sink_tokens + r + t} "
                               f"exceeds the backbone's native context {native}")
        return r

    def write_memory(
        self, memory: MemoryBank, out: LongMemOutput, valid: torch.Tensor | None = None, to_bank: bool = True
    ) -> None:
        """Store a segment's memory-layer K/V (after its forward pass: write-after-read).

        valid [B,T] marks real tokens (padding stays out); sink tokens are never stored.
        With a short-term tier the segment enters the tier and what leaves it goes to the
        chunk bank (dropped when ``to_bank`` is False, an ablation).
        """
        b, _, t, _ = out.mem_keys.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=out.mem_keys.device) if valid is None else valid
        keep = valid.clone()
        log = getattr(memory, "token_log", None)  # a stand-in bank (named memories) keeps no ids
        if log is not None and out.input_ids is not None and to_bank:  # (the tier-only ablation: no copying)
            if out.match_keys is None:
                raise LongMemError("this segment was read without the copy head's match keys; cannot write it")
            log.note(out.input_ids, out.positions, valid, keys=out.match_keys)
        search = None
        if self.backbone.family.rotary:  # search keys rotated to their absolute positions
            cos, sin = self._rope_absolute(out.positions)  # [B,T,Dh]
            search = apply_rope(out.mem_keys.float(), cos[:, None], sin[:, None])  # [B,Hkv,T,Dh]
        if memory.recent is None:
            keep[:, : self.config.sink_tokens] = False  # every segment's first tokens are attention sinks
            memory.write(out.mem_keys, out.mem_values, out.positions, keep, search_keys=search)
            return
        if out.layer_keys is None:
            raise LongMemError("this segment was read without the memory's short-term tier; cannot write it")
        keep &= out.positions >= self.config.sink_tokens  # the document's sinks live in the short-term tier
        gone = memory.recent.push(out.layer_keys, out.layer_values, valid, self._shift_back, out.mem_keys,
                                  out.mem_values, out.positions, keep, search)
        if to_bank:
            memory.write(gone.keys, gone.values, gone.positions, gone.keep, search_keys=gone.search)
        memory.end_position = out.positions[:, -1] + 1

    def _rope_absolute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [...,Dh] (fp32) at absolute positions [...]."""
        return self.backbone.family.rope_exact(self.backbone.model, positions, torch.float32,
                                               self.backbone.memory_layer)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        memory: MemoryBank | None = None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        backbone_logits: bool = False,
        cache: DecodeCache | None = None,
        trace: bool = False,
    ) -> LongMemOutput:
        """One segment: input_ids [B,T] (+ memory to read) -> LongMemOutput.

        positions [B,T] are absolute token positions in each row's document (default: right after what
        the memory has seen). labels [B,T] use -100 for no target. With ``cache`` (``new_cache``) the
        tokens extend the cached window: only they are computed, and the logits equal this forward run
        on the whole window (``positions`` then come from the cache). ``trace``: also return where the copy
        head's candidates sit (``LongMemOutput.copy_sources``, for provenance).
        """
        b, t = input_ids.shape
        if memory is not None and memory.batch_size != b:
            raise LongMemError(f"memory has {memory.batch_size} rows but the batch has {b}")
        if memory is not None and getattr(memory, "device", self.device) != self.device:
            raise LongMemError(f"the memory is on {memory.device} but the model on {self.device}: load it with "
                               f"load_memory(..., device=model.device)")
        if cache is None:
            if positions is None:
                dev = input_ids.device
                start = memory.end_position if memory is not None else torch.zeros(b, dtype=torch.long, device=dev)
                positions = start[:, None] + torch.arange(t, device=dev)[None, :]  # [B,T]
            past = memory.recent if memory is not None else None
            frozen = self.backbone(input_ids, past=past)
            offset = past.slots if past is not None else 0  # the segment follows the short-term slots
            rope = self._rope(t, offset) if self.backbone.family.rotary else None
        else:
            cache.check(memory, t)
            if cache.length == 0 and cache.lead == 0 and (memory is None or memory.recent is None):
                self._lead_bos(input_ids, cache)  # as the backbone does for a segment read without a tier
            local = torch.arange(cache.length, cache.length + t, device=input_ids.device)  # [T] places in the window
            frozen = self.backbone(input_ids, cache=cache.backbone,
                                   position_ids=(cache.offset + local)[None, :].expand(b, t))
            positions = cache.start[:, None] + local[None, :]  # [B,T] absolute
            rope = None if cache.rope is None else {i: (c[local], s_[local]) for i, (c, s_) in cache.rope.items()}
            cache.memory_kv.append(frozen.mem_keys, frozen.mem_values)
            cache.ids = torch.cat([cache.ids, input_ids], 1)
        ctx = self._context(memory, positions)
        h, stats = self.sidenet(frozen.hidden, rope, ctx, None if cache is None else cache.blocks)  # [B,T,D]
        logits = self.backbone.head(h)  # [B,T,V]
        match = self.match_keys(frozen.hidden)
        sources = [] if trace else None
        logits = self._copy(logits, match, memory, (input_ids, positions) if cache is None else None, h, cache,
                            sources)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        base = self.backbone.logits(frozen.hidden[-1]) if backbone_logits else None
        mem_keys, mem_values = self.memory_entries(frozen)
        return LongMemOutput(logits, loss, mem_keys, mem_values, positions, base, stats,
                             frozen.layer_keys, frozen.layer_values, input_ids, match,
                             sources[0] if sources else None)

    def _lead_bos(self, input_ids: torch.Tensor, cache: DecodeCache) -> None:
        """A decode window without a short-term tier that starts without the backbone's <bos> (where it needs
        one) gets one ahead of it in the backbone's cache, as ``FrozenBackbone.forward`` does for a segment."""
        ids, lead = self.backbone.with_bos(input_ids)
        if not lead:
            return
        bos = ids[:, :1]  # [B,1]
        self.backbone(bos, cache=cache.backbone, position_ids=torch.full_like(bos, cache.offset))
        cache.offset, cache.lead = cache.offset + 1, 1

    def memory_entries(self, frozen) -> tuple[torch.Tensor, torch.Tensor]:
        """What a segment writes to the bank: the frozen memory layer's K/V [B,H_kv,T,Dh] (never stale)."""
        return frozen.mem_keys, frozen.mem_values

    @property
    def frozen_memory(self) -> bool:
        """Whether the memory holds the frozen backbone's K/V only (so the backbone alone can fill it)."""
        return True

    def _copy(self, logits: torch.Tensor, match: torch.Tensor | None, memory: MemoryBank | None,
              context: tuple[torch.Tensor, torch.Tensor] | None, hidden: torch.Tensor,
              cache: DecodeCache | None, sources: list | None = None) -> torch.Tensor:
        """logits [B,T,V] -> the copy head's mixture (log-probabilities, fp32), or the logits unchanged without
        a head. match [B,H_kv,T,Dh]: the tokens' match keys; context: ids and positions [B,C] of the window
        ending with these T tokens (the cache's window when decoding); hidden [B,T,D]: the SideNet's states."""
        if match is None or not self.copy_head_enabled:
            return logits
        history = None
        if cache is not None:  # the window's match keys enter the memory's log when its tokens move there
            cache.match_keys.append(match, match[..., :0])  # type: ignore[union-attr]
            context, history = (cache.ids, cache.window_positions(), cache.first), cache.match_history
        log = getattr(memory, "token_log", None)
        if log is None or log.is_empty:  # exact matches in the context work without any memory
            b, h, _, d = match.shape
            log = TokenLog(b, 1, h, d, device=match.device)
        head = self.sidenet.copy_head
        cand = head.candidates(match, log, history)
        if cache is not None:  # runs and follows count over the last RUN tokens' matches
            both = cand.positions if history is None else torch.cat([history, cand.positions], 2)
            cache.match_history = both[:, :, -RUN:]
        return head.mix(logits, cand, log, context, hidden, self.config.segment_length, sources)

    def match_keys(self, hidden: list[torch.Tensor]) -> torch.Tensor | None:
        """The copy head's match keys [B,H_kv,T,Dh] from the frozen hidden states (None without a head)."""
        if getattr(self.sidenet, "copy_head", None) is None:
            return None
        layer = self.config.copy_layer
        return self.backbone.keys_at(hidden[layer], layer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """SideNet parameters only (the backbone is frozen)."""
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ decoding
    decodes_incrementally = True
    """Whether ``new_cache`` works (not for the MemTRM baseline, whose memory its own forward writes)."""

    def new_cache(self, batch_size: int, start: torch.Tensor | int, capacity: int | None = None,
                  memory: MemoryBank | None = None) -> DecodeCache:
        """An empty decode window whose first token sits at absolute position ``start`` ([B] or int).

        With a ``memory`` that has a short-term tier, the window follows the tier's entries in every
        attention, as a segment read with that memory does; the memory must not change while the cache
        is in use.
        """
        if not self.decodes_incrementally:
            raise LongMemError(f"incremental decoding does not support {type(self).__name__}")
        return new_cache(self, batch_size, start, capacity or self.config.segment_length, memory)

    def generate(self, input_ids: torch.Tensor, generation_config=None, memory: MemoryBank | None = None,
                 streamer=None, logits_processor=None, stopping_criteria=None, **kwargs) -> torch.Tensor:
        """Hugging Face-style generation with a memory: input_ids [B,L] -> sequences [B,L+N] (on the CPU).

        Takes a ``transformers.GenerationConfig`` (and its options as keyword arguments: max_new_tokens,
        do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, stop_strings, ...), a
        ``streamer`` (e.g. ``TextIteratorStreamer``), ``logits_processor`` and ``stopping_criteria`` lists;
        see :mod:`longmem.inference.hf_generation`."""
        from longmem.inference.hf_generation import hf_generate

        return hf_generate(self, input_ids, generation_config, memory, streamer, logits_processor,
                           stopping_criteria, **kwargs)

    # ------------------------------------------------------------------ positions
    @property
    def max_distance(self) -> int:
        return self.config.max_distance or self.backbone.native_context

    def _context(self, memory: MemoryBank | None, positions: torch.Tensor) -> MemoryContext:
        rotary = self.backbone.family.rotary
        table = None
        if rotary:
            dmax = self.max_distance
            cos, sin = self._rope_at(("table", dmax), -torch.arange(dmax + 1, device=self.device),  # key d tokens back
                                     self.backbone.memory_layer)
            half = cos.shape[-1] // 2
            table = (cos[:, :half].contiguous(), sin[:, :half].contiguous())  # [Dmax+1,Dh/2]
        return MemoryContext(
            bank=memory,
            query_positions=positions,
            search_rope=self._rope_absolute(positions) if rotary and memory is not None else None,
            rope_table=table,
            max_distance=self.max_distance,
            num_chunks=self.config.chunks_per_query,
            recent=memory.recent if memory is not None else None,
        )

    def _rope(self, t: int, offset: int = 0) -> Ropes:
        """Each SideNet block's cos/sin [T,Dh] of in-segment positions offset..offset+T-1 (the backbone's own)."""
        positions = torch.arange(offset, offset + t, device=self.device)
        return {b.layer_index: self._rope_at(("local", t, offset), positions, b.layer_index)
                for b in self.sidenet.blocks}

    def _rope_at(self, key: tuple, positions: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [...,Dh] of backbone layer ``layer``'s rotary table at positions [...], kept per ``key``."""
        family, model = self.backbone.family, self.backbone.model
        key = (*key, family.rope_kind(model.config, layer), positions.device)  # another device: computed again
        if key not in self._rope_cache:
            self._rope_cache[key] = family.rope_cos_sin(model, positions, torch.float32, layer)
        cos, sin = self._rope_cache[key]
        return cos.to(self.backbone.dtype), sin.to(self.backbone.dtype)

    def _shift_back(self, keys: torch.Tensor, d: int) -> torch.Tensor:
        """Rotate already-rotated keys of every layer [L,...,N,Dh] (fp32) d positions back."""
        back = torch.tensor([-d], device=self.device)
        tables = [self._rope_at(("shift", d), back, layer) for layer in range(keys.shape[0])]  # L x [1,Dh]
        shape = (keys.shape[0],) + (1,) * (keys.dim() - 2) + (keys.shape[-1],)  # [L,1,..,1,Dh]
        cos = torch.stack([c for c, _ in tables]).float().view(shape)
        sin = torch.stack([s for _, s in tables]).float().view(shape)
        return apply_rope(keys, cos, sin)


def _fresh_part(key: str, state: dict) -> bool:
    """Whether a weight missing from a saved SideNet may start fresh (its fresh form changes nothing, or next
    to nothing)."""
    if key.startswith("copy_head."):  # a whole copy head added, its context gate (zero at the start) or its
        # keyed matches (trusted at 3e-4 when fresh)
        return (not any(k.startswith("copy_head.") for k in state) or key == "copy_head.context.weight"
                or key.startswith("copy_head.keyed_"))
    return key.startswith("style.")  # a style adapter (up = 0)


def _copy_layer(config: LongMemConfig, num_layers: int) -> int | None:
    """The copy head's match layer: as configured, else num_layers / 15 (2 of SmolLM2's 30; None without a head)."""
    if not config.copy_head:
        return None
    layer = max(1, round(num_layers / 15)) if config.copy_layer is None else config.copy_layer
    if not 0 <= layer < num_layers:
        raise LongMemError(f"copy_layer={layer} is outside the backbone's {num_layers} layers")
    return layer
