"""Time-sliced colocation (training/colocation.py). The swaps themselves need CUDA (SGLang's memory saver, Megatron's
GPU <-> host offload) and are not run here; these tests check the capability check and the order of the swaps around
sampling and weight sync, with recording stand-ins for the two CUDA-only sides (the GPU boundary)."""

from __future__ import annotations

import dataclasses

import pytest

from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.training.colocation import SamplingSpan, TimeSlicedEngine, check_time_slicing


class _Log:
    def __init__(self) -> None:
        self.calls: list[str] = []


class _Servers:
    """The engine side: sampling, weight sync and memory release / resume, recorded."""

    def __init__(self, log: _Log, fail: bool = False, teacher_served: bool = True) -> None:
        self.log, self.fail, self.teacher_served = log, fail, teacher_served

    def serves(self, model) -> bool:
        return model == "student" or self.teacher_served

    def release_memory(self, tags: tuple[str, ...]) -> None:
        self.log.calls.append("release " + ",".join(tags))

    def resume_memory(self, tags: tuple[str, ...]) -> None:
        self.log.calls.append("resume " + ",".join(tags))

    def generate(self, prompts, params, *, model="student"):
        self.log.calls.append(f"generate {model}")
        if self.fail:
            raise RuntimeError("server lost")
        return [Generation(prompt_ids=p, output_ids=[1], output_logprobs=[0.0], finished=True) for p in prompts]

    def sync_weights(self) -> dict[str, float]:
        self.log.calls.append("sync")
        return {"sync/bytes": 1.0}

    def score(self, *a, **k):
        self.log.calls.append("score")
        return []

    def generate_windows(self, rows, positions, params, *, model, first_window=0, top_k=0):
        self.log.calls.append(f"windows {model}" + (f" top-{top_k}" if top_k else ""))
        return []

    def generate_window_pair(self, rows, positions, params, *, first_window=0, teacher_top_k=0):
        self.log.calls.append("windows teacher and student" + (f" top-{teacher_top_k}" if teacher_top_k else ""))
        return {"teacher": [], "student": []}


class _States:
    def __init__(self, log: _Log) -> None:
        self.log = log

    def offload(self, *, weights: bool = True) -> None:
        self.log.calls.append("offload megatron" if weights else "offload megatron's gradients and optimizer")

    def reload(self) -> None:
        self.log.calls.append("reload megatron")


def test_capability_check_refuses_without_cuda() -> None:
    with pytest.raises(ValueError, match="time_slice' needs CUDA.*colocate='share'"):
        check_time_slicing(cuda=False)
    check_time_slicing(cuda=True)


def test_capability_check_refuses_students_the_offload_would_break() -> None:
    from topd_megatron.models.build import ModelConfig

    mxfp8 = ModelConfig(path="x", fp8="mxfp8", fp8_weights=True)
    with pytest.raises(ValueError, match="gradient buffer's storage.*fp8_weights=false"):
        check_time_slicing(cuda=True, student=mxfp8, span="call")
    fp32 = ModelConfig(path="x", dtype="float32")
    with pytest.raises(ValueError, match="time_slice_span='step'.*bf16/fp16 student.*time_slice_span=call"):
        check_time_slicing(cuda=True, student=fp32, span="step")
    check_time_slicing(cuda=True, student=fp32, span="call")  # everything moves: the weights come back with it
    check_time_slicing(cuda=True, student=ModelConfig(path="x", fp8="tensorwise", fp8_weights=True), span="step")


