"""The sbatch scripts on a real single-node Slurm cluster (tests/slurm/conftest.py), and the SGLang `serve` entry point.

- `sbatch --wait` returns a failing job's exit code, and the job's completion record says the same;
- the GPU directives of slurm/topd_70b.sh are accepted (fake GPUs) and an impossible request fails at submission;
- slurm/topd_tiny.sh trains the tiny recipe for 4 steps with rollouts from the SGLang server it starts, exits 0, and
  leaves no process behind;
- the same job sent the early-warning signal mid-run checkpoints, requeues itself, resumes and finishes with the
  metrics of the uninterrupted job;
- both scripts parse; `TOPD_DRY_RUN=1 bash slurm/topd_70b.sh` prints the server and training srun lines, runs nothing,
  and never prints the API key;
- `python -m topd_megatron.rollout.sglang.serve` serves /health_generate and stops its server on SIGTERM (slow: a second
  server start; the sbatch test already checks that serve.py exits 0 on SIGTERM and leaves no process), refuses a
  teacher without weights and a non-loopback host without an API key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.slurm.conftest import REPO, SlurmCluster, clean_env

TINY = REPO / "slurm" / "topd_tiny.sh"
BIG = REPO / "slurm" / "topd_70b.sh"
TINY_OVERRIDES = (
    "train.steps=2 train.eval_at_start=false train.prompts_per_step=4 train.micro_batch_size=4 eval.problems=4 eval.k=1"
)
PREEMPT_OVERRIDES = (
    "train.steps=3 train.save_every=1 train.eval_every=2 train.eval_at_start=false train.prompts_per_step=4"
    " train.micro_batch_size=4 eval.problems=4 eval.k=1 train.temperature=0 eval.temperature=0"
    " objective.detection.student_window=rollout"
)
"""Greedy rollouts and evaluations, and TOPD's student windows taken from the rollouts: SGLang 0.5.23 honours
per-request sampling seeds only with --enable-deterministic-inference, which needs a GPU attention backend; on CPU a
restarted server samples other tokens than the one that kept running, so only greedy decoding makes the two jobs
comparable token for token (the default fresh student windows are sampled from the student's server at temperature
1)."""


def _job_id(sbatch_stdout: str) -> str:
    match = re.search(r"Submitted batch job (\d+)", sbatch_stdout)
    assert match, f"no job id in sbatch output: {sbatch_stdout!r}"
    return match.group(1)


def _group_gone(pgid: int, wait_s: float = 10.0) -> bool:
    """No live process is left in process group `pgid` (zombies waiting to be reaped by init do not count)."""
    deadline = time.monotonic() + wait_s
    while True:
        live = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(stat.parent.name)
        if not live or time.monotonic() > deadline:
            return not live
        time.sleep(0.5)


def test_sbatch_wait_returns_the_job_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "exit3.sh"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=exit3\n#SBATCH --time=00:01:00\necho running\nexit 3\n")
    out = slurm_cluster.run("sbatch", "--wait", f"--output={tmp_path}/exit3-%j.out", script, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    job = _job_id(out.stdout)
    record: dict[str, str] = {}
    for _ in range(50):  # slurmctld writes the completion record as the job ends
        record = slurm_cluster.jobcomp(job)
        if record:
            break
        time.sleep(0.2)
    assert record.get("ExitCode") == "3:0" and record.get("JobState") == "FAILED", record
    assert (tmp_path / f"exit3-{job}.out").read_text().strip() == "running"


def test_gpu_directives_are_accepted_and_impossible_requests_rejected(slurm_cluster: SlurmCluster) -> None:
    fits = slurm_cluster.run("sbatch", "--test-only", "--nodes=1", BIG, timeout=60, cwd=REPO)
    assert fits.returncode == 0, fits.stderr  # --gpus-per-node=8 --exclusive on the node's 8 fake GPUs
    too_big = slurm_cluster.run("sbatch", "--test-only", BIG, timeout=60, cwd=REPO)  # 16 nodes on a 1-node cluster
    assert too_big.returncode != 0, too_big.stderr


@dataclass(frozen=True, slots=True)
class TinyJob:
    """A finished `sbatch --wait slurm/topd_tiny.sh` job: its id, sbatch's exit code, output and directories."""

    job: str
    returncode: int
    log: str
    out: Path
    """TOPD_OUT: the run is out/tiny, the script's files out/slurm-JOBID."""
    stderr: str


def _submit_tiny(cluster: SlurmCluster, tmp_path: Path, overrides: str) -> subprocess.Popen[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(cluster.env, TOPD_OUT=str(tmp_path / "out"), TOPD_OVERRIDES=overrides)
    return subprocess.Popen(
        ["sbatch", "--wait", f"--output={tmp_path}/job-%j.out", str(TINY)],
        env=env,
        cwd=REPO,  # the job's TOPD_REPO defaults to the submit directory
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], tmp_path: Path, job: str, timeout: float = 840) -> TinyJob:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert _job_id(stdout) == job
    log = (tmp_path / f"job-{job}.out").read_text()
    return TinyJob(job=job, returncode=proc.returncode, log=log, out=tmp_path / "out", stderr=stderr)


