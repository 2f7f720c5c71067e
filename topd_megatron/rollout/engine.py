"""The rollout seam: sampling parameters, generations, and the protocols every engine implements.

Two implementations plug into the same `RolloutEngine` protocol:
- `embedded.EmbeddedEngine`: samples in-process from the Megatron student/teacher (any TP/PP; vocab-parallel
  sampling, no gather of the vocabulary). The laptop default.
- `sglang.SGLangEngine`: SGLang servers (launched or attached), weight sync after every step: the at-scale path.

The trainer owns tokenisation: engines see token ids only. Calls are collective over the model-parallel group for the
embedded engine (every rank passes the same prompts, every rank gets the same result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor


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
    output_top_ids: list[list[int]] | None = None
    """[n][k] the generating model's k most likely ids at each output position, when asked (`top_k` of the served
    engines' window calls): the distribution each output token was sampled from."""
    output_top_logprobs: list[list[float]] | None = None
    """[n][k] their log-probs (temperature 1)."""
    meta: dict = field(default_factory=dict)
    """Engine-specific facts (SGLang: finish_reason, prompt_tokens, cached_tokens)."""


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


@dataclass(kw_only=True, slots=True)
class TokenScores:
    """Teacher-forced scores of the tokens of one sequence, from position `start` on."""

    logprobs: list[float]
    """[n] log p(token_i | tokens_<i) for i = start .. len-1."""
    top_ids: list[list[int]] | None = None
    """[n][k] the k most likely tokens at each of those positions (when asked)."""
    top_logprobs: list[list[float]] | None = None
    """[n][k] their log-probs."""
    prompt_tokens: int = 0
    """Tokens the server read for this request (a served scorer's count; 0 when unknown)."""
    cached_tokens: int = 0
    """Of them, how many its prefix cache held (SGLang's meta_info.cached_tokens)."""


@runtime_checkable
class TeacherScorer(Protocol):
    """Teacher forcing by a served model: the log-probs (and top-k) a teacher that is not colocated reports."""

    def score(
        self,
        sequences: list[list[int]],
        starts: list[int],
        *,
        top_k: int = 0,
        model: Literal["student", "teacher"] = "teacher",
    ) -> list[TokenScores]:
        """log p(seq[i] | seq[:i]) for i >= starts[j] of each sequence j, with the top-k ids and log-probs at those
        positions when top_k > 0 (collective over the model-parallel group, like `generate`)."""
        ...


class PendingResult(Protocol):
    """Work a server is doing in the background; `result()` waits for it (collective)."""

    def result(self) -> list[TokenScores]: ...


@runtime_checkable
class AsyncTeacherScorer(Protocol):
    """A TeacherScorer whose scoring can begin before the caller needs it (SGLangEngine.score_async)."""

    def score_async(
        self,
        sequences: list[list[int]],
        starts: list[int],
        *,
        top_k: int = 0,
        model: Literal["student", "teacher"] = "teacher",
    ) -> PendingResult:
        """Begin `TeacherScorer.score` (no collective); its `result()` is the collective `score` would have been."""
        ...


Role = Literal["student", "teacher"]
"""Which model an engine call is for."""


@runtime_checkable
class WindowSampler(Protocol):
    """Near-future windows sampled per rollout: every prefix (x, y_<=j) of a rollout row is a prefix of the row, so an
    engine can compute the row once for all its windows (the embedded engine packs them after the row, SGLang serves
    them from its radix cache); engines without it get one independent `generate` call per prefix."""

    def generate_windows(
        self, rows: Tensor, positions: Tensor, params: SamplingParams, *, model: Role
    ) -> list[Generation]:
        """One continuation of `params.max_new_tokens` tokens after rows[p // (S - 1), : p % (S - 1) + 1] for each
        flat target position p of `positions` (ascending) in the [B, S] token rows, in that order (collective over
        the model-parallel group, like `generate`); `prompt_ids` of each generation is its prefix."""
        ...


@runtime_checkable
class PairedWindowSampler(Protocol):
    """Windows from servers (the SGLang engine): both models' windows at the same positions in one call
    (detection.student_window='fresh'), each role on its own servers at the same time; a step's windows sampled in
    parts with the seeds of one call (`first_window`); the KV-cache budget of a role's window requests."""

    def generate_window_pair(
        self, rows: Tensor, positions: Tensor, params: SamplingParams, *, first_window: int = 0, teacher_top_k: int = 0
    ) -> dict[Role, list[Generation]]:
        """{'teacher': ..., 'student': ...}, each what `WindowSampler.generate_windows` returns for that model with
        the same `params` (the same per-window seeds); collective over the model-parallel group. `teacher_top_k` > 0:
        the teacher's windows also carry its top-k ids and log-probs at every window position
        (`Generation.output_top_ids`), so that no prefill has to score them again."""
        ...

    def generate_windows(
        self,
        rows: Tensor,
        positions: Tensor,
        params: SamplingParams,
        *,
        model: Role,
        first_window: int = 0,
        top_k: int = 0,
    ) -> list[Generation]:
        """`WindowSampler.generate_windows`, window i seeded as window `first_window + i` of one call; with the
        generating model's top-k at every window position when `top_k` > 0."""
        ...

    def window_cache_budget(self, model: Role) -> int | None:
        """KV-cache tokens of the role's servers one chunk of window requests may take (None: unknown)."""
        ...