def test_students_sample_only_while_megatron_is_in_host_memory() -> None:
    log = _Log()
    engine = TimeSlicedEngine(_Servers(log), _States(log))
    params = SamplingParams(max_new_tokens=1)
    engine.generate([[1, 2]], params)  # the step's rollouts
    engine.generate([[3]], params, model="teacher")  # teacher requests are not sliced
    engine.score([[1, 2]], [1])
    engine.generate_windows(None, None, params, model="teacher")  # teacher windows: not sliced
    engine.sync_weights()  # after the update
    engine.generate([[1, 2]], params)  # the next step
    assert log.calls == [
        "offload megatron",
        "generate student",
        "release kv_cache,weights",
        "reload megatron",
        "generate teacher",
        "score",
        "windows teacher",
        "resume weights",
        "sync",
        "offload megatron",
        "resume kv_cache",
        "generate student",
        "release kv_cache,weights",
        "reload megatron",
    ]
    log.calls.clear()
    engine.generate_windows(None, None, params, model="student")  # fresh student windows sample from its servers
    assert log.calls == ["offload megatron", "resume weights,kv_cache", "windows student", "release kv_cache,weights",
                         "reload megatron"]  # fmt: skip
    log.calls.clear()
    engine.generate_window_pair(None, None, params, teacher_top_k=4)  # both at once: the student's servers whole
    assert log.calls == ["offload megatron", "resume weights,kv_cache", "windows teacher and student top-4",
                         "release kv_cache,weights", "reload megatron"]  # fmt: skip
    # a teacher without servers (in-process windows) samples before the swap, not next to the whole servers
    log.calls.clear()
    in_process = TimeSlicedEngine(_Servers(log, teacher_served=False), _States(log))
    in_process.generate_window_pair(None, None, params, teacher_top_k=4)
    assert log.calls == [
        "windows teacher top-4",
        "offload megatron",
        "windows student",
        "release kv_cache,weights",
        "reload megatron",
    ]  # fmt: skip (a new engine's servers start whole)


def test_a_step_span_swaps_once_and_keeps_megatrons_weights_for_the_d_t_pass() -> None:
    """span='step': the rollouts, the d_t pass (Megatron's weights on the GPUs) and both roles' windows share one
    swap; the student servers keep their KV caches (the rollouts) until the detection ends."""
    log = _Log()
    engine = TimeSlicedEngine(_Servers(log), _States(log), span="step")
    params = SamplingParams(max_new_tokens=1)
    assert isinstance(engine, SamplingSpan)
    for _ in range(2):
        engine.begin_sampling()
        engine.generate([[1, 2]], params)  # the rollouts
        engine.score([[1, 2]], [1])  # the teacher's scores, then the d_t pass on Megatron's weights
        engine.generate_window_pair(None, None, params)  # a part's windows: no swap
        engine.generate_windows(None, None, params, model="student")  # another part's
        engine.end_sampling()  # train_step, after phase 2
        engine.end_sampling()  # run_step's safety net: nothing more
        engine.sync_weights()
    step = ["generate student", "score", "windows teacher and student", "windows student", "release kv_cache,weights",
            "reload megatron", "resume weights", "sync"]  # fmt: skip
    first = ["offload megatron's gradients and optimizer", *step]  # the servers start whole
    again = ["offload megatron's gradients and optimizer", "resume kv_cache", *step]
    assert log.calls == first + again
    # outside a span (evaluation, the oracle) every call swaps Megatron's whole states
    log.calls.clear()
    engine.generate([[1]], params)
    assert log.calls == ["offload megatron", "resume kv_cache", "generate student", "release kv_cache,weights",
                         "reload megatron"]  # fmt: skip
    # span='call' ignores the span: one swap per call
    log.calls.clear()
    per_call = TimeSlicedEngine(_Servers(log), _States(log), span="call")
    per_call.begin_sampling()
    per_call.generate([[1]], params)
    per_call.generate([[1]], params)
    per_call.end_sampling()
    assert log.calls.count("offload megatron") == 2 and log.calls.count("reload megatron") == 2


def test_a_failing_call_in_a_span_brings_megatron_back() -> None:
    log = _Log()
    engine = TimeSlicedEngine(_Servers(log, fail=True), _States(log), span="step")
    engine.begin_sampling()
    with pytest.raises(RuntimeError, match="server lost"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    assert log.calls[-2:] == ["release kv_cache,weights", "reload megatron"]
    engine.end_sampling()  # the loop's safety net after the failure: nothing swaps twice
    assert log.calls.count("reload megatron") == 1


def test_megatron_comes_back_when_sampling_fails() -> None:
    log = _Log()
    engine = TimeSlicedEngine(_Servers(log, fail=True), _States(log))
    with pytest.raises(RuntimeError, match="server lost"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    assert log.calls[-2:] == ["release kv_cache,weights", "reload megatron"]


def test_training_refuses_time_slicing_before_building_anything(tmp_path) -> None:
    from tests.distributed.test_train import make_config
    from topd_megatron.rollout.sglang.engine import SGLangConfig
    from topd_megatron.training.loop import train

    cfg = make_config(("no-student", "no-teacher"), tmp_path, "opd")
    cfg = dataclasses.replace(cfg, rollout="sglang", sglang=SGLangConfig(colocate="time_slice"))
    with pytest.raises(ValueError, match="needs CUDA"):
        train(0, 1, cfg)
