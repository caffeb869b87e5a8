import dataclasses
import json
import random

import pytest
import torch

from conftest import byte_tokenizer, make_model, run_cli
from longmem.errors import LongMemError
from longmem.evals.recall import (TASKS, PromptBuilder, RecallConfig, RecallTemplates, Task, TaskMaker, grade,
                                  recall)
from longmem.evals.scoring import decode, greedy, parse_mode, prepare, split_prefix

SHORT = RecallTemplates(intro="Keys.\n", needle="{key} is {value}.", question="{key}?", answer=" {key} is",
                        question_all="{keys}?", answer_all=" {keys} are", update="{key} is now {value}.",
                        var_intro="Vars.\n", var_value="{name}={value}.", var_copy="{name}={source}.",
                        var_question="Which are {value}?", var_answer=" They are:")


@pytest.fixture
def prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text("Emma was handsome. She was clever and rich. It was a fine day.\n" * 40)
    return str(path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode_name", ["memory", "no-memory", "backbone", "window-48"])
def test_cached_decoding_gives_the_slow_greedy_tokens(family, mode_name):
    model = make_model(family, trained=True, segment_length=32)
    mode = parse_mode(model, mode_name)
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1))
    head, local = split_prefix(ids, mode.window, 8)
    ctx = prepare(model, mode, head)
    slow = greedy(model, ctx, local, 8)
    ctx = prepare(model, mode, head)
    assert decode(model, ctx, local, 8) == slow
    stop = slow[3]
    assert decode(model, prepare(model, mode, head), local, 8, stop=stop) == slow[: slow.index(stop) + 1]


def test_every_task_lays_its_statements_in_order_into_a_prompt_of_the_exact_length(prose):
    config = RecallConfig(filler=prose, digits=4, templates=SHORT)
    builder, maker, tok = PromptBuilder(byte_tokenizer(), config), TaskMaker(config), byte_tokenizer()
    for task in TASKS:
        rng = random.Random(task)
        t = maker(task, rng)
        prompt = builder.build(t, 1200, rng)
        text = tok.decode(prompt.ids)
        assert prompt.ids.shape[0] == 1200 and text.startswith(t.intro) and text.endswith(t.question)
        at = [text.index(s) for s in t.statements]
        assert at == sorted(at) and len(prompt.depths) == len(t.statements)
        assert all(0 < d < 1 for d in prompt.depths) and prompt.depths == sorted(prompt.depths)
        for e in t.expected:
            assert e in " ".join(t.statements)


def test_tasks_ask_what_their_names_say(prose):
    config = RecallConfig(filler=prose, keys=4, values=3, queries=2, hops=2, chains=2)
    maker = TaskMaker(config)
    multikey = maker("multikey", random.Random(0))
    assert len(multikey.statements) == 4 and len(multikey.expected) == 1 and multikey.ordered
    assert len({s.split(" is: ")[0] for s in multikey.statements}) == 4  # four different keys
    key = multikey.question.split(" for ")[1].split(" mentioned")[0]
    assert f"{key} is: {multikey.expected[0]}." in " ".join(multikey.statements)
    multivalue = maker("multivalue", random.Random(0))
    assert len(multivalue.expected) == 3 and not multivalue.ordered
    update = maker("update", random.Random(0))
    assert update.expected[0] in update.statements[-1] and "has changed" in update.statements[-1]
    assert update.expected[0] not in " ".join(update.statements[:-1])
    vartrack = maker("vartrack", random.Random(0))
    assert len(vartrack.statements) == 6 and len(vartrack.expected) == 3
    first = [s for s in vartrack.statements if any(f"VAR {n} " in s for n in vartrack.expected)]
    assert first[0].startswith(f"VAR {vartrack.expected[0]} = ") and first[0].rstrip(".").split(" = ")[1].isdigit()
    assert "3 variables are assigned the value" in vartrack.question
    query = maker("multiquery", random.Random(0))
    assert len(query.expected) == 2 and " and " in query.question


