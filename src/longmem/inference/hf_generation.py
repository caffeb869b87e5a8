"""Hugging Face-style ``generate``: a ``transformers.GenerationConfig``, streamers, logits processors and
stopping criteria, with a memory.

The loop is the incremental decoder's (``inference.generate.Decoder``: a sliding window over the memory);
everything around a step is transformers' own machinery: the logits processors and warpers a
``GenerationConfig`` asks for (repetition penalty, temperature, top-k, top-p, min-p) built from transformers'
classes, a caller's ``logits_processor`` list after them, transformers' stopping criteria (``max_new_tokens`` /
``max_length``, ``eos_token_id``, ``stop_strings``) plus a caller's ``stopping_criteria``, and any
``BaseStreamer`` (``TextStreamer``, ``TextIteratorStreamer``) fed as ``GenerationMixin.generate`` feeds one: the
prompt first, then each new token, then ``end()``. Sampling draws from torch's global generator, so
``torch.manual_seed`` makes it reproducible, as in transformers.

Defaults come from the backbone's own ``generation_config`` (its end-of-sequence ids among them), as
``model.generate`` of the backbone would take them. Greedy search and sampling only: beam search and several
sequences per prompt are refused by name.
"""

from __future__ import annotations

import copy

import torch

from longmem.errors import LongMemError
from longmem.inference.generate import Decoder, GenerationConfig, window_sizes
from longmem.memory.bank import MemoryBank


def _hf():
    import transformers

    return transformers


def resolve_config(model, generation_config=None, **kwargs):
    """The backbone's generation config (or the one given), updated with ``kwargs`` -> a GenerationConfig;
    a kwarg that is not a generation option, or an option this loop cannot honour, is a clear error."""
    hf = _hf()
    base = generation_config if generation_config is not None else getattr(model.backbone.model,
                                                                           "generation_config", None)
    config = copy.deepcopy(base) if base is not None else hf.GenerationConfig()
    unused = config.update(**kwargs)
    if unused:
        raise LongMemError(f"not generation options: {', '.join(sorted(unused))}")
    for name, allowed in (("num_beams", 1), ("num_return_sequences", 1)):
        value = getattr(config, name, None)
        if value not in (None, allowed):
            raise LongMemError(f"{name}={value}: only greedy search and sampling of one sequence are supported")
    if config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = 20  # transformers' default length
    return config


def eos_ids(model, config) -> list[int]:
    """The end-of-sequence ids: the config's, else the tokenizer's (none: never stop at one)."""
    eos = config.eos_token_id
    if eos is None and model.tokenizer is not None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def processors(config, extra=None):
    """transformers' logits processors for ``config`` (warpers only when sampling), then ``extra``."""
    hf = _hf()
    out = hf.LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        out.append(hf.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            out.append(hf.TemperatureLogitsWarper(config.temperature))
        if config.top_k not in (None, 0):
            out.append(hf.TopKLogitsWarper(config.top_k))
        if config.top_p not in (None, 1.0):
            out.append(hf.TopPLogitsWarper(config.top_p))
        if getattr(config, "min_p", None):
            out.append(hf.MinPLogitsWarper(config.min_p))
    out.extend(extra or [])
    return out


def stopping(model, config, prompt_length: int, extra=None):
    """transformers' stopping criteria for ``config`` and a prompt of ``prompt_length`` tokens, then ``extra``."""
    hf = _hf()
    total = prompt_length + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    out = hf.StoppingCriteriaList([hf.MaxLengthCriteria(max_length=total)])
    eos = eos_ids(model, config)
    if eos:
        out.append(hf.EosTokenCriteria(eos_token_id=eos))
    if config.stop_strings:
        if model.tokenizer is None:
            raise LongMemError("stop_strings need the model's tokenizer")
        stops = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        out.append(hf.StopStringCriteria(tokenizer=model.tokenizer, stop_strings=stops))
    out.extend(extra or [])
    return out


@torch.no_grad()
def hf_generate(model, input_ids: torch.Tensor, generation_config=None, memory: MemoryBank | None = None,
                streamer=None, logits_processor=None, stopping_criteria=None, window: int | None = None,
                **kwargs) -> torch.Tensor:
    """input_ids [B,L] (or [L]) -> the sequences [B,L+N] (int64, on the CPU), prompt included, rows that stop
    early padded with the pad (else end-of-sequence) id, as transformers' ``generate`` returns them.

    ``memory``: a one-row memory every row reads (never changed: the window's evictions go to a copy); None:
    an empty one. ``window``: the decode window (default: the model's segment length). A streamer takes one
    row only, as in transformers."""
    config = resolve_config(model, generation_config, **kwargs)
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise LongMemError(f"input_ids must be [batch, length] with length >= 1, not {tuple(input_ids.shape)}")
    if streamer is not None and ids.shape[0] != 1:
        raise LongMemError("a streamer takes one sequence: pass one row of input_ids")
    rows = [_one(model, row.to("cpu", torch.long), config, memory, streamer, logits_processor, stopping_criteria,
                 window) for row in ids]
    longest = max(r.shape[0] for r in rows)
    eos = eos_ids(model, config)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    out = torch.full((len(rows), longest), int(pad), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _one(model, prompt: torch.Tensor, config, memory, streamer, logits_processor, stopping_criteria,
         window: int | None) -> torch.Tensor:
    """One row: prompt [L] -> prompt and new tokens [L+N]."""
    bank = memory if memory is not None else model.new_memory(1)
    w, evict = window_sizes(model, GenerationConfig(window=window), bank)
    decoder = Decoder(model, bank, w, evict, copy_on_write=memory is not None)
    process = processors(config, logits_processor)
    stop = stopping(model, config, prompt.shape[0], stopping_criteria)
    seq = prompt[None]  # [1,L]
    if streamer is not None:
        streamer.put(seq)
    logits = decoder.feed(prompt)  # [V]
    while True:
        scores = process(seq, logits[None].float())  # [1,V]
        if config.do_sample:
            token = torch.multinomial(torch.softmax(scores, -1), 1)  # [1,1] torch's global generator
        else:
            token = scores.argmax(-1, keepdim=True)
        token = token.to("cpu")
        seq = torch.cat([seq, token], 1)
        if streamer is not None:
            streamer.put(token[0])
        if bool(stop(seq, scores).all()):
            break
        logits = decoder.feed(token[0].to(model.device))
    if streamer is not None:
        streamer.end()
    return seq[0]
