"""Time-sliced colocation (sglang.colocate='time_slice'): the student's SGLang servers and Megatron take the same GPUs
by turns, so that every training GPU also samples rollouts between steps.

    engine = TimeSlicedEngine(session.engine, MegatronStates(student, optimizer))   # training/loop.py
    engine.generate(prompts, params)     # Megatron's states -> host memory, servers' memory resumed, sample,
                                         # servers' memory released, Megatron's states back on the GPUs
    engine.sync_weights()                # the servers' weights resumed (not their KV cache) to receive the new ones

A step's span (sglang.time_slice_span='step', training/loop.py and training/step.py):

    engine.begin_sampling()              # before the rollouts: the next student call swaps in and the servers stay
    ...rollouts, d_t pass, windows...    # whole; Megatron keeps its weights on the GPUs (the d_t pass runs on them),
    engine.end_sampling()                # its gradient buffers and optimizer state wait in host memory; after phase 2
                                         # the servers release their memory and Megatron's states come back

Megatron's side uses Megatron-Core's RL offload (`_ParamAndGradBuffer.offload_to_cpu` / `reload_from_cpu` for the
weights and fp32 gradient buffers, `MegatronOptimizer.offload_to_cpu` / `restore_from_cpu` for the optimizer state);
SGLang's side its `/release_memory_occupation` and `/resume_memory_occupation` (tags 'weights', 'kv_cache'), which
need the servers started with `--enable-memory-saver --enable-weights-cpu-backup` (torch_memory_saver; the released
weights wait in host memory, so a resumed server holds the weights of the last sync). The peak of a step is the
weight sync: Megatron's states plus the servers' weights (the planner's "sync" phase). Teacher servers are not
sliced.

Capability checks (`check_time_slicing`, before anything is built): CUDA, and servers that were launched with the
memory saver. Not run here (no GPU on the machines this was written on): the unit tests check the order of the
swaps with stand-ins for the CUDA-only operations; the planner and `TOPD_DRY_RUN=1 bash slurm/topd_70b.sh` cover the
layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from topd_megatron.models.build import MegatronLM, ModelConfig
from topd_megatron.rollout.engine import Generation, Role, SamplingParams

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer


class ServerMemory(Protocol):
    """What the time slicer needs from the engine (SGLangEngine): release / resume its student servers' memory."""

    def release_memory(self, tags: tuple[str, ...]) -> None: ...

    def resume_memory(self, tags: tuple[str, ...]) -> None: ...


class StateSwap(Protocol):
    """Moves the trainer's GPU state out of the way and back (`MegatronStates`)."""

    def offload(self, *, weights: bool = True) -> None:
        """Everything to host memory, or (weights=False) all but the model's weights."""
        ...

    def reload(self) -> None: ...


@runtime_checkable
class SamplingSpan(Protocol):
    """An engine whose student calls of a step can share one swap (`TimeSlicedEngine`, span='step')."""

    def begin_sampling(self) -> None: ...

    def end_sampling(self) -> None: ...


