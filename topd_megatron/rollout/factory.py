"""The engine a run asks for: `rollout_engine(kind, ...)`."""

from __future__ import annotations

from pathlib import Path

from topd_megatron.models.build import MegatronLM
from topd_megatron.rollout.embedded import EmbeddedEngine
from topd_megatron.rollout.engine import RolloutEngine
from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine


def rollout_engine(
    kind: str,
    student: MegatronLM,
    teacher: MegatronLM | None,
    *,
    micro_batch_size: int = 64,
    sglang: SGLangConfig | None = None,
    run_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
) -> RolloutEngine:
    """The engine named `kind` (collective: every trainer rank calls it).

    'embedded': in-process sampling from the Megatron models. 'sglang': SGLang servers configured by `sglang` (an
    `SGLangConfig`; servers and weight-sync files live under `run_dir`/sglang); the teacher's windows come from the
    teacher server when one is configured, otherwise from the colocated Megatron teacher in-process. With no Megatron
    teacher (`teacher=None`: a teacher served by SGLang only), `teacher_dir` is the teacher's HF directory to serve.
    """
    if kind == "embedded":
        return EmbeddedEngine(student, teacher, micro_batch_size=micro_batch_size)
    if kind == "sglang":
        fallback = EmbeddedEngine(student, teacher, micro_batch_size=micro_batch_size) if teacher else None
        return SGLangEngine(
            sglang or SGLangConfig(),
            student,
            teacher,
            run_dir=run_dir or ".",
            teacher_fallback=fallback,
            teacher_dir=teacher_dir,
        )
    raise ValueError(f"unknown rollout engine {kind!r}; available: embedded, sglang")
