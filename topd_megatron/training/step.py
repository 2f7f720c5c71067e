"""One TOPD optimisation step on a StepBatch of rollouts (stages 3-6 of the data flow), in five named phases:

    scores   = score(ctx.scoring, step)                             1. teacher logits / served report; no-grad d_t
    found    = detect(ctx.scoring, step, scores, window_seed=s)     2. candidates, D_t, decisions, teacher windows
               (both through `score_and_detect`, which runs 1-2 part by part when a served teacher's KV caches
               cannot hold the step's rollouts and their windows at once)
    branches = build_branches(ctx.scoring, step, found, seed=s)     3. teacher_window guidance: branch rows (x, y_<t, u)
                                                                       at the divergent positions, teacher-scored
    grads    = backward(ctx, step, scores, found, branches)         4. pass 1 over the rollout micro-batches (OPD term
                                                                       with suppression, on_path guidance), pass 2 over
                                                                       the branch micro-batches; DP-reduced once
    update   = apply_update(ctx, grads)                             5. skip a non-finite step, else clip + step + LR

Packed guidance (`ctx.scoring.pack_guidance`, the default where the models can: algorithm/packing.py): phase 3 packs
each rollout's windows after it, the teacher scores the packed rows in one forward, and phase 4 is a single pass over
them; the loss and every gradient equal the two passes' (tests/distributed/test_packing.py).

Phases 1-2 live in `training.scoring` (the oracle reuses them without an optimizer).

Normalisation spans the step: the per-position weights n_t are computed on the whole step (all micro-batches and
data-parallel replicas, `objective.normalizer(..., group=dp)`), and each micro-batch's loss is multiplied by the
number of micro-batches (Megatron's schedule divides by it) and by the data-parallel size (Megatron's DDP averages
over replicas), so the gradient is exactly that of the step's objective.

Teacher served by SGLang (`ctx.scoring.teacher is None`): phase 1 asks the teacher server for the log-probs (top-k
with teacher_signal='top_k') of every rollout's response tokens; its windows come with its report on their tokens
(the decode's log-probs and top-k: `scoring.report_on_windows`), of which phase 3 keeps the guided ones (an engine
whose windows cannot carry it has the branch windows scored instead: `served_branch_scores`); the loss then uses the
served forms (`objective.ServedTeacher`). With time slicing, `train_step` ends the step's sampling span after
phase 2 (training/colocation.py). Nothing else changes.

Memory: the teacher's rollout logits of the whole step are kept until the backward pass ([B, S, V/TP] per last-stage
rank), in host memory with `train.offload_teacher_logits`; of the branch sequences only the window rows are kept
([sum K', V/TP]); the no-grad student pass of the detector keeps only d_t.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from topd_megatron.algorithm import objective
from topd_megatron.algorithm.batch import BranchBatch, StepBatch, build_branch_batch
from topd_megatron.algorithm.objective import ServedTeacher
from topd_megatron.algorithm.packing import PackedBatch, pack_windows
from topd_megatron.algorithm.types import Detection, TokenBatch, Windows
from topd_megatron.models.positions import width_multiple
from topd_megatron.training.colocation import SamplingSpan
from topd_megatron.training.forward import MicroBatch, run_pipeline
from topd_megatron.training.scoring import (
    Detected,
    Scores,
    ScoringContext,
    TeacherScores,
    microbatch_tokens,
    sample_teacher_windows,
    score_and_detect,
    teacher_view,
)
from topd_megatron.training.teacher import served_branch_scores, teacher_logits

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


@dataclass(kw_only=True, slots=True)
class StepContext:
    """What a step needs besides its batch: the scoring context plus the student's optimizer and LR schedule."""

    scoring: ScoringContext
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


@dataclass(kw_only=True, slots=True)
class Branches:
    """Phase 3: teacher_window guidance's branch sequences (x, y_<t, u_1..u_K') at the divergent positions."""

    positions: Tensor
    """[G] ascending flat positions t of the branches (the divergent candidates)."""
    windows: Windows
    """[G, K] the teacher windows u, in `positions` order."""
    batch: BranchBatch | PackedBatch | None
    """The branch rows in micro-batches: one whole-prefix row per branch (BranchBatch), or the windows packed after
    their rollouts (PackedBatch, `ctx.pack_guidance`: one pass trains rollouts and windows); None when G = 0."""
    teacher: list[Tensor] | ServedTeacher | None
    """Per branch micro-batch the teacher's window rows [sum K', V_local], a served report on all window tokens
    (packed window after window), or None (cross-entropy guidance needs nothing from the teacher)."""
    window_seconds: float = 0.0
    """Wall time of sampling the windows here (0 when the detector's windows were reused)."""


