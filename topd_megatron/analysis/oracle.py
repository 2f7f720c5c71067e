"""An oracle for divergence labels: it calibrates the detectors' thresholds and scores them (never used for training).

For a candidate position t of a student rollout (a high-loss position), with y_t the student's sampled token and a*
the teacher's argmax token at t:
    agreement   y_t = a*: both continuations are the same; the position is neither a fork nor a surface mismatch
    surface     the teacher continues greedily from (x, y_<t, y_t) and from (x, y_<t, a*), and both reach a correct
                answer: the student's token changed only the wording
    fork        only the continuation from a* is correct: the student's token broke the reasoning
    unlabelled  anything else (neither correct, e.g. an earlier fork already broke the prefix; or only the student's)
Detectors are scored on forks against surface mismatches (agreements and unlabelled candidates left out): AUROC of
their score D, precision and recall of their decisions at a frozen threshold, each with a bootstrap 95% CI over
candidates, next to a random flagger that flags the same share of candidates (its precision is the forks' base rate,
its recall the flag rate).

`run_oracle` labels two disjoint sets of initial-student rollouts: on the calibration set each detector's threshold
tau is chosen (Youden's J: the largest recall-minus-false-alarm gap) and frozen; on the evaluation set the frozen
detectors are scored. Training runs use the frozen tau, so the share of candidates they judge non-divergent is a
measurement, not an input.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from topd_megatron.algorithm import detection, objective
from topd_megatron.algorithm.batch import StepBatch, build_step_batch, prefixes
from topd_megatron.analysis.statistics import Interval, auroc, bootstrap, precision_recall, youden_threshold
from topd_megatron.config import RunConfig
from topd_megatron.models.tokenizer import encode_prompt
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sampling import vocab_parallel_argmax
from topd_megatron.tasks import LabelsChoices, Problem, Task, load_task
from topd_megatron.training.forward import broadcast_from_last_stage
from topd_megatron.training.scoring import (
    ChoiceLabeller,
    Scores,
    ScoringContext,
    detect,
    scoring_context,
    step_divergence,
)
from topd_megatron.training.session import EngineSpec, RankSession, rank_session
from topd_megatron.training.teacher import teacher_logits

FORK, SURFACE, AGREEMENT, UNLABELLED = 1, 0, 2, -1
NAMES = {FORK: "fork", SURFACE: "surface", AGREEMENT: "agreement", UNLABELLED: "unlabelled"}


@dataclass(kw_only=True, slots=True)
class OracleConfig:
    """Which rollouts to label and which detectors to calibrate and score."""

    prompts: int = 64
    """Student rollouts per set (one per prompt, from the task's training split): calibration and evaluation each."""
    detectors: tuple[str, ...] = ("window_ot", "lookahead", "oracle")
    """'oracle' (the task's own choice labels) only where the task labels its choices."""
    max_new_tokens: int = 64
    seed: int = 4242
    objective: objective.Config = field(default_factory=objective.Config)
    """Candidate selection and detector settings (the detector field is set per entry of `detectors`)."""


@dataclass(kw_only=True, slots=True)
class LabelledSet:
    """One set of initial-student rollouts with its candidates, oracle labels and every detector's scores."""

    labels: np.ndarray
    """[C] FORK / SURFACE / AGREEMENT / UNLABELLED per candidate."""
    scores: dict[str, np.ndarray]
    """detector -> [C] D_t (NaN: no window, always flagged)."""
    kinds: list[str | None] | None
    """[C] the task's own choice kind per candidate, where the task labels its choices."""
    heatmap: dict[str, Any]


def _teacher_choice(ctx: ScoringContext, positions: torch.Tensor, t_logits: list[torch.Tensor]) -> torch.Tensor:
    """a*: the teacher's argmax token at each position, on every rank."""
    from megatron.core import parallel_state as ps

    best = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        full = torch.cat([t[:, :-1] for t in t_logits]).reshape(-1, t_logits[0].shape[-1])
        rows = full[positions] if positions.numel() else full[:0]
        best = vocab_parallel_argmax(rows, ctx.tp_group, vocab_size=ctx.vocab_size).float()
    return broadcast_from_last_stage(best, (positions.numel(),), torch.float32).long()


def classify(student_ok: bool, teacher_ok: bool, agree: bool) -> int:
    """The oracle's label of one candidate from its two continuations (module docstring)."""
    if agree:
        return AGREEMENT
    if student_ok and teacher_ok:
        return SURFACE
    if teacher_ok:
        return FORK
    return UNLABELLED


def label_candidates(
    ctx: ScoringContext,
    step: StepBatch,
    positions: torch.Tensor,
    t_logits: list[torch.Tensor],
    task: Task,
    problems: list[Problem],
    prompt_lens: list[int],
    tokenizer: Any,
    max_new_tokens: int,
) -> np.ndarray:
    """[C] the oracle's label of each flat target position (collective: the teacher continues greedily)."""
    if positions.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    s1 = step.targets_per_row
    chosen = _teacher_choice(ctx, positions, t_logits).tolist()
    pres = prefixes(step, positions)
    student_tok = [int(step.tokens[int(p) // s1, int(p) % s1 + 1]) for p in positions]
    todo = [i for i in range(len(chosen)) if student_tok[i] != chosen[i]]  # agreements need no continuation
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    branches = [pres[i] + [student_tok[i]] for i in todo] + [pres[i] + [chosen[i]] for i in todo]
    gens = ctx.engine.generate(branches, greedy, model="teacher") if todo else []
    labels = np.full(len(chosen), AGREEMENT, dtype=np.int64)
    for n, i in enumerate(todo):
        row = int(positions[i]) // s1
        ok = []
        for g in (gens[n], gens[n + len(todo)]):
            response = g.prompt_ids[prompt_lens[row] :] + g.output_ids
            ok.append(task.is_correct(tokenizer.decode(response, skip_special_tokens=True), problems[row]))
        labels[i] = classify(ok[0], ok[1], agree=False)
    return labels


def label_counts(labels: np.ndarray) -> dict[str, Any]:
    """How many candidates of each class, and the surface share among forks + surface mismatches."""
    counts = {NAMES[c]: int((labels == c).sum()) for c in NAMES}
    decided = counts["fork"] + counts["surface"]
    return {
        "candidates": int(labels.size),
        **counts,
        "surface_share": counts["surface"] / decided if decided else math.nan,
    }


def score_detector(scores: np.ndarray, labels: np.ndarray, tau: float, *, seed: int = 0) -> dict[str, Any]:
    """AUROC, and precision/recall at the frozen `tau`, with bootstrap 95% CIs over the fork + surface candidates,
    and a random flagger that flags the same share: its precision is the forks' base rate, its recall the share."""
    keep = (labels == FORK) | (labels == SURFACE)
    s, fork = scores[keep], labels[keep] == FORK
    flagged = np.isnan(s) | (s >= tau) if not math.isnan(tau) else np.ones_like(fork)
    share = float(flagged.mean()) if flagged.size else math.nan

    def pr(idx: np.ndarray) -> tuple[float, float]:
        return precision_recall(flagged[idx], fork[idx])

    out: dict[str, Any] = {"tau": tau, "labelled": int(keep.sum()), "forks": int(fork.sum()), "flag_rate": share}
    out["auroc"] = bootstrap(lambda i: auroc(s[i], fork[i]), s.size, seed=seed).as_dict()
    out["precision"] = bootstrap(lambda i: pr(i)[0], s.size, seed=seed + 1).as_dict()
    out["recall"] = bootstrap(lambda i: pr(i)[1], s.size, seed=seed + 2).as_dict()
    base = bootstrap(lambda i: float(fork[i].mean()) if i.size else math.nan, s.size, seed=seed + 3)
    out["random_flagger"] = {"precision": base.as_dict(), "recall": Interval(share, share, share, s.size).as_dict()}
    return out


def _label_set(
    session: RankSession, run: RunConfig, cfg: OracleConfig, task: Task, problems: list[Problem], seed: int
) -> LabelledSet:
    """Roll out the initial student on `problems`, label its candidates and score them with every detector."""
    tokenizer = session.tokenizer
    labeller = ChoiceLabeller(task=task, tokenizer=tokenizer) if isinstance(task, LabelsChoices) else None
    ctx = scoring_context(
        cfg.objective,
        session.student,
        session.teacher,
        session.engine,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        choices=labeller,
    )
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
    params = SamplingParams(
        temperature=run.train.temperature,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=(tokenizer.eos_token_id,),
        seed=seed,
    )
    rollouts = ctx.engine.generate(prompts, params)
    step = build_step_batch(rollouts, pad_id=tokenizer.pad_token_id, micro_batch_size=run.train.micro_batch_size)
    tb = step.token_batch()
    t_logits = teacher_logits(ctx.teacher, step.microbatches())
    d = step_divergence(ctx, step, tb, t_logits)
    cands = detection.select_candidates(cfg.objective.detection, tb, d)
    lens = [len(p) for p in prompts]
    labels = label_candidates(ctx, step, cands.positions, t_logits, task, problems, lens, tokenizer, cfg.max_new_tokens)
    scores, decisions = {}, {}
    for name in cfg.detectors:
        if name == "oracle" and labeller is None:
            continue
        dcfg = dataclasses.replace(cfg.objective.detection, detector=name, tau=None)
        one = dataclasses.replace(cfg.objective, detection=dcfg, guidance="none")
        found = detect(
            dataclasses.replace(ctx, objective=one),
            step,
            Scores(tokens=tb, teacher=t_logits, divergence=d),
            window_seed=seed + 1,
        )
        scores[name] = found.detection.scores.cpu().numpy()
        decisions[name] = found.detection.divergent.cpu()
    kinds = labeller.kinds(step, cands.positions) if labeller is not None else None
    heatmap = heatmap_record(step, d, cands.positions, decisions, labels, tokenizer)
    return LabelledSet(labels=labels, scores=scores, kinds=kinds, heatmap=heatmap)


def _kind_agreement(labelled: LabelledSet) -> dict[str, dict[str, int]] | None:
    """How the task's choice kinds line up with the continuation labels (a check of both)."""
    if labelled.kinds is None:
        return None
    table: dict[str, dict[str, int]] = {}
    for kind, label in zip(labelled.kinds, labelled.labels.tolist(), strict=True):
        row = table.setdefault(str(kind), {n: 0 for n in NAMES.values()})
        row[NAMES[label]] += 1
    return table


def run_oracle(rank: int, world: int, run: RunConfig, cfg: OracleConfig) -> dict[str, Any] | None:
    """Rank body: label a calibration and an evaluation set, freeze each detector's tau on the first and score the
    detectors on the second. The report on rank 0."""
    task = load_task(run.task)
    engine = EngineSpec(kind=run.rollout, micro_batch_size=256, sglang=run.sglang, run_dir=Path(run.run_dir) / "oracle")
    problems = task.train_problems(2 * cfg.prompts, seed=cfg.seed)
    with rank_session(run.parallel, run.student, teacher=run.teacher, engine=engine) as session:
        calibration = _label_set(session, run, cfg, task, problems[: cfg.prompts], cfg.seed)
        evaluation = _label_set(session, run, cfg, task, problems[cfg.prompts :], cfg.seed + 2)
    report: dict[str, Any] = {
        "calibration": label_counts(calibration.labels),
        "evaluation": label_counts(evaluation.labels),
        "choice_kinds_vs_labels": _kind_agreement(evaluation),
        "tau": {},
        "detectors": {},
        "heatmap": evaluation.heatmap,
    }
    for name, cal_scores in calibration.scores.items():
        keep = (calibration.labels == FORK) | (calibration.labels == SURFACE)
        tau = youden_threshold(cal_scores[keep], calibration.labels[keep] == FORK)
        if name == "oracle":
            tau = detection.ORACLE_TAU
        report["tau"][name] = tau
        report["detectors"][name] = score_detector(evaluation.scores[name], evaluation.labels, tau, seed=cfg.seed)
    return report if dist.get_rank() == 0 else None


def heatmap_record(
    step: StepBatch,
    d: torch.Tensor,
    positions: torch.Tensor,
    decisions: dict[str, torch.Tensor],
    labels: np.ndarray,
    tokenizer: Any,
) -> dict[str, Any]:
    """Per-position d_t of the rollout with the most forks and surface mismatches among its candidates, with the
    candidates, each detector's decisions and the oracle labels marked (for the plot)."""
    s1 = step.targets_per_row
    tb = step.token_batch()
    rows = (positions // s1).tolist()
    decided = [i for i, lab in enumerate(labels.tolist()) if lab in (FORK, SURFACE)]
    best = max(set(rows), key=lambda r: sum(1 for i in decided if rows[i] == r), default=0)
    mask = tb.response_mask[best * s1 : (best + 1) * s1]
    idx = torch.nonzero(mask).flatten()
    rec: dict[str, Any] = {
        "tokens": [tokenizer.decode([int(t)]) for t in tb.tokens[best * s1 : (best + 1) * s1][idx]],
        "divergence": d[best * s1 : (best + 1) * s1][idx].tolist(),
        "candidate": [],
        "labels": [],
        "divergent": {k: [] for k in decisions},
    }
    local = {int(p) - best * s1: i for i, p in enumerate(positions) if int(p) // s1 == best}
    for j in idx.tolist():
        i = local.get(j)
        rec["candidate"].append(i is not None)
        rec["labels"].append(int(labels[i]) if i is not None else None)
        for k, dec in decisions.items():
            rec["divergent"][k].append(bool(dec[i]) if i is not None else False)
    return rec
