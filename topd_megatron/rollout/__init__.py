"""Stage 2: rollout engines. They turn token-id prompts into sampled continuations with per-token log-probs.

Two implementations plug into the same `RolloutEngine` protocol:
- `embedded.EmbeddedEngine`: samples in-process from the Megatron student/teacher (any TP/PP; vocab-parallel
  sampling, no gather of the vocabulary). The laptop default.
- `sglang.SGLangEngine`: SGLang servers (launched or attached), weight sync after every step: the at-scale path.

The trainer owns tokenisation: engines see token ids only. Calls are collective over the model-parallel group for the
embedded engine (every rank passes the same prompts, every rank gets the same result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to sample. Log-probs are always those of the model's own distribution (temperature 1, no top-p) at the
    sampled token, i.e. log pi(y_t | x, y_<t): what OPD's importance ratio and the oracle need."""

    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sequence ends after it emits one of these (kept in the output)."""
    seed: int = 0
    """Base seed; the same seed, prompts and weights give the same samples."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(kw_only=True, slots=True)
class Generation:
    """One sampled continuation."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    """log pi(y_t | x, y_<t) of each output token under the generating model (temperature 1)."""
    finished: bool
    """True when a stop token ended it, False when max_new_tokens did."""
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    """Sampling from the student (rollouts, evaluation) and the teacher (near-future windows, oracle)."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: Literal["student", "teacher"] = "student"
    ) -> list[Generation]:
        """One continuation per prompt, in order."""
        ...

    def sync_weights(self) -> dict[str, float]:
        """Make the student's current weights the ones `generate` samples from; returns timing/size metrics."""
        ...

    def close(self) -> None:
        """Release what the engine started (servers); the engine is unusable afterwards."""
        ...


def rollout_engine(
    kind: str,
    student: Any,
    teacher: Any | None,
    *,
    micro_batch_size: int = 64,
    sglang: Any = None,
    run_dir: str | Path | None = None,
    teacher_dir: str | Path | None = None,
) -> RolloutEngine:
    """The engine named `kind` (collective: every trainer rank calls it).

    'embedded': in-process sampling from the Megatron models. 'sglang': SGLang servers configured by `sglang` (an
    `SGLangConfig`; servers and weight-sync files live under `run_dir`/sglang); the teacher's windows come from the
    teacher server when one is configured, otherwise from the colocated Megatron teacher in-process. With no Megatron
    teacher (`teacher=None`: a teacher served by SGLang only), `teacher_dir` is the teacher's HF directory to serve.
    """
    from topd_megatron.rollout.embedded import EmbeddedEngine

    if kind == "embedded":
        return EmbeddedEngine(student, teacher, micro_batch_size=micro_batch_size)
    if kind == "sglang":
        from topd_megatron.rollout.sglang import SGLangConfig, SGLangEngine

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
