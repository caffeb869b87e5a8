"""lm-evaluation-harness adapter: the standard benchmarks, run with a memory.

Importing this module registers the model ``longmem`` with lm-eval, so that

    longmem lm-eval run --model longmem --model_args sidenet=default,memory=NAME --tasks ...

(lm-eval's own command line, with this model registered first: lm-eval 0.4 has no plugin discovery for
models) or, from Python, ``lm_eval.simple_evaluate(model="longmem", ...)`` after ``import
longmem.evals.harness`` evaluates the model with a memory. ``model_args``: ``sidenet`` (a SideNet directory,
``default`` or ``fresh``), ``backbone``, ``memory`` (a named memory every request reads; default: an empty
one), ``memory_dir``, ``dtype``, ``segment`` (the local window), ``memory_size`` (tokens).

What each request type does, with the memory given (never changed: a request's overflow goes to a copy):

* ``loglikelihood(context, continuation)``: the context, then the continuation token by token, through the
  incremental decoder (``inference.generate.Decoder``), so a context longer than the window is read into
  the memory as generation would read it; the log-likelihood of the continuation and whether it is greedy.
* ``loglikelihood_rolling(text)``: the text read segment by segment with a memory that fills as it reads --
  exactly ``longmem ppl``'s reader (``inference.reader.perplexity``, mode ``memory``); the sum of the
  log-likelihoods of every token after the first (the first has no context).
* ``generate_until(context, {until, max_gen_toks, do_sample, temperature, top_p})``: ``inference.generate``'s
  streamed generation, stopped at the first ``until`` string.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from longmem.data.tokens import document_ids
from longmem.errors import LongMemError
from longmem.inference.generate import Decoder, GenerationConfig, copy_memory, stream, window_sizes
from longmem.inference.reader import perplexity, tokenize
from longmem.memory.bank import MemoryBank
from longmem.model.longmem import LongMemModel

log = logging.getLogger(__name__)


@register_model("longmem")
class LongMemLM(LM):
    """A LongMem model (a frozen backbone, its SideNet and a memory) as an lm-eval ``LM``."""

    def __init__(self, sidenet: str = "default", backbone: str | None = None, memory: str | None = None,
                 memory_dir: str | None = None, dtype: str = "bfloat16", segment: int | None = None,
                 memory_size: int | None = None,
                 device: str | None = None, model: LongMemModel | None = None, max_gen_toks: int = 256,
                 batch_size: int | str | None = None, max_batch_size: int | None = None, **unknown) -> None:
        """``model``: an already loaded LongMemModel (Python API); else it is loaded from ``sidenet`` /
        ``backbone``. ``batch_size`` is accepted and ignored (one request at a time)."""
        super().__init__()
        if unknown:
            raise LongMemError(f"unknown longmem model_args: {', '.join(sorted(unknown))} (known: sidenet, "
                               "backbone, memory, memory_dir, dtype, segment, memory_size, device, max_gen_toks)")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s asked for (lm-eval's default is cuda:0), but CUDA is not available: the CPU", device)
            device = "cpu"
        if model is None:
            overrides = ({"segment_length": int(segment)} if segment else {}) | (
                {"memory_size": int(memory_size)} if memory_size else {})
            model = LongMemModel.from_pretrained(sidenet, backbone=backbone, dtype=dtype, device=device or "auto",
                                                 **overrides)
        if model.tokenizer is None:
            raise LongMemError("lm-eval needs the model's tokenizer")
        self.model, self.max_gen_toks = model.eval(), int(max_gen_toks)
        self.memory: MemoryBank | None = None
        if memory:
            from longmem.inference.session import load_named

            self.memory, _ = load_named(model, memory, Path(memory_dir) if memory_dir else None)

    # ------------------------------------------------------------------ helpers
    def _bank(self) -> MemoryBank:
        """A private memory for one request: a copy of the given one, or an empty one."""
        return copy_memory(self.memory) if self.memory is not None else self.model.new_memory(1)

    def _start(self) -> bool:
        return self.memory is None or int(self.memory.end_position.max()) == 0

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as lm-eval splits them: the whole string encoded, the context's
        trailing spaces moved to the continuation; an empty context gets the end-of-text id as its prefix."""
        tok = self.model.tokenizer
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = document_ids(tok, context + continuation, start=self._start())
        head = document_ids(tok, context, start=self._start()) if context else []
        if not head:
            prefix = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
            if prefix is None:
                raise LongMemError("an empty context needs an end-of-text or <bos> token as its prefix")
            return [int(prefix)], whole
        return whole[: len(head)], whole[len(head) :]

    # ------------------------------------------------------------------ the LM API
    @torch.no_grad()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = request.args
            head, tail = self._pair(context, continuation)
            if not tail:
                raise LongMemError(f"an empty continuation cannot be scored (context {context[-40:]!r})")
            bank = self._bank()
            window, evict = window_sizes(self.model, GenerationConfig(), bank)
            decoder = Decoder(self.model, bank, window, evict)
            logits = decoder.feed(torch.tensor(head, dtype=torch.long, device="cpu"))  # [V]
            total, greedy = 0.0, True
            for i, token in enumerate(tail):
                logp = torch.log_softmax(logits.float(), -1)
                total += float(logp[token])
                greedy &= int(logp.argmax()) == token
                if i + 1 < len(tail):
                    logits = decoder.feed(torch.tensor([token], dtype=torch.long, device="cpu"))
            out.append((total, greedy))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            ids = tokenize(self.model, text)
            result = perplexity(self.model, ids, mode="memory", memory=self._bank())
            out.append(-result.nll * result.tokens)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 1.0 if sample else 0.0))
            config = GenerationConfig(max_new_tokens=int(options.pop("max_gen_toks", self.max_gen_toks)),
                                      temperature=temperature if sample or temperature else 0.0,
                                      top_p=float(options.pop("top_p", 1.0)), stop=[u for u in until if u],
                                      seed=options.pop("seed", None))
            pieces = stream(self.model, context, self._bank() if self.memory is not None else None, config,
                            copy_on_write=False)
            out.append("".join(pieces))
        return out

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.model.tokenizer, "name_or_path", "longmem").replace("/", "__")


def main(argv: list[str]) -> int:
    """``longmem lm-eval ARGS``: lm-eval's own command line with the ``longmem`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
