"""The lm-evaluation-harness adapter, run by the real lm-eval package on tasks the tests write (no download)."""

import glob
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from longmem.errors import LongMemError
from longmem.evals.harness import LongMemLM
from longmem.inference.generate import GenerationConfig, generate

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 3


def model_args(backbone_dir) -> str:
    return f"sidenet=fresh,backbone={backbone_dir},dtype=float32,segment=64,memory_size=256"


def test_rolling_perplexity_through_lm_eval_agrees_with_longmem_ppl(tmp_path, capsys, backbone_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (tmp_path / "book_ppl.yaml").write_text(f"""task: book_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""")
    code, _, _ = run_cli(capsys, "lm-eval", "run", "--model", "longmem", "--model_args", model_args(backbone_dir),
                         "--tasks", "book_ppl", "--include_path", tmp_path, "--output_path", tmp_path / "out")
    assert code == 0
    found = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    word_ppl = json.loads(open(found[0]).read())["results"]["book_ppl"]["word_perplexity,none"]
    code, out, _ = run_cli(capsys, "ppl", book, "--backbone", backbone_dir, "--sidenet", "fresh", "--dtype", "float32",
                           "--segment", 64, "--memory-size", 256, "--json")
    assert code == 0
    ours = json.loads(out)
    tokens, token_ppl = ours["tokens"], ours["perplexity"]
    words = len(re.split(r"\s+", TEXT))
    through_lm_eval = math.exp(math.log(word_ppl) * words / tokens)  # the same log-likelihood sum, per token
    assert through_lm_eval == pytest.approx(token_ppl, rel=5e-3)


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_loglikelihood_and_generation_equal_the_library(backbone_dir):
    lm = LongMemLM(**dict(kv.split("=") for kv in model_args(backbone_dir).split(",")))
    model, tok = lm.model, lm.model.tokenizer
    (ll, greedy), = lm.loglikelihood(requests(("The cat sat on", " the mat")))
    ids = torch.tensor(tok("The cat sat on the mat")["input_ids"])
    n = len(tok("The cat sat on")["input_ids"])
    logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)  # the slow twin: one forward pass
    want = float(sum(logp[i - 1, ids[i]] for i in range(n, len(ids))))
    assert ll == pytest.approx(want, abs=1e-3)
    assert greedy == all(int(logp[i - 1].argmax()) == int(ids[i]) for i in range(n, len(ids)))
    long_context = TEXT * 2  # longer than the 64-token window: read into the memory on the way
    (long_ll, _), = lm.loglikelihood(requests((long_context, " wife")))
    assert math.isfinite(long_ll) and long_ll < 0
    text, = lm.generate_until(requests(("It is a truth", {"until": ["\n\n"], "max_gen_toks": 12})))
    assert text == generate(model, "It is a truth", None, GenerationConfig(max_new_tokens=12, stop=["\n\n"])).text
    with pytest.raises(LongMemError, match="unknown longmem model_args: colour"):
        LongMemLM(model=model, colour="blue")