def _wait_job_id(proc: subprocess.Popen[str], cluster: SlurmCluster, tmp_path: Path) -> str:
    """The id of the job `proc` (sbatch --wait) submitted, from the queue (its stdout comes only at the end)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ids = cluster.run("squeue", "-h", "-o", "%i", timeout=30).stdout.split()
        if ids:
            return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"no job in the queue; sbatch: {proc.poll()}")


def _final_state(cluster: SlurmCluster, job: str, *, restarts: int, timeout: float) -> dict[str, str]:
    """`scontrol show job` of `job` once it has ended after `restarts` requeues ({"JobState": ..., "ExitCode": ...}).
    Polled rather than read from `sbatch --wait`, whose poll can see the first start's end as the job's."""
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = cluster.run("scontrol", "-o", "show", "job", job, timeout=30).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        ended = fields.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        if ended and int(fields.get("Restarts", "0")) >= restarts:
            return fields
        time.sleep(1.0)
    raise AssertionError(f"job {job} did not end after {restarts} requeue(s) within {timeout:.0f} s: {fields}")


def _stable_rows(run: Path) -> list[dict]:
    """metrics.jsonl without what differs between processes: timings, weight-sync figures, per-process counters
    (sglang/*), and the served-model self-test rows (one per start)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("time/", "sync/", "sglang/", "detect/time_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows if r["split"] != "selftest"]


def _run_tiny(cluster: SlurmCluster, tmp_path: Path, overrides: str) -> TinyJob:
    proc = _submit_tiny(cluster, tmp_path, overrides)
    return _finish(proc, tmp_path, _wait_job_id(proc, cluster, tmp_path))


def test_topd_tiny_sbatch_trains_with_its_sglang_server(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    done = _run_tiny(slurm_cluster, tmp_path, TINY_OVERRIDES)
    log, job = done.log, done.job
    assert done.returncode == 0, f"sbatch exit {done.returncode}; job output:\n{log[-4000:]}\n{done.stderr}"
    assert "training exited with code 0" in log and "requeueing" not in log

    rows = [json.loads(line) for line in (done.out / "tiny" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["sync/bytes"] > 0 for r in train)  # the student's weights were pushed to the SGLang server

    served = (done.out / f"slurm-{job}" / "serve-student.out").read_text()
    assert "ready: SGLang student server" in served and "stopping the SGLang student server" in served
    assert "the SGLang student server stopped (exit code 0)" in log  # serve.py exits 0 on SIGTERM
    server_pid = int(re.search(r"\(pid (\d+),", served).group(1))
    assert _group_gone(server_pid), "the SGLang server's process group outlived the job"
    assert not (done.out / f"slurm-{job}" / "student.pid").exists()


@pytest.mark.slow  # two tiny jobs and a restart: 6-8 minutes on 2 CPU cores
def test_a_preempted_tiny_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_one(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The early warning (`--signal=B:USR1@...` sends it to the batch shell; here `scancel --signal=USR1 --batch`
    sends it now) reaches a running job mid-run: training finishes its step, writes a checkpoint and requeue.json,
    the script stops its server and requeues the job; the restarted job resumes from the checkpoint and finishes.
    Its metrics equal those of the same job run without interruption (timings and per-process counters excluded;
    greedy decoding, see PREEMPT_OVERRIDES); no server is left."""
    reference = _run_tiny(slurm_cluster, tmp_path / "reference", PREEMPT_OVERRIDES)
    assert reference.returncode == 0, reference.log[-4000:]
    tmp_path = tmp_path / "preempted"
    proc = _submit_tiny(slurm_cluster, tmp_path, PREEMPT_OVERRIDES)
    job = _wait_job_id(proc, slurm_cluster, tmp_path)
    run = tmp_path / "out" / "tiny"
    deadline = time.monotonic() + 600
    while not (run / "metrics.jsonl").exists() or '"split": "train"' not in (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first step"
        time.sleep(0.5)
    signalled = slurm_cluster.run("scancel", "--signal=USR1", "--batch", job, timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    # Slurm holds a requeued job for ~2 minutes (BeginTime); release it as soon as it is pending again.
    while "JobState=PENDING" not in slurm_cluster.run("scontrol", "show", "job", job, timeout=30).stdout:
        assert proc.poll() is None and time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", timeout=30)
    final = _final_state(slurm_cluster, job, restarts=1, timeout=840)
    done = _finish(proc, tmp_path, job)  # sbatch --wait may have returned at the end of the first start: not used

    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", f"{final}\n{done.log[-6000:]}"
    assert "got SIGUSR1: passing it on to training" in done.log
    assert "stopped on SIGUSR1: requeueing job" in done.log and "training exited with code 0" in done.log
    assert "(restart 1)" in done.log
    assert not (run / "requeue.json").exists()
    assert _stable_rows(run) == _stable_rows(reference.out / "tiny")
    served = (tmp_path / "out" / f"slurm-{job}" / "serve-student.out").read_text()
    for pid in re.findall(r"\(pid (\d+),", served):  # one server per start of the job
        assert _group_gone(int(pid)), f"an SGLang server (pid {pid}) outlived the job"


def test_scripts_parse_and_the_70b_dry_run_prints_its_srun_lines(tmp_path: Path) -> None:
    for script in (TINY, BIG):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
    env = clean_env(
        TOPD_DRY_RUN="1",
        TOPD_OUT=str(tmp_path / "runs"),
        TOPD_SGLANG_API_KEY="not-to-be-printed",
        TOPD_OVERRIDES="train.steps=3",
    )
    dry = subprocess.run(["bash", str(BIG)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    sruns = [line for line in dry.stdout.splitlines() if line.startswith("+ srun ")]
    # the layout of slurm/topd_70b.sh: 8 training nodes, each also a time-sliced student server; 10 teacher servers
    assert len(sruns) == 8 + 10 + 1, dry.stdout
    students, teachers, train = sruns[:8], sruns[8:18], sruns[18]
    for i, line in enumerate(students, start=1):
        assert "rollout.sglang.serve" in line and "--role student" in line and f"--nodelist=node{i:03d}" in line
        assert "--overlap" in line and "--enable-memory-saver --enable-weights-cpu-backup" in line
        assert "--mem-fraction 0.72" in line  # room for Megatron's weights and the d_t pass beside the server
    for i, line in enumerate(teachers, start=9):
        assert "--role teacher" in line and f"--nodelist=node{i:03d}" in line and "--overlap" not in line
        assert "--quantization fp8" in line and "--mem-fraction 0.85" in line
    assert "torch.distributed.run --nnodes=8" in train and "--rdzv-endpoint=node001:29500" in train
    assert "--overlap" in train and "sglang.colocate=time_slice" in train and "--recipe topd_70b" in train
    urls = ",".join(f"http://node{i:03d}:30000" for i in range(1, 9))
    assert f"sglang.student.urls={urls}" in train and "sglang.teacher.urls=http://node009:30001," in train
    assert "--set=train.steps=3" in train
    assert "sglang.student.api_key_env=TOPD_SGLANG_API_KEY" in train  # the variable's name, never the key
    assert "sglang.teacher.api_key_env=TOPD_SGLANG_API_KEY" in train
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in train and "--shutdown-timeout=600" in train
    assert "not-to-be-printed" not in dry.stdout + dry.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran

    dedicated = subprocess.run(
        ["bash", str(BIG)], env=dict(env, TOPD_STUDENT_SERVER_NODES="2"), capture_output=True, text=True, timeout=60
    )
    lines = [line for line in dedicated.stdout.splitlines() if line.startswith("+ srun ")]
    assert dedicated.returncode == 0 and len(lines) == 2 + 10 + 1, dedicated.stdout
    assert "--nodelist=node007" in lines[0] and "--overlap" not in lines[0] and "sglang.colocate=share" in lines[-1]
    assert "--mem-fraction 0.85" in lines[0]  # a student server on its own nodes

    misfit = subprocess.run(
        ["bash", str(BIG)], env=dict(env, TOPD_STUDENT_SERVER_NODES="18"), capture_output=True, text=True, timeout=60
    )
    assert misfit.returncode == 2 and "do not fit" in misfit.stderr


@pytest.mark.slow  # the sbatch test above covers the same lifecycle through the script
def test_serve_answers_health_and_stops_on_sigterm(synthetic_pair: tuple[Path, Path], tmp_path: Path) -> None:
    pid_file = tmp_path / "student.pid"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "topd_megatron.rollout.sglang.serve",
            "--role",
            "student",
            "--model",
            str(synthetic_pair[0]),
        ]
        + ["--log-dir", str(tmp_path), "--pid-file", str(pid_file), "--timeout", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        for line in proc.stdout:  # "[serve] ready: ...", then the URL, once /health_generate answered
            seen.append(line)
            if line.startswith("http://"):
                break
        assert seen and seen[-1].startswith("http://127.0.0.1:"), f"serve exited ({proc.wait()}):\n{''.join(seen)}"
        url = seen[-1].strip()
        server_pid = int(pid_file.read_text())
        assert requests.get(f"{url}/health_generate", timeout=60).status_code == 200

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopping the SGLang student server" in proc.stdout.read()
        assert _group_gone(server_pid), "the SGLang server's process group outlived serve"
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_refuses_a_teacher_without_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from topd_megatron.rollout.sglang import serve

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # a topd checkpoint's hf/: config, no safetensors
    assert serve.main(["--role", "teacher", "--model", str(tmp_path)]) == 2
    assert "no safetensors weights" in capsys.readouterr().err


def test_serve_needs_an_api_key_beyond_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from topd_megatron.rollout.sglang import serve

    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    assert serve.main(["--role", "student", "--model", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert serve.API_KEY_ENV in capsys.readouterr().err
