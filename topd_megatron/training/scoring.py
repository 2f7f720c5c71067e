"""Phases 1-2 of a step, shared by training and the oracle: score a step's rollouts, then detect divergences.

    ctx = scoring_context(objective, student, teacher, engine, tokenizer)     # no optimizer: scoring only
    scores = score(ctx, step)                           # teacher logits per micro-batch (or a served report); d_t
    found = detect(ctx, step, scores, window_seed=s)    # candidates, D_t, tau, decisions; window_ot's teacher windows

`score` keeps the teacher's vocab-sharded logits of every micro-batch (`[b, S, V/TP]` on the last pipeline stage,
in host memory with `offload_teacher_logits`), or asks a served teacher (`ctx.teacher is None`) for its log-probs of
every response token. With a detector it also runs the student without gradients and keeps only d_t `[N]`,
broadcast from the last pipeline stage so that every rank detects the same positions. `detect` selects the
candidates over the whole step (one tau per step and data-parallel rank) and, for window_ot, samples K teacher tokens
after (x, y_<t) at each candidate through the rollout engine (and K student tokens with student_window='fresh').
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from topd_megatron.algorithm import detection, objective
from topd_megatron.algorithm.batch import StepBatch, prefixes, windows_from_generations
from topd_megatron.algorithm.budget import within_budget
from topd_megatron.algorithm.objective import ServedTeacher
from topd_megatron.algorithm.types import Detection, TokenBatch, Windows
from topd_megatron.models.build import MegatronLM
from topd_megatron.models.positions import packing_unsupported_reason
from topd_megatron.rollout.engine import (
    AsyncTeacherScorer,
    PairedWindowSampler,
    RolloutEngine,
    SamplingParams,
    TeacherScorer,
    WindowSampler,
)
from topd_megatron.tasks import ChoiceKind, LabelsChoices
from topd_megatron.training.forward import MicroBatch, broadcast_from_last_stage, forward_logits
from topd_megatron.training.teacher import (
    generated_window_scores,
    served_rollout_scores,
    start_served_rollout_scores,
    teacher_logits,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)

TeacherScores = list[Tensor] | ServedTeacher
"""The teacher's side of a step: its vocab-sharded logits per micro-batch, or a served teacher's report."""


@dataclass(kw_only=True, slots=True)
class ScoringContext:
    """What scoring and detection need: the objective, both models, the engine and the vocabulary shards."""

    objective: objective.Config
    student: MegatronLM
    teacher: MegatronLM | None
    """None: the teacher is served (`scorer`), see objective.teacher_signal."""
    engine: RolloutEngine
    scorer: TeacherScorer | None
    """The server scoring for a served teacher (the SGLang engine); None with a colocated teacher."""
    eos_id: int
    pad_id: int
    tp_group: ProcessGroup
    """The tensor-parallel group the vocabulary is sharded over."""
    dp_group: ProcessGroup
    """The data-parallel group (step-wide normalisation)."""
    offload_teacher_logits: bool = False
    """Keep the step's teacher logits in host memory until each micro-batch's loss needs them (GPU only)."""
    choices: ChoiceLabeller | None = None
    """The task's labels of its choices (the oracle detector); None when the task cannot label them."""
    pack_guidance: bool = False
    """teacher_window guidance: pack each rollout's windows after it (algorithm/packing.py) instead of one whole-prefix
    row per window; `scoring_context` sets it only where the models can (models.positions)."""

    @property
    def vocab_size(self) -> int:
        """The true vocabulary: logits at ids >= this are padding."""
        return self.student.vocab_size

    @property
    def top_k(self) -> int:
        """k of a served teacher's top-k report (0: the sampled-token form or a colocated teacher)."""
        return self.objective.teacher_top_k if self.objective.teacher_signal == "top_k" else 0


