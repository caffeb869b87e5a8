"""Keyed matches (memory/keyed.py) against a brute-force twin, and the copy head's keyed source."""

import math

import pytest
import torch

from conftest import make_model
from longmem.memory.keyed import MAX_ANCHOR, SAID, keyed_matches
from longmem.model.copy_head import KEYED_FRESH_BIAS, CopyHead
from longmem.memory.token_log import TokenLog


def reference(seq: list[int], first: int, queries: int, window: int, keys: int, occurrences: int, reach: int,
              slots: int, max_count: int) -> list[dict[int, tuple[float, int, int, bool]]]:
    """The definition, one query at a time: {candidate position: (overlap, anchor length, next id, said)}."""
    out = []
    for q in range(len(seq) - queries, len(seq)):
        known = [x for x in seq[: q + 1] if x >= 0]  # what has been read up to the query
        counts = {x: known.count(x) for x in set(known)}
        limit = q - window + 1

        def leads(x: int) -> list[int]:  # anchors within reach after the word's latest occurrences
            occ = [i for i in range(max(0, limit)) if seq[i] == x][-occurrences:]
            return [p for o in occ for p in range(o + 1, o + 1 + reach)
                    if p + 1 < q and seq[p] == seq[q] and seq[p + 1] >= 0 and seq[q] >= 0]

        words: list[tuple[float, int]] = []
        for j in range(q, max(-1, q - window), -1):  # the window, newest first; a repeated id counts once
            x = seq[j]
            if x < 0 or counts[x] > max_count or any(w == x for _, w in words) \
                    or x not in seq[: max(0, q - window + 1)] or not leads(x):
                continue
            words.append((math.log((len(known) + 1) / (counts[x] + 1)), x))
        words = [w for _, w in sorted(((idf, -i), (idf, x)) for i, (idf, x) in enumerate(words))[::-1]][:keys]
        words = [w for w in words if w[0] > 0]  # top `keys` by idf, the newest first among equals
        cands: dict[int, tuple[float, int, int, bool]] = {}
        for idf, x in words:
            for p in leads(x):
                cands[p] = (0.0, 0, seq[p + 1], False)
        for p in cands:
            ov = 0.0
            for idf, x in words:
                occ = [i for i in range(max(0, limit)) if seq[i] == x][-occurrences:]
                if any(p - reach - 1 < o <= p for o in occ):
                    ov += idf
            length = 0
            while length < MAX_ANCHOR and p - length >= 0 and q - length >= 0 and seq[p - length] == seq[q - length] \
                    and seq[q - length] >= 0:
                length += 1
            ahead = seq[p + 1 : p + 1 + SAID] if p + SAID < q else []
            said = len(ahead) == SAID and all(a >= 0 for a in ahead) and any(
                seq[w : w + SAID] == ahead for w in range(max(0, q - window + 1), q - SAID + 2))
            cands[p] = (ov, length, seq[p + 1], said)
        best = sorted(cands.items(), key=lambda kv: (kv[1][0], kv[0]), reverse=True)[:slots]
        out.append({p + first * 0: v for p, v in best})
    return out


def test_keyed_matches_equal_the_brute_force_definition():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n, c = 300, 40
        seq = torch.randint(0, 60, (n,), generator=g)
        seq[::7] = torch.randint(60, 400, (len(seq[::7]),), generator=g)  # rarer ids
        log = TokenLog(1, 512)
        log.note(seq[None, : n - c], torch.arange(n - c)[None])
        settings = dict(window=16, keys=3, occurrences=4, reach=6, slots=8, max_count=40)
        pos, overlap, length, nxt, said = keyed_matches(log, seq[None, n - c:], torch.arange(n - c, n)[None], 10,
                                                        **settings)
        want = reference(seq.tolist(), n - c, 10, **settings)
        for qi, expect in enumerate(want):
            got = {int(p): (float(o), int(l), int(x), bool(z)) for p, o, l, x, z in
                   zip(pos[0, qi], overlap[0, qi], length[0, qi], nxt[0, qi], said[0, qi]) if p >= 0}
            assert set(got) == set(expect), (trial, qi)
            for p in got:
                assert got[p][0] == pytest.approx(expect[p][0], abs=1e-4) and got[p][1:] == expect[p][1:]


