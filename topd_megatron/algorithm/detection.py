"""Stage 4: tell real divergences from surface-form mismatches among the high-loss tokens (docs/topd.md, "TOPD").

Detection runs BEFORE the loss can be formed, because the training loop must know which positions are divergent to
generate and score the teacher windows that guidance uses. The order within one step, per micro-batch:

    terms = objective.token_terms(cfg, batch, student_logits, teacher_logits, vocab_size=V, group=tp)  # d_t etc.
    d = terms.divergence.detach()
    cands = detection.select_candidates(cfg.detection, batch, d)         # 1. top-q per rollout, at most M
    # window_ot only: the loop samples K teacher tokens u after (x, y_<t) for every t in cands.positions (in that
    # order) -> Windows; with student_window="fresh" also K fresh student tokens.
    det = detection.detect(cfg.detection, batch, cands, d, teacher_windows=u, embedding=emb_shard,
                           vocab_size=V, group=tp)                       # 2. scores D_t, tau, divergent
    # teacher_window guidance only: for t in det.guidance_positions() the loop scores the branch (x, y_<t, u) with
    # both models (u = det.guidance_windows(u): the detection windows are reused, nothing new is generated).
    branch = objective.branch_terms(cfg, det.guidance_positions(), det.guidance_windows(u), s_branch, t_branch, ...)
    loss, metrics = objective.loss(cfg, batch, terms, det, branch)    # 3.-4. suppression, guidance, normalisation

Everything here works on per-token `[N]` vectors and small `[C, K]` windows, never on logits. Every TP rank computes
the same detection (its inputs are all-reduced quantities); the scores are broadcast from the group's first rank so
that the ranks agree bit for bit.

Batch layout (`types.TokenBatch`): N packed positions; the positions of one rollout are contiguous and in order; row i
of the logits is the distribution the model gives to `tokens[i]` (already shifted: p_t = pi(.|x, y_<t) for y_t).
A window after t runs over the following positions of the same contiguous response run (it stops at the rollout's
EOS, at padding and at masked positions): windows carry their real lengths.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import csr_matrix, identity, kron, vstack
from torch import Tensor
from torch.distributed import ProcessGroup

from topd_megatron.algorithm.loss import vocab_parallel_embedding
from topd_megatron.algorithm.types import Candidates, Detection, TokenBatch, Windows
from topd_megatron.choices import check_choices


@dataclass(kw_only=True, slots=True)
class Config:
    """Candidate selection and the divergence detector (docs/topd.md, TOPD steps 1-2)."""

    detector: Literal["none", "window_ot", "lookahead", "oracle"] = "window_ot"
    """'window_ot': OT distance between a teacher window and a student window in embedding space (the paper's);
    'lookahead': discounted mean of the student's own next per-token divergences (ours, no generation);
    'oracle': the task's own label of each candidate (a reasoning choice is divergent, a surface choice is not; a
    control arm for tasks that can label their choices, `tasks.LabelsChoices`); 'none': no detection (plain OPD)."""
    q: float = 0.2
    """Candidates are the top-q fraction of each rollout's response positions by per-token loss: ceil(q * n)."""
    max_candidates: int | None = 64
    """M: at most this many candidates per rollout (largest loss first); None for no cap."""
    tau: float | None = None
    """Fixed threshold, calibrated once and frozen: t is divergent when D_t >= tau, so the share of candidates judged
    non-divergent is a measurement. None: tau is the q_d quantile of each step's D instead."""
    q_d: float = 0.3
    """With tau=None, the quantile of D over a step's candidates used as tau. This fixes the non-divergent share at
    q_d by construction (0.3: the paper's ~30%); it is not a measurement."""
    window: int = 50
    """K: tokens per window (teacher/student windows, lookahead, on_path guidance)."""
    ot_solver: Literal["exact", "sinkhorn"] = "exact"
    """'exact': assignment (equal lengths) or the transport LP (unequal lengths); 'sinkhorn': batched entropic OT."""
    sinkhorn_eps: float = 0.05
    """Entropic regularisation of Sinkhorn, in units of the cost (1 - cosine, in [0, 2])."""
    sinkhorn_iters: int = 200
    """Sinkhorn iterations (fixed, so that every rank runs the same computation)."""
    student_window: Literal["rollout", "fresh"] = "fresh"
    """Student window s for window_ot. 'fresh': K tokens sampled from the student after the same prefix (x, y_<t) as
    the teacher's window (the paper's: candidates are positions, so both windows start at the prefix). 'rollout': the
    rollout's own y_t..y_{t+K-1}, free but biased: it begins with the one token the student happened to sample, so a
    high-d_t position where it sampled the teacher's token looks like a surface mismatch."""
    lookahead_gamma: float = 0.9
    """gamma of the lookahead detector: D_t = sum_j gamma^j d_{t+j} / sum_j gamma^j, j = 1..K (real length)."""

    def __post_init__(self) -> None:
        check_choices(self, "detection")
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"detection.q must be in (0, 1], got {self.q}")
        if self.max_candidates is not None and self.max_candidates < 1:
            raise ValueError(f"detection.max_candidates must be >= 1 or None, got {self.max_candidates}")
        if not 0.0 <= self.q_d <= 1.0:
            raise ValueError(f"detection.q_d must be in [0, 1], got {self.q_d}")
        if self.tau is not None and not math.isfinite(self.tau):
            raise ValueError(f"detection.tau must be finite or None, got {self.tau}")
        if self.window < 1:
            raise ValueError(f"detection.window must be >= 1, got {self.window}")
        if self.sinkhorn_eps <= 0.0 or self.sinkhorn_iters < 1:
            raise ValueError(
                f"detection.sinkhorn_eps must be > 0 and sinkhorn_iters >= 1, got {self.sinkhorn_eps},"
                f" {self.sinkhorn_iters}"
            )
        if not 0.0 < self.lookahead_gamma <= 1.0:
            raise ValueError(f"detection.lookahead_gamma must be in (0, 1], got {self.lookahead_gamma}")