@dataclass(kw_only=True, slots=True)
class ChoiceLabeller:
    """The task's own labels of a step's positions (`tasks.LabelsChoices`), through the tokenizer."""

    task: LabelsChoices
    tokenizer: Any

    def kinds(self, step: StepBatch, positions: Tensor) -> list[ChoiceKind | None]:
        """For each flat target position: the kind of choice its token makes, given the row's prompt and the
        response tokens before it."""
        s1 = step.targets_per_row
        out: list[ChoiceKind | None] = []
        for p in positions.tolist():
            row, j = p // s1, p % s1 + 1  # the target token is tokens[row, j]
            response = step.response_mask[row].nonzero().flatten()
            first = int(response[0]) if response.numel() else j
            prompt = self.tokenizer.decode(step.tokens[row, :first].tolist(), skip_special_tokens=True)
            prefix = self.tokenizer.decode(step.tokens[row, first:j].tolist(), skip_special_tokens=True)
            out.append(self.task.choice_kind(prompt, prefix))
        return out


def scoring_context(
    cfg: objective.Config,
    student: MegatronLM,
    teacher: MegatronLM | None,
    engine: RolloutEngine,
    *,
    eos_id: int,
    pad_id: int,
    offload_teacher_logits: bool = False,
    choices: ChoiceLabeller | None = None,
    pack_guidance: bool = True,
) -> ScoringContext:
    """A ScoringContext on this rank's parallel groups. A served teacher (teacher=None) needs an engine that scores;
    the oracle detector needs `choices`. `pack_guidance` is kept only when the student (and a colocated teacher) can
    run packed rows; otherwise a warning says why and the per-branch rows are used (the same numbers, more compute)."""
    from megatron.core import parallel_state as ps

    if cfg.detection.detector == "oracle" and choices is None:
        raise ValueError(
            "objective.detection.detector='oracle' needs a task that labels its choices (tasks.LabelsChoices,"
            " e.g. topd_megatron.tasks.drift:default); this task does not"
        )

    scorer = None
    if teacher is None:
        if not isinstance(engine, TeacherScorer):
            raise ValueError(
                f"no Megatron teacher and the {type(engine).__name__} rollout engine cannot score sequences: a served"
                " teacher needs rollout=sglang with sglang.teacher set"
            )
        scorer = engine
    if pack_guidance and cfg.guidance == "teacher_window":
        modules = student.modules + (teacher.modules if teacher is not None else [])
        reason = packing_unsupported_reason(modules)
        if reason is not None:
            log.warning("packed guidance windows are off: %s; training on one whole-prefix row per window", reason)
            pack_guidance = False
    return ScoringContext(
        objective=cfg,
        student=student,
        teacher=teacher,
        engine=engine,
        scorer=scorer,
        eos_id=eos_id,
        pad_id=pad_id,
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        offload_teacher_logits=offload_teacher_logits,
        choices=choices,
        pack_guidance=pack_guidance and cfg.guidance == "teacher_window",
    )


@dataclass(kw_only=True, slots=True)
class Scores:
    """Phase 1: the step's positions, the teacher's side and the student's no-grad d_t."""

    tokens: TokenBatch
    """The step's positions (N = B * (S - 1)), `StepBatch.token_batch()`."""
    teacher: TeacherScores
    divergence: Tensor | None
    """[N] float32 no-grad d_t on every rank (with a detector), else None."""


@dataclass(kw_only=True, slots=True)
class Detected:
    """Phase 2: the detector's decisions and the teacher windows sampled for them."""

    detection: Detection | None
    """None without a detector."""
    teacher_windows: Windows | None
    """window_ot: one teacher window per candidate (in candidate order); else None."""
    window_seconds: float = 0.0
    """Wall time of the window sampling (teacher, and fresh student windows) through the engine."""
    teacher_window_scores: ServedTeacher | None = None
    """A served teacher's report on every candidate's teacher window (packed window after window, candidate order),
    taken from the decode that sampled them (`report_on_windows`); None: phase 3 scores the branches."""


