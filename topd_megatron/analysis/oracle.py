"""An oracle for divergence labels (a diagnostic, never used for training).

For a candidate position t of a student rollout (a high-loss token y_t), the teacher continues greedily twice:
from (x, y_<t, y_t) — the student's token — and from (x, y_<t, a*) with a* the teacher's preferred token. If both
continuations reach a correct answer, t is a *surface mismatch*; if only the teacher's does, t is a *real fork*.
Other outcomes (neither correct, e.g. an earlier fork already broke the prefix; or only the student's) leave t
unlabelled. Against these labels we report each detector's precision and recall for "divergent = real fork", and
the share of labelled high-loss tokens that are surface mismatches (the paper reports about 30%).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from topd_megatron.algorithm import detection, objective
from topd_megatron.algorithm.batch import StepBatch, build_step_batch, prefixes
from topd_megatron.config import RunConfig
from topd_megatron.models.tokenizer import encode_prompt
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sampling import vocab_parallel_argmax
from topd_megatron.tasks import Problem, Task, load_task
from topd_megatron.training.forward import broadcast_from_last_stage
from topd_megatron.training.scoring import Scores, ScoringContext, detect, scoring_context, step_divergence
from topd_megatron.training.session import EngineSpec, rank_session
from topd_megatron.training.teacher import teacher_logits

FORK, SURFACE, UNLABELLED = 1, 0, -1


@dataclass(kw_only=True, slots=True)
class OracleConfig:
    """Which rollouts to label and which detectors to score."""

    prompts: int = 32
    """Student rollouts to draw (one per prompt, from the task's training split)."""
    detectors: tuple[str, ...] = ("window_ot", "lookahead")
    max_new_tokens: int = 48
    seed: int = 4242
    objective: objective.Config = field(default_factory=objective.Config)
    """Candidate selection and detector settings (the detector field is overridden per entry of `detectors`)."""


def _teacher_choice(ctx: ScoringContext, positions: torch.Tensor, t_logits: list[torch.Tensor]) -> torch.Tensor:
    """a*: the teacher's argmax token at each position, on every rank."""
    from megatron.core import parallel_state as ps

    best = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        full = torch.cat([t[:, :-1] for t in t_logits]).reshape(-1, t_logits[0].shape[-1])
        rows = full[positions] if positions.numel() else full[:0]
        best = vocab_parallel_argmax(rows, ctx.tp_group, vocab_size=ctx.vocab_size).float()
    return broadcast_from_last_stage(best, (positions.numel(),), torch.float32).long()


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
) -> torch.Tensor:
    """FORK / SURFACE / UNLABELLED for each flat target position (collective)."""
    if positions.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    s1 = step.targets_per_row
    chosen = _teacher_choice(ctx, positions, t_logits)
    pres = prefixes(step, positions)
    student_tok = [int(step.tokens[int(p) // s1, int(p) % s1 + 1]) for p in positions]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    branches = [pre + [tok] for pre, tok in zip(pres, student_tok, strict=True)]
    branches += [pre + [int(a)] for pre, a in zip(pres, chosen, strict=True)]
    gens = ctx.engine.generate(branches, greedy, model="teacher")
    labels = torch.full((positions.numel(),), UNLABELLED, dtype=torch.long)
    for i, p in enumerate(positions):
        row = int(p) // s1
        ok = []
        for g in (gens[i], gens[i + positions.numel()]):
            response = g.prompt_ids[prompt_lens[row] :] + g.output_ids
            ok.append(task.is_correct(tokenizer.decode(response, skip_special_tokens=True), problems[row]))
        if ok[0] and ok[1]:
            labels[i] = SURFACE
        elif ok[1] and not ok[0]:
            labels[i] = FORK
    return labels


def precision_recall(divergent: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Precision/recall of `divergent` for the FORK class over labelled candidates."""
    lab = labels != UNLABELLED
    pred, truth = divergent[lab], labels[lab] == FORK
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    return {
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "labelled": float(int(lab.sum())),
    }


def fork_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Threshold-free quality of a detector's score D: the probability that a random real fork scores above a random
    surface mismatch (ties count one half; a NaN score — no window, always divergent — ranks above every number).
    0.5 is chance. `scores` [C] float, `labels` [C] FORK/SURFACE/UNLABELLED; NaN when either class is empty."""
    s = torch.nan_to_num(scores.double(), nan=float("inf"))
    fork, surface = s[labels == FORK], s[labels == SURFACE]
    if fork.numel() == 0 or surface.numel() == 0:
        return float("nan")
    above = (fork[:, None] > surface[None, :]).double().sum() + 0.5 * (fork[:, None] == surface[None, :]).double().sum()
    return float(above / (fork.numel() * surface.numel()))


def run_oracle(rank: int, world: int, run: RunConfig, cfg: OracleConfig) -> dict[str, Any] | None:
    """Rank body: label the student's candidates with the oracle and score each detector. Report on rank 0."""
    task = load_task(run.task)
    engine = EngineSpec(kind=run.rollout, micro_batch_size=256, sglang=run.sglang, run_dir=Path(run.run_dir) / "oracle")
    with rank_session(run.parallel, run.student, teacher=run.teacher, engine=engine) as session:
        tokenizer = session.tokenizer
        ctx = scoring_context(
            cfg.objective,
            session.student,
            session.teacher,
            session.engine,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
        )
        problems = task.train_problems(cfg.prompts, seed=cfg.seed)
        prompts = [encode_prompt(tokenizer, p.prompt) for p in problems]
        params = SamplingParams(
            temperature=run.train.temperature,
            max_new_tokens=cfg.max_new_tokens,
            stop_token_ids=(tokenizer.eos_token_id,),
            seed=cfg.seed,
        )
        rollouts = ctx.engine.generate(prompts, params)
        step = build_step_batch(rollouts, pad_id=tokenizer.pad_token_id, micro_batch_size=run.train.micro_batch_size)
        tb = step.token_batch()
        t_logits = teacher_logits(ctx.teacher, step.microbatches())
        d = step_divergence(ctx, step, tb, t_logits)
        cands = detection.select_candidates(cfg.objective.detection, tb, d)
        labels = label_candidates(
            ctx,
            step,
            cands.positions,
            t_logits,
            task,
            problems,
            [len(p) for p in prompts],
            tokenizer,
            cfg.max_new_tokens,
        )
        report = _label_counts(cands.positions.numel(), labels)
        decisions = {}
        scores = Scores(tokens=tb, teacher=t_logits, divergence=d)
        for name in cfg.detectors:
            dcfg = dataclasses.replace(cfg.objective.detection, detector=name)
            found = detect(
                dataclasses.replace(ctx, objective=dataclasses.replace(cfg.objective, detection=dcfg)),
                step,
                scores,
                window_seed=cfg.seed + 1,
            )
            det = found.detection
            decisions[name] = det.divergent.cpu()
            report[name] = precision_recall(det.divergent.cpu(), labels) | {
                "auroc": fork_auroc(det.scores.cpu(), labels),
                "non_divergent_share": float(det.metrics.get("detect/non_divergent_share", float("nan"))),
            }
        report["heatmap"] = _heatmap_record(step, tb, d, cands.positions, decisions, labels, tokenizer)
    return report if dist.get_rank() == 0 else None


def _label_counts(candidates: int, labels: torch.Tensor) -> dict[str, Any]:
    n_fork, n_surface = int((labels == FORK).sum()), int((labels == SURFACE).sum())
    return {
        "candidates": int(candidates),
        "forks": n_fork,
        "surface": n_surface,
        "unlabelled": int((labels == UNLABELLED).sum()),
        "surface_share": n_surface / (n_fork + n_surface) if n_fork + n_surface else float("nan"),
    }


def _heatmap_record(
    step: StepBatch,
    tb: Any,
    d: torch.Tensor,
    positions: torch.Tensor,
    decisions: dict[str, torch.Tensor],
    labels: torch.Tensor,
    tokenizer: Any,
) -> dict[str, Any]:
    """Per-position d_t of the rollout with the most labelled candidates, with candidates, detector decisions and
    oracle labels marked (for the plot)."""
    s1 = step.targets_per_row
    rows = (positions // s1).tolist()
    best = max(
        set(rows), key=lambda r: sum(1 for i, x in enumerate(rows) if x == r and labels[i] != UNLABELLED), default=0
    )
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
