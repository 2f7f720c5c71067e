"""RunConfig: one training run, composed of each stage's Config. No logic beyond cross-stage checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from topd_megatron.algorithm import objective
from topd_megatron.choices import check_choices
from topd_megatron.cluster import ClusterConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.task_eval import EvalConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.metrics import MetricsConfig
from topd_megatron.training.optim import OptimConfig
from topd_megatron.training.preemption import check_signal_names


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The loop: how many steps, how many rollouts, how often to evaluate and save."""

    steps: int = 30
    prompts_per_step: int = 16
    """Prompts per step over all data-parallel replicas."""
    samples_per_prompt: int = 2
    """Rollouts per prompt."""
    micro_batch_size: int = 16
    """Rollouts per micro-batch (gradient accumulation over micro-batches)."""
    problem_pool: int = 5000
    """Training problems drawn from the task; steps walk through them in order (wrapping around)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    eval_every: int = 10
    """Evaluate every this many steps (and after the last); 0: only after the last."""
    eval_at_start: bool = True
    """Also evaluate the initial student (step 0) in a fresh run."""
    save_every: int = 10
    """Save a training checkpoint every this many steps (and after the last); 0: only after the last."""
    save_checkpoints: bool = True
    """False: a run that is never resumed (the experiment's arms), no checkpoint is written."""
    checkpoint_optimizer: Literal["any_layout", "same_model_parallel"] = "any_layout"
    """How checkpoints store the distributed optimizer (models/checkpoint.py OPTIMIZER_FORMATS): 'any_layout' resumes
    at any TP/PP/DP (saving gathers each DP group's optimizer shards on its DP rank 0, in host memory);
    'same_model_parallel' saves fully in parallel and resumes at the same TP/PP only (any DP)."""
    offload_teacher_logits: bool = False
    """Keep the step's teacher logits ([B, S, V/TP] per last-stage rank) in host memory between scoring and the
    backward pass, copied back one micro-batch at a time (GPU only; the planner counts one micro-batch then)."""
    pack_guidance: bool = True
    """teacher_window guidance: train (and teacher-score) each rollout's windows packed after it in one row, one pass
    for rollouts and windows (algorithm/packing.py), where the models can (Megatron-Core's local attention; a warning
    and one whole-prefix row per window otherwise). False: always the per-branch rows. The numbers are the same."""
    max_bad_steps: int = 3
    """Abort after this many steps with a non-finite loss (each is skipped and logged)."""
    inject_nan_at: tuple[int, ...] = ()
    """Fault injection: make the loss NaN at these (1-based) steps, to exercise the skip/abort path."""
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """Signals that stop the run cleanly (training/preemption.py): every rank finishes the step in flight, a
    checkpoint is written, RUN_DIR/requeue.json records the stop and `topd train` exits with code 75 ("requeue me");
    rerunning resumes. SIGUSR1 is the early warning the sbatch scripts ask Slurm for. () disables the handling. With
    save_checkpoints false there is nothing to resume from: the stop fails the run (StoppedWithoutCheckpoint)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.prompts_per_step < 1 or self.samples_per_prompt < 1 or self.micro_batch_size < 1:
            raise ValueError("train.steps, prompts_per_step, samples_per_prompt and micro_batch_size must be >= 1")
        check_signal_names(self.stop_signals, "train.stop_signals")
        check_choices(self, "train")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A complete TOPD run."""

    student: ModelConfig
    teacher: ModelConfig
    run_dir: str
    """Where metrics, TensorBoard logs, checkpoints and plots go (a rerun with the same run_dir resumes)."""
    task: str = "topd_megatron.tasks.drift:default"
    rollout: Literal["embedded", "sglang"] = "embedded"
    """'embedded' (sample in-process from the Megatron models) or 'sglang' (SGLang servers, see `sglang`)."""
    teacher_source: Literal["megatron", "sglang"] = "megatron"
    """'megatron': the teacher is built in Megatron on the student's ranks and gives vocab-sharded logits;
    'sglang': the teacher is only served (sglang.teacher), for teachers that cannot be colocated; the loss then uses
    the served forms (objective.teacher_signal 'top_k' or 'sampled_token')."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: objective.Config = field(default_factory=objective.Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Metrics sinks besides JSONL and TensorBoard (Weights & Biases)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The machines the run is meant for (planner, launchers); training uses what torchrun/srun give it."""

    def __post_init__(self) -> None:
        check_choices(self)
        signal = self.objective.teacher_signal
        if self.teacher_source == "megatron":
            if signal != "logits":
                raise ValueError(
                    f"objective.teacher_signal={signal!r} is for a teacher served by SGLang; with the colocated"
                    " Megatron teacher use teacher_signal=logits (or set teacher_source=sglang)"
                )
        else:  # sglang
            problems = []
            if self.rollout != "sglang":
                problems.append("rollout=sglang (the teacher server is reached through the SGLang engine)")
            if self.sglang.teacher is None:
                problems.append("sglang.teacher=default (serves teacher.path) or sglang.teacher.url=URL")
            if signal == "logits":
                problems.append("objective.teacher_signal=top_k or sampled_token (a server reports log-probs)")
            if problems:
                raise ValueError("teacher_source=sglang needs " + "; ".join(problems))


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from `dataclasses.asdict` output (e.g. a JSON file written by `topd train`)."""
    import dataclasses
    import typing

    def build(cls: type, value: object) -> object:
        if isinstance(value, dict) and not dataclasses.is_dataclass(cls):  # X | None with X a dataclass
            cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
        if not dataclasses.is_dataclass(cls) or not isinstance(value, dict):
            return value
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in value:
                continue
            kind, v = hints[f.name], value[f.name]
            if isinstance(v, list) and typing.get_origin(kind) is tuple:
                v = tuple(v)
            kwargs[f.name] = build(kind, v)
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**kwargs)

    return build(RunConfig, data)  # type: ignore[return-value]