def response_run_end(batch: TokenBatch) -> Tensor:
    """[N] int64: for a response position, the last position of the contiguous response run (same rollout) that
    contains it; -1 elsewhere. Windows after t never go past it."""
    n = batch.num_positions
    m = batch.response_mask
    dev = m.device
    cont = torch.zeros(n, dtype=torch.bool, device=dev)
    if n > 1:
        cont[:-1] = m[1:] & (batch.seq_ids[1:] == batch.seq_ids[:-1])
    is_end = m & ~cont
    idx = torch.where(is_end, torch.arange(n, device=dev), torch.full((n,), n, device=dev))
    run_end = torch.flip(torch.cummin(torch.flip(idx, [0]), dim=0).values, [0])
    return torch.where(m, run_end, torch.full_like(run_end, -1))


def candidates_per_rollout(cfg: Config, response_positions: Tensor) -> Tensor:
    """[B] int64: min(M, ceil(q * n_b)) candidates of rollouts with n_b response positions (`response_positions`
    [B]); the ceiling guarded against q * n landing a hair above an integer in floating point."""
    k = torch.ceil(cfg.q * response_positions.to(torch.float64) - 1e-9).to(torch.int64)
    return k.clamp(max=cfg.max_candidates) if cfg.max_candidates is not None else k


def select_candidates(cfg: Config, batch: TokenBatch, per_token_loss: Tensor) -> Candidates:
    """Top-q response positions of each rollout by per-token loss, at most M per rollout (largest first).

    Args: per_token_loss `[N]` (d_t by default), detached. Rollout b with n_b response positions gets
    min(M, ceil(q * n_b)) candidates; ties go to the earlier position.
    Returns: positions sorted ascending.
    """
    if per_token_loss.shape != (batch.num_positions,):
        raise ValueError(
            f"select_candidates: per_token_loss must be [N] = [{batch.num_positions}], got"
            f" {tuple(per_token_loss.shape)}"
        )
    loss = per_token_loss.detach()
    resp = batch.response_mask.nonzero().flatten()
    if resp.numel() == 0:
        return Candidates(positions=resp, loss=loss[resp])
    lv, sq = loss[resp], batch.seq_ids[resp]
    order = torch.sort(lv, descending=True, stable=True).indices  # largest first, ties by position
    order = order[torch.sort(sq[order], stable=True).indices]  # grouped by rollout, keeping that order
    sorted_seq = sq[order]
    counts = torch.bincount(sorted_seq)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_seq]
    k = candidates_per_rollout(cfg, counts)
    pos = torch.sort(resp[order[rank < k[sorted_seq]]]).values
    return Candidates(positions=pos, loss=loss[pos])


def rollout_windows(batch: TokenBatch, positions: Tensor, window: int) -> Windows:
    """The student's own window after (x, y_<t): y_t..y_{t+K-1}, cut at the end of the response run."""
    run_end = response_run_end(batch)
    k = torch.arange(window, device=positions.device)
    idx = positions.unsqueeze(1) + k
    lengths = (run_end[positions] - positions + 1).clamp(min=0, max=window)
    tokens = batch.tokens[idx.clamp(max=max(batch.num_positions - 1, 0))]
    tokens = torch.where(k.unsqueeze(0) < lengths.unsqueeze(1), tokens, torch.zeros_like(tokens))
    return Windows(tokens=tokens, lengths=lengths)