def check_time_slicing(cuda: bool | None = None, *, student: ModelConfig | None = None, span: str = "call") -> None:
    """Raise ValueError when time slicing cannot run here or for this student (checked before any model is built):
    CUDA; not Megatron-Core's MXFP8 weights (fp8='mxfp8' with fp8_weights keeps the weights in the gradient buffer's
    storage, which the offload frees); a span that keeps the weights on the GPUs needs a bf16/fp16 student (with an
    fp32 one the optimizer's parameters are the weights, which its offload moves to the host)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        raise ValueError(
            "sglang.colocate='time_slice' needs CUDA: SGLang releases and resumes GPU memory (torch_memory_saver) and"
            " Megatron's states move between GPU and host; on this machine use sglang.colocate='share' (topd plan"
            " models the time-sliced layout)"
        )
    if student is not None and student.fp8 == "mxfp8" and student.fp8_weights:
        raise ValueError(
            "sglang.colocate='time_slice' cannot offload student.fp8='mxfp8' with student.fp8_weights=True: Megatron"
            " keeps those weights in the gradient buffer's storage, which the offload frees; set student.fp8_weights"
            "=false, another student.fp8 recipe, or sglang.colocate='share'"
        )
    if student is not None and span == "step" and student.dtype not in ("bfloat16", "float16"):
        raise ValueError(
            f"sglang.time_slice_span='step' keeps the student's weights on the GPUs while its optimizer state is in"
            f" host memory, which needs a bf16/fp16 student (student.dtype={student.dtype!r}: the optimizer's"
            " parameters are the weights); set sglang.time_slice_span=call or student.dtype=bfloat16"
        )


class MegatronStates:
    """The student's weights, fp32 gradient buffers and optimizer state on the GPU or in host memory (Megatron-Core's
    own offload of its DDP buffers and optimizer)."""

    def __init__(self, student: MegatronLM, optimizer: MegatronOptimizer) -> None:
        self.student, self.optimizer = student, optimizer
        self.moved_weights = True

    def _buffers(self) -> list[Any]:
        return [b for m in self.student.modules for b in (m.buffers + m.expert_parallel_buffers)]

    def offload(self, *, weights: bool = True) -> None:
        """The gradient buffers (freed: a step starts from zero gradients), the optimizer state and, with `weights`,
        the parameter buffers to host memory."""
        torch.cuda.synchronize()
        self.moved_weights = weights
        for buffer in self._buffers():
            buffer.offload_to_cpu(move_params=weights, move_grads=True)
        self.optimizer.offload_to_cpu()
        torch.cuda.empty_cache()

    def reload(self) -> None:
        for buffer in self._buffers():
            buffer.reload_from_cpu(move_params=self.moved_weights, move_grads=True)
        self.optimizer.restore_from_cpu()
        torch.cuda.synchronize()


class TimeSlicedEngine:
    """A RolloutEngine whose student servers sample only while Megatron's states are in host memory (module
    docstring). Teacher requests (scoring, windows) and the rest of the engine pass through unchanged. A student
    request runs inside `serving`: with its swaps each time (one per call), or, inside a step's span
    (`begin_sampling` .. `end_sampling`, span='step'), with one swap in at the first call and out at the end."""

    def __init__(self, engine: Any, states: StateSwap, *, span: Literal["step", "call"] = "call") -> None:
        self.engine, self.states, self.span = engine, states, span
        self.resumed: set[str] = {"weights", "kv_cache"}
        """What the student servers hold on the GPUs now (they start whole; the first `serving` keeps them so)."""
        self.spanning = False
        """Inside a step's span (`begin_sampling`)."""
        self.swapped_in = False
        """The span's servers are whole and Megatron's gradients and optimizer state in host memory."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)  # score, generate_windows, close, ...: the wrapped engine's own

    def _resume(self, tags: tuple[str, ...]) -> None:
        missing = tuple(t for t in tags if t not in self.resumed)
        if missing:
            self.engine.resume_memory(missing)
            self.resumed |= set(missing)

    def begin_sampling(self) -> None:
        """span='step': the student calls until `end_sampling` share one swap (Megatron's weights stay on the GPUs,
        so its no-grad passes run in between); span='call': nothing changes."""
        self.spanning = self.span == "step"

    def end_sampling(self) -> None:
        """End the span: the servers release their memory and Megatron's states come back (if a call swapped)."""
        self.spanning = False
        if self.swapped_in:
            self.swapped_in = False
            self._swap_out()

    def _swap_out(self) -> None:
        self.engine.release_memory(tuple(sorted(self.resumed)))
        self.resumed = set()
        self.states.reload()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Megatron's states in host memory and the servers whole while the body runs; the other way round after
        (inside a step's span: from the span's first call to `end_sampling`, or to a call that fails)."""
        if self.spanning:
            try:
                if not self.swapped_in:
                    self.swapped_in = True
                    self.states.offload(weights=False)
                    self._resume(("weights", "kv_cache"))
                yield
            except BaseException:
                self.end_sampling()
                raise
            return
        self.states.offload()
        try:
            self._resume(("weights", "kv_cache"))
            yield
        finally:
            self._swap_out()

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: Literal["student", "teacher"] = "student"
    ) -> list[Generation]:
        if model != "student":
            return self.engine.generate(prompts, params, model=model)
        with self.serving():
            return self.engine.generate(prompts, params, model="student")

    def generate_windows(
        self,
        rows: Tensor,
        positions: Tensor,
        params: SamplingParams,
        *,
        model: Role,
        first_window: int = 0,
        top_k: int = 0,
    ) -> Any:
        """Fresh student windows (detection.student_window='fresh') need the student servers too."""
        kw = {"first_window": first_window, "top_k": top_k}
        if model != "student":
            return self.engine.generate_windows(rows, positions, params, model=model, **kw)
        with self.serving():
            return self.engine.generate_windows(rows, positions, params, model="student", **kw)

    def generate_window_pair(
        self, rows: Tensor, positions: Tensor, params: SamplingParams, *, first_window: int = 0, teacher_top_k: int = 0
    ) -> Any:
        """The teacher's windows (its own servers) while the student servers sample theirs: one swap for both. A
        teacher without servers samples in-process before the swap, not next to the whole student servers (inside a
        step's span they are whole already: the planner counts those windows' memory beside them)."""
        if not self.engine.serves("teacher"):
            teacher = self.engine.generate_windows(
                rows, positions, params, model="teacher", first_window=first_window, top_k=teacher_top_k
            )
            student = self.generate_windows(rows, positions, params, model="student", first_window=first_window)
            return {"teacher": teacher, "student": student}
        with self.serving():
            return self.engine.generate_window_pair(
                rows, positions, params, first_window=first_window, teacher_top_k=teacher_top_k
            )

    def sync_weights(self) -> dict[str, float]:
        """The servers' weights come back next to Megatron's states (no KV cache) to receive the new weights."""
        self.end_sampling()  # a span still open (the step failed before phase 3) ends here
        self._resume(("weights",))
        return self.engine.sync_weights()
