"""Contrast training's pieces: the held KL and the choice of another document of the same group."""

import numpy as np
import pytest
import torch

from longmem.contrast import ForeignBanks, group_of, held_kl
from longmem.data.tokens import TokenizedCorpus


def test_held_kl_is_zero_for_the_same_prediction_and_only_moves_the_second():
    g = torch.Generator().manual_seed(0)
    ref, cur = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    assert float(held_kl(ref, ref, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(held_kl(ref, ref.log_softmax(-1), mask)) == pytest.approx(0.0, abs=1e-6)  # logits or log-probs
    ref.requires_grad_(True)
    kl = held_kl(ref, cur, mask)
    kl.backward()
    assert float(kl) > 0 and ref.grad is None and cur.grad.abs().sum() > 0
    assert cur.grad[1, 3:].abs().sum() == 0  # unmasked tokens only


def test_another_document_of_the_same_group():
    ids = ["austen-emma", "austen-persuasion", "kjv-bible", "shakespeare-lear", "austen-empty"]
    lengths = np.array([10, 10, 10, 10, 0])
    corpus = TokenizedCorpus(np.zeros(40, dtype=np.uint32), ids, np.array([0, 10, 20, 30, 40]), lengths)
    banks = ForeignBanks(None, corpus, 1, 8, 1, seed=0)
    rng = np.random.default_rng(0)
    assert {banks.pick(0, rng) for _ in range(20)} == {1}  # the other Austen novel, never an empty one
    assert {banks.pick(2, rng) for _ in range(50)} == {0, 1, 3}  # no other KJV: any other document
    assert group_of("austen-emma") == "austen" and group_of("plain") == "plain"