def teacher_view(
    teacher: TeacherScores, microbatch: int, start: int, stop: int, device: torch.device
) -> Tensor | ServedTeacher:
    """What `objective.token_terms` takes for micro-batch `microbatch` (positions [start, stop)): its teacher logits
    [mb, S - 1, V_local] (moved to `device`: they may wait in host memory) or the served report's slice."""
    if isinstance(teacher, ServedTeacher):
        return teacher.slice(start, stop)
    return teacher[microbatch][:, :-1].to(device, non_blocking=True)


def microbatch_tokens(tokens: TokenBatch, start: int, stop: int) -> TokenBatch:
    """Positions [start, stop) of a step's TokenBatch (a micro-batch's share), rollout ids renumbered from 0."""
    lp = None if tokens.rollout_logprobs is None else tokens.rollout_logprobs[start:stop]
    seq = tokens.seq_ids[start:stop]
    return TokenBatch(
        tokens=tokens.tokens[start:stop],
        seq_ids=seq - seq.min() if seq.numel() else seq,
        response_mask=tokens.response_mask[start:stop],
        rollout_logprobs=lp,
    )


def teacher_scores(ctx: ScoringContext, step: StepBatch) -> TeacherScores:
    """The teacher's side of the step: its logits per micro-batch (colocated) or the server's report."""
    if ctx.teacher is None:
        assert ctx.scorer is not None
        return served_rollout_scores(ctx.scorer, step, ctx.top_k)
    offload = ctx.offload_teacher_logits and torch.cuda.is_available()
    to_host = (lambda mb, t: t.to("cpu", non_blocking=True)) if offload else None
    return teacher_logits(ctx.teacher, step.microbatches(), to_host)


@dataclass(kw_only=True, slots=True)
class _DivergenceOf:
    """forward_logits reduction: a micro-batch's no-grad d_t, so no whole-step student logits are kept."""

    ctx: ScoringContext
    step: StepBatch
    tokens: TokenBatch
    teacher: TeacherScores

    def __call__(self, mb: MicroBatch, logits: Tensor) -> Tensor:
        a, b = self.step.position_range(mb.index)
        teacher = teacher_view(self.teacher, mb.index, a, b, logits.device)
        terms = objective.token_terms(
            self.ctx.objective,
            microbatch_tokens(self.tokens, a, b),
            logits[:, :-1],
            teacher,
            vocab_size=self.ctx.vocab_size,
            group=self.ctx.tp_group,
        )
        return terms.divergence.detach().float()


def step_divergence(ctx: ScoringContext, step: StepBatch, tokens: TokenBatch, teacher: TeacherScores) -> Tensor:
    """The student's no-grad d_t [N] for the whole step, on every rank (computed on the last pipeline stage)."""
    from megatron.core import parallel_state as ps

    parts = forward_logits(
        ctx.student.modules, step.microbatches(), _DivergenceOf(ctx=ctx, step=step, tokens=tokens, teacher=teacher)
    )
    d_local = torch.cat(parts) if ps.is_pipeline_last_stage(ignore_virtual=True) else None
    return broadcast_from_last_stage(d_local, (tokens.num_positions,), torch.float32)


def score(ctx: ScoringContext, step: StepBatch, *, teacher: TeacherScores | None = None) -> Scores:
    """Phase 1 (collective): the teacher's side of every position (`teacher`, when it was taken already) and, with
    a detector, the student's d_t."""
    tokens = step.token_batch()
    teacher = teacher_scores(ctx, step) if teacher is None else teacher
    d = step_divergence(ctx, step, tokens, teacher) if ctx.objective.detection.detector != "none" else None
    return Scores(tokens=tokens, teacher=teacher, divergence=d)


def window_params(ctx: ScoringContext, seed: int) -> SamplingParams:
    """K tokens at temperature 1, stopping at EOS."""
    k = ctx.objective.detection.window
    return SamplingParams(temperature=1.0, max_new_tokens=k, stop_token_ids=(ctx.eos_id,), seed=seed)


