"""Devices: the resolver, every tensor following the model's device, and the same numbers on any device.

This machine has no GPU. Two checks stand in for one:

* **Nothing is made off the model's device.** With ``torch.device("meta")`` as the default device, a
  tensor made without ``device=`` is a meta tensor, and mixing it with the model's CPU tensors raises (or
  reading its value does). Every path below (reading, perplexity, decoding with eviction, each index,
  int8 storage, named memories; a training step in ``test_train.py``) must run and give the numbers it gives without the
  meta default: a factory call that ignores the device would fail here as it would on CUDA.
* **The same numbers on the test device.** ``LONGMEM_TEST_DEVICE`` (default cpu) names a device; the
  model there must match the CPU model (``bench/gpu_check.sh`` runs this file with cuda; the ``gpu``
  marker's tests need CUDA and skip without it).
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_model
from longmem.devices import resolve_device
from longmem.errors import LongMemError
from longmem.inference.generate import GenerationConfig, generate
from longmem.inference.reader import perplexity, read
from longmem.inference.session import load_named, remember
from longmem.memory.io.store import load_memory, save_memory
from longmem.memory.search import IndexConfig

TEST_DEVICE = os.environ.get("LONGMEM_TEST_DEVICE", "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------- resolving
def test_auto_is_cuda_when_present_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_device_that_is_not_here_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LongMemError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(LongMemError, match="not one of auto, cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LongMemError, match=r"1 CUDA device\(s\)"):
        resolve_device("cuda:3")
    assert resolve_device("CPU") == torch.device("cpu")


def test_cli_refuses_a_missing_device_with_one_line(capsys, backbone_dir, monkeypatch, tmp_path):
    from conftest import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "t.txt").write_text("a short text to read " * 20)
    code, _, err = run_cli(capsys, "ppl", tmp_path / "t.txt", "--sidenet", "fresh", "--backbone", backbone_dir,
                           "--device", "cuda")
    assert code != 0 and "CUDA is not available" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- meta default
IDS = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(0))
PROMPT = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(1))


def _ppl(model, **memory):
    mm = model.new_memory(1, **memory)
    read(model, IDS[:80], mm)
    return perplexity(model, IDS, "memory", memory=mm).nll


def _generate(model):
    mm = model.new_memory(1)
    read(model, IDS, mm)
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=3)
    return generate(model, PROMPT, mm, config).text  # the window (32) fills: tokens are evicted to memory


def _saved(model, tmp_path):
    mm = model.new_memory(1)
    read(model, IDS, mm)
    save_memory(mm, tmp_path / "m")
    return perplexity(model, IDS[:40], "foreign-memory", memory=load_memory(tmp_path / "m")).nll


def _named(model, tmp_path):
    remember(model, "notes", "the amber acorn is 4550622. " * 8, root=tmp_path)
    bank, _ = load_named(model, "notes", root=tmp_path)
    return perplexity(model, IDS[:40], "foreign-memory", memory=bank).nll


PATHS = {
    "perplexity": lambda m, _: _ppl(m),
    "torch-ivf": lambda m, _: _ppl(m, index=IndexConfig(kind="torch-ivf", nlist=2, train_chunks=8, nprobe=1)),
    "faiss": lambda m, _: _ppl(m, index=IndexConfig(kind="faiss")),
    "generate": lambda m, _: _generate(m),
    "saved memory": _saved,
    "named memory": _named,
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_tensor_follows_the_model_device(path, tmp_path):
    """Run a path with meta as the default device: it must run and give the numbers it gives normally."""
    if path == "faiss":
        pytest.importorskip("faiss")
    model = make_model(trained=True)
    expected = PATHS[path](model, tmp_path / "plain")
    with torch.device("meta"):
        got = PATHS[path](model, tmp_path / "meta")
    assert got == expected


def test_int8_memory_follows_the_model_device():
    model = make_model(trained=True, memory_dtype="int8")
    expected = _ppl(model)
    with torch.device("meta"):
        assert _ppl(model) == expected


# ---------------------------------------------------------------------------------------------- same numbers
def _on(device: str):
    return make_model(trained=True).to(device)


@pytest.mark.parametrize("device", [TEST_DEVICE, pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_the_device_reads_as_the_cpu_does(device):
    cpu, dev = _on("cpu"), _on(device)
    assert dev.device.type == torch.device(device).type and dev.new_memory(1).keys.device.type == dev.device.type
    assert _ppl(dev) == pytest.approx(_ppl(cpu), abs=1e-4)


@pytest.mark.parametrize("device", [TEST_DEVICE, pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_the_device_decodes_as_the_cpu_does(device):
    greedy = GenerationConfig(max_new_tokens=12, temperature=0.0)
    outs = []
    for model in (_on("cpu"), _on(device)):
        mm = model.new_memory(1)
        read(model, IDS, mm)
        outs.append(generate(model, PROMPT, mm, greedy).text)
    assert outs[0] == outs[1]


def test_the_evaluations_follow_the_model_device(tmp_path):
    """The recall suite (every mode kind) and in-context learning (shared prefixes, memory) under the meta default."""
    from test_evals_icl import BAD, GOOD
    from test_evals_recall import SHORT
    from longmem.evals.icl import IclConfig, icl
    from longmem.evals.recall import RecallConfig, recall

    prose = tmp_path / "prose.txt"
    prose.write_text("Emma was handsome. She was clever and rich. It was a fine day.\n" * 40)
    (tmp_path / "icl" / "SST-2").mkdir(parents=True)
    rows = "\n".join([f"{t}\t1" for t in GOOD] + [f"{t}\t0" for t in BAD])
    (tmp_path / "icl" / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + rows + "\n")
    (tmp_path / "icl" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nnice\t1\nawful\t0\n")
    model = make_model(trained=True, segment_length=64, memory_size=512)
    recall_config = RecallConfig(filler=str(prose), tasks=["multikey", "update"], lengths=[200], trials=1, digits=3,
                                 templates=SHORT, modes=["memory", "backbone", "window-128"])
    icl_config = IclConfig(data=str(tmp_path / "icl"), tasks=["sst-2"], demos=[4], memory_demos=4, seeds=1,
                           modes=["memory", "backbone"])

    def run():
        return ([t.predicted for t in recall(model, recall_config).trials],
                [s.accuracy for s in icl(model, icl_config).scores])

    expected = run()
    with torch.device("meta"):
        assert run() == expected
