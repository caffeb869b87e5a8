import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama
from longmem.cli.main import main
from longmem.data.books import Document, write_corpus
from longmem.train.trainer import Trainer
from longmem.train.config import TrainConfig, load_train_config

WORDS = "the quick brown fox jumps over a lazy dog while Emma reads letters to Harriet at Hartfield".split()


def _text(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    backbone = root / "backbone"
    tiny_llama().save_pretrained(backbone)
    byte_tokenizer().save_pretrained(backbone)
    docs = [Document(f"doc-{i}", f"Doc {i}", "test", _text(i, 40 + 25 * i), []) for i in range(5)]
    docs.append(Document("austen-northangerabbey", "Val", "test", _text(99, 60), []))
    write_corpus(docs, root / "corpus")
    return root, backbone


def config(root: Path, backbone: Path, out: str, **kw) -> TrainConfig:
    model = dict(backbone=str(backbone), segment_length=16, memory_size=64, chunk_size=2, topk=8,
                 memory_dtype="float32", memory_layer=1, style_rank=8)  # the shipped layout, one later block
    base = dict(model=model, corpus=str(root / "corpus"), output_dir=str(root / out), steps=6, batch_size=2,
                warmup_steps=2, eval_every=3, eval_tokens=48, save_every=3, log_every=1, dtype="float32")
    return TrainConfig(**(base | kw))


def params(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.sidenet.state_dict().items()}


def test_interrupted_and_resumed_run_matches_uninterrupted(setup_dirs):
    root, backbone = setup_dirs
    full = Trainer(config(root, backbone, "full"), progress=False).setup()
    full.train()
    first = Trainer(config(root, backbone, "split"), progress=False).setup()
    for _ in range(3):
        first.train_step(next(first.stream))
    first.save_checkpoint()
    del first  # "killed" after its checkpoint
    resumed = Trainer(config(root, backbone, "split"), resume=True, progress=False).setup()
    assert resumed.step == 3
    resumed.train()
    a, b = params(full), params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = Trainer(config(root, backbone, "fresh"), progress=False).setup()
    assert any(not torch.equal(a[k], v) for k, v in params(changed).items())  # training did move weights


def test_run_writes_config_metrics_curve_checkpoints_and_sidenet(setup_dirs, capsys):
    root, backbone = setup_dirs
    run_file = root / "run.json"
    run_file.write_text(json.dumps(config(root, backbone, "cli").to_dict()))
    code = main(["train", str(run_file), "--set", "steps=4", "--set", "model.memory_size=32"])
    assert code == 0
    out = root / "cli"
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["steps"] == 4 and resolved["model"]["memory_size"] == 32
    assert resolved["model"]["backbone_fingerprint"].startswith("sha256:")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    val = [r for r in rows if "ppl_memory" in r]
    assert val and all(r["ppl_backbone"] > 1 for r in val)
    assert (out / "curve.png").stat().st_size > 1000
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert (out / "sidenet" / "model.safetensors").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_dir"] == str(out)


def test_memory_only_holds_earlier_text_of_the_same_document(setup_dirs):
    root, backbone = setup_dirs
    trainer = Trainer(config(root, backbone, "causal", batch_size=3), progress=False).setup()
    for _ in range(12):
        batch = next(trainer.stream)
        for row in range(3):
            if batch.reset[row]:
                assert batch.positions[row, 0] == 0  # a new document starts at its beginning
            else:
                _, _, pos = trainer.memory.row_chunks(row)
                assert pos.numel() == 0 or pos.max() < batch.positions[row, 0]
        trainer.train_step(batch)
        for row in range(3):
            assert trainer.memory.num_tokens(row) == 0 or trainer.memory.row_chunks(row)[2].max() <= batch.positions[row].max()


@pytest.mark.parametrize("trainable", ["memory_path", "lora"])
def test_trainable_sets(setup_dirs, trainable):
    root, backbone = setup_dirs
    trainer = Trainer(config(root, backbone, f"set-{trainable}", trainable=trainable, steps=3,
                             eval_every=-1, lr=1e-2), progress=False).setup()
    before = {k: v.clone() for k, v in trainer.model.sidenet.state_dict().items()}
    trainer.train()
    after = trainer.model.sidenet.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if trainable == "memory_path":
        assert moved and all(k.startswith("blocks.") for k in moved)
    else:
        assert moved and all("lora_" in k or k.endswith(".gate") for k in moved)
        ids = torch.randint(0, 256, (1, 16))
        trainer.model.eval()
        with torch.no_grad():
            adapted = trainer.model(ids).logits
        path = trainer.export(root / f"export-{trainable}")
        from longmem.model.longmem import LongMemModel

        merged = LongMemModel.from_backbone(path, trainer.model.backbone)
        merged.sidenet.float()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-2, rtol=1e-2)


