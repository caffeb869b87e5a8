"""Memory-augmented adaptation: train the SideNet while documents stream through memory.

One recipe class (setup / train / save / cleanup). Each of the B rows of a batch reads
one document's consecutive segments in order; a row's memory is reset when it starts a
new document, so memory only ever holds earlier text of the same document. Under
``torchrun`` every rank streams different documents and gradients are averaged by
DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from longmem.train import checkpoint as ckpt
from longmem.train.facts import FactPlanter, FactWords
from longmem.train.recall import RecallSpans, insert_recall_spans
from longmem.train.stream import Batch, DocumentStream
from longmem.data.tokens import tokenize_corpus
from longmem.devices import autocast, resolve_device
from longmem.errors import LongMemError
from longmem.files import save_json
from longmem.train.lora import add_lora, merge_lora
from longmem.kinds import MODEL_KINDS
from longmem.model.longmem import ARCHITECTURE_FIELDS
from longmem.inference.reader import perplexity
from longmem.train.config import TrainConfig

log = logging.getLogger(__name__)

# trainable sets that are one part of the SideNet: mode -> (SideNet attributes, what a model without any lacks)
ONE_PART = {
    "copy_head": (("copy_head",), "a model with a copy head (model.copy_head: true)"),
    "memory_path": (("blocks",), "SideNet blocks"),
    "style": (("style",), "a style adapter (model.style_rank > 0)"),
}


class Trainer:
    """Adaptation training of a LongMem SideNet; see the module docstring."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        self.config, self.resume, self.progress = config, resume, progress
        self.output = Path(config.output_dir)
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.step, self.tokens = 0, 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg = self.config
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:  # one GPU per rank
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed)
        backbone_dtype = "bfloat16" if cfg.dtype == "bfloat16" else "float32"
        overrides = {k: v for k, v in cfg.model.to_dict().items() if k not in ("backbone_fingerprint",)}
        kind = MODEL_KINDS[cfg.kind]
        if cfg.init_from:
            runtime = {k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS}
            self.model = kind.from_pretrained(cfg.init_from, dtype=backbone_dtype, device=self.device, **runtime)
        else:
            self.model = kind.from_pretrained(None, dtype=backbone_dtype, device=self.device, **overrides)
        self.model.sidenet.float()  # fp32 master weights; compute runs under autocast
        self._select_trainable()
        self.optimizer = self._optimizer()
        self.ddp = self._wrap()
        tok = self.model.tokenizer
        self.train_data = tokenize_corpus(Path(cfg.corpus), tok, cfg.train_split)
        self.val_data = tokenize_corpus(Path(cfg.corpus), tok, cfg.val_split) if cfg.eval_every >= 0 else None
        self.stream = DocumentStream(self.train_data, cfg.batch_size, self.model.config.segment_length,
                                     seed=cfg.seed, rank=self.rank, world_size=self.world)
        self.memory = self.model.new_memory(cfg.batch_size)
        self._overwritten: list[list[tuple[int, int]]] = [[] for _ in range(cfg.batch_size)]
        self.facts = FactPlanter(FactWords(tok), cfg.batch_size, cfg.fact_prob, seed=cfg.seed + 7919 * self.rank,
                                 keyed=cfg.keyed_prob, update=cfg.update_prob, listed=cfg.list_prob,
                                 pair=cfg.pair_prob) if cfg.fact_prob > 0 else None
        if self.resume:
            self._restore()
        elif self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "metrics.jsonl").write_text("")
        if self.rank == 0:
            save_json(self.output / "train_config.json",
                      self.config.to_dict() | {"model": self.model.config.to_dict(), "world_size": self.world})
        return self

    def _select_trainable(self) -> None:
        sidenet, mode = self.model.sidenet, self.config.trainable
        if mode in ONE_PART:  # everything frozen but one part of the SideNet
            attrs, needs = ONE_PART[mode]
            parts = [p for p in (getattr(sidenet, a) for a in attrs) if p is not None]
            if not parts:
                raise LongMemError(f"trainable={mode!r} needs {needs}")
            sidenet.requires_grad_(False)
            for part in parts:
                part.requires_grad_(True)
        elif mode == "lora":
            sidenet.requires_grad_(False)
            add_lora(sidenet.blocks, self.config.lora_rank, self.config.lora_alpha)
            sidenet.memory_block.gate.requires_grad_(True)
        if not self.model.trainable_parameters():
            raise LongMemError(f"trainable={mode!r} leaves nothing to train")

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups: dict[str, list] = {"gate": [], "no_decay": [], "decay": [], "style": []}
        for name, param in self.model.sidenet.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("style."):
                groups["style"].append(param)
                continue
            scalar = param.ndim < 2  # gates and the copy head's scalars; its context gate [1,D] learns at lr
            kind = "gate" if scalar and (name.endswith(".gate") or name.startswith("copy_head.")) \
                else "no_decay" if scalar else "decay"
            groups[kind].append(param)
        settings = {"gate": (cfg.gate_lr, 0.0), "decay": (cfg.lr, cfg.weight_decay), "no_decay": (cfg.lr, 0.0),
                    "style": (cfg.style_lr or cfg.lr, 0.0)}
        param_groups = [{"params": params, "lr": settings[k][0], "base_lr": settings[k][0],
                         "weight_decay": settings[k][1], "name": k} for k, params in groups.items() if params]
        return torch.optim.AdamW(param_groups, betas=(cfg.beta1, cfg.beta2))

    def _wrap(self):
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [f"backbone.{name}" for name, _ in self.model.backbone.named_parameters()]
        frozen += [f"backbone.{name}" for name, _ in self.model.backbone.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(self.model, frozen)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)

    # ------------------------------------------------------------------ train
    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def next_batch(self) -> tuple[Batch, RecallSpans | None]:
        """The stream's next batch, with synthetic recall spans when configured."""
        batch = next(self.stream)
        cfg = self.config
        if cfg.recall_prob <= 0 and self.facts is None:
            return batch, None
        near = max(batch.input_ids.shape[1], self.model.recent_tokens)  # older than segment and tier
        reach = self.model.recent_tokens + self.model.config.memory_size  # still held by the bank
        for row in range(batch.input_ids.shape[0]):  # overwritten text the bank may still hold
            p0 = int(batch.positions[row, 0])
            keep = [(a, e) for a, e in self._overwritten[row] if not batch.reset[row] and e > p0 - reach]
            self._overwritten[row] = keep
        batch, spans = insert_recall_spans(batch, self.train_data, cfg.recall_prob, cfg.recall_min, cfg.recall_max,
                                           near=near, reach=reach, avoid=self._overwritten)
        written = spans.written
        if self.facts is not None:  # written over whatever the spans left: a span's overwritten labels leave its mask
            batch, spans.answers, planted = self.facts.plant(batch, near, reach)
            for row, start, end in planted:
                p0 = int(batch.positions[row, 0])
                spans.mask[row, max(0, start - p0 - 1) : end - p0] = False
            written = written + planted
        for row, start, end in written:
            self._overwritten[row].append((start, end))
        return batch, spans

    def train_step(self, batches: Batch | tuple[Batch, RecallSpans | None] | list) -> dict:
        """One optimizer step over one batch, or a list of ``grad_accum`` batches (their gradients summed, each
        scaled by 1/n); every batch's K/V are written to memory after its own forward pass."""
        cfg = self.config
        batches = batches if isinstance(batches, list) else [batches]
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * self.lr_factor(self.step)
        params = self.model.trainable_parameters()
        rows = []
        for i, item in enumerate(batches):
            batch, spans = item if isinstance(item, tuple) else (item, None)
            last = i == len(batches) - 1
            with self.ddp.no_sync() if self.world > 1 and not last else nullcontext():  # one all-reduce per step
                rows.append(self._accumulate(batch.to(self.device), spans, params, len(batches)))
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(r["tokens"] for r in rows)
        self.tokens += tokens * self.world
        row = {"loss": sum(r["loss"] for r in rows) / len(rows), "grad_norm": float(norm), "tokens": tokens,
               "memory_share": rows[-1]["memory_share"], "gate_mean": rows[-1]["gate_mean"]}
        return row | _mean_of(rows, "recall_loss") | _mean_of(rows, "fact_loss")

    def _accumulate(self, batch: Batch, spans: RecallSpans | None, params: list, n: int) -> dict:
        """Forward and backward of one batch (loss / n), then its write to memory -> its statistics."""
        cfg = self.config
        resets = batch.reset.nonzero().flatten().tolist()
        if resets:
            self.memory.reset(resets)
        with self._autocast():
            memory = self.memory if cfg.read_memory else None
            out = self.ddp(batch.input_ids, memory=memory, positions=batch.positions, labels=batch.labels)
        loss = out.loss
        if not loss.requires_grad:  # e.g. a memory-delta SideNet with every row's memory empty
            loss = loss + 0.0 * sum(p.sum() for p in params)
        (loss / n).backward()
        if cfg.read_memory:
            self.model.write_memory(self.memory, out, valid=batch.labels != -100)
        stats = out.stats
        row = {"loss": float(out.loss.detach()), "tokens": int((batch.labels != -100).sum()),
               "memory_share": stats.memory_share if stats else 0.0,
               "gate_mean": float(stats.gate.mean()) if stats else None}  # None: JSON null (empty memory)
        if spans is not None:  # the loss on tokens only the memory can supply
            for key, mask in (("recall_loss", spans.mask), ("fact_loss", spans.answers)):
                if mask is not None and mask.any():
                    mask = mask.to(self.device)
                    with torch.no_grad():
                        nll = torch.nn.functional.cross_entropy(out.logits.detach()[mask].float(), batch.labels[mask])
                    row[key] = float(nll)
        return row

    def _weights_lr(self) -> float:
        """The current learning rate of the SideNet weights (the copy head's or the gates' when only those train)."""
        groups = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        return next(groups[k] for k in ("decay", "no_decay", "style", "gate") if k in groups)

    def train(self) -> dict:
        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train",
                   disable=not (self.progress and self.rank == 0))
        window, start = [], time.perf_counter()
        last_eval: dict = {}
        while self.step < cfg.steps:
            row = self.train_step([self.next_batch() for _ in range(cfg.grad_accum)])
            window.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - start
                self._log({"step": self.step, "loss": sum(r["loss"] for r in window) / len(window),
                           "lr": self._weights_lr(),
                           "grad_norm": window[-1]["grad_norm"], "tokens_seen": self.tokens,
                           "tokens_per_s": sum(r["tokens"] for r in window) * self.world / elapsed,
                           "memory_share": window[-1]["memory_share"], "gate_mean": window[-1]["gate_mean"]}
                          | _mean_of(window, "recall_loss") | _mean_of(window, "fact_loss"))
                window, start = [], time.perf_counter()
            if cfg.eval_every > 0 and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                last_eval = self.evaluate()
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        if self.world > 1:
            self._log({"step": self.step, "ranks_in_sync": self.ranks_in_sync()})
        last_eval = self.evaluate() if cfg.eval_every >= 0 else last_eval
        self.save_checkpoint()
        return last_eval

    def ranks_in_sync(self) -> bool:
        """True when every rank holds bit-identical trainable parameters."""
        flat = torch.cat([p.detach().double().flatten() for p in self.model.trainable_parameters()])
        index = torch.arange(flat.numel(), dtype=torch.float64, device=flat.device)
        probe = torch.stack([flat.sum(), (flat * index).sum()])
        gathered = [torch.empty_like(probe) for _ in range(self.world)]
        dist.all_gather(gathered, probe)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation perplexity with memory, with empty memory, and of the backbone (rank 0)."""
        if self.rank != 0 or self.val_data is None or len(self.val_data) == 0:
            return {}
        self.model.eval()
        row: dict = {"step": self.step, "split": self.config.val_split}
        for mode in ("memory", "no-memory", "backbone"):
            nll, count = 0.0, 0
            for i in range(len(self.val_data)):
                ids = torch.from_numpy(self.val_data.document(i)[: self.config.eval_tokens].astype("int64"))
                if ids.numel() < 2:
                    continue
                with self._autocast():
                    res = perplexity(self.model, ids, mode=mode)
                nll += res.nll * res.tokens
                count += res.tokens
            row[f"ppl_{mode.replace('-', '_')}"] = math.exp(nll / max(count, 1))
        row["memory_gain"] = 1 - row["ppl_memory"] / row["ppl_no_memory"]
        self._log(row)
        return row

    # ------------------------------------------------------------------ save / restore
    def save_checkpoint(self) -> None:
        tmp = ckpt.tmp_dir(self.output, self.step)
        if self.rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        stream_state = self.stream.state_dict() | {"overwritten": self._overwritten}  # recall sources to avoid
        if self.facts is not None:
            stream_state["facts"] = self.facts.state_dict()
        ckpt.write_rank(tmp, self.rank, stream_state, [self.memory])
        if self.rank == 0:
            state = {"step": self.step, "tokens": self.tokens, "world_size": self.world,
                     "config": self.config.to_dict()}
            ckpt.write_shared(tmp, state, self.model.sidenet.state_dict(), self.optimizer)
        self._barrier()
        if self.rank == 0:
            ckpt.publish(self.output, self.step, self.config.keep_checkpoints)
            self._plot()
        self._barrier()

    def _restore(self) -> None:
        path = ckpt.latest(self.output)
        state, trainable = ckpt.read_shared(path, self.optimizer)
        if state["world_size"] != self.world:
            raise LongMemError(f"checkpoint {path} was written by {state['world_size']} processes, not {self.world}")
        self.model.sidenet.load_state_dict(trainable)
        stream_state, memories = ckpt.read_rank(path, self.rank, self.model.memory_meta(),
                                                self.model.config.retrieval, self.device)
        self._overwritten = [[tuple(r) for r in rows] for rows in stream_state.pop("overwritten", self._overwritten)]
        facts = stream_state.pop("facts", None)
        if self.facts is not None and facts is not None:
            self.facts.load_state_dict(facts)
        self.stream.load_state_dict(stream_state)
        self.memory = memories[0]
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        if self.rank == 0:
            _truncate_metrics(self.output / "metrics.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def export(self, path: Path | None = None) -> Path:
        """The trained SideNet as a plain directory (LoRA merged) in ``export_dtype``."""
        path = path or self.output / "sidenet"
        if self.rank == 0:
            merge_lora(self.model.sidenet)
            dtype = torch.bfloat16 if self.config.export_dtype == "bfloat16" else torch.float32
            self.model.save_pretrained(path, dtype=dtype)
        self._barrier()
        return path

    def cleanup(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        return autocast(self.device, torch.bfloat16 if self.config.dtype == "bfloat16" else None)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _log(self, row: dict) -> None:
        if self.rank != 0:
            return
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("%s", row)

    def _plot(self) -> None:
        from longmem.train.curves import training_curve

        training_curve(self.output / "metrics.jsonl", self.output / "curve.png")


def _mean_of(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if key in r]
    return {key: sum(values) / len(values)} if values else {}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint being resumed."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def run(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Set up, train, export and clean up; returns the last validation row."""
    trainer = Trainer(config, resume=resume, progress=progress).setup()
    try:
        result = trainer.train()
        trainer.export()
        return result
    finally:
        trainer.cleanup()

