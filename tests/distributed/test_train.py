"""The distillation loop end to end on gloo ranks, with tiny random student/teacher checkpoints for the synthetic
task: every preset trains, the loss goes down, PP works, a run SIGKILLed at a random step or stopped by a signal
resumes to the same metrics, and non-finite losses skip steps (then abort)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from topd_megatron.algorithm import objective
from topd_megatron.config import RunConfig, TrainConfig, config_from_dict
from topd_megatron.distributed.launch import DistributedFailure, spawn
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.task_eval import EvalConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.training.loop import train
from topd_megatron.training.metrics import read_metrics
from topd_megatron.training.optim import OptimConfig

TIMING_PREFIXES = ("time/", "sync/", "detect/time_s")


def make_config(
    pair: tuple[Path, Path], run_dir: Path, arm: str, *, steps: int = 3, tp: int = 2, pp: int = 1, **train_kw
) -> RunConfig:
    obj = objective.preset(arm)
    obj = dataclasses.replace(obj, detection=dataclasses.replace(obj.detection, window=4))
    return RunConfig(
        student=ModelConfig(path=str(pair[0]), dtype="float32"),
        teacher=ModelConfig(path=str(pair[1]), dtype="float32"),
        run_dir=str(run_dir),
        parallel=ParallelConfig(tp=tp, pp=pp),
        objective=obj,
        optim=OptimConfig(lr=5e-3),
        train=TrainConfig(
            steps=steps,
            prompts_per_step=4,
            samples_per_prompt=2,
            micro_batch_size=4,
            max_new_tokens=12,
            **({"eval_every": 0} | train_kw),
        ),
        eval=EvalConfig(problems=4, k=1, max_new_tokens=12),
    )


@pytest.mark.parametrize("arm", ["opd", "opd_pg", "opd_suppress", "topd", "topd_lookahead"])
def test_every_preset_trains_on_two_tensor_parallel_ranks(synthetic_pair, tmp_path: Path, arm: str) -> None:
    cfg = make_config(synthetic_pair, tmp_path / arm, arm, steps=3)
    summary = spawn(train, 2, (cfg,), timeout=900)[0]
    assert summary["steps"] == 3 and "avg@1" in summary["final_eval"]
    rows = read_metrics(tmp_path / arm, "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["skipped"] == 0.0 and r["grad_norm"] > 0 and r["loss"] == r["loss"]  # finite, not NaN
    if objective.preset(arm).detection.detector != "none":
        assert all(r["detect/candidates"] > 0 for r in rows)
        assert all(0.0 <= r["detect/non_divergent_share"] <= 1.0 for r in rows)
    if arm == "topd":
        assert all(r["detect/windows_generated"] == r["detect/candidates"] for r in rows)
        assert all(r["guidance/windows"] > 0 for r in rows)
        assert any(r["loss/guidance_total"] > 0 for r in rows), "teacher_window guidance must contribute"
    assert (tmp_path / arm / "checkpoints" / "latest").is_file()
    assert (tmp_path / arm / "tensorboard").is_dir()


def test_distillation_lowers_the_divergence(synthetic_pair, tmp_path: Path) -> None:
    """The student is the teacher at a higher temperature (the teacher's final-norm weights halved: the same ranking,
    flatter distributions). 10 OPD steps must close a good part of the reverse KL on its own rollouts."""
    import shutil

    from safetensors.torch import load_file, save_file

    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    teacher = make_tiny_checkpoint(
        tmp_path / "teacher", TinyModelSpec(family="qwen3", num_layers=2, seed=5, init_std=0.2), synthetic_pair[0]
    )
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    weights = load_file(str(student / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 0.5
    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    cfg = make_config((student, teacher), tmp_path / "opd", "opd", steps=10)
    cfg = dataclasses.replace(cfg, optim=OptimConfig(lr=3e-3))
    spawn(train, 2, (cfg,), timeout=900)
    losses = [r["loss"] for r in read_metrics(tmp_path / "opd", "train")]
    assert losses[0] > 0.2, losses
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses


def test_topd_with_pipeline_parallel(synthetic_pair, tmp_path: Path) -> None:
    """TP=1 x PP=2: detection and guidance see the same numbers on both stages, branches flow through the pipe."""
    cfg = make_config(synthetic_pair, tmp_path / "pp", "topd", steps=2, tp=1, pp=2)
    spawn(train, 2, (cfg,), timeout=900)
    rows = read_metrics(tmp_path / "pp", "train")
    assert len(rows) == 2 and all(r["guidance/windows"] > 0 and r["skipped"] == 0.0 for r in rows)


def test_topd_with_data_parallel_replicas(synthetic_pair, tmp_path: Path) -> None:
    """TP=1 on 2 ranks: 2 data-parallel replicas split each step's prompts and the evaluation problems; detection
    and guidance run per replica, gradients are reduced by the distributed optimizer."""
    cfg = make_config(synthetic_pair, tmp_path / "dp", "topd", steps=2, tp=1)
    summary = spawn(train, 2, (cfg,), timeout=900)[0]
    assert summary["final_eval"]["problems"] == 4.0
    rows = read_metrics(tmp_path / "dp", "train")
    assert len(rows) == 2
    for r in rows:
        assert r["skipped"] == 0.0 and r["grad_norm"] > 0 and r["guidance/windows"] > 0


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def _train_cmd(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "topd_megatron.cli", "train", "--config", str(config_path)]


def _resume_config(pair: tuple[Path, Path], run_dir: Path) -> RunConfig:
    """6 TOPD steps, a checkpoint every 2 and an evaluation after every step."""
    return make_config(pair, run_dir, "topd", steps=6, save_every=2, eval_every=1)


@pytest.fixture(scope="module")
def straight_run(synthetic_pair, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The metrics of `_resume_config` run without interruption (timings excluded)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    spawn(train, 2, (_resume_config(synthetic_pair, run),), timeout=900)
    return _stable(read_metrics(run))


def _start_train(config: RunConfig, tmp_path: Path) -> tuple[subprocess.Popen, Path, dict[str, str]]:
    """`topd train --config` of `config` in its own process group (the ranks are its children)."""
    config_path = tmp_path / f"{Path(config.run_dir).name}.json"
    config_path.write_text(json.dumps(dataclasses.asdict(config)))
    assert config_from_dict(json.loads(config_path.read_text())) == config
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    proc = subprocess.Popen(
        _train_cmd(config_path), start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return proc, config_path, env


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted mid-way"


def test_sigkill_at_a_random_step_and_resume_gives_the_metrics_of_an_uninterrupted_run(
    synthetic_pair, straight_run, tmp_path
) -> None:
    """SIGKILL to the launcher and every rank once a random number of steps (1-5 of 6) is done: wherever it lands
    (before the first checkpoint, just after one, mid-step, mid-evaluation, mid-save), the rerun resumes from the
    latest complete checkpoint and ends with the metrics of an uninterrupted run."""
    import random

    steps, kill_after = 6, random.SystemRandom().randint(1, 5)
    proc, config_path, env = _start_train(_resume_config(synthetic_pair, tmp_path / "killed"), tmp_path)
    _wait_for(proc, lambda: len(read_metrics(tmp_path / "killed", "train")) >= kill_after)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, without any chance to clean up
    proc.wait()
    done = read_metrics(tmp_path / "killed", "train")
    assert kill_after <= len(done) < steps, f"asked to kill after {kill_after} steps, killed after {len(done)}"

    resumed = subprocess.run(_train_cmd(config_path), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, f"killed after {len(done)} steps: {resumed.stderr[-3000:]}"
    assert _stable(read_metrics(tmp_path / "killed")) == straight_run, f"killed after {len(done)} steps"


def test_a_stop_signal_checkpoints_exits_75_and_the_rerun_matches_an_uninterrupted_run(
    synthetic_pair, straight_run, tmp_path
) -> None:
    """SIGTERM to the whole process group (what `scancel` does to a job): the ranks finish the step in flight, write
    a checkpoint and RUN_DIR/requeue.json, and `topd train` exits with 75; the evaluation due after that step is
    postponed to the restart, so the rerun's metrics (timings excluded) equal an uninterrupted run's."""
    from topd_megatron.models.checkpoint import latest_checkpoint
    from topd_megatron.training.preemption import REQUEUE_EXIT_CODE, read_marker

    run = tmp_path / "stopped"
    proc, config_path, env = _start_train(_resume_config(synthetic_pair, run), tmp_path)
    _wait_for(proc, lambda: len(read_metrics(run, "train")) >= 2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT_CODE, err.decode()[-3000:]
    marker = read_marker(run)
    assert marker is not None and marker["signal"] == "SIGTERM" and 2 <= marker["step"] < 6, marker
    assert "stopped on SIGTERM after step" in err.decode()
    assert latest_checkpoint(run).name == f"step_{marker['step']:06d}"
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, marker["step"] + 1))

    resumed = subprocess.run(_train_cmd(config_path), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_marker(run) is None
    assert _stable(read_metrics(run)) == straight_run


def test_a_stop_signal_fails_a_run_that_writes_no_checkpoints(synthetic_pair, tmp_path) -> None:
    """train.save_checkpoints=false (the experiment's arms): a stop has nothing to resume from, so the run fails after
    the step in flight with one error saying so; no checkpoint, no requeue.json, and not the "requeue me" status."""
    from topd_megatron.models.checkpoint import latest_checkpoint
    from topd_megatron.training.preemption import REQUEUE_EXIT_CODE, read_marker

    run = tmp_path / "unsaved"
    proc, _, _ = _start_train(make_config(synthetic_pair, run, "opd", steps=6, save_checkpoints=False), tmp_path)
    _wait_for(proc, lambda: len(read_metrics(run, "train")) >= 1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode not in (0, REQUEUE_EXIT_CODE), err.decode()[-3000:]
    assert "train.save_checkpoints is false, so there is no checkpoint to resume from" in err.decode()
    assert read_marker(run) is None and latest_checkpoint(run) is None
    assert 1 <= len(read_metrics(run, "train")) < 6


def test_non_finite_losses_skip_steps_then_abort(synthetic_pair, tmp_path: Path) -> None:
    cfg = make_config(synthetic_pair, tmp_path / "nan", "opd", steps=3, inject_nan_at=(2,), max_bad_steps=1)
    spawn(train, 2, (cfg,), timeout=900)
    rows = read_metrics(tmp_path / "nan", "train")
    assert [r["skipped"] for r in rows] == [0.0, 1.0, 0.0]
    cfg = make_config(synthetic_pair, tmp_path / "nan2", "opd", steps=4, inject_nan_at=(1, 2), max_bad_steps=1)
    with pytest.raises(DistributedFailure, match="the loss was not finite in 2 steps"):
        spawn(train, 2, (cfg,), timeout=900)


def test_periodic_evaluation_includes_the_configured_benchmarks(synthetic_pair, tmp_path: Path) -> None:
    """eval.benchmarks: the math benchmarks are sampled through the run's engine with the student's current weights,
    graded like `topd eval`, and logged with the evaluation metrics (per benchmark and macro-averaged)."""
    bench = tmp_path / "mini.jsonl"
    rows = [
        {"id": f"m{i}", "problem": f"What is {i} plus {i}?", "answer": str(2 * i), "source": "test"} for i in (1, 2, 3)
    ]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(synthetic_pair, tmp_path / "run", "opd", steps=1, eval_at_start=False)
    cfg = dataclasses.replace(
        cfg, eval=dataclasses.replace(cfg.eval, benchmarks=(f"{bench}:gsm8k",), k=2, max_new_tokens=6)
    )
    spawn(train, 2, (cfg,), timeout=900)
    (row,) = read_metrics(tmp_path / "run", "eval")
    assert row["step"] == 1 and "avg@2" in row  # the task's own held-out evaluation is still there
    name = "mini"
    assert row[f"bench/{name}/problems"] == 3.0
    statuses = sum(row[f"bench/{name}/{s}"] for s in ("correct", "incorrect", "no_answer", "unparsable", "timeout"))
    assert statuses == 3 * 2  # every sample of every problem graded once
    assert row[f"bench/{name}/avg@2"] == row[f"bench/{name}/correct"] / 6
    assert row["bench/macro/avg@2"] == row[f"bench/{name}/avg@2"]
    assert 0.0 <= row[f"bench/{name}/pass@2"] <= 1.0 and f"bench/{name}/pass@1" in row
