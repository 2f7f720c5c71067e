"""Plain full-vocabulary float64 reference of docs/topd.md, written independently of topd_megatron.

No sharding, no chunking, no custom autograd: log_softmax over the true vocabulary and Python loops over rollouts,
so that every test compares the sharded code against the formulas as written. Only the knobs are read from the
implementation's Config objects (they are plain data).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor


def log_probs(logits: Tensor, vocab_size: int | None) -> Tensor:
    v = logits.shape[-1] if vocab_size is None else vocab_size
    return torch.log_softmax(logits[..., :v].to(torch.float64), dim=-1)


def divergence(
    student: Tensor,
    teacher: Tensor,
    kind: str,
    *,
    tokens: Tensor | None = None,
    beta: float = 0.5,
    vocab_size: int | None = None,
) -> Tensor:
    """[T, V] full logits -> [T] float64, differentiable through `student`."""
    lp = log_probs(student, vocab_size)
    lq = log_probs(teacher.detach(), vocab_size)
    p, q = lp.exp(), lq.exp()
    if kind == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    if kind == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    if kind == "jsd":
        # log m in log space: p and q can both underflow to 0 at extreme logits while log p, log q stay finite
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), dim=0)
        return beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    if kind == "log_ratio":
        idx = tokens.long().unsqueeze(1)
        return lp.gather(1, idx).squeeze(1) - lq.gather(1, idx).squeeze(1)
    raise ValueError(kind)


def logprobs(logits: Tensor, tokens: Tensor, vocab_size: int | None = None) -> Tensor:
    return log_probs(logits, vocab_size).gather(1, tokens.long().unsqueeze(1)).squeeze(1)


def topk_divergence(logits: Tensor, top_ids: Tensor, teacher_top_logprobs: Tensor) -> Tensor:
    """Reverse KL on the teacher's top-k support, both renormalised there (float64, full vocabulary)."""
    log_p = torch.log_softmax(logits.to(torch.float64).gather(1, top_ids), dim=-1)
    log_q = torch.log_softmax(teacher_top_logprobs.to(torch.float64), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy(logits: Tensor, vocab_size: int | None = None) -> Tensor:
    lp = log_probs(logits, vocab_size)
    return -(lp.exp() * lp).sum(-1)


def ot_bruteforce(cost: np.ndarray) -> float:
    """Uniform-mass OT by enumeration: replicate rows and columns to lcm(n, m) copies, then try every permutation."""
    n, m = cost.shape
    size = n * m // math.gcd(n, m)
    big = np.repeat(np.repeat(cost, size // n, axis=0), size // m, axis=1)
    best = math.inf
    for perm in itertools.permutations(range(size)):
        best = min(best, sum(big[i, perm[i]] for i in range(size)))
    return best / size


def _run_after(t: int, seq: list[int], mask: list[bool]) -> list[int]:
    """Positions t+1, t+2, ... while they stay in t's rollout and in the response."""
    out = []
    i = t + 1
    while i < len(seq) and seq[i] == seq[t] and mask[i]:
        out.append(i)
        i += 1
    return out


def _omega(k: int, gamma: float) -> list[float]:
    w = [gamma**j for j in range(1, k + 1)]
    return [x / sum(w) for x in w]


def topd_loss(cfg, case: dict) -> dict:
    """The TOPD loss of docs/topd.md for one micro-batch, from full-vocabulary tensors.

    case keys: tokens [N] (any value where masked), seq_ids [N], mask [N] bool, rollout_logprobs [N] | None,
    student [N, V] (requires grad), teacher [N, V], vocab_size, embedding [V, H], u_tokens [N, K] / u_len [N]
    (teacher window after each position), s_tokens [N, K] / s_len [N] (fresh student windows), branch_student
    [N, K, V] (requires grad) / branch_teacher [N, K, V] (the branch (x, y_<t, u) at each position).
    Returns loss (differentiable), candidates, scores, divergent, tau.
    """
    det = cfg.detection
    vocab = case["vocab_size"]
    seq = case["seq_ids"].tolist()
    mask = case["mask"].tolist()
    n = len(seq)
    toks = case["tokens"].tolist()
    d = divergence(case["student"], case["teacher"], cfg.divergence, beta=cfg.jsd_beta, vocab_size=vocab)

    # normaliser weights
    resp = [i for i in range(n) if mask[i]]
    norm = [0.0] * n
    rollouts = sorted({seq[i] for i in resp})
    for i in resp:
        if cfg.normalization == "token_mean":
            norm[i] = 1.0 / len(resp)
        elif cfg.normalization == "constant":
            norm[i] = 1.0 / cfg.normalization_constant
        else:
            n_b = sum(1 for j in resp if seq[j] == seq[i])
            norm[i] = 1.0 / (n_b * len(rollouts))

    # 1. candidates
    cands: list[int] = []
    if det.detector != "none":
        for b in rollouts:
            pos = [i for i in resp if seq[i] == b]
            k = math.ceil(det.q * len(pos) - 1e-9)
            if det.max_candidates is not None:
                k = min(k, det.max_candidates)
            ranked = sorted(pos, key=lambda i: (-float(d[i].detach()), i))
            cands.extend(ranked[:k])
        cands.sort()

    # 2. scores
    scores: dict[int, float] = {}
    for t in cands:
        if det.detector == "lookahead":
            fut = _run_after(t, seq, mask)[: det.window]
            if not fut:
                scores[t] = math.nan
                continue
            w = [det.lookahead_gamma ** (j + 1) for j in range(len(fut))]
            scores[t] = sum(wj * float(d[i].detach()) for wj, i in zip(w, fut, strict=True)) / sum(w)
        elif det.detector == "oracle":
            kind = case["kinds"][t]
            scores[t] = 1.0 if kind == "reasoning" else 0.0 if kind == "surface" else math.nan
        elif det.detector == "window_ot":
            u = case["u_tokens"][t, : int(case["u_len"][t])].tolist()
            if det.student_window == "rollout":
                s = [toks[i] for i in ([t] + _run_after(t, seq, mask))[: det.window]]
            else:
                s = case["s_tokens"][t, : int(case["s_len"][t])].tolist()
            e = case["embedding"].to(torch.float64)
            e = e / e.norm(dim=1, keepdim=True)
            cost = 1.0 - (e[u] @ e[s].T)
            scores[t] = ot_bruteforce(cost.numpy())
    finite = [v for v in scores.values() if not math.isnan(v)]
    if det.detector == "oracle":
        tau = 0.5
    elif det.tau is not None:
        tau = det.tau
    else:
        tau = float(np.quantile(np.array(finite), det.q_d)) if finite else math.nan
    divergent = [t for t in cands if math.isnan(scores[t]) or math.isnan(tau) or scores[t] >= tau]
    suppressed = [t for t in cands if t not in divergent]

    # guided anchors: the divergent candidates, or the random control's positions (given by the case)
    anchors = list(divergent) if cfg.guidance_at == "divergent" else list(case["random_anchors"])

    # 3. OPD term with suppression (and no OPD weight where a window replaces it)
    weight = [norm[i] * (cfg.suppress_weight if i in suppressed else 1.0) for i in range(n)]
    if cfg.guidance != "none" and cfg.guidance_replaces_opd:
        weight = [0.0 if i in anchors else w for i, w in enumerate(weight)]
    if cfg.opd == "dense":
        per_tok = d
    else:
        safe = torch.tensor([toks[i] if mask[i] else 0 for i in range(n)])
        lp = logprobs(case["student"], safe, vocab)
        lq = logprobs(case["teacher"].detach(), safe, vocab)
        r = (lp - lq).detach()
        adv = -r
        if cfg.pg_discount > 0:  # discounted future log-ratio: -sum_{j>=t} gamma^(j-t) r_j, same rollout's response
            adv = torch.stack(
                [
                    -sum(cfg.pg_discount ** (j - i) * r[j] for j in [i, *_run_after(i, seq, mask)])
                    if mask[i]
                    else r[i] * 0
                    for i in range(n)
                ]
            )
        terms = []
        for i in range(n):
            if not mask[i]:
                terms.append(lp[i] * 0.0)
                continue
            roll = case["rollout_logprobs"]
            ratio = 1.0 if roll is None else math.exp(float(lp[i].detach()) - float(roll[i]))
            if cfg.rho_clip is not None:
                ratio = min(ratio, cfg.rho_clip)
            rho = ratio * torch.exp(lp[i] - lp[i].detach())
            terms.append(-adv[i] * rho)
        per_tok = torch.stack(terms)
    loss_opd = sum(weight[i] * per_tok[i] for i in range(n) if weight[i] != 0.0)

    # 4. guidance
    gamma = cfg.guidance_gamma if cfg.guidance_weights == "geometric" else 1.0
    loss_g = torch.zeros((), dtype=torch.float64)
    for t in anchors:
        if cfg.guidance == "upweight":
            loss_g = loss_g + norm[t] * d[t]
        elif cfg.guidance == "teacher_window":
            k = int(case["u_len"][t])
            u = case["u_tokens"][t, :k]
            bs, bt = case["branch_student"][t, :k], case["branch_teacher"][t, :k]
            if cfg.guidance_divergence == "cross_entropy":
                g = -logprobs(bs, u, vocab)
            else:
                g = divergence(bs, bt, cfg.guidance_divergence, vocab_size=vocab)
            om = _omega(k, gamma)
            loss_g = loss_g + norm[t] * sum(om[j] * g[j] for j in range(k))
        elif cfg.guidance == "on_path":
            fut = _run_after(t, seq, mask)[: det.window]
            om = _omega(len(fut), gamma)
            loss_g = loss_g + norm[t] * sum((om[j] * d[i] for j, i in enumerate(fut)), torch.zeros((), dtype=d.dtype))
    total = loss_opd + cfg.guidance_coef * loss_g
    return {"loss": total, "candidates": cands, "scores": scores, "divergent": divergent, "guided": anchors, "tau": tau}
