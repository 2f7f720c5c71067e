"""The served-model self-test (rollout/sglang/selftest.py, training/served_selftest.py) against real SGLang servers.

- the right servers (the student's, the teacher's) pass, on 2 tensor-parallel ranks with the colocated Megatron models:
  repeated calls agree exactly, the temperature-1 check and the colocated comparison within float32 noise, identity
  checked through the served directories;
- a wrong server is refused before step 1: the student's model served as the teacher (another architecture), with
  the error naming every failed check;
- a server of the student's architecture and tokenizer with other weights, whose process lacks
  SGLANG_RETURN_ORIGINAL_LOGPROB (an attached server started by someone else), passes the identity check but fails
  the temperature-1 check and the comparison with the colocated student;
- a training run starts with the self-test and logs its `*/selftest_*` metrics (in
  tests/sglang/test_sglang.py::test_training_with_a_teacher_served_only_by_sglang).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from topd_megatron.distributed.launch import DistributedFailure, spawn
from topd_megatron.rollout.sglang.selftest import SelfTestConfig
from topd_megatron.rollout.sglang.server import (
    ServerConfig,
    SGLangServer,
    server_command,
    server_env,
    wait_healthy,
)

PROMPTS = [[1, 5, 7, 9, 11], [1, 5, 8], [3, 4, 6, 2, 9, 12], [2, 2, 7]]


def _selftest_body(rank: int, world: int, pair: tuple[str, str], urls: dict[str, str], work: str) -> dict:
    """TP=world: the student and the colocated teacher built here, an engine attached to `urls`, the self-test."""
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine
    from topd_megatron.training.served_selftest import served_selftest
    from topd_megatron.training.teacher import build_teacher

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), par, role="student")
    teacher = build_teacher(ModelConfig(path=pair[1], dtype="float32"), par, student)
    cfg = SGLangConfig(
        student=ServerConfig(url=urls["student"]),
        teacher=ServerConfig(role="teacher", url=urls["teacher"]),
        sync_mode="disk",
    )
    engine = SGLangEngine(cfg, student, teacher, run_dir=work)  # attaching pushes the student's weights first
    try:
        return served_selftest(
            SelfTestConfig(),
            engine,
            PROMPTS,
            expected={"student": Path(pair[0]), "teacher": Path(pair[1])},
            colocated={"student": student, "teacher": teacher},
        )
    finally:
        engine.close()


def test_the_expected_servers_pass(synthetic_pair, student_server, teacher_server, tmp_path: Path) -> None:
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    urls = {"student": student_server.url, "teacher": teacher_server.url}
    metrics = spawn(_selftest_body, 2, (pair, urls, str(tmp_path)), timeout=900)
    assert metrics[0] == metrics[1]  # every rank gets the report
    m = metrics[0]
    for role in ("student", "teacher"):
        assert m[f"{role}/selftest_files_checked"] == 1.0
        assert m[f"{role}/selftest_repeat_max"] <= 1e-5, m
        assert m[f"{role}/selftest_temperature_max"] <= 1e-4, m
        assert m[f"{role}/selftest_colocated_max"] <= 1e-4, m  # the README's parity bound, fp32 on CPU


def test_the_students_model_served_as_the_teacher_is_refused(
    synthetic_pair, student_server, teacher_server, tmp_path: Path
) -> None:
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    urls = {"student": student_server.url, "teacher": student_server.url}  # a Qwen3 where the Llama teacher belongs
    with pytest.raises(DistributedFailure) as err:
        spawn(_selftest_body, 2, (pair, urls, str(tmp_path)), timeout=900)
    message = str(err.value)
    assert "SelfTestError: the served-model self-test failed before step 1" in message
    assert f"sglang.teacher ({student_server.url}): it serves architectures=['Qwen3ForCausalLM']" in message
    assert "its config has hidden_size=64, the expected model's 96" in message
    assert "sglang.teacher: its log-probs differ from the colocated Megatron teacher's" in message
    assert "sglang.student" not in message.replace("sglang.student.", "")  # the student's server is the right one


@pytest.fixture(scope="module")
def rogue_server(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    """The student's architecture and tokenizer with other weights (peaked distributions, init_std 0.2), started
    without SGLANG_RETURN_ORIGINAL_LOGPROB (sampled tokens then come with tempered log-probs): what an attached server
    started by someone else may be."""
    from topd_megatron.distributed.env import free_port
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("rogue")
    spec = TinyModelSpec(family="qwen3", num_layers=2, seed=21, init_std=0.2)
    model = make_tiny_checkpoint(root / "model", spec, synthetic_pair[0])
    cfg = ServerConfig(model_path=str(model), startup_timeout_s=600)
    port = free_port()
    env = server_env(cuda=False)
    env.pop("SGLANG_RETURN_ORIGINAL_LOGPROB")
    log = root / "sglang-rogue.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            server_command(cfg, port, with_key=False, cuda=False),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = SGLangServer(cfg, f"http://127.0.0.1:{port}", None, proc, log)
    try:
        wait_healthy(server, 600)
        yield server
    finally:
        server.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_other_weights_and_tempered_logprobs_are_refused(synthetic_pair, rogue_server, tmp_path: Path) -> None:
    """Checked piece by piece, without an engine (attaching one would push the student's weights into it)."""
    from topd_megatron.rollout.sglang.client import SGLangClient
    from topd_megatron.rollout.sglang.selftest import ServedModel, check_consistency, check_identity

    model = ServedModel(
        role="student",
        client=SGLangClient(rogue_server.url),
        expected_dir=Path(synthetic_pair[0]),
        vocab_size=json.loads((Path(synthetic_pair[0]) / "config.json").read_text())["vocab_size"],
        dp=1,
    )
    found, identity = check_identity(model)
    assert identity == [] and found["student/selftest_files_checked"] == 1.0  # the same config and tokenizer
    probes, metrics, failures = check_consistency(SelfTestConfig(), model, PROMPTS)
    assert metrics["student/selftest_repeat_max"] <= 1e-5
    assert [f for f in failures if f.startswith("temperature: mean |delta log p|")], failures
    assert metrics["student/selftest_temperature_mean"] > 0.05, metrics
    mine = spawn(_megatron_logprobs_body, 2, (str(synthetic_pair[0]), probes.sequences, probes.starts), timeout=600)
    from topd_megatron.rollout.sglang.selftest import gap

    mean, _ = gap(probes.served, mine[0])
    assert mean > SelfTestConfig().tolerance, "random weights must not pass for the student's"


def _megatron_logprobs_body(rank: int, world: int, path: str, sequences: list, starts: list) -> list:
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.training.served_selftest import megatron_logprobs

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    return megatron_logprobs(build_model(ModelConfig(path=path, dtype="float32"), par), sequences, starts)