@dataclass(kw_only=True, slots=True)
class Gradients:
    """Phase 4: gradients are in the DDP buffers, reduced; what the step's loss was."""

    opd_value: Tensor
    """0-dim: the OPD term (with on_path guidance) summed over micro-batches (last pipeline stage; 0 elsewhere)."""
    guidance_value: Tensor
    """0-dim: lambda * teacher_window guidance, summed over branch micro-batches (last stage; 0 elsewhere)."""
    diagnostics: list[dict[str, float]]
    """`objective.loss` metrics of every rollout micro-batch."""


@dataclass(kw_only=True, slots=True)
class Update:
    """Phase 5: whether the optimizer stepped."""

    skipped: bool
    grad_norm: float


def build_branches(ctx: ScoringContext, step: StepBatch, found: Detected, *, seed: int) -> Branches | None:
    """Phase 3 (collective): the branch rows of teacher_window guidance, scored by the teacher (colocated: only
    each branch's window rows are kept; served: the server's report on the window tokens). None without it."""
    if ctx.objective.guidance != "teacher_window":
        return None
    assert found.detection is not None, "teacher_window guidance needs a detector (objective.Config checks it)"
    positions = found.detection.guidance_positions()
    t0 = time.perf_counter()
    served = ctx.teacher is None and ctx.objective.guidance_divergence != "cross_entropy"
    report = None  # a served teacher's report on the windows, from the decode that sampled them
    if found.teacher_windows is not None:  # window_ot sampled them at the divergent candidates: reuse them
        windows = found.detection.guidance_windows(found.teacher_windows)
    else:
        windows, report = sample_teacher_windows(ctx, step, positions, seed, report=served)
    sampled = time.perf_counter() - t0 if found.teacher_windows is None else 0.0
    if not positions.numel():
        return Branches(positions=positions, windows=windows, batch=None, teacher=None, window_seconds=sampled)
    if ctx.pack_guidance:
        multiple = width_multiple(ctx.student.modules)
        batch: BranchBatch | PackedBatch = pack_windows(
            step, positions, windows, pad_id=ctx.pad_id, width_multiple=multiple
        )
    else:
        batch = build_branch_batch(step, positions, windows, pad_id=ctx.pad_id, micro_batch_size=step.micro_batch_size)
    if ctx.teacher is not None:  # [sum K', V_local] per branch micro-batch
        teacher = teacher_logits(ctx.teacher, batch.microbatches(), lambda mb, t: batch.window_logits(mb.index, t))
    elif ctx.objective.guidance_divergence == "cross_entropy":  # the cross-entropy on u_j needs no teacher
        teacher = None
    elif found.teacher_window_scores is not None and found.teacher_windows is not None:
        # sampled with every candidate's window (scoring.report_on_windows): keep the guided ones
        rows = found.detection.guidance_rows()
        teacher = found.teacher_window_scores.select_windows(found.teacher_windows.lengths, rows)
    elif report is not None:
        teacher = report
    else:
        assert ctx.scorer is not None
        teacher = served_branch_scores(ctx.scorer, step, positions, windows, ctx.top_k)
    return Branches(positions=positions, windows=windows, batch=batch, teacher=teacher, window_seconds=sampled)


@dataclass(kw_only=True, slots=True)
class RolloutLoss:
    """Pass 1's loss function: the OPD term (suppression, on_path guidance) of one rollout micro-batch."""

    cfg: objective.Config
    """The objective without teacher_window guidance (pass 2 adds it)."""
    step: StepBatch
    tokens: TokenBatch
    teacher: TeacherScores
    detection: Detection | None
    weights: Tensor
    """[N] step-wide normaliser weights n_t."""
    scale: float
    """Micro-batches x data-parallel size: undoes Megatron's averaging so gradients are the step objective's."""
    ctx: ScoringContext
    inject_nan: bool = False
    diagnostics: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, mb: MicroBatch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        a, b = self.step.position_range(mb.index)
        tokens = microbatch_tokens(self.tokens, a, b)
        teacher = teacher_view(self.teacher, mb.index, a, b, logits.device)
        terms = objective.token_terms(
            self.cfg, tokens, logits[:, :-1], teacher, vocab_size=self.ctx.vocab_size, group=self.ctx.tp_group
        )
        det = self.detection.restrict(a, b) if self.detection is not None else None
        value, metrics = objective.loss(self.cfg, tokens, terms, det, weights=self.weights[a:b])
        if self.inject_nan:
            value = value * float("nan")
        self.diagnostics.append(metrics)
        return value * self.scale, {"value": value.detach().clone()}


