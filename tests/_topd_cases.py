"""Shared test inputs for the TOPD objective: a small random micro-batch and the implementation's pipeline on it.

`make_case` builds full-vocabulary tensors (what the reference in tests/_reference_topd.py consumes); `run_pipeline`
runs topd_megatron on this rank's vocabulary shards of them, in the order the training loop will (token_terms ->
select_candidates -> detect -> branch_terms -> loss -> backward), and returns picklable results so that distributed
ranks can hand them back to the test process.
"""

from __future__ import annotations

import dataclasses

import torch

from topd_megatron.algorithm import detection, objective, types
from topd_megatron.training.step import rollout_objective

# (prompt, response, padding) per rollout: a short rollout, a padded one, one without prompt, one single token.
LAYOUT = ((2, 9, 0), (1, 12, 3), (0, 6, 0), (1, 1, 0))
V_PAD = 52  # divisible by 1, 2 and 4: 13 columns per rank at TP=4
VOCAB = 45  # true vocabulary: the last shard is partly padding at TP=2 and TP=4
K = 3
HIDDEN = 8


def small_detection(**kw) -> detection.Config:
    base = {"window": K, "q": 0.3, "max_candidates": 3, "q_d": 0.4}
    base.update(kw)
    return detection.Config(**base)


def variants() -> dict[str, objective.Config]:
    """Every preset (with small windows) plus variants that exercise the other knobs."""
    out: dict[str, objective.Config] = {}
    for name in objective.PRESETS:
        if name == "topd_budget":  # topd for the loss: the budget acts in the step (training/scoring.py), not here
            continue
        cfg = objective.preset(name)
        det = dataclasses.replace(cfg.detection, window=K, q=0.3, max_candidates=3, q_d=0.4)
        out[name] = dataclasses.replace(cfg, detection=det)
    r = dataclasses.replace
    out["topd_geometric_ce_seqmean"] = r(
        out["topd"],
        guidance_weights="geometric",
        guidance_gamma=0.7,
        guidance_divergence="cross_entropy",
        normalization="sequence_mean",
        guidance_coef=0.5,
    )
    out["topd_fkl_guidance_jsd"] = r(out["topd"], guidance_divergence="forward_kl", divergence="jsd", jsd_beta=0.3)
    out["topd_lookahead_fixed_tau_const"] = r(
        out["topd_lookahead"],
        detection=small_detection(detector="lookahead", tau=1.6, lookahead_gamma=0.6),
        normalization="constant",
        normalization_constant=17.0,
        divergence="forward_kl",
        guidance_weights="geometric",
    )
    out["opd_pg_noclip"] = r(out["opd_pg"], rho_clip=None)
    out["opd_pg_suppress"] = r(out["opd_pg"], detection=small_detection(detector="lookahead"), suppress_weight=0.5)
    out["opd_suppress_rollout_window"] = r(
        out["opd_suppress"],
        detection=small_detection(detector="window_ot", student_window="rollout"),
        suppress_weight=0.25,
    )
    out["topd_window_replaces_opd"] = r(out["topd"], guidance_replaces_opd=True, guidance_coef=2.0)
    out["topd_upweight_sequence_mean"] = r(out["topd_upweight"], normalization="sequence_mean", guidance_coef=0.5)
    out["opd_kl_discount_half"] = r(out["opd_kl_discount"], pg_discount=0.5, rho_clip=None)
    return out


def make_case(seed: int, *, scale: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    seq, mask = [], []
    for b, (p, r, pad) in enumerate(LAYOUT):
        seq += [b] * (p + r + pad)
        mask += [False] * p + [True] * r + [False] * pad
    n = len(seq)
    mask_t = torch.tensor(mask)
    tokens = torch.randint(0, VOCAB, (n,), generator=g)
    tokens = torch.where(mask_t, tokens, torch.full_like(tokens, -100))  # masked ids are not valid ids
    student = torch.randn(n, V_PAD, generator=g, dtype=torch.float64) * scale
    teacher = 0.6 * student + torch.randn(n, V_PAD, generator=g, dtype=torch.float64) * scale
    lp = torch.log_softmax(student[:, :VOCAB], -1).gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1)
    rollout_lp = lp + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
    rollout_lp = torch.where(mask_t, rollout_lp, torch.full_like(rollout_lp, float("nan")))  # never read
    return {
        "tokens": tokens,
        "seq_ids": torch.tensor(seq),
        "mask": mask_t,
        "rollout_logprobs": rollout_lp,
        "student": student,
        "teacher": teacher,
        "vocab_size": VOCAB,
        "embedding": torch.randn(V_PAD, HIDDEN, generator=g, dtype=torch.float64),
        "u_tokens": torch.randint(0, VOCAB, (n, K), generator=g),
        "u_len": torch.randint(1, K + 1, (n,), generator=g),
        "s_tokens": torch.randint(0, VOCAB, (n, K), generator=g),
        "s_len": torch.randint(1, K + 1, (n,), generator=g),
        "branch_student": torch.randn(n, K, V_PAD, generator=g, dtype=torch.float64) * scale,
        "branch_teacher": torch.randn(n, K, V_PAD, generator=g, dtype=torch.float64) * scale,
        "kinds": [("reasoning", "surface", None)[int(i)] for i in torch.randint(0, 3, (n,), generator=g)],
        "random_anchors": sorted(
            torch.nonzero(mask_t).flatten()[torch.randperm(int(mask_t.sum()), generator=g)[:4]].tolist()
        ),
    }


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the last (vocabulary) dimension, Megatron's VocabUtility layout."""
    v = x.shape[-1] // world
    return x[..., rank * v : (rank + 1) * v]


