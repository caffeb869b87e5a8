"""LongMemModel: frozen backbone + SideNet -> logits, loss, and the K/V to store.

Data flow for one segment: ids -> backbone (H_0..H_L, K/V of layer m) -> SideNet
(x_0 = H_0, residual differences, retrieval at block m // r) -> norm -> LM head. The
forward pass only *reads* the memory; ``write_memory`` stores the segment afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from longmem.model.backbone import FrozenBackbone
from longmem.model.hub import load_model_and_tokenizer
from longmem.config import DEFAULT_BACKBONE, FORMAT_VERSION, LongMemConfig, from_dict
from longmem.files import load_checked_safetensors, load_json, load_versioned, save_json, sha256
from longmem.errors import LongMemError
from longmem.model.families import apply_rope
from longmem.memory.bank import MemoryBank
from longmem.memory.bank import float_dtype
from longmem.memory.search.exact import IndexConfig
from longmem.memory.tier import RecentCache
from longmem.memory.token_log import TokenLog
from longmem.model.copy_head import EXACT_PARAMS
from longmem.model.sidenet import MemoryContext, MemoryStats, SideNet

KIND = "longmem-sidenet"
WEIGHTS = "model.safetensors"
ARCHITECTURE_FIELDS = ("backbone", "backbone_fingerprint", "memory_layer", "reduction", "init")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LongMemOutput:
    """Result of one segment."""

    logits: torch.Tensor | None  # [B,T,V]
    loss: torch.Tensor | None  # scalar mean cross-entropy over labelled tokens
    mem_keys: torch.Tensor  # [B,H_kv,T,Dh] backbone memory-layer keys of this segment
    mem_values: torch.Tensor  # [B,H_kv,T,Dh]
    positions: torch.Tensor  # [B,T] absolute positions of the segment's tokens
    backbone_logits: torch.Tensor | None = None  # [B,T,V] the frozen backbone's own logits
    stats: MemoryStats | None = None
    layer_keys: torch.Tensor | None = None  # [L,B,H_kv,T,Dh] every layer's keys, when a short-term tier is read
    layer_values: torch.Tensor | None = None  # [L,B,H_kv,T,Dh]
    input_ids: torch.Tensor | None = None  # [B,T] the segment's tokens (a copy head's memory notes them)
    match_keys: torch.Tensor | None = None  # [B,H_kv,T,Dh] pre-rotary keys of the copy head's match layer


class LongMemModel(nn.Module):
    """A frozen causal LM with a long-term memory read by a trainable SideNet."""

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
            pointer_layer=_pointer_layer(config, backbone.num_layers),
            backbone_fingerprint=config.backbone_fingerprint or backbone.fingerprint,
        )
        self.sidenet = SideNet(backbone, self.config).to(backbone.dtype)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recent_tokens = self._resolve_recent()
        self.copy_head_enabled = True
        """False leaves the copy head's mixture out (an ablation; the token log is still kept): the logits
        are the SideNet's alone."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        backbone: str | None = None,
        dtype: str = "bfloat16",
        **overrides,
    ) -> "LongMemModel":
        """Load a saved SideNet directory (or build a fresh one when ``path`` is None).

        ``path`` may also be ``"default"``: the SideNet shipped with this package for the
        backbone (a fresh one when none ships for it), or ``"fresh"``: a new SideNet.
        ``overrides`` set runtime config fields (memory_size, segment_length, ...).
        """
        if dtype not in DTYPES:
            raise LongMemError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if path == "default":
            path = shipped_sidenet(backbone or DEFAULT_BACKBONE)
        elif path == "fresh":
            path = None
        if path is None:
            config = from_dict(LongMemConfig, ({"backbone": backbone} if backbone else {}) | overrides)
            model, tokenizer = load_model_and_tokenizer(config.backbone, DTYPES[dtype])
            frozen = FrozenBackbone(model, config.memory_layer, config.reduction, config.backbone)
            return cls(config, frozen, tokenizer)
        path = Path(path)
        config = read_config(path)
        fixed = sorted(set(overrides) & set(ARCHITECTURE_FIELDS))
        if fixed:
            raise LongMemError(f"cannot override {', '.join(fixed)} of a trained SideNet")
        config = dataclasses.replace(config, **overrides)
        name = backbone or config.backbone
        model, tokenizer = load_model_and_tokenizer(name, DTYPES[dtype])
        frozen = FrozenBackbone(model, config.memory_layer, config.reduction, name)
        return cls.from_backbone(path, frozen, tokenizer, config)

    @classmethod
    def from_backbone(
        cls, path: str | Path, backbone: FrozenBackbone, tokenizer=None, config: LongMemConfig | None = None
    ) -> "LongMemModel":
        """Load SideNet weights from ``path`` onto an already loaded backbone."""
        path = Path(path)
        config = config or read_config(path)
        if backbone.fingerprint != config.backbone_fingerprint:
            raise LongMemError(
                f"SideNet {path} was trained for backbone {config.backbone_fingerprint}, "
                f"not {backbone.fingerprint} ({backbone.name or 'given model'})"
            )
        model = cls(config, backbone, tokenizer)
        meta = load_json(path / "config.json")
        weights = path / WEIGHTS
        state = load_checked_safetensors(weights, meta.get("weights_sha256"), "SideNet weights")
        missing, unexpected = model.sidenet.load_state_dict(state, strict=False)
        if config.pointer and not any(k.startswith("pointer.") for k in state):
            missing = [k for k in missing if not k.startswith("pointer.")]  # adding a fresh copy head
        if config.pointer_ngram:  # adding fresh exact matches to a copy head; the newer scalars start neutral (0)
            fresh = EXACT_PARAMS if "pointer.length_bias" not in state else ("pointer.uncertain", "pointer.local_bias")
            missing = [k for k in missing if k not in fresh]
        if config.pointer_context:  # adding a fresh context gate (zeros: the head's trust unchanged)
            missing = [k for k in missing if k != "pointer.context.weight"]
        if config.style_rank:  # adding a fresh style adapter (up = 0: nothing changes)
            missing = [k for k in missing if not k.startswith(("style.", "styles."))]
        if missing or unexpected:
            raise LongMemError(f"SideNet weights {weights} do not fit this architecture "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(backbone.dtype)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``config.json`` + SideNet ``model.safetensors`` (the backbone is referenced)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LongMemError(f"{path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.sidenet.state_dict().items()}
        tmp = path / (WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / WEIGHTS)
        meta = {"kind": KIND, "format_version": FORMAT_VERSION, "weights_sha256": sha256(path / WEIGHTS)}
        save_json(path / "config.json", meta | {"config": self.config.to_dict()})
        return path

    # ------------------------------------------------------------------ memory
    def new_memory(
        self, batch_size: int = 1, capacity: int | None = None, index: str | IndexConfig | None = None
    ) -> MemoryBank:
        """An empty memory bank for ``batch_size`` sequences, bound to this backbone."""
        shape = self.backbone.attn_shape
        recent = None
        if self.recent_tokens:
            recent = RecentCache(batch_size, self.backbone.num_layers, shape.num_kv_heads, shape.head_dim,
                                 self.recent_tokens, self.config.sink_tokens, float_dtype(self.config.memory_dtype))
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
        )

    def new_token_log(self, batch_size: int, capacity: int | None = None) -> TokenLog | None:
        """A copy head's token log for a bank of ``capacity`` tokens (None without a head): it keeps
        everything the bank, the tier and two segments can hold."""
        if not self.config.pointer:
            return None
        span = (capacity or self.config.memory_size) + (self.recent_tokens or 0) + 2 * self.config.segment_length
        shape = self.backbone.attn_shape
        return TokenLog(batch_size, span, shape.num_kv_heads, shape.head_dim)

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
        valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid
        keep = valid.clone()
        log = getattr(memory, "token_log", None)  # a stand-in bank (named memories) keeps no ids
        if log is not None and out.input_ids is not None and to_bank:  # (the tier-only ablation: no copying)
            if out.match_keys is None:
                raise LongMemError("this segment was read without the copy head's match keys; cannot write it")
            log.note(out.input_ids, out.positions, valid, keys=out.match_keys)
        search = None
        if self.search_rotated:
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

    def _shift_back(self, keys: torch.Tensor, d: int) -> torch.Tensor:
        """Rotate already-rotated keys [...,N,Dh] (fp32) d positions back."""
        cos, sin = self._rope_at(("shift", d), torch.tensor([-d]))  # [1,Dh]
        return apply_rope(keys, cos.float(), sin.float())

    @property
    def search_rotated(self) -> bool:
        """Whether chunk search compares keys and queries rotated to their absolute positions."""
        return self.backbone.family.rotary and self.config.search_positions == "absolute"

    def _rope_absolute(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [...,Dh] (fp32) at absolute positions [...]."""
        return self.backbone.family.rope_exact(self.backbone.model, positions, torch.float32)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        memory: MemoryBank | None = None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        backbone_logits: bool = False,
    ) -> LongMemOutput:
        """One segment: input_ids [B,T] (+ memory to read) -> LongMemOutput.

        positions [B,T] are absolute token positions in each row's document (default:
        right after what the memory has seen). labels [B,T] use -100 for no target.
        """
        b, t = input_ids.shape
        if memory is not None and memory.batch_size != b:
            raise LongMemError(f"memory has {memory.batch_size} rows but the batch has {b}")
        if positions is None:
            start = memory.end_position if memory is not None else torch.zeros(b, dtype=torch.long)
            positions = start[:, None] + torch.arange(t)[None, :]  # [B,T]
        past = memory.recent if memory is not None else None
        frozen = self.backbone(input_ids, past=past)
        offset = past.slots if past is not None else 0  # the segment follows the short-term slots
        rope = self._rope(t, offset) if self.backbone.family.rotary else None
        ctx = self._context(memory, positions)
        h, stats = self.sidenet(frozen.hidden, rope, ctx)  # [B,T,D]
        logits = self.backbone.head(h)  # [B,T,V]
        match = self.match_keys(frozen.hidden)
        # [B,T,V]: log-probs once the copy head reads
        logits = self.copy_head_logits(logits, match, memory, context=(input_ids, positions), hidden=h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        base = self.backbone.logits(frozen.hidden[-1]) if backbone_logits else None
        mem_keys, mem_values = frozen.mem_keys, frozen.mem_values  # [B,H_kv,T,Dh] what the memory gets
        if self.config.coupled:  # MemTRM: the trainable memory layer writes its own (soon stale) K/V
            with torch.no_grad():
                _, mem_keys, mem_values = self.sidenet.memory_block.project(frozen.hidden[self.backbone.memory_layer])
        return LongMemOutput(logits, loss, mem_keys, mem_values, positions, base, stats,
                             frozen.layer_keys, frozen.layer_values, input_ids, match)

    def copy_head_logits(self, logits: torch.Tensor, match: torch.Tensor | None, memory: MemoryBank | None,
                         context: tuple[torch.Tensor, torch.Tensor] | None = None,
                         hidden: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B,T,V] -> the copy head's mixture (log-probabilities, fp32), or the logits unchanged
        without a head or while the memory's token log is empty (unless the head also matches the
        context itself, ``pointer_local``). match [B,H_kv,T,Dh] and context (ids, positions [B,C]
        of the window ending with these T tokens) and hidden [B,T,D] (the SideNet's final states) as
        ``CopyHead.forward`` takes them."""
        return self.copy_head_step(logits, match, memory, None, context, hidden)[0]

    def copy_head_step(self, logits: torch.Tensor, match: torch.Tensor | None, memory: MemoryBank | None,
                       history: torch.Tensor | None, context: tuple[torch.Tensor, torch.Tensor] | None,
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``copy_head_logits`` for incremental decoding: history [B,H_kv,P,k] holds the match
        positions of the previous tokens of the window -> (log-probabilities, these tokens' match
        positions [B,H_kv,T,k]; None without a head at work)."""
        log = getattr(memory, "token_log", None)
        if match is None or not self.copy_head_enabled:
            return logits, None
        if log is None or log.is_empty:
            if not self.config.pointer_local:
                return logits, None
            b, h, _, d = match.shape  # exact matches in the context work without any memory
            log = TokenLog(b, 1, h, d)
        head = self.sidenet.pointer
        cand = head.candidates(match, log, history)
        return head.mix(logits, cand, log, context, hidden), cand.positions

    def match_keys(self, hidden: list[torch.Tensor]) -> torch.Tensor | None:
        """The copy head's match keys [B,H_kv,T,Dh] from the frozen hidden states (None without a head)."""
        if self.sidenet.pointer is None:
            return None
        layer = self.config.pointer_layer
        return self.backbone.keys_at(hidden[layer], layer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """SideNet parameters only (the backbone is frozen)."""
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    @property
    def decodes_incrementally(self) -> bool:
        """Whether ``longmem.inference.decode`` can run this model (not the MemTRM layout: its memory is written
        by its own forward pass)."""
        return not (self.config.coupled or self.config.init == "upper")

    @property
    def position_scheme(self) -> str:
        """The effective scheme: 'none' for non-rotary backbones, 'auto' -> 'true'."""
        if not self.backbone.family.rotary:
            return "none"
        return "true" if self.config.position_scheme == "auto" else self.config.position_scheme

    @property
    def max_distance(self) -> int:
        return self.config.max_distance or self.backbone.native_context

    def _context(self, memory: MemoryBank | None, positions: torch.Tensor) -> MemoryContext:
        scheme = self.position_scheme
        table = None
        if scheme in ("fixed", "true"):
            dmax = max(self.max_distance, self.config.fixed_distance)
            cos, sin = self._rope_at(("table", dmax), -torch.arange(dmax + 1))  # key d tokens back
            half = cos.shape[-1] // 2
            table = (cos[:, :half].contiguous(), sin[:, :half].contiguous())  # [Dmax+1,Dh/2]
        return MemoryContext(
            bank=memory,
            query_positions=positions,
            search_rope=self._rope_absolute(positions) if self.search_rotated and memory is not None else None,
            scheme=scheme,
            rope_table=table,
            max_distance=self.max_distance,
            fixed_distance=self.config.fixed_distance,
            num_chunks=self.config.chunks_per_query,
            per_kv_head=self.config.retrieval_heads == "kv",
            recent=memory.recent if memory is not None else None,
        )

    def _rope(self, t: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T,Dh] of in-segment positions offset..offset+T-1 (the backbone's own)."""
        return self._rope_at(("local", t, offset), torch.arange(offset, offset + t))

    def _rope_at(self, key: tuple, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._rope_cache:
            family, model = self.backbone.family, self.backbone.model
            self._rope_cache[key] = family.rope_cos_sin(model, positions, torch.float32)
        cos, sin = self._rope_cache[key]
        return cos.to(self.backbone.dtype), sin.to(self.backbone.dtype)


SHIPPED = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m"}  # backbone name -> packaged SideNet


def shipped_sidenet(backbone: str) -> Path | None:
    """The SideNet directory shipped in this package for a built-in backbone, if any."""
    name = SHIPPED.get(backbone)
    path = Path(__file__).parent.parent / "assets" / "sidenets" / name if name else None
    return path if path is not None and (path / "config.json").is_file() else None


def read_config(path: Path) -> LongMemConfig:
    """The LongMemConfig of a saved SideNet directory, with clear errors."""
    meta = load_versioned(path, "config.json", KIND, "SideNet", FORMAT_VERSION)
    return from_dict(LongMemConfig, meta.get("config", {}))


def _pointer_layer(config: LongMemConfig, num_layers: int) -> int | None:
    """The copy head's match layer: as configured, else num_layers / 15 (2 of SmolLM2's 30; None without a head)."""
    if not config.pointer:
        return None
    layer = max(1, round(num_layers / 15)) if config.pointer_layer is None else config.pointer_layer
    if not 0 <= layer < num_layers:
        raise LongMemError(f"pointer_layer={layer} is outside the backbone's {num_layers} layers")
    return layer