@dataclass(kw_only=True, slots=True)
class BranchLoss:
    """Pass 2's loss function: lambda * teacher_window guidance on one branch micro-batch's windows."""

    cfg: objective.Config
    branches: Branches
    weights: Tensor
    """[N] step-wide normaliser weights n_t (a branch weighs as its anchor)."""
    scale: float
    ctx: ScoringContext

    def __call__(self, mb: MicroBatch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        br = self.branches
        assert br.batch is not None
        rows = br.batch.rows_of(mb.index)
        if len(rows) == 0:
            return logits.sum() * 0.0, {"value": torch.zeros(())}
        sel = torch.arange(rows.start, rows.stop, dtype=torch.long)
        windows = br.windows.select(sel)
        if isinstance(br.teacher, ServedTeacher):
            teacher = br.teacher.window_rows(br.windows.lengths, rows)
        else:
            teacher = br.teacher[mb.index] if br.teacher is not None else None
        terms = objective.branch_terms(
            self.cfg,
            br.positions[sel],
            windows,
            br.batch.window_logits(mb.index, logits),
            teacher,
            vocab_size=self.ctx.vocab_size,
            group=self.ctx.tp_group,
        )
        value = self.cfg.guidance_coef * objective.teacher_window_loss(self.cfg, self.weights[br.positions[sel]], terms)
        return value * self.scale, {"value": value.detach().clone()}


@dataclass(kw_only=True, slots=True)
class PackedLoss:
    """The one pass over packed rows (algorithm/packing.py): pass 1's OPD term on the rollout columns plus pass 2's
    guidance on the window rows of the same logits; both scaled as their own passes were."""

    rollout: RolloutLoss
    guidance: BranchLoss
    width: int
    """S: the rollout columns of a packed row."""

    def __call__(self, mb: MicroBatch, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        value, out = self.rollout(mb, logits[:, : self.width])
        g_value, g_out = self.guidance(mb, logits)
        return value + g_value, {"value": out["value"], "guidance": g_out["value"]}


def rollout_objective(
    cfg: objective.Config, weights: Tensor, detection: Detection | None
) -> tuple[objective.Config, Tensor]:
    """Pass 1's objective and weights n_t: with teacher_window guidance (pass 2's windows) the OPD term alone, its
    weight 0 at the guided anchors when the window replaces it there (guidance_replaces_opd); else `cfg` as is."""
    if cfg.guidance != "teacher_window":
        return cfg, weights
    if cfg.guidance_replaces_opd and detection is not None:
        weights = weights.clone()
        weights[detection.guidance_positions().to(weights.device)] = 0.0
    return dataclasses.replace(cfg, guidance="none", guidance_budget=None, guidance_replaces_opd=False), weights


def _sum_values(outputs: list[dict[str, Tensor]]) -> Tensor:
    return sum((o["value"] for o in outputs), torch.zeros(()))


def backward(
    ctx: StepContext, step: StepBatch, scores: Scores, found: Detected, branches: Branches | None, *, inject_nan: bool
) -> Gradients:
    """Phase 4 (collective): both passes through get_forward_backward_func (one pass over packed rows when the
    branches are packed); gradients add up in the DDP buffers and are reduced once by `finalize_model_grads`."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    sc, student = ctx.scoring, ctx.scoring.student
    cfg = sc.objective
    weights = objective.normalizer(cfg, scores.tokens, group=sc.dp_group)
    dp = ps.get_data_parallel_world_size()
    for m in student.modules:
        m.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    mbs = step.microbatches()
    rollout_cfg, rollout_weights = rollout_objective(cfg, weights, found.detection)
    rollout_loss = RolloutLoss(
        cfg=rollout_cfg,
        step=step,
        tokens=scores.tokens,
        teacher=scores.teacher,
        detection=found.detection,
        weights=rollout_weights,
        scale=len(mbs) * dp,
        ctx=sc,
        inject_nan=inject_nan,
    )
    out2: list[dict[str, Tensor]] = []
    if branches is not None and isinstance(branches.batch, PackedBatch):  # one pass: rollouts and their windows
        guidance = BranchLoss(cfg=cfg, branches=branches, weights=weights, scale=len(mbs) * dp, ctx=sc)
        packed = PackedLoss(rollout=rollout_loss, guidance=guidance, width=branches.batch.rollout_width)
        out1 = run_pipeline(student.modules, branches.batch.microbatches(), packed, forward_only=False)
        out2 = [{"value": o["guidance"]} for o in out1]
    else:
        out1 = run_pipeline(student.modules, mbs, rollout_loss, forward_only=False)
        if branches is not None and branches.batch is not None:
            branch_mbs = branches.batch.microbatches()
            branch_loss = BranchLoss(cfg=cfg, branches=branches, weights=weights, scale=len(branch_mbs) * dp, ctx=sc)
            out2 = run_pipeline(student.modules, branch_mbs, branch_loss, forward_only=False)
    finalize_model_grads(student.modules)  # DP all-reduce / reduce-scatter, SP norms, tied embeddings: once
    return Gradients(
        opd_value=_sum_values(out1), guidance_value=_sum_values(out2), diagnostics=rollout_loss.diagnostics
    )


def apply_update(ctx: StepContext, grads: Gradients) -> Update:
    """Phase 5 (collective): every rank agrees on skipping (the loss lives on the last stage only); a skipped step
    drops its gradients and leaves the weights and optimizer state as they were."""
    from megatron.core import parallel_state as ps

    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    total = float(grads.opd_value + grads.guidance_value)
    finite = torch.tensor([1.0 if (not last_stage or math.isfinite(total)) else 0.0])
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1.0:
        for m in ctx.scoring.student.modules:
            m.zero_grad_buffer()
        return Update(skipped=True, grad_norm=math.nan)
    ok, grad_norm, _ = ctx.optimizer.step()
    ctx.scheduler.step(increment=1)
    return Update(skipped=not ok, grad_norm=float(grad_norm) if grad_norm is not None else math.nan)


def train_step(ctx: StepContext, step: StepBatch, *, window_seed: int, inject_nan: bool = False) -> dict[str, float]:
    """Run one step (collective); returns metrics (meaningful on the last pipeline stage; see `gather_metrics`).
    `window_seed` seeds this step's window sampling; `inject_nan` multiplies the loss by NaN (tests the skip path)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    scores, found, times["time/score_s"] = score_and_detect(ctx.scoring, step, window_seed=window_seed)
    times["time/detect_s"] = time.perf_counter() - t0 - times["time/score_s"]
    if isinstance(ctx.scoring.engine, SamplingSpan):  # time slicing: the student servers give the GPUs back now
        t0 = time.perf_counter()
        ctx.scoring.engine.end_sampling()
        times["time/swap_out_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    branches = build_branches(ctx.scoring, step, found, seed=window_seed)
    times["time/branch_score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = backward(ctx, step, scores, found, branches, inject_nan=inject_nan)
    times["time/backward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    update = apply_update(ctx, grads)
    times["time/update_s"] = time.perf_counter() - t0
    times["time/windows_s"] = found.window_seconds + (branches.window_seconds if branches is not None else 0.0)
    shape = {"step/rollout_tokens": float(step.tokens.numel())}  # B x S: what guidance/train_tokens compares to
    return step_metrics(ctx, grads, update, found, branches) | times | shape


def step_metrics(
    ctx: StepContext, grads: Gradients, update: Update, found: Detected, branches: Branches | None
) -> dict[str, float]:
    """The step's metrics: per-micro-batch diagnostics merged, loss totals, optimizer state, detection, guidance."""
    metrics = _merge(grads.diagnostics)
    metrics["loss"] = float((grads.opd_value + grads.guidance_value).double())
    metrics["loss/opd_total"] = float(grads.opd_value)
    metrics["loss/guidance_total"] = float(grads.guidance_value)
    metrics["grad_norm"] = update.grad_norm
    metrics["skipped"] = float(update.skipped)
    metrics["lr"] = float(ctx.optimizer.param_groups[0]["lr"])
    metrics["teacher/colocated"] = float(ctx.scoring.teacher is not None)  # 0: served by SGLang, no Megatron teacher
    if found.detection is not None:
        metrics.update(found.detection.metrics)
        u = found.teacher_windows
        metrics["detect/windows_generated"] = float(u.tokens.shape[0]) if u is not None else 0.0
    if branches is not None:
        metrics["guidance/windows"] = float(branches.positions.numel())
        metrics["guidance/tokens"] = float(branches.windows.lengths.sum())
        if branches.batch is not None:  # tokens the branch training processes, padding included
            b = branches.batch
            width = b.width - b.rollout_width if isinstance(b, PackedBatch) else b.tokens.shape[1]
            metrics["guidance/train_tokens"] = float(b.tokens.shape[0] * width)
            metrics["guidance/packed"] = float(isinstance(b, PackedBatch))
    return metrics


def _merge(per_mb: list[dict[str, float]]) -> dict[str, float]:
    """Mean over micro-batches of per-micro-batch diagnostics (loss shares and times are summed)."""
    out: dict[str, float] = {}
    if not per_mb:
        return out
    for key in per_mb[0]:
        if key.startswith("detect/"):
            continue  # step-wide, added from the detection itself
        vals = [m[key] for m in per_mb if key in m]
        out[key] = float(sum(vals)) if key.startswith(("loss", "time/")) else float(sum(vals) / len(vals))
    return out
