import torch

from conftest import make_model
from longmem.evals.probe import retrieval_quality


def test_probe_scores_lie_between_random_and_perfect(family):
    model = make_model(family, segment_length=16, memory_size=64, topk=8, chunk_size=2, sink_tokens=0)
    ids = torch.randint(0, 256, (80,))
    q = retrieval_quality(model, ids, window=64)
    assert q.queries == 16 and q.memory_tokens == 48 - model.recent_tokens  # the short-term tier holds the rest
    assert 0 < q.earlier_share < 1
    assert 0 <= q.random_captured <= 1 and 0 <= q.captured <= 1


def test_probe_is_perfect_when_everything_is_retrieved(family):
    # K covers the whole memory: retrieval cannot miss anything stored
    model = make_model(family, segment_length=16, memory_size=64, topk=48, chunk_size=2, sink_tokens=0)
    q = retrieval_quality(model, torch.randint(0, 256, (64,)), window=64)
    assert abs(q.captured - 1.0) < 1e-5


def test_probe_misses_what_sinks_keep_out():
    model = make_model("llama", segment_length=16, memory_size=64, topk=48, chunk_size=2, sink_tokens=1)
    q = retrieval_quality(model, torch.randint(0, 256, (64,)), window=64)
    assert q.captured < 1.0 - 1e-4  # mass on the first token of each earlier segment is not in memory
