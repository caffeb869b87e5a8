"""Many short queries after one shared prefix, the prefix computed once.

In-context learning scores thousands of test sentences after the same demonstrations.
``SharedPrefix`` decodes the demonstrations once with incremental decoding
(the model's decode cache for the LongMem modes, the Hugging Face key/value cache for the
backbone), then appends each query, takes its logits and rewinds the caches to the
prefix. Its logits equal :func:`longmem.evals.scoring.window_logits` on prefix + query
(the slow twin it is tested against).
"""

from __future__ import annotations

import torch

from longmem.model.backbone import with_cache
from longmem.errors import LongMemError
from longmem.evals.scoring import Context, Scorer


class SharedPrefix:
    """A context's prefix [P] decoded once; ``logits`` appends a query and rewinds."""

    def __init__(self, model: Scorer, ctx: Context, prefix: torch.Tensor):
        if prefix.shape[0] < 1:
            raise LongMemError("a shared prefix needs at least one token")
        self.model, self.ctx, self.n = model, ctx, prefix.shape[0]
        prefix = prefix.to(model.device)
        if ctx.mode.backbone_only:
            self.cache = model.backbone.new_cache()
            model.backbone.model(prefix[None], use_cache=True, **with_cache(model.backbone.model, self.cache))
        else:
            self.cache = model.new_cache(1, ctx.start, ctx.mode.window, memory=ctx.memory)
            with torch.no_grad():
                model(prefix[None], ctx.memory, cache=self.cache)
            self.history = self.cache.match_history  # the copy head's matches of the prefix's last tokens

    @torch.no_grad()
    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """query [Q] placed after the prefix -> next-token logits [Q,V] (float32)."""
        if self.n + query.shape[0] > self.ctx.mode.window:
            raise LongMemError(f"{self.n + query.shape[0]} tokens do not fit the {self.ctx.mode.window}-token window")
        query = query.to(self.model.device)
        if self.ctx.mode.backbone_only:
            hf = self.model.backbone.model
            out = hf(query[None], use_cache=True, **with_cache(hf, self.cache)).logits
        else:
            out = self.model(query[None], self.ctx.memory, cache=self.cache).logits
        self._rewind(query.shape[0])
        return out[0].float()  # [Q,V]

    def _rewind(self, q: int) -> None:
        """Drop the last q tokens from every cache."""
        if self.ctx.mode.backbone_only:
            self.cache.crop(-q)
        else:
            self.cache.rewind(self.n, self.history)