def sample_window_pair(
    ctx: ScoringContext, step: StepBatch, positions: Tensor, seed: int, *, first_window: int = 0, report: bool = False
) -> tuple[Windows, Windows, ServedTeacher | None]:
    """The teacher's and the student's windows after (x, y_<t) at each flat position t: both at once where the engine
    serves the two models from different servers (PairedWindowSampler), else one after the other; the same requests
    either way (each window's seed depends on its index in `positions` only). `report`: also the served teacher's
    report on its windows' tokens (`sample_teacher_windows`)."""
    if positions.numel() and isinstance(ctx.engine, PairedWindowSampler):
        params = window_params(ctx, seed)
        top_k = ctx.top_k if report else 0
        gens = ctx.engine.generate_window_pair(
            step.tokens, positions, params, first_window=first_window, teacher_top_k=top_k
        )
        k = ctx.objective.detection.window
        scores = generated_window_scores(gens["teacher"], k, top_k) if report else None
        return windows_from_generations(gens["teacher"], k), windows_from_generations(gens["student"], k), scores
    u, scores = sample_teacher_windows(ctx, step, positions, seed, report=report)
    return u, sample_windows(ctx, step, positions, "student", seed), scores


def sample_teacher_windows(
    ctx: ScoringContext, step: StepBatch, positions: Tensor, seed: int, *, first_window: int = 0, report: bool = False
) -> tuple[Windows, ServedTeacher | None]:
    """The teacher's windows at `positions` (`sample_windows`) and, with `report` and a served engine
    (PairedWindowSampler), the teacher's report on their tokens (`generated_window_scores`: packed window after
    window, what `served_branch_scores` would return) taken from the decode that sampled them; else None."""
    if not (report and isinstance(ctx.engine, PairedWindowSampler)):
        return sample_windows(ctx, step, positions, "teacher", seed, first_window=first_window), None
    k = ctx.objective.detection.window
    if not positions.numel():
        return windows_from_generations([], k), generated_window_scores([], k, ctx.top_k)
    gens = ctx.engine.generate_windows(
        step.tokens, positions, window_params(ctx, seed), model="teacher", first_window=first_window, top_k=ctx.top_k
    )
    return windows_from_generations(gens, k), generated_window_scores(gens, k, ctx.top_k)


def sample_windows(
    ctx: ScoringContext, step: StepBatch, positions: Tensor, model: str, seed: int, *, first_window: int = 0
) -> Windows:
    """K tokens sampled at temperature 1 after (x, y_<t) for each flat position t, from the student or the teacher
    (`first_window`: the windows before these in a step sampled in parts, served engines only)."""
    k = ctx.objective.detection.window
    params = window_params(ctx, seed)
    if not positions.numel():
        return windows_from_generations([], k)
    if isinstance(ctx.engine, PairedWindowSampler):  # served: window i seeded as window first_window + i of the step
        gens = ctx.engine.generate_windows(step.tokens, positions, params, model=model, first_window=first_window)
    elif isinstance(ctx.engine, WindowSampler):  # per rollout: each rollout's prefix computed once for its windows
        gens = ctx.engine.generate_windows(step.tokens, positions, params, model=model)
    else:
        gens = ctx.engine.generate(prefixes(step, positions), params, model=model)
    return windows_from_generations(gens, k)


