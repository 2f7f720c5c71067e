"""One TOPD optimisation step on a StepBatch of rollouts (stages 3-6 of the data flow).

    1. score     teacher logits (vocab-sharded, no grad) for every micro-batch; with a detector, also the student's
                 no-grad d_t for the whole step, broadcast from the last pipeline stage to every rank;
    2. detect    candidates over the whole step (one tau per step and data-parallel rank); window_ot samples K
                 teacher tokens after (x, y_<t) at each candidate through the rollout engine;
    3. branches  teacher_window guidance: branch sequences (x, y_<t, u) at the divergent positions, teacher-scored;
    4. backward  pass 1 over the rollout micro-batches (OPD term with suppression, on_path guidance), pass 2 over the
                 branch micro-batches (teacher_window guidance), both through get_forward_backward_func; gradients
                 add up in the DDP buffers and are reduced once by `finalize_model_grads`;
    5. update    skip the step when the loss is not finite, else clip + step the Megatron optimizer and the LR schedule.

Normalisation spans the step: the per-position weights n_t are computed on the whole step (all micro-batches and
data-parallel replicas), and each micro-batch's loss is multiplied by the number of micro-batches (Megatron's
schedule divides by it) and by the data-parallel size (Megatron's DDP averages over replicas), so the gradient is
exactly that of the step's objective.

Teacher served by SGLang (`ctx.teacher is None`): step 1 asks the teacher server for the log-probs (top-k with
teacher_signal='top_k') of every rollout's response tokens, step 3 for those of the branch windows; the loss then
uses the served forms (`objective.ServedTeacher`). Nothing else changes.

Memory: the teacher's rollout logits of the whole step are kept until the backward pass ([B, S, V/TP] per last-stage
rank), in host memory with `train.offload_teacher_logits` (copied back one micro-batch at a time); of the branch
sequences only the window rows are kept ([sum K', V/TP]); the no-grad student pass of the detector keeps only d_t.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from topd_megatron.algorithm import detection, objective
from topd_megatron.algorithm.batch import BranchBatch, StepBatch, build_branch_batch, prefixes, windows_from_generations
from topd_megatron.algorithm.types import Detection, TokenBatch, Windows
from topd_megatron.models.build import MegatronLM
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.training.forward import forward_logits, run_pipeline
from topd_megatron.training.teacher import served_branch_scores, served_rollout_scores, teacher_logits


@dataclass(kw_only=True, slots=True)
class StepContext:
    """What a step needs besides its batch."""

    cfg: objective.Config
    student: MegatronLM
    teacher: MegatronLM | None
    """None: the teacher is served by SGLang (`engine.score`), see objective.teacher_signal."""
    optimizer: Any
    scheduler: Any
    engine: Any
    eos_id: int
    pad_id: int
    window_seed: int
    """Seed of this step's teacher-window sampling."""
    offload_teacher_logits: bool = False
    """Keep the step's teacher logits in host memory until each micro-batch's loss needs them."""
    inject_nan: bool = False
    """Fault injection: multiply this step's loss by NaN (tests the skip path)."""


def _ps() -> Any:
    from megatron.core import parallel_state

    return parallel_state


