"""SGLang configuration: validation, model paths filled in from the run's models, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from topd_megatron.config import RunConfig, config_from_dict
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig, _resolve
from topd_megatron.rollout.sglang.server import ServerConfig


def test_bad_values_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="sync_mode"):
        SGLangConfig(sync_mode="rsync")
    with pytest.raises(ValueError, match="role"):
        ServerConfig(model_path="m", role="critic")
    with pytest.raises(ValueError, match="model_path .* or url"):
        ServerConfig()
    with pytest.raises(ValueError, match="rollout must be"):
        RunConfig(student=ModelConfig(path="s"), teacher=ModelConfig(path="t"), run_dir="r", rollout="vllm")


def test_model_paths_come_from_the_run_and_weightless_students_start_dummy(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    student = _resolve(ServerConfig(model_path="<student>"), hf)
    assert student.model_path == str(hf) and student.extra_args[-2:] == ("--load-format", "dummy")
    with pytest.raises(ValueError, match="no safetensors weights"):
        _resolve(ServerConfig(role="teacher", model_path="<teacher>"), hf)
    (hf / "model.safetensors").write_bytes(b"")
    assert _resolve(ServerConfig(model_path="<student>"), hf).extra_args == ()
    explicit = ServerConfig(model_path="/elsewhere")
    assert _resolve(explicit, hf) is explicit


def test_run_config_with_sglang_servers_survives_json() -> None:
    cfg = RunConfig(
        student=ModelConfig(path="s"),
        teacher=ModelConfig(path="t"),
        run_dir="r",
        rollout="sglang",
        sglang=SGLangConfig(
            teacher=ServerConfig(role="teacher", url="http://10.0.0.5:30000"),
            sync_mode="disk",
            student=ServerConfig(model_path="<student>", extra_args=("--chunked-prefill-size", "512")),
        ),
    )
    back = config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg
    assert (
        isinstance(back.sglang.teacher, ServerConfig)
        and back.sglang.student.extra_args == cfg.sglang.student.extra_args
    )