def student_embedding_shard(student: MegatronLM) -> Tensor:
    """This TP rank's input-embedding shard [V_local, H], available on every pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    first_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
    weight = unwrap_model(student.modules[0]).embedding.word_embeddings.weight.detach() if first_stage else None
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return weight
    shape = (student.padded_vocab_size // ps.get_tensor_model_parallel_world_size(), student.provider.hidden_size)
    buf = weight.float().contiguous() if weight is not None else torch.empty(shape, dtype=torch.float32)
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_first_rank(), group=ps.get_pipeline_model_parallel_group())
    return buf


def random_anchors(tokens: TokenBatch, counts: Tensor, seed: int) -> Tensor:
    """[G] ascending positions: `counts[b]` response positions of rollout b drawn uniformly without replacement
    (the random-placement control; the same draw on every rank for the same seed)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    chosen = []
    for b, n in enumerate(counts.tolist()):
        resp = ((tokens.seq_ids == b) & tokens.response_mask).nonzero().flatten().cpu()
        if n and resp.numel():
            chosen.append(resp[torch.randperm(resp.numel(), generator=gen)[: min(n, resp.numel())]])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.zeros(0, dtype=torch.long)


def detect(
    ctx: ScoringContext, step: StepBatch, scores: Scores, *, window_seed: int, sampled: SampledWindows | None = None
) -> Detected:
    """Phase 2 (collective: window_ot samples windows through the engine): candidates over the whole step and the
    detector's decisions, with the teacher windows it sampled (or those `score_and_detect` sampled part by part:
    `sampled`). With guidance_at='random', guidance then acts at as many random response positions of each rollout
    as it has divergent candidates (`place_guidance`)."""
    cfg = ctx.objective.detection
    if cfg.detector == "none":
        return Detected(detection=None, teacher_windows=None)
    assert scores.divergence is not None, "score() computes d_t whenever a detector is configured"
    cands = detection.select_candidates(cfg, scores.tokens, scores.divergence)
    u = student_windows = embedding = kinds = window_scores = None
    t0 = time.perf_counter()
    if cfg.detector == "window_ot":
        if sampled is not None:  # candidates are chosen rollout by rollout: the parts' are the step's
            assert torch.equal(sampled.positions, cands.positions), "the parts' candidates differ from the step's"
            u, student_windows, window_scores = sampled.teacher, sampled.student, sampled.teacher_scores
        elif cfg.student_window == "fresh":
            u, student_windows, window_scores = sample_window_pair(
                ctx, step, cands.positions, window_seed, report=report_on_windows(ctx)
            )
        else:
            u, window_scores = sample_teacher_windows(
                ctx, step, cands.positions, window_seed, report=report_on_windows(ctx)
            )
        embedding = student_embedding_shard(ctx.student)
    seconds = time.perf_counter() - t0 + (sampled.seconds if sampled is not None else 0.0)
    if cfg.detector == "oracle":
        assert ctx.choices is not None, "scoring_context() refuses the oracle detector without choice labels"
        kinds = ctx.choices.kinds(step, cands.positions)
    det = detection.detect(
        cfg,
        scores.tokens,
        cands,
        scores.divergence,
        teacher_windows=u,
        student_windows=student_windows,
        embedding=embedding,
        choice_kinds=kinds,
        vocab_size=ctx.vocab_size,
        group=ctx.tp_group,
    )
    det = place_guidance(ctx.objective, scores.tokens, det, window_seed)
    if ctx.objective.guidance != "none" and ctx.objective.guidance_at == "random":
        u = window_scores = None  # the detection's windows belong to other positions
    return Detected(detection=det, teacher_windows=u, window_seconds=seconds, teacher_window_scores=window_scores)


def place_guidance(cfg: objective.Config, tokens: TokenBatch, det: Detection, seed: int) -> Detection:
    """Where guidance acts (`Detection.guidance_positions`): the divergent candidates, or with guidance_at='random' as
    many random response positions of each rollout; with a guidance budget (teacher_window) at most that many of
    each rollout, the most divergent ones (algorithm/budget.py)."""
    if cfg.guidance == "none":
        return det
    if cfg.guidance_at == "random":
        seq = tokens.seq_ids[det.candidates.positions[det.divergent]]
        counts = torch.bincount(seq, minlength=int(tokens.seq_ids.max()) + 1)
        if cfg.guidance_budget is not None:
            counts = counts.clamp(max=cfg.guidance_budget)
        return det.with_guided(random_anchors(tokens, counts, seed))
    if cfg.guidance_budget is not None:
        keep = within_budget(det, tokens.seq_ids, cfg.guidance_budget)
        return det.with_guided(det.guidance_positions()[keep.to(det.divergent.device)])
    return det