def test_grading_takes_the_first_item_for_one_answer_and_a_set_for_many():
    one = Task("", [], "", ["1234567"], "number", True)
    assert grade(one, " 1234567.") == (True, 1.0)
    assert grade(one, " 7654321, or 1234567") == (False, 1.0)  # listing everything seen is not recall
    assert grade(one, " none") == (False, 0.0)
    many = Task("", [], "", ["111", "222"], "number", False)
    assert grade(many, " 222 and 111.") == (True, 1.0)
    assert grade(many, " 222, 333") == (False, 0.5)
    names = Task("", [], "", ["ABCDE", "FGHIJ"], "name", False)
    assert grade(names, " ABCDE, FGHIJ") == (True, 1.0) and grade(names, " ABCDEF") == (False, 0.0)


def test_every_task_runs_in_every_mode_on_the_same_prompt_and_resumes(prose):
    model = make_model("llama", trained=True, segment_length=64, memory_size=512)
    config = RecallConfig(filler=prose, lengths=[200, 300], trials=2, digits=3, templates=SHORT,
                          modes=["memory", "no-memory", "backbone", "window-128"])
    result = recall(model, config)
    assert len(result.trials) == len(TASKS) * 2 * 2 * 4
    by_prompt = {}
    for t in result.trials:
        by_prompt.setdefault((t.task, t.length, t.trial), []).append(t)
    assert all(len({tuple(r.expected) for r in rows}) == 1 and len(rows) == 4 for rows in by_prompt.values())
    summary = result.summary()
    assert set(summary) == set(TASKS) and set(summary["single"]) == {"memory", "no-memory", "backbone", "window-128"}
    assert all(0 <= m["accuracy"] <= 1 and m["n"] == 4 for s in summary.values() for m in s.values())
    seen = []
    again = recall(model, config, done=result.trials[:10], on_trial=lambda t, s: seen.append(t))
    assert len(seen) == len(result.trials) - 10
    assert [t.predicted for t in again.trials] == [t.predicted for t in result.trials]


@pytest.mark.parametrize("fields, match", [
    ({"tasks": ["needle"]}, "tasks must be among"),
    ({"queries": 5, "keys": 4}, "cannot exceed"),
    ({"digits": 2}, "digits"),
    ({"templates": {"needle": "{key} only"}}, "must contain {value}"),
    ({"templates": {"question": "{colour}?"}}, "names ['colour']"),
    ({"templates": {"answer": "{key"}}, "answer"),
])
def test_bad_settings_are_named(prose, fields, match):
    with pytest.raises(LongMemError, match=match.replace("[", r"\[").replace("]", r"\]")):
        RecallConfig(filler=prose, **fields)


def test_cli_writes_json_and_a_plot_and_refuses_bad_input(tmp_path, capsys, backbone_dir, prose):
    out = tmp_path / "res" / "recall.json"
    templates = tmp_path / "short.json"
    templates.write_text(json.dumps(dataclasses.asdict(SHORT)))
    args = ["eval", "recall", "--templates", templates, "--backbone", backbone_dir, "--dtype", "float32", "--segment", 64,
            "--memory-size", 256, "--quiet", "--filler", prose, "--lengths", "300", "--trials", 1,
            "--tasks", "single,multikey", "--digits", 3, "--modes", "memory,backbone"]
    code, stdout, _ = run_cli(capsys, *args, "--out", out)
    assert code == 0 and "multikey" in stdout and out.with_suffix(".png").stat().st_size > 1000
    record = json.loads(out.read_text())
    assert record["eval"] == "recall" and record["config"]["templates"]["needle"] == SHORT.needle
    assert set(record["results"]["summary"]) == {"single", "multikey"} and len(record["results"]["trials"]) == 4
    bad = tmp_path / "bad.json"
    code, _, err = run_cli(capsys, *args, "--tasks", "haystack", "--out", bad)
    assert code == 2 and err.startswith("longmem: error:") and "haystack" in err and not bad.exists()
    templates.write_text('{"needle": "{key} only"}')
    code, _, err = run_cli(capsys, *args, "--out", bad)
    assert code == 2 and "must contain {value}" in err and err.count("\n") == 1 and not bad.exists()
    templates.write_text('{"colour": "red"}')
    code, _, err = run_cli(capsys, *args, "--out", bad)
    assert code == 2 and "no field colour" in err and not bad.exists()