def test_the_key_picks_its_statement_among_look_alikes():
    # four statements "KEY_i is : V_i", filler between them, then a question naming KEY_2, ending with "is"
    filler, IS, COLON = list(range(10, 40)) * 3, 5, 6
    seq = []
    for i in range(4):
        seq += filler[: 20 + i] + [100 + i, 200 + i, IS, COLON, 300 + i]
    seq += filler[:70]  # the statements end before the question's window
    question = filler[:5] + [100 + 2, 200 + 2] + filler[5:8] + [IS]
    log = TokenLog(1, 1024)
    log.note(torch.tensor(seq)[None], torch.arange(len(seq))[None])
    ids = torch.tensor(question)[None]
    pos, overlap, _, nxt, _ = keyed_matches(log, ids, torch.arange(len(seq), len(seq) + len(question))[None], 1)
    top = int(overlap[0, 0].argmax())
    assert int(nxt[0, 0, top]) == COLON and seq[int(pos[0, 0, top]) - 2] == 100 + 2
    assert overlap[0, 0, top] > 0 and (overlap[0, 0] < overlap[0, 0, top]).sum() >= 3


def test_a_fresh_keyed_source_barely_changes_anything_and_a_trusted_one_answers():
    model = make_model("llama", trained=True)
    filler = [10 + i % 30 for i in range(91)]
    said = torch.tensor([[200, 201, 5, 6, 77] + filler])  # "KEY is : VALUE", then filler (96 tokens)
    asked = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 200, 201, 18, 19, 20, 21, 22, 23, 5]])  # ... KEY ... is
    memory = model.new_memory(1)
    for a in range(0, 96, 16):
        model.write_memory(memory, model(said[:, a : a + 16], memory=memory))
    head = model.sidenet.copy_head

    def logp(bias: float) -> torch.Tensor:
        with torch.no_grad():
            head.keyed_bias.fill_(bias)
            return torch.log_softmax(model(asked, memory=memory).logits[0, -1].float(), -1)

    off, fresh, trusted = logp(-100.0), logp(KEYED_FRESH_BIAS), logp(4.0)
    assert (fresh.exp() - off.exp()).abs().sum() < 1e-3  # a fresh head moves next to no probability
    assert trusted[6] > off[6] + 1.0 and trusted.argmax() == 6  # the value's first token, found by the key


def test_a_list_moves_on_to_the_value_not_said_yet():
    # "KEY is : _ A1 A2 A3 ." ... "KEY is : _ B1 B2 B3 ." ... then "KEY ... : _ B1 B2 B3 , _" : next is A1
    filler, KEY, IS, COLON, SP, DOT, COMMA = list(range(10, 40)) * 4, 100, 5, 6, 7, 8, 9
    seq = filler[:30] + [KEY, IS, COLON, SP, 201, 202, 203, DOT] + filler[:30] + [KEY, IS, COLON, SP, 301, 302, 303, DOT]
    seq += filler[:80]
    question = [11, 12, KEY, 13, 14, COLON, SP, 301, 302, 303, COMMA, SP]
    log = TokenLog(1, 1024)
    log.note(torch.tensor(seq)[None], torch.arange(len(seq))[None])
    context = (torch.tensor(question)[None], torch.arange(len(seq), len(seq) + len(question))[None])
    pos, _, _, nxt, said = keyed_matches(log, *context, 1)
    found = {int(x): bool(z) for p, x, z in zip(pos[0, 0], nxt[0, 0], said[0, 0]) if p >= 0}
    assert found == {201: False, 301: True}  # both statements found; the second's value is in the window
    with torch.no_grad():
        ids, w, _ = CopyHead(1).keyed_source(log, context, 1)
    mass = {int(i): float(x) for i, x in zip(ids[0, 0], w[0, 0]) if x > 0}
    assert mass[201] > 0.9 > mass[301]  # the value not said yet, though the other is more recent
