"""recipes/launch.py: every recipe through nemo-run. The tiny recipe really runs (LocalExecutor, torchrun, 2 gloo
ranks); the Slurm path is checked through nemo-run's dry run, which writes the sbatch script without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(args: list[str], env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", **env_extra}
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / "launch.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def test_tiny_recipe_trains_through_nemo_run_local_executor(synthetic_pair, tmp_path):
    out = _launch(
        ["tiny", "train.steps=1", "eval.problems=8", "train.eval_every=0", "train.save_every=0"],
        {"TOPD_OUT": str(tmp_path)},
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1] and train[0]["skipped"] == 0.0
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 1]
    assert (tmp_path / "tiny" / "checkpoints").is_dir()


@pytest.mark.parametrize(("recipe", "nodes"), [("topd_70b", 8), ("qwen3_4b_from_30b_a3b", 1)])
def test_gpu_recipes_dry_run_to_an_sbatch_script(recipe, nodes, tmp_path):
    out = _launch(
        [recipe, "--executor", "slurm", "--dry-run", "--account", "acct", "--partition", "gpu", "train.steps=5"],
        {"TOPD_OUT": str(tmp_path)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout + out.stderr
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"):
        assert line in text, f"{line!r} missing from the dry run"
    assert "#SBATCH --account=acct" in text and "#SBATCH --partition=gpu" in text
    assert "nemo_run.core.runners.fdl_runner" in text


def test_bad_overrides_fail_before_anything_starts(tmp_path):
    out = _launch(["tiny", "train.stepz=1"], {"TOPD_OUT": str(tmp_path)}, timeout=120)
    assert out.returncode == 2
    assert "unknown override key 'train.stepz'" in out.stderr
    assert not (tmp_path / "tiny").exists()