@dataclass(kw_only=True, slots=True)
class SampledWindows:
    """window_ot's windows of a step sampled part by part (`score_and_detect`), in candidate order."""

    positions: Tensor
    """[C] the candidates the windows were sampled at (flat step positions, ascending)."""
    teacher: Windows
    student: Windows | None
    """The fresh student windows (student_window='fresh'), else None."""
    seconds: float
    """Wall time of the sampling (and of the teacher's scores of the windows)."""
    teacher_scores: ServedTeacher | None = None
    """The served teacher's report on every teacher window (`report_on_windows`), else None."""


def pipelines_parts(ctx: ScoringContext) -> bool:
    """Whether the served teacher can score part i + 1 while part i's d_t pass and windows run (an
    AsyncTeacherScorer): `part_plan` pipelines the parts when each can take half the window-cache budget."""
    return ctx.teacher is None and isinstance(ctx.scorer, AsyncTeacherScorer)


def part_plan(ctx: ScoringContext, step: StepBatch) -> tuple[int, bool]:
    """Into how many parts (of whole micro-batches) phases 1-2 split the step so that each part's rollouts, with the
    KV of their windows, fit the served teacher's window-cache budget (`PairedWindowSampler.window_cache_budget`,
    shared by the data-parallel replicas), and whether the parts are pipelined (`score_and_detect`: the next part
    is scored while this one's windows are sampled, so two parts must fit: half the budget each, when the step has
    enough micro-batches for that; else parts in sequence, each with the whole budget). (1, False) unless window_ot
    samples from a teacher served by SGLang whose caches cannot hold the whole step. Collective (one MAX all-reduce
    over every rank): every replica makes the same engine calls."""
    det = ctx.objective.detection
    if det.detector != "window_ot" or ctx.teacher is not None or not isinstance(ctx.engine, PairedWindowSampler):
        return 1, False
    budget = ctx.engine.window_cache_budget("teacher")
    if budget is None:
        return 1, False
    resp = step.response_mask[:, 1:]
    per_rollout = detection.candidates_per_rollout(det, resp.sum(dim=1))
    # a rollout's scored tokens: up to its last response token (served_rollout_scores); resp's column c is token c + 1
    scored = torch.where(resp.any(dim=1), resp.shape[1] + 1 - resp.flip(1).int().argmax(dim=1), 0)
    need = int((scored + det.window * per_rollout).sum())
    share = budget / dist.get_world_size(ctx.dp_group)
    counts = torch.tensor([float(-(-need // max(int(share), 1))), float(-(-need // max(int(share / 2), 1)))])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    whole, halves = int(counts[0].item()), int(counts[1].item())
    if whole > 1 and pipelines_parts(ctx) and halves <= step.num_microbatches:
        return halves, True
    return min(max(whole, 1), step.num_microbatches), False


def report_on_windows(ctx: ScoringContext) -> bool:
    """Whether window_ot's teacher windows are sampled with the served teacher's report on their tokens (log-prob of
    each window token, top-k at each window position: `generated_window_scores`), from which phase 3 keeps the
    guided ones: teacher_window guidance at the divergent candidates with a divergence that reads the teacher. The
    decode that samples a window computes the teacher's distribution at every window position, so no prefill scores
    the windows again (`served_branch_scores`, with every prefix again once the teacher's caches lost them)."""
    obj = ctx.objective
    return (
        ctx.teacher is None
        and obj.guidance == "teacher_window"
        and obj.guidance_at != "random"
        and obj.guidance_divergence != "cross_entropy"
    )


def score_and_detect(ctx: ScoringContext, step: StepBatch, *, window_seed: int) -> tuple[Scores, Detected, float]:
    """Phases 1-2 (collective): `score` then `detect`, or, where the served teacher's KV caches cannot hold the step's
    rollouts with their windows (`part_plan`: more than one part), part by part: each part's rollouts scored by the
    teacher, their d_t, their candidates (chosen rollout by rollout: the same as the whole step's) and their windows
    (seeded as in one call), while the teacher servers still cache the part's prefixes from scoring; then the
    detection over the whole step. Pipelined (`pipelines_parts`): part i + 1's rollouts go to the teacher as soon as
    part i's report is in, so that the teacher scores them during part i's d_t pass and windows. Same scores,
    candidates and window requests either way; the windows' prefixes are not computed again. With teacher_window
    guidance the teacher's windows come with its report on their tokens (`report_on_windows`). Returns the scores,
    the detection and the seconds of phase 1 (the rest is phase 2)."""
    parts, pipelined = part_plan(ctx, step)
    t0 = time.perf_counter()
    if parts == 1:
        scores = score(ctx, step)
        scored = time.perf_counter() - t0
        return scores, detect(ctx, step, scores, window_seed=window_seed), scored
    cfg = ctx.objective.detection
    bounds = [round(i * step.num_microbatches / parts) for i in range(parts + 1)]
    reports: list[ServedTeacher] = []
    divergence, positions, teacher_windows, student_windows = [], [], [], []
    window_s = 0.0
    window_scores: list[ServedTeacher] = []
    firsts = bounds[:-1]
    steps = [step.part(first, stop) for first, stop in zip(firsts, bounds[1:], strict=True)]
    with_report = report_on_windows(ctx)
    pending = start_served_rollout_scores(ctx.scorer, steps[0], ctx.top_k) if pipelined else None
    for index, (first, part) in enumerate(zip(firsts, steps, strict=True)):
        report: ServedTeacher | None = None
        if pending is not None:  # this part's report (collective), then the next part's requests go out
            report = pending()
            more = index + 1 < len(steps)
            pending = start_served_rollout_scores(ctx.scorer, steps[index + 1], ctx.top_k) if more else None
        part_scores = score(ctx, part, teacher=report)
        assert isinstance(part_scores.teacher, ServedTeacher) and part_scores.divergence is not None
        cands = detection.select_candidates(cfg, part_scores.tokens, part_scores.divergence)
        t1 = time.perf_counter()
        done = sum(p.numel() for p in positions)
        if cfg.student_window == "fresh":
            u, s, u_scores = sample_window_pair(
                ctx, part, cands.positions, window_seed, first_window=done, report=with_report
            )
            student_windows.append(s)
        else:
            u, u_scores = sample_teacher_windows(
                ctx, part, cands.positions, window_seed, first_window=done, report=with_report
            )
        if u_scores is not None:
            window_scores.append(u_scores)
        window_s += time.perf_counter() - t1
        teacher_windows.append(u)
        reports.append(part_scores.teacher)
        divergence.append(part_scores.divergence)
        positions.append(cands.positions + first * step.micro_batch_size * step.targets_per_row)
    scores = Scores(tokens=step.token_batch(), teacher=ServedTeacher.concat(reports), divergence=torch.cat(divergence))
    sampled = SampledWindows(
        positions=torch.cat(positions),
        teacher=_concat_windows(teacher_windows),
        student=_concat_windows(student_windows) if student_windows else None,
        seconds=window_s,
        teacher_scores=ServedTeacher.concat(window_scores) if len(window_scores) == parts else None,
    )
    scored = time.perf_counter() - t0 - window_s
    return scores, detect(ctx, step, scores, window_seed=window_seed, sampled=sampled), scored


def _concat_windows(parts: list[Windows]) -> Windows:
    return Windows(tokens=torch.cat([w.tokens for w in parts]), lengths=torch.cat([w.lengths for w in parts]))