def _broadcast_from_last_stage(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The last pipeline stage's tensor on every stage of this pipeline."""
    ps = _ps()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        assert t is not None
        return t
    buf = t.to(dtype).contiguous() if t is not None else torch.empty(shape, dtype=dtype)
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return buf


def _embedding_shard(student: MegatronLM) -> torch.Tensor:
    """This TP rank's input-embedding shard [V_local, H], available on every pipeline stage."""
    from megatron.core.utils import unwrap_model

    ps = _ps()
    first = unwrap_model(student.modules[0])
    weight = (
        first.embedding.word_embeddings.weight.detach() if ps.is_pipeline_first_stage(ignore_virtual=True) else None
    )
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return weight
    shape = (student.padded_vocab_size // ps.get_tensor_model_parallel_world_size(), student.provider.hidden_size)
    buf = weight.float().contiguous() if weight is not None else torch.empty(shape, dtype=torch.float32)
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_first_rank(), group=ps.get_pipeline_model_parallel_group())
    return buf


def step_weights(cfg: objective.Config, batch: TokenBatch) -> torch.Tensor:
    """[N] normaliser weights n_t for the whole step across data-parallel replicas (token_mean and sequence_mean
    count tokens / rollouts of every replica; constant divides by the configured N)."""
    ps = _ps()
    dp_group = ps.get_data_parallel_group()
    m = batch.response_mask.float()
    if cfg.normalization == "constant":
        return m / cfg.normalization_constant
    if cfg.normalization == "token_mean":
        total = m.sum().reshape(1)
        dist.all_reduce(total, group=dp_group)  # response tokens of the whole step
        return m / total.clamp(min=1.0)
    n_seq = int(batch.seq_ids.max()) + 1 if batch.num_positions else 0
    per_seq = torch.zeros(n_seq).index_add_(0, batch.seq_ids, m)
    active = (per_seq > 0).sum().float().reshape(1)
    dist.all_reduce(active, group=dp_group)  # rollouts with a response, whole step
    return m / (per_seq[batch.seq_ids].clamp(min=1.0) * active.clamp(min=1.0))


def _slice(batch: TokenBatch, start: int, stop: int) -> TokenBatch:
    lp = None if batch.rollout_logprobs is None else batch.rollout_logprobs[start:stop]
    seq = batch.seq_ids[start:stop]
    return TokenBatch(
        tokens=batch.tokens[start:stop],
        seq_ids=seq - seq.min() if seq.numel() else seq,
        response_mask=batch.response_mask[start:stop],
        rollout_logprobs=lp,
    )


def _sample_windows(ctx: StepContext, step: StepBatch, positions: torch.Tensor, model: str) -> Windows:
    k = ctx.cfg.detection.window
    params = SamplingParams(temperature=1.0, max_new_tokens=k, stop_token_ids=(ctx.eos_id,), seed=ctx.window_seed)
    gens = ctx.engine.generate(prefixes(step, positions), params, model=model) if positions.numel() else []
    return windows_from_generations(gens, k)


def detect_step(
    ctx: StepContext, cfg: objective.Config, step: StepBatch, tb: TokenBatch, d_step: torch.Tensor
) -> tuple[Detection, Windows | None]:
    """Candidates over the whole step and the detector's decisions (collective: window_ot samples teacher windows
    through the engine). Returns (detection, teacher windows per candidate or None)."""
    kw = {"vocab_size": ctx.student.vocab_size, "group": _ps().get_tensor_model_parallel_group()}
    cands = detection.select_candidates(cfg.detection, tb, d_step)
    extra: dict[str, Any] = {}
    u = None
    if cfg.detection.detector == "window_ot":
        u = _sample_windows(ctx, step, cands.positions, "teacher")
        if cfg.detection.student_window == "fresh":
            extra["student_windows"] = _sample_windows(ctx, step, cands.positions, "student")
        extra["embedding"] = _embedding_shard(ctx.student)
    return detection.detect(cfg.detection, tb, cands, d_step, teacher_windows=u, **extra, **kw), u


def _teacher_of(
    t_scores: list[torch.Tensor] | objective.ServedTeacher, microbatch: int, a: int, b: int, device: torch.device
) -> Any:
    """What `objective.token_terms` takes for micro-batch `microbatch` (positions [a, b)): its teacher logits
    [mb, S - 1, V_local] (on `device`: they may wait in host memory) or the served report's slice."""
    if isinstance(t_scores, objective.ServedTeacher):
        return t_scores.slice(a, b)
    return t_scores[microbatch][:, :-1].to(device, non_blocking=True)


def _top_k(cfg: objective.Config) -> int:
    return cfg.teacher_top_k if cfg.teacher_signal == "top_k" else 0


def step_divergence(
    ctx: StepContext,
    cfg: objective.Config,
    step: StepBatch,
    tb: TokenBatch,
    t_logits: list[torch.Tensor] | objective.ServedTeacher,
) -> torch.Tensor:
    """The student's no-grad d_t [N] for the whole step, on every rank (computed on the last pipeline stage).
    `t_logits`: the teacher's logits per micro-batch, or a served teacher's report on the step's positions."""
    ps = _ps()
    kw = {"vocab_size": ctx.student.vocab_size, "group": ps.get_tensor_model_parallel_group()}

    def divergence_of(mb: Any, s_l: torch.Tensor) -> torch.Tensor:  # per micro-batch: no whole-step student logits
        a, b = step.position_range(mb.index)
        teacher = _teacher_of(t_logits, mb.index, a, b, s_l.device)
        terms = objective.token_terms(cfg, _slice(tb, a, b), s_l[:, :-1], teacher, **kw)
        return terms.divergence.detach().float()

    parts = forward_logits(ctx.student.modules, step.microbatches(), divergence_of)
    d_local = torch.cat(parts) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
    return _broadcast_from_last_stage(d_local, (tb.num_positions,), torch.float32)


def train_step(ctx: StepContext, step: StepBatch) -> dict[str, float]:
    """Run one step; returns metrics (meaningful on the last pipeline stage; see `gather_metrics`)."""
    ps = _ps()
    cfg, student, teacher = ctx.cfg, ctx.student, ctx.teacher
    tp_group = ps.get_tensor_model_parallel_group()
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    kw = {"vocab_size": student.vocab_size, "group": tp_group}
    times: dict[str, float] = {}
    mbs = step.microbatches()
    tb = step.token_batch()

    # 1. score
    t0 = time.perf_counter()
    if teacher is None:
        t_logits = served_rollout_scores(ctx.engine, step, _top_k(cfg))
    else:
        offload = ctx.offload_teacher_logits and torch.cuda.is_available()
        t_logits = teacher_logits(teacher, mbs, (lambda mb, t: t.to("cpu", non_blocking=True)) if offload else None)
    d_step = step_divergence(ctx, cfg, step, tb, t_logits) if cfg.detection.detector != "none" else None
    times["time/score_s"] = time.perf_counter() - t0

    # 2. detect
    t0 = time.perf_counter()
    det, u = detect_step(ctx, cfg, step, tb, d_step) if cfg.detection.detector != "none" else (None, None)
    times["time/detect_s"] = time.perf_counter() - t0

    # 3. branches for teacher_window guidance
    t0 = time.perf_counter()
    branch: BranchBatch | None = None
    g_pos = g_win = t_branch = None
    if cfg.guidance == "teacher_window":
        g_pos = det.guidance_positions()
        g_win = det.guidance_windows(u) if u is not None else _sample_windows(ctx, step, g_pos, "teacher")
        if g_pos.numel():
            branch = build_branch_batch(step, g_pos, g_win, pad_id=ctx.pad_id, micro_batch_size=step.micro_batch_size)
            if teacher is None:  # the cross-entropy on u_j needs nothing from the teacher
                ce = cfg.guidance_divergence == "cross_entropy"
                t_branch = None if ce else served_branch_scores(ctx.engine, step, g_pos, g_win, _top_k(cfg))
            else:  # only the window rows of each branch are kept: [sum K', V_local] per micro-batch
                t_branch = teacher_logits(
                    teacher, branch.microbatches(), lambda mb, t: branch.window_logits(mb.index, t)
                )
    times["time/branch_score_s"] = time.perf_counter() - t0

    # 4. backward
    t0 = time.perf_counter()
    weights = step_weights(cfg, tb)
    dp = ps.get_data_parallel_world_size()
    pass1_cfg = dataclasses.replace(cfg, guidance="none") if cfg.guidance == "teacher_window" else cfg
    for m in student.modules:
        m.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    collected: list[dict[str, float]] = []

    def rollout_loss(mb: Any, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        a, b = step.position_range(mb.index)
        mtb = _slice(tb, a, b)
        teacher_mb = _teacher_of(t_logits, mb.index, a, b, logits.device)
        terms = objective.token_terms(pass1_cfg, mtb, logits[:, :-1], teacher_mb, **kw)
        mdet = det.restrict(a, b) if det is not None else None
        value, metrics = objective.loss(pass1_cfg, mtb, terms, mdet, weights=weights[a:b])
        if ctx.inject_nan:
            value = value * float("nan")
        collected.append(metrics)
        return value * len(mbs) * dp, {"value": value.detach().clone()}

    out1 = run_pipeline(student.modules, mbs, rollout_loss, forward_only=False)
    guidance_value = torch.zeros(())
    if branch is not None:
        branch_mbs = branch.microbatches()

        def branch_loss(mb: Any, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
            rows = branch.rows_of(mb.index)
            if len(rows) == 0:
                return logits.sum() * 0.0, {"value": torch.zeros(())}
            sel = torch.tensor(list(rows), dtype=torch.long)
            win = Windows(tokens=g_win.tokens[sel], lengths=g_win.lengths[sel])
            s_w = branch.window_logits(mb.index, logits)
            if isinstance(t_branch, objective.ServedTeacher):  # packed over all windows: take this micro-batch's
                offsets = torch.cumsum(g_win.lengths, 0) - g_win.lengths
                lo, hi = int(offsets[rows.start]), int(offsets[rows.stop - 1] + g_win.lengths[rows.stop - 1])
                t_w = t_branch.slice(lo, hi)
            elif t_branch is not None:
                t_w = t_branch[mb.index]
            else:
                t_w = None
            bt = objective.branch_terms(cfg, g_pos[sel], win, s_w, t_w, **kw)
            value = cfg.guidance_coef * objective.teacher_window_loss(cfg, weights[g_pos[sel]], bt)
            return value * len(branch_mbs) * dp, {"value": value.detach().clone()}

        out2 = run_pipeline(student.modules, branch_mbs, branch_loss, forward_only=False)
        if last_stage:
            guidance_value = sum((o["value"] for o in out2), torch.zeros(()))
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(student.modules)  # DP all-reduce / reduce-scatter, SP norms, tied embeddings: once
    times["time/backward_s"] = time.perf_counter() - t0

    # 5. update (every rank must agree on skipping: the loss lives on the last stage only)
    t0 = time.perf_counter()
    opd_value = sum((o["value"] for o in out1), torch.zeros(())) if last_stage else torch.zeros(())
    total = (opd_value + guidance_value).reshape(1).double()
    finite = torch.tensor([1.0 if (not last_stage or math.isfinite(float(total))) else 0.0])
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    skipped = finite.item() < 1.0
    grad_norm = math.nan
    if skipped:
        for m in student.modules:
            m.zero_grad_buffer()  # drop the non-finite gradients; the weights and optimizer state stay as they were
    else:
        ok, grad_norm, _ = ctx.optimizer.step()
        ctx.scheduler.step(increment=1)
        skipped = not ok
    times["time/update_s"] = time.perf_counter() - t0

    metrics = _merge(collected)
    metrics.update(times)
    metrics["loss"] = float(total)
    metrics["loss/opd_total"] = float(opd_value)
    metrics["loss/guidance_total"] = float(guidance_value)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
    metrics["skipped"] = float(skipped)
    metrics["lr"] = float(ctx.optimizer.param_groups[0]["lr"])
    metrics["teacher/colocated"] = float(teacher is not None)  # 0: served by SGLang, no Megatron teacher built
    if det is not None:
        metrics.update(det.metrics)
        metrics["detect/windows_generated"] = float(u.tokens.shape[0]) if u is not None else 0.0
    if g_pos is not None:
        metrics["guidance/windows"] = float(g_pos.numel())
        metrics["guidance/tokens"] = float(g_win.lengths.sum()) if g_win is not None else 0.0
    return metrics


def _merge(per_mb: list[dict[str, float]]) -> dict[str, float]:
    """Mean over micro-batches of per-micro-batch diagnostics (loss shares are summed)."""
    out: dict[str, float] = {}
    if not per_mb:
        return out
    for key in per_mb[0]:
        if key.startswith("detect/"):
            continue  # step-wide, added from the detection itself
        vals = [m[key] for m in per_mb if key in m]
        out[key] = float(sum(vals)) if key.startswith(("loss", "time/")) else float(sum(vals) / len(vals))
    return out