def test_bf16_autocast_training_runs(setup_dirs):
    root, backbone = setup_dirs
    trainer = Trainer(config(root, backbone, "bf16", dtype="bfloat16", steps=2, eval_every=-1), progress=False)
    trainer.setup()
    assert trainer.model.backbone.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.trainable_parameters())
    trainer.train()
    assert torch.isfinite(torch.tensor(json.loads((root / "bf16" / "metrics.jsonl").read_text()
                                                  .splitlines()[-1])["loss"]))


def test_config_errors():
    from longmem.errors import LongMemError

    with pytest.raises(LongMemError, match="unknown TrainConfig keys: stepz"):
        load_train_config(None, ["stepz=3"])
    with pytest.raises(LongMemError, match="key=value"):
        load_train_config(None, ["steps"])
    with pytest.raises(LongMemError, match="trainable"):
        load_train_config(None, ["trainable=everything"])
    assert load_train_config(None, ["lr=1e-4", "model.chunk_size=2"]).model.chunk_size == 2


def test_resume_without_checkpoint_fails_cleanly(setup_dirs, capsys):
    root, backbone = setup_dirs
    run_file = root / "empty-run.json"
    run_file.write_text(json.dumps(config(root, backbone, "never-ran").to_dict()))
    assert main(["train", str(run_file), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_torchrun_two_ranks_stay_in_sync(setup_dirs):
    root, backbone = setup_dirs
    run_file = root / "ddp.json"
    run_file.write_text(json.dumps(config(root, backbone, "ddp", steps=3, eval_every=-1, save_every=0).to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29533", "-m", "longmem.cli", "train", str(run_file)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "ranks_in_sync": True} in rows
    state = json.loads((root / "ddp" / "checkpoints" / "step-000003" / "rank1.json").read_text())
    state0 = json.loads((root / "ddp" / "checkpoints" / "step-000003" / "rank0.json").read_text())
    assert state != state0  # the ranks stream different documents


def test_delta_sidenet_trains_on_recall_spans(setup_dirs):
    root, backbone = setup_dirs
    cfg = config(root, backbone, "recall", steps=8, eval_every=-1, save_every=0, recall_prob=1.0,
                 recall_min=4, recall_max=8, batch_size=1)
    trainer = Trainer(cfg, progress=False).setup()
    assert not any(p.requires_grad for p in trainer.model.sidenet.norm.parameters())
    trainer.train()
    rows = [json.loads(line) for line in (root / "recall" / "metrics.jsonl").read_text().splitlines()]
    assert any("recall_loss" in r for r in rows)


def test_copy_head_alone_trains_on_recall_spans_and_resumes(setup_dirs):
    root, backbone = setup_dirs
    cfg = config(root, backbone, "pointer", steps=6, eval_every=-1, save_every=3, recall_prob=1.0,
                 recall_min=4, recall_max=8, batch_size=1, trainable="copy_head")
    trainer = Trainer(cfg, progress=False).setup()
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("copy_head.") for k in changed)  # only the copy head moved
    assert any(trainer._overwritten)  # recall sources avoid text that earlier spans overwrote
    resumed = Trainer(cfg, resume=True, progress=False).setup()
    assert resumed._overwritten == trainer._overwritten
    headless = cfg.model.to_dict() | dict(copy_head=False, copy_gate=False)
    with pytest.raises(Exception, match="copy head"):
        Trainer(config(root, backbone, "bad", trainable="copy_head", model=headless), progress=False).setup()


def test_copy_head_trains_on_synthetic_facts_and_resumes_their_state(setup_dirs):
    root, backbone = setup_dirs
    model = dict(backbone=str(backbone), segment_length=128, memory_size=512, chunk_size=2, topk=8,
                 memory_dtype="float32", memory_layer=1)
    cfg = config(root, backbone, "facts", steps=20, eval_every=-1, save_every=10, fact_prob=1.0, batch_size=1,
                 trainable="copy_head", model=model, log_every=1)
    trainer = Trainer(cfg, progress=False).setup()
    gate = trainer.model.sidenet.copy_head.context.weight.detach().clone()
    trainer.train()
    rows = [json.loads(line) for line in (root / "facts" / "metrics.jsonl").read_text().splitlines()]
    assert any("fact_loss" in r for r in rows)  # questions were asked and scored
    assert not torch.equal(gate, trainer.model.sidenet.copy_head.context.weight)  # the context gate learned
    resumed = Trainer(cfg, resume=True, progress=False).setup()
    assert resumed.facts.state_dict() == trainer.facts.state_dict()


def test_a_style_adapter_alone_trains_without_memory(setup_dirs):
    root, backbone = setup_dirs
    cfg = config(root, backbone, "style", steps=4, eval_every=-1, save_every=0, trainable="style",
                 read_memory=False)
    trainer = Trainer(cfg, progress=False).setup()
    before = params(trainer)
    trainer.train()
    changed = {k for k, v in params(trainer).items() if not torch.equal(before[k], v)}
    assert changed == {"style.up.weight", "style.down.weight"}
    assert trainer.memory.is_empty  # nothing was read into memory
    plain = cfg.model.to_dict() | dict(style_rank=0)
    with pytest.raises(Exception, match="style adapter"):
        Trainer(config(root, backbone, "bad", trainable="style", model=plain), progress=False).setup()


RUN_FILES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_every_shipped_run_file_is_a_valid_config(path):
    cfg = load_train_config(path)
    assert cfg.model.backbone == "smollm2-135m" and cfg.steps > 0


def test_gradient_accumulation_averages_the_batches_gradients(setup_dirs):
    """grad_accum=2: one step reads two batches in turn (memory carried on) and its gradient is the mean of
    the two batches' own gradients."""
    root, backbone = setup_dirs
    acc = Trainer(config(root, backbone, "acc", grad_accum=2, trainable="copy_head"), progress=False).setup()
    ref = Trainer(config(root, backbone, "ref", trainable="copy_head"), progress=False).setup()
    batches = [acc.next_batch() for _ in range(2)]
    assert [ref.next_batch()[0].input_ids.tolist() for _ in range(2)] == [b[0].input_ids.tolist() for b in batches]
    params = ref.model.trainable_parameters()
    grads = []
    for batch, spans in batches:  # the slow twin: each batch's gradient on its own, memory written between
        ref._accumulate(batch, spans, params, 1)
        grads.append([p.grad.clone() for p in params])
        ref.optimizer.zero_grad(set_to_none=True)
    acc.optimizer.step = lambda: None  # keep the summed gradient to look at
    acc.optimizer.zero_grad = lambda set_to_none=True: None
    acc.config.grad_clip = 0.0
    row = acc.train_step(batches)
    assert acc.step == 1 and row["tokens"] == sum(int((b.labels != -100).sum()) for b, _ in batches)
    for p, g1, g2 in zip(acc.model.trainable_parameters(), *grads):
        assert torch.allclose(p.grad, (g1 + g2) / 2, atol=1e-6)


def test_a_training_step_follows_the_model_device(setup_dirs):
    """With meta as the default device a tensor made without ``device=`` is a meta tensor and mixing it with the
    model's raises: the same step must run and give the same loss (see test_devices.py)."""
    root, backbone = setup_dirs

    def steps(trainer: Trainer) -> float:
        trainer.train_step(trainer.next_batch())
        return trainer.train_step(trainer.next_batch())["loss"]

    def trainer(out: str) -> Trainer:  # built outside: transformers refuses to load weights onto meta
        cfg = config(root, backbone, out, fact_prob=1.0, keyed_prob=0.5, recall_prob=0.5)
        return Trainer(cfg, progress=False).setup()

    expected, second = steps(trainer("plain")), trainer("meta")
    with torch.device("meta"):
        assert steps(second) == expected
