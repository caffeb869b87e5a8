"""The training scripts resume an interrupted run (a fake `longmem` on PATH records its arguments)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``script`` (scripts/X or experiments/X) in a copy of its folder under tmp_path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    fake = bin_dir / "longmem"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    folder = script.split("/")[0]
    shutil.copytree(ROOT / folder, tmp_path / folder, dirs_exist_ok=True)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


def test_train_default_resumes_a_stage_with_a_checkpoint_and_skips_a_finished_one(tmp_path):
    (tmp_path / "runs/default/stage1/sidenet").mkdir(parents=True)
    (tmp_path / "runs/default/stage1/sidenet/config.json").write_text("{}")  # finished
    (tmp_path / "runs/default/stage2").mkdir(parents=True)
    (tmp_path / "runs/default/stage2/latest.json").write_text('{"step": 20, "dir": "checkpoints/step-000020"}')
    done, calls = run_script(tmp_path, "scripts/train-default.sh")
    assert done.returncode == 0, done.stderr
    assert calls[0] == "train configs/stage2-copy-head.yaml --resume"
    assert calls[1:] == ["train configs/stage3-facts.yaml", "train configs/stage4-style.yaml",
                         "train configs/stage5-refit.yaml", "train configs/stage6-keyed.yaml"]  # no checkpoint: fresh
    assert all((ROOT / c.split()[1]).is_file() for c in calls)  # every stage's run file exists


@pytest.mark.parametrize("args, code, stages", [(["--until", "1"], 0, 1), (["--until", "3"], 0, 3),
                                                (["--until", "9"], 2, 0), ([], 0, 6), (["--bogus"], 2, 0),
                                                (["--install", "--backbone", "x"], 2, 0)])
def test_train_default_options(tmp_path, args, code, stages):
    done, calls = run_script(tmp_path, "scripts/train-default.sh", *args)
    assert done.returncode == code
    assert len(calls) == stages


def test_train_default_runs_the_recipe_for_another_backbone_in_its_own_folder(tmp_path):
    (tmp_path / "runs/gemma/stage1/sidenet").mkdir(parents=True)
    (tmp_path / "runs/gemma/stage1/sidenet/config.json").write_text("{}")  # finished
    done, calls = run_script(tmp_path, "scripts/train-default.sh", "--backbone", "models/gemma.gguf", "--until", "3",
                             "--device", "cuda", "--eval")
    assert done.returncode == 0, done.stderr
    assert calls[:2] == [
        "train configs/stage2-copy-head.yaml --set output_dir=runs/gemma/stage2 --set init_from=runs/gemma/stage1/sidenet"
        " --device cuda",
        "train configs/stage3-facts.yaml --set output_dir=runs/gemma/stage3 --set init_from=runs/gemma/stage2/sidenet"
        " --device cuda"]
    assert calls[2].startswith("ppl ") and "--sidenet runs/gemma/stage3/sidenet" in calls[2]  # then its evaluation
    (tmp_path / "fresh").mkdir()
    done, calls = run_script(tmp_path / "fresh", "scripts/train-default.sh", "--backbone", "org/model", "--until", "1")
    assert calls == ["train configs/stage1-memory.yaml --set output_dir=runs/model/stage1 --set model.backbone=org/model"]


def test_full_evals_skip_finished_results_and_resume_the_long_ones(tmp_path):
    (tmp_path / "results/full").mkdir(parents=True)
    (tmp_path / "results/full/chapterbreak-longmem.json").write_text("{}")
    done, calls = run_script(tmp_path, "experiments/full-evals.sh", "--memtrm", "runs/mt")
    assert done.returncode == 0, done.stderr
    assert "done already: results/full/chapterbreak-longmem.json" in done.stdout
    assert len(calls) == 6 and calls[0].startswith("eval chapterbreak --sidenet runs/mt")
    assert all("--resume" in c for c in calls)  # every evaluation resumes
    assert all(c.endswith(f"--out results/full/{c.split()[1]}-{'memtrm' if 'runs/mt' in c else 'longmem'}.json")
               for c in calls)
    assert run_script(tmp_path, "experiments/full-evals.sh", "--bogus")[0].returncode == 2
