"""The layout and step shapes the planner reasons about, derived from a RunConfig.

    layout = layout_of(cfg)               # ranks: world, TP, PP, VPP, CP, EP, DP, expert DP
    shape = step_shape(cfg, layout)       # per data-parallel rank: rollouts, micro-batches, candidates, branches

Step shapes follow the code (algorithm/batch.py, training/step.py, algorithm/detection.py), sized for the worst case:
- every row of the step's `[B, S]` token matrix is S = `student.seq_length` wide (the declared longest sequence:
  prompt + response + window); B = this replica's rollouts rounded up to whole micro-batches;
- every rollout is assumed to use all of `max_new_tokens` (RESPONSE_FRACTION), so a rollout has
  min(ceil(q * max_new_tokens), max_candidates) detection candidates;
- teacher_window guidance scores one branch sequence per divergent candidate: (1 - q_d) of the candidates when tau
  is the q_d quantile, DIVERGENT_SHARE_FIXED_TAU of them with a fixed tau, at most objective.guidance_budget per
  rollout; per-branch rows are as wide as the step (a candidate near the end of the longest rollout makes the padded
  width about S);
- packed guidance (train.pack_guidance where the models can: Megatron-Core's local attention, `packs`) puts a
  rollout's windows after it instead: no branch rows, the training pass and the colocated teacher's branch forward
  run on rows of S + (branches per rollout) x (K - 1) tokens (algorithm/packing.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from topd_megatron.config import RunConfig
from topd_megatron.models.build import ModelConfig

RESPONSE_FRACTION = 1.0
"""Share of max_new_tokens a rollout is assumed to use (1.0: the worst case for memory)."""
DIVERGENT_SHARE_FIXED_TAU = 0.7
"""Share of candidates judged divergent when detection.tau is a fixed value (the paper's ~30% non-divergent)."""


Attention = Literal["local", "te"]


def attention_kind(model: ModelConfig, device: str) -> Attention:
    """'te' on GPUs unless TransformerEngine is switched off (model.transformer_engine=False), else 'local'."""
    return "te" if device == "cuda" and model.transformer_engine is not False else "local"


def teacher_served(cfg: RunConfig) -> bool:
    """Whether the teacher is only served by SGLang (teacher_source='sglang'): no Megatron teacher on the training
    ranks, per-position reports instead of logits."""
    return cfg.teacher_source == "sglang"


def time_sliced(cfg: RunConfig) -> bool:
    """The student servers share the training GPUs by turns (sglang.colocate='time_slice', no server nodes)."""
    return cfg.rollout == "sglang" and cfg.sglang.colocate == "time_slice" and cfg.cluster.student_server_nodes == 0


def span_keeps_weights(cfg: RunConfig) -> bool:
    """Time slicing with sglang.time_slice_span='step': from the rollouts to the end of detection the student servers
    stay whole and Megatron's weights stay beside them on the GPUs (the d_t pass runs on them); only the optimizer
    state waits in host memory, and the step swaps once (training/colocation.py)."""
    return time_sliced(cfg) and cfg.sglang.time_slice_span == "step"


@dataclass(frozen=True, slots=True)
class Layout:
    """Parallel sizes of the training ranks (Megatron-Core's groups)."""

    world: int
    """Training ranks = cluster.nodes * cluster.gpus_per_node."""
    tp: int
    pp: int
    vpp: int
    """Virtual stages per pipeline rank (1: plain 1F1B)."""
    cp: int
    ep: int
    etp: int
    """Expert tensor parallelism (Megatron's default: = TP)."""
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        """Data-parallel replicas: world / (TP * PP * CP) (0 when it does not divide)."""
        mp = self.tp * self.pp * self.cp
        return self.world // mp if self.world % mp == 0 else 0

    @property
    def edp(self) -> int:
        """Expert data parallelism: world / (ETP * EP * PP) (0 when it does not divide)."""
        emp = self.etp * self.ep * self.pp
        return self.world // emp if self.world % emp == 0 else 0

    @property
    def sp(self) -> int:
        """Divisor of the sequence-sharded (hidden-sized) activations: TP with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1


@dataclass(frozen=True, slots=True)
class StepShape:
    """Sizes of one training step on one data-parallel rank."""

    seq: int
    """S: width of the step's token matrix."""
    micro_batch: int
    rollouts: int
    """Rollouts of this replica (prompts_per_step / DP * samples_per_prompt)."""
    rows: int
    """Rows of the step's token matrix: rollouts rounded up to whole micro-batches."""
    candidates: int
    """Detection candidates of this replica (0 without a detector)."""
    branches: int
    """Branch sequences scored for teacher_window guidance (0 without it)."""
    branch_rows: int
    """Branch rows rounded up to whole micro-batches (0 without branches)."""
    branch_seq: int
    """Width of a branch row: S per-branch, the packed width S + (branches per rollout) x (K - 1) when packed."""
    window: int
    """K: window tokens per candidate."""
    packed: bool = False
    """Windows packed after their rollouts (no branch rows; the training pass runs branch_seq wide)."""

    @property
    def microbatches(self) -> int:
        return self.rows // self.micro_batch

    @property
    def branch_microbatches(self) -> int:
        return self.branch_rows // self.micro_batch

    @property
    def tokens(self) -> int:
        """Tokens the models process for the rollouts of this replica (padding included)."""
        return self.rows * self.seq

    @property
    def branch_tokens(self) -> int:
        """Tokens the branch training adds to the rollouts' pass: whole-prefix branch rows, or the packed window
        columns (padding included)."""
        if self.packed:
            return self.rows * (self.branch_seq - self.seq)
        return self.branch_rows * self.branch_seq

    @property
    def branch_score_tokens(self) -> int:
        """Tokens a colocated teacher's branch forward reads: the branch rows, or the packed rows whole."""
        return self.rows * self.branch_seq if self.packed else self.branch_rows * self.branch_seq

    @property
    def train_seq(self) -> int:
        """Width of the training pass's micro-batches."""
        return self.branch_seq if self.packed else self.seq


def layout_of(cfg: RunConfig) -> Layout:
    p = cfg.parallel
    return Layout(
        world=cfg.cluster.training_gpus,
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp or 1,
        cp=p.cp,
        ep=p.ep,
        etp=p.tp,
        sequence_parallel=p.sequence_parallel,
    )


def packs(cfg: RunConfig, device: str) -> bool:
    """Whether teacher_window guidance runs packed (training/scoring.py `scoring_context`): asked for, and every
    Megatron model takes the per-window mask (the local attention; TransformerEngine falls back to branch rows)."""
    models = [cfg.student] + ([] if teacher_served(cfg) else [cfg.teacher])
    wanted = cfg.train.pack_guidance and cfg.objective.guidance == "teacher_window" and cfg.parallel.cp == 1
    return wanted and all(attention_kind(m, device) == "local" for m in models)


def step_shape(cfg: RunConfig, layout: Layout, device: str = "cuda") -> StepShape:
    t, det = cfg.train, cfg.objective.detection
    dp = max(layout.dp, 1)
    rollouts = -(-t.prompts_per_step // dp) * t.samples_per_prompt
    mb = t.micro_batch_size
    rows = -(-rollouts // mb) * mb
    seq = cfg.student.seq_length
    response = max(1, round(t.max_new_tokens * RESPONSE_FRACTION))
    per_rollout = 0
    if det.detector != "none":
        per_rollout = math.ceil(det.q * response)
        if det.max_candidates is not None:
            per_rollout = min(per_rollout, det.max_candidates)
    candidates = rollouts * per_rollout
    branches = 0
    if cfg.objective.guidance == "teacher_window" and det.detector != "none":
        share = (1.0 - det.q_d) if det.tau is None else DIVERGENT_SHARE_FIXED_TAU
        branches = math.ceil(candidates * share)
        if cfg.objective.guidance_budget is not None:
            branches = min(branches, rollouts * cfg.objective.guidance_budget)
    packed = bool(branches) and packs(cfg, device)
    branch_rows = 0 if packed else -(-branches // mb) * mb
    per_rollout = -(-branches // max(rollouts, 1))
    width = seq + per_rollout * (det.window - 1) if packed else (seq if branches else 0)
    width = -(-width // layout.sp) * layout.sp  # sequence parallelism: rows a multiple of TP (algorithm/packing.py)
    return StepShape(
        seq=seq,
        micro_batch=mb,
        rollouts=rollouts,
        rows=rows,
        candidates=candidates,
        branches=branches,
        branch_rows=branch_rows,
        branch_seq=width,
        window=det.window,
        packed=packed,
    )