def run_pipeline(
    cfg: objective.Config,
    case: dict,
    *,
    rank: int = 0,
    world: int = 1,
    group=None,
    dtype: torch.dtype = torch.float64,
    two_pass: bool = False,
) -> dict:
    """The implementation on this rank's shards; returns loss, grads of the shards, decisions and metrics.
    two_pass: compose the loss as the training step does (training/step.py): pass 1 the rollout objective
    (`rollout_objective`) with the step's normaliser weights, pass 2 lambda * the teacher-window loss."""
    vocab = case["vocab_size"]
    batch = types.TokenBatch(
        tokens=case["tokens"],
        seq_ids=case["seq_ids"],
        response_mask=case["mask"],
        rollout_logprobs=case["rollout_logprobs"],
    )
    s = shard(case["student"], rank, world).to(dtype).clone().requires_grad_()
    t = shard(case["teacher"], rank, world).to(dtype).clone()
    bs = shard(case["branch_student"], rank, world).to(dtype).clone().requires_grad_()
    bt = shard(case["branch_teacher"], rank, world).to(dtype).clone()
    emb = shard(case["embedding"].T, rank, world).T.contiguous()
    terms = objective.token_terms(cfg, batch, s, t, vocab_size=vocab, group=group)
    det = branch = None
    if cfg.detection.detector != "none":
        cands = detection.select_candidates(cfg.detection, batch, terms.divergence.detach())
        p = cands.positions
        u = types.Windows(tokens=case["u_tokens"][p], lengths=case["u_len"][p])
        sw = types.Windows(tokens=case["s_tokens"][p], lengths=case["s_len"][p])
        det = detection.detect(
            cfg.detection,
            batch,
            cands,
            terms.divergence.detach(),
            teacher_windows=u,
            student_windows=sw if cfg.detection.student_window == "fresh" else None,
            embedding=emb,
            choice_kinds=[case["kinds"][int(i)] for i in p],
            vocab_size=vocab,
            group=group,
        )
        if cfg.guidance_at == "random":
            det = det.with_guided(torch.tensor(case["random_anchors"], dtype=torch.long))
        if cfg.guidance == "teacher_window":
            pos = det.guidance_positions()
            win = types.Windows(tokens=case["u_tokens"][pos], lengths=case["u_len"][pos])
            valid = win.valid()
            branch = objective.branch_terms(
                cfg, pos, win, bs[pos][valid], bt[pos][valid], vocab_size=vocab, group=group
            )
    if two_pass and branch is not None:
        weights = objective.normalizer(cfg, batch, dtype)
        rollout_cfg, rollout_weights = rollout_objective(cfg, weights, det)
        value, metrics = objective.loss(rollout_cfg, batch, terms, det, weights=rollout_weights)
        value = value + cfg.guidance_coef * objective.teacher_window_loss(cfg, weights[branch.positions], branch)
    else:
        value, metrics = objective.loss(cfg, batch, terms, det, branch)
    value.backward()
    return {
        "loss": float(value.detach()),
        "grad": s.grad.detach().clone(),
        "branch_grad": bs.grad.detach().clone() if bs.grad is not None else torch.zeros_like(bs),
        "candidates": [] if det is None else det.candidates.positions.tolist(),
        "divergent": [] if det is None else det.candidates.positions[det.divergent].tolist(),
        "guided": [] if det is None else det.guidance_positions().tolist(),
        "scores": None if det is None else det.scores.clone(),
        "tau": float("nan") if det is None else det.tau,
        "metrics": metrics,
    }