def future_weights(batch: TokenBatch, positions: Tensor, window: int, gamma: float) -> tuple[Tensor, Tensor]:
    """Positions t+1..t+K after each anchor (within its response run) and weights gamma^j over them, summing to 1.

    Returns: idx `[C, K]` int64 (clamped into range where invalid) and w `[C, K]` float64 (0 where invalid; a row
    with no future token is all zero). gamma=1 gives uniform weights.
    """
    run_end = response_run_end(batch)
    j = torch.arange(1, window + 1, device=positions.device)
    idx = positions.unsqueeze(1) + j
    valid = idx <= run_end[positions].unsqueeze(1)
    w = torch.where(valid, torch.pow(torch.tensor(gamma, dtype=torch.float64), j.to(torch.float64)), 0.0)
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-300), 0.0)
    return idx.clamp(max=max(batch.num_positions - 1, 0)), w


def lookahead_scores(cfg: Config, batch: TokenBatch, positions: Tensor, per_token_divergence: Tensor) -> Tensor:
    """D_t = sum_{j=1..K'} gamma^j d_{t+j} / sum_j gamma^j on the student's own rollout; NaN when K' = 0.

    `[N]` d (detached) and `[C]` positions -> `[C]` float64.
    """
    idx, w = future_weights(batch, positions, cfg.window, cfg.lookahead_gamma)
    d = per_token_divergence.detach().to(torch.float64)
    scores = (w * d[idx]).sum(dim=1)
    return torch.where(w.sum(dim=1) > 0, scores, torch.full_like(scores, math.nan))


def ot_exact(cost: np.ndarray) -> float:
    """Exact OT distance with uniform masses 1/n and 1/m for an `[n, m]` cost matrix: sum_ij P_ij c_ij.

    n == m: an assignment (linear_sum_assignment), the uniform-mass optimum being a permutation (Birkhoff).
    n != m: the transportation LP (HiGHS), exact up to the solver's tolerance (~1e-9).
    """
    n, m = cost.shape
    if n == 0 or m == 0:
        return math.nan
    if n == m:
        r, c = linear_sum_assignment(cost)
        return float(cost[r, c].sum() / n)
    rows = kron(identity(n, format="csr"), csr_matrix(np.ones((1, m))))  # sum_j P_ij = 1/n
    cols = kron(csr_matrix(np.ones((1, n))), identity(m, format="csr"))  # sum_i P_ij = 1/m
    a_eq = vstack([rows, cols]).tocsr()
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    res = linprog(cost.reshape(-1), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"ot_exact: transport LP failed ({res.message})")
    return float(res.fun)


def ot_sinkhorn(cost: Tensor, n: Tensor, m: Tensor, eps: float, iters: int) -> Tensor:
    """Batched entropic OT (log-domain Sinkhorn) with uniform masses on the first n[c] rows and m[c] columns.

    Args: cost `[C, N_max, M_max]` (padded entries ignored), n and m `[C]` int64 >= 1.
    Returns: `[C]` transport cost sum_ij P_ij c_ij of the final plan (columns exact, rows converged).
    """
    c, n_max, m_max = cost.shape
    dev, dt = cost.device, cost.dtype
    rv = torch.arange(n_max, device=dev).unsqueeze(0) < n.unsqueeze(1)
    cv = torch.arange(m_max, device=dev).unsqueeze(0) < m.unsqueeze(1)
    pair = rv.unsqueeze(2) & cv.unsqueeze(1)
    neg_inf = torch.tensor(-math.inf, dtype=dt, device=dev)
    kern = torch.where(pair, -cost / eps, neg_inf)
    log_a = torch.where(rv, -torch.log(n.to(dt)).unsqueeze(1), neg_inf)
    log_b = torch.where(cv, -torch.log(m.to(dt)).unsqueeze(1), neg_inf)
    f = torch.zeros(c, n_max, dtype=dt, device=dev)
    g = torch.where(cv, torch.zeros((), dtype=dt, device=dev), neg_inf)
    for _ in range(iters):
        f = torch.where(rv, log_a - torch.logsumexp(kern + g.unsqueeze(1), dim=2), neg_inf)
        g = torch.where(cv, log_b - torch.logsumexp(kern + f.unsqueeze(2), dim=1), neg_inf)
    plan = torch.exp(kern + f.unsqueeze(2) + g.unsqueeze(1))
    return (plan * torch.where(pair, cost, torch.zeros((), dtype=dt, device=dev))).sum(dim=(1, 2))


