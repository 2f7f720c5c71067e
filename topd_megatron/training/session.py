"""One rank's setup, in one place: parallel state, the student, the teacher, the rollout engine, the tokenizer.

    with rank_session(cfg.parallel, cfg.student, teacher=cfg.teacher, engine=EngineSpec(kind="embedded")) as s:
        s.student, s.teacher, s.engine, s.tokenizer                      # the engine is closed on every path

Training, the oracle, `topd eval` and `topd agree` open a session with what they need: a trainable student wraps in
DDP (`ddp=`), a teacher is colocated (built on the student's layout and frozen) or served (only its HF directory is
checked and handed to the engine), the engine is optional (agreement scores without sampling).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
from topd_megatron.models.build import MegatronLM, ModelConfig, build_model
from topd_megatron.models.tokenizer import load_tokenizer
from topd_megatron.rollout.engine import RolloutEngine
from topd_megatron.rollout.factory import rollout_engine
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.teacher import build_teacher, teacher_hf_dir

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallelConfig


@dataclass(kw_only=True, slots=True)
class EngineSpec:
    """Which rollout engine a session starts."""

    kind: Literal["embedded", "sglang"] = "embedded"
    micro_batch_size: int = 64
    """Sequences per forward of the embedded engine."""
    sglang: SGLangConfig | None = None
    """SGLang servers (kind='sglang'); None: one student server on the student's own weights."""
    run_dir: str | Path = "."
    """Servers log and sync files under RUN_DIR/sglang."""


@dataclass(kw_only=True, slots=True)
class RankSession:
    """What a rank works with once set up."""

    student: MegatronLM
    teacher: MegatronLM | None
    """The colocated Megatron teacher; None when there is none or it is only served."""
    engine: RolloutEngine | None
    tokenizer: Any
    """The student's Hugging Face tokenizer (the teacher's is checked to be the same)."""


@contextmanager
def rank_session(
    parallel: ParallelConfig,
    student: ModelConfig,
    *,
    teacher: ModelConfig | None = None,
    teacher_source: Literal["megatron", "sglang"] = "megatron",
    engine: EngineSpec | None = None,
    ddp: DistributedDataParallelConfig | None = None,
) -> Iterator[RankSession]:
    """Set up this rank (collective): Megatron parallel state, the student (DDP-wrapped with `ddp`), the teacher, the
    engine; yield them, and close the engine (stopping the servers it launched) however the body ends."""
    init_model_parallel(parallel)
    student_lm = build_model(student, parallel, role="student", wrap_with_ddp=ddp is not None, ddp_config=ddp)
    teacher_lm, teacher_dir = None, None
    if teacher is not None and teacher_source == "megatron":
        teacher_lm = build_teacher(teacher, parallel, student_lm)
    elif teacher is not None:  # served only: nothing is built; its server is started from (or attached for) its path
        teacher_dir = teacher_hf_dir(teacher, student_lm)
    tokenizer = load_tokenizer(student_lm.tokenizer_dir)
    eng = None
    if engine is not None:
        eng = rollout_engine(
            engine.kind,
            student_lm,
            teacher_lm,
            micro_batch_size=engine.micro_batch_size,
            sglang=engine.sglang,
            run_dir=engine.run_dir,
            teacher_dir=teacher_dir,
        )
    try:
        yield RankSession(student=student_lm, teacher=teacher_lm, engine=eng, tokenizer=tokenizer)
    finally:
        if eng is not None:
            eng.close()
