"""The training scripts resume an interrupted run (a fake `longmem` on PATH records its arguments)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path: Path, script: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    fake = bin_dir / "longmem"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts", dirs_exist_ok=True)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", f"scripts/{script}", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


def test_train_default_resumes_a_stage_with_a_checkpoint(tmp_path):
    (tmp_path / "runs/longmem-default").mkdir(parents=True)
    (tmp_path / "runs/longmem-default/latest.json").write_text('{"step": 30, "dir": "checkpoints/step-000030"}')
    done, calls = run_script(tmp_path, "train-default.sh")
    assert done.returncode == 0, done.stderr
    assert len(calls) == 5
    assert calls[0].startswith("train configs/longmem-default.yaml") and calls[0].endswith("--resume")
    assert all("--resume" not in c for c in calls[1:])  # stages without a checkpoint start fresh
    assert calls[3].startswith("train configs/longmem-style.yaml")
    assert calls[4].startswith("train configs/longmem-refit.yaml")


@pytest.mark.parametrize("args, code, stages", [(["--stage1-only"], 0, 1), (["--stage3-only"], 0, 3),
                                                (["--stage4-only"], 0, 4), (["--bogus"], 2, 0)])
def test_train_default_options(tmp_path, args, code, stages):
    done, calls = run_script(tmp_path, "train-default.sh", *args)
    assert done.returncode == code
    assert len(calls) == stages


def test_ablations_refuse_an_unknown_variant_before_training(tmp_path):
    done, calls = run_script(tmp_path, "ablations.sh", "delta-joint", "no-such-variant")
    assert done.returncode == 2 and "no-such-variant" in done.stderr
    assert calls == []


def test_full_evals_skip_finished_results_and_resume_the_long_ones(tmp_path):
    (tmp_path / "results/full").mkdir(parents=True)
    (tmp_path / "results/full/chapterbreak-longmem.json").write_text("{}")
    done, calls = run_script(tmp_path, "full-evals.sh", "--memtrm", "runs/mt")
    assert done.returncode == 0, done.stderr
    assert "done already: results/full/chapterbreak-longmem.json" in done.stdout
    assert len(calls) == 6 and calls[0].startswith("eval chapterbreak --sidenet runs/mt")
    assert all("--resume" in c for c in calls)  # every evaluation resumes
    assert all(c.endswith(f"--out results/full/{c.split()[1]}-{'memtrm' if 'runs/mt' in c else 'longmem'}.json")
               for c in calls)
    assert run_script(tmp_path, "full-evals.sh", "--bogus")[0].returncode == 2