def _unit_embeddings(windows: Windows, embedding: Tensor, vocab_size: int | None, group: ProcessGroup | None) -> Tensor:
    """[C, K, H] L2-normalised input embeddings (fp32, fp64 for an fp64 table; zero rows past the lengths).

    Only the distinct ids are looked up and communicated, not C*K rows.
    """
    valid = windows.valid()
    ids = torch.where(valid, windows.tokens, torch.zeros_like(windows.tokens))
    uniq, inverse = torch.unique(ids, return_inverse=True)
    rows = vocab_parallel_embedding(embedding, uniq.to(embedding.device), vocab_size=vocab_size, group=group)
    rows = torch.nn.functional.normalize(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
    out = rows[inverse.to(rows.device)]
    return out * valid.to(out.device).unsqueeze(-1)


def window_ot_scores(
    cfg: Config,
    teacher_windows: Windows,
    student_windows: Windows,
    embedding: Tensor,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    """D_t = OT(u, s) with cost c_ij = 1 - cos(e(u_i), e(s_j)) over the student's L2-normalised input embeddings.

    Args: `[C, K]` teacher and student windows (row c for candidate c), `embedding` this rank's `[V_local, H]`
    shard of the student's vocab-parallel input embedding. Returns `[C]` float64.
    """
    if teacher_windows.tokens.shape[0] != student_windows.tokens.shape[0]:
        raise ValueError(
            f"window_ot: {teacher_windows.tokens.shape[0]} teacher windows but {student_windows.tokens.shape[0]}"
            " student windows (one each per candidate)"
        )
    n_c = teacher_windows.tokens.shape[0]
    if n_c == 0:
        return torch.zeros(0, dtype=torch.float64)
    for name, w in (("teacher", teacher_windows), ("student", student_windows)):
        if int(w.lengths.min()) < 1:
            raise ValueError(f"window_ot: every {name} window needs >= 1 token (a window cut by EOS keeps the EOS)")
    eu = _unit_embeddings(teacher_windows, embedding, vocab_size, group)
    es = _unit_embeddings(student_windows, embedding, vocab_size, group)
    cost = (1.0 - torch.bmm(eu, es.transpose(1, 2))).to(torch.float64)
    n, m = teacher_windows.lengths.to(cost.device), student_windows.lengths.to(cost.device)
    if cfg.ot_solver == "sinkhorn":
        return ot_sinkhorn(cost, n, m, cfg.sinkhorn_eps, cfg.sinkhorn_iters).cpu()
    cost_np = cost.cpu().numpy()
    n_l, m_l = n.tolist(), m.tolist()
    return torch.tensor([ot_exact(cost_np[i, : n_l[i], : m_l[i]]) for i in range(n_c)], dtype=torch.float64)


ORACLE_TAU = 0.5
"""The oracle detector's threshold between its scores 0 (surface) and 1 (reasoning)."""


def oracle_scores(choice_kinds: list[str | None] | None, n: int) -> Tensor:
    """[C] float64 D of the oracle detector: 1 for a reasoning choice, 0 for a surface choice, NaN when unknown."""
    if choice_kinds is None or len(choice_kinds) != n:
        raise ValueError(
            f"detect: the oracle detector needs choice_kinds, one per candidate ({n}); got"
            f" {None if choice_kinds is None else len(choice_kinds)} (the task must label its choices)"
        )
    value = {"reasoning": 1.0, "surface": 0.0}
    return torch.tensor([value.get(k, math.nan) if k else math.nan for k in choice_kinds], dtype=torch.float64)


def threshold(cfg: Config, scores: Tensor) -> float:
    """tau: the fixed value, or the q_d quantile (linear interpolation) of the finite scores; NaN if none."""
    if cfg.tau is not None:
        return float(cfg.tau)
    finite = scores[~torch.isnan(scores)]
    if finite.numel() == 0:
        return math.nan
    return float(torch.quantile(finite.to(torch.float64), cfg.q_d))


def _spearman(a: Tensor, b: Tensor) -> float:
    if a.numel() < 2:
        return math.nan
    ra = torch.argsort(torch.argsort(a)).to(torch.float64)
    rb = torch.argsort(torch.argsort(b)).to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _broadcast_scores(scores: Tensor, group: ProcessGroup | None, device: torch.device) -> Tensor:
    """Make every rank of the group use group-rank 0's scores (they are equal up to solver non-determinism)."""
    if group is None or dist.get_world_size(group) == 1:
        return scores
    buf = scores.to(device)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.cpu()


def detect(
    cfg: Config,
    batch: TokenBatch,
    candidates: Candidates,
    per_token_divergence: Tensor,
    *,
    teacher_windows: Windows | None = None,
    student_windows: Windows | None = None,
    embedding: Tensor | None = None,
    choice_kinds: list[str | None] | None = None,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> Detection:
    """Score the candidates and decide which are divergent (D_t >= tau; no-window candidates are kept divergent).

    Inputs by detector:
        window_ot: `teacher_windows` (row c: K teacher tokens after (x, y_<t) for t = candidates.positions[c]),
            `embedding` (this rank's `[V_local, H]` student input-embedding shard), `vocab_size`, `group`; and
            `student_windows` when cfg.student_window == 'fresh' (else the rollout's own tokens are used).
        lookahead: `per_token_divergence` `[N]` d_t on the rollout (detached).
        oracle: `choice_kinds`, the task's label of each candidate ('reasoning' -> D = 1, 'surface' -> D = 0,
            unknown -> NaN, kept divergent); tau is 0.5.
        none: nothing; every candidate is divergent (no suppression).
    Returns a Detection whose metrics hold the diagnostics of docs/topd.md.
    """
    start = time.perf_counter()
    pos = candidates.positions
    windows_used = 0
    if cfg.detector == "window_ot":
        if teacher_windows is None or embedding is None:
            raise ValueError(
                "detect: window_ot needs teacher_windows (K teacher tokens after (x, y_<t) for each of"
                " candidates.positions) and embedding (the student's input-embedding shard)"
            )
        if teacher_windows.tokens.shape[0] != pos.numel():
            raise ValueError(
                f"detect: {teacher_windows.tokens.shape[0]} teacher windows for {pos.numel()} candidates"
                " (one per candidate, in candidates.positions order)"
            )
        if cfg.student_window == "fresh":
            if student_windows is None:
                raise ValueError("detect: student_window='fresh' needs student_windows (one per candidate)")
            windows_used = 2 * pos.numel()
        else:
            student_windows = rollout_windows(batch, pos, cfg.window)
            windows_used = pos.numel()
        scores = window_ot_scores(cfg, teacher_windows, student_windows, embedding, vocab_size=vocab_size, group=group)
        scores = _broadcast_scores(scores, group, embedding.device)
    elif cfg.detector == "lookahead":
        if per_token_divergence.shape != (batch.num_positions,):
            raise ValueError(f"detect: per_token_divergence must be [N] = [{batch.num_positions}]")
        scores = lookahead_scores(cfg, batch, pos, per_token_divergence).cpu()
    elif cfg.detector == "oracle":
        scores = oracle_scores(choice_kinds, pos.numel())
    else:
        scores = torch.full((pos.numel(),), math.nan, dtype=torch.float64)
    if cfg.detector == "oracle":
        tau = ORACLE_TAU
    else:
        tau = threshold(cfg, scores) if cfg.detector != "none" else math.nan
    has = ~torch.isnan(scores)
    divergent = ~has | (scores >= tau) if not math.isnan(tau) else torch.ones_like(has)
    divergent = divergent.to(pos.device)
    elapsed = time.perf_counter() - start
    return Detection(
        num_positions=batch.num_positions,
        candidates=candidates,
        scores=scores,
        divergent=divergent,
        tau=tau,
        metrics=_metrics(candidates, scores, divergent, tau, windows_used, elapsed),
    )


def _metrics(cands: Candidates, scores: Tensor, divergent: Tensor, tau: float, windows: int, sec: float) -> dict:
    c = int(cands.positions.numel())
    n_div = int(divergent.sum())
    has = ~torch.isnan(scores)
    s = scores[has]
    out = {
        "detect/candidates": float(c),
        "detect/divergent": float(n_div),
        "detect/non_divergent_share": (c - n_div) / c if c else math.nan,
        "detect/tau": tau,
        "detect/windows": float(windows),
        "detect/time_s": sec,
    }
    if s.numel():
        qs = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        out.update(
            {
                "detect/D_mean": float(s.mean()),
                "detect/D_std": float(s.std()) if s.numel() > 1 else 0.0,
                "detect/D_min": float(s.min()),
                "detect/D_p10": qs[0],
                "detect/D_p50": qs[1],
                "detect/D_p90": qs[2],
                "detect/D_max": float(s.max()),
            }
        )
    out["detect/loss_D_spearman"] = _spearman(cands.loss.detach().cpu().to(torch.float64)[has.cpu()], s)
    return out
