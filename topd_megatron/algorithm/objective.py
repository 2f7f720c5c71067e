"""The TOPD objective: OPD baselines, suppression of surface mismatches and near-future guidance (docs/topd.md).

    L = L_OPD (per-token weight beta_s on non-divergent candidates, 1 elsewhere) + lambda * L_guidance

with every sum normalised by N (token mean, per-sequence mean or a constant). Presets (`preset(name)`):

    opd                  dense OPD: L = sum_t m_t d_t / N
    opd_pg               policy-gradient OPD: A_t = -r_t (detached), L = -sum_t m_t A_t rho_t / N
    opd_suppress         opd + window_ot detector + suppression (beta_s = 0), no guidance: the paper's middle arm
    topd                 window_ot detector + suppression + teacher_window guidance (the paper's method; Config())
    topd_lookahead       lookahead detector + suppression + on_path guidance: TOPD without any extra generation
    topd_budget          topd with a guidance budget of B = 1 window per rollout (its most divergent candidate): the
                         tiny job's counterpart of the cap a recipe states (topd_70b: 16 of its ~45 guided windows per
                         rollout); a recipe sets its own objective.guidance_budget
    controls (docs/tiny.md):
    topd_upweight        topd's detector and suppression; lambda more weight on d_t at divergent t, no window
    topd_random_windows  topd, with its windows at as many random response positions instead of the divergent ones
    topd_oracle          topd with the task's own labels as the detector (tasks that label their choices)
    opd_kl_discount      opd_pg with the discounted future log-ratio as advantage (Tinker's kl_discount, gamma 0.9)

One micro-batch, in the loop's order (see topd_megatron/algorithm/detection.py for why detection comes first):

    batch = TokenBatch(tokens=y, seq_ids=..., response_mask=m, rollout_logprobs=...)  # or TokenBatch.from_padded
    terms = token_terms(cfg, batch, student_logits, teacher_logits, vocab_size=V, group=tp)  # [N, V_local] shards
    cands = detection.select_candidates(cfg.detection, batch, terms.divergence.detach())
    u = <teacher samples K tokens after (x, y_<t) for t in cands.positions>          # window_ot only
    det = detection.detect(cfg.detection, batch, cands, terms.divergence.detach(), teacher_windows=u,
                            embedding=student_embedding_shard, vocab_size=V, group=tp)
    g_pos, g_win = det.guidance_positions(), det.guidance_windows(u)                  # teacher_window only:
    s_b, t_b = <student and teacher logits on (x, y_<t, u_1..u_K), packed [sum(g_win.lengths), V_local]>
    branch = branch_terms(cfg, g_pos, g_win, s_b, t_b, vocab_size=V, group=tp)
    loss_value, metrics = loss(cfg, batch, terms, det, branch)
    loss_value.backward()

A teacher that cannot be colocated (served by SGLang, `teacher_source='sglang'`) reports log-probs, not logits: pass a
`ServedTeacher` in place of the teacher logits, and set `teacher_signal`:
    top_k          d_t = reverse KL on the teacher's top-k support, both renormalised (loss.topk_divergence); exact
                   gradients through the student's logits at those k ids
    sampled_token  d_t = log p_S(y_t) - log p_T(y_t), the one-sample estimate of the reverse KL at the sampled token,
                   with the score-function gradient (log p_S(y_t) - log p_T(y_t)) * grad log p_S(y_t)
Teacher-window guidance then uses the teacher's top-k on the branch (reverse_kl) or, with sampled_token, the
forward-KL sample log p_T(u_j) - log p_S(u_j) (gradient: the cross-entropy on u_j, the teacher's own tokens).

For `opd` / `opd_pg` skip the detection lines and call `loss(cfg, batch, terms)`. For `topd_lookahead` nothing is
generated: `detect` needs only the per-token divergences and `loss` needs no branch. With the lookahead detector and
teacher_window guidance, the loop samples teacher windows only for `det.guidance_positions()` and passes them to
`branch_terms` directly. `token_terms` may also be run
under `torch.no_grad()` first (to free the student's graph while the teacher generates windows) and again with
gradients for the loss. Logits rows are aligned with `batch.tokens` (row i scores tokens[i]); `[B, T, V_local]`
logits are accepted and flattened. The value and metrics are identical on every rank of the TP group.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from topd_megatron.algorithm import detection
from topd_megatron.algorithm.detection import future_weights
from topd_megatron.algorithm.loss import token_divergence, token_logprobs, topk_divergence
from topd_megatron.algorithm.types import Detection, TokenBatch, Windows
from topd_megatron.choices import check_choices

PRESETS: tuple[str, ...] = (
    "opd",
    "opd_pg",
    "opd_suppress",
    "topd",
    "topd_lookahead",
    "topd_budget",
    "topd_upweight",
    "topd_random_windows",
    "topd_oracle",
    "opd_kl_discount",
)

TINY_GUIDANCE_BUDGET = 1
"""guidance_budget of the topd_budget preset. The tiny task's rollouts have ~2.2 guided windows each; B = 1 keeps about
the share of them that topd_70b's B = 16 keeps of its ~45 (docs/tiny.md, "The guidance budget")."""


@dataclass(kw_only=True, slots=True)
class Config:
    """The distillation objective; the defaults are the paper's TOPD (window_ot + suppression + teacher_window)."""

    detection: detection.Config = field(default_factory=detection.Config)
    """Candidates and detector (q, M, tau/q_D, K, OT solver, Sinkhorn, window source, lookahead gamma)."""
    opd: Literal["dense", "pg"] = "dense"
    """'dense': L = sum m_t d_t / N through p_t over the whole vocabulary; 'pg': the policy-gradient form."""
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"
    """d_t, the per-token divergence of dense OPD, of candidate selection, lookahead and on_path guidance."""
    jsd_beta: float = 0.5
    """beta of JSD(beta) when divergence == 'jsd'."""
    suppress_weight: float = 0.0
    """beta_s: OPD weight of high-loss tokens judged non-divergent (1 elsewhere)."""
    guidance: Literal["none", "teacher_window", "on_path", "upweight"] = "teacher_window"
    """Guidance at divergent t: the branch (x, y_<t, u_1..u_K) scored by both models (the paper's), the rollout's own
    future d_{t+1..t+K} (ours), or 'upweight': lambda more weight on d_t itself, no window (a control: the same extra
    loss mass at the same positions as a window, whose omega sums to 1)."""
    guidance_coef: float = 1.0
    """lambda: L = L_OPD + lambda * L_guidance (1.0: untuned, a window weighs like one more token at its anchor)."""
    guidance_at: Literal["divergent", "random"] = "divergent"
    """Where guidance acts: the divergent candidates, or (a control) as many uniformly random response positions of
    the same rollout, so that only the placement differs."""
    guidance_replaces_opd: bool = False
    """False: the OPD term at a guided position stays (its weight n_t plus lambda n_t omega_1 g_1 from the window,
    whose first token is scored by the same distribution); True: the window replaces it (OPD weight 0 there)."""
    guidance_weights: Literal["uniform", "geometric"] = "uniform"
    """omega_j over a window of real length K': 1/K', or gamma_g^j normalised to sum to 1."""
    guidance_gamma: float = 0.9
    """gamma_g of geometric omega."""
    guidance_budget: int | None = None
    """teacher_window guidance on at most this many windows per rollout: the divergent candidates with the largest
    D_t (algorithm/budget.py; with guidance_at='random', at most this many random positions); the others stay
    divergent (not suppressed, their OPD term kept) without a window. None: every one."""
    guidance_divergence: Literal["reverse_kl", "forward_kl", "cross_entropy"] = "reverse_kl"
    """g_j of teacher_window guidance: KL at each branch position, or -log p_S(u_j) (cross-entropy on u_j)."""
    normalization: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    """N: response tokens of the micro-batch; per rollout then mean over rollouts; or `normalization_constant`."""
    normalization_constant: float | None = None
    """N for normalization == 'constant' (e.g. the number of tokens of the whole step, for gradient accumulation)."""
    pg_discount: float = 0.0
    """opd_pg: A_t = -sum_{j>=t} gamma^(j-t) r_j over the rest of the response (Tinker's kl_discount_factor: the
    discounted future KL); 0 is the per-token advantage -r_t."""
    rho_clip: float | None = 2.0
    """opd_pg: rho_t = pi_S(y_t) / pi_rollout(y_t) truncated at this value (value and gradient weight); None: no cap."""
    chunk_size: int | None = None
    """Tokens per chunk of the vocab-parallel kernels (None: chosen from V_local and the device)."""
    teacher_signal: Literal["logits", "top_k", "sampled_token"] = "logits"
    """What the teacher provides: its vocab-sharded logits (a colocated Megatron teacher), or, for a teacher served
    by SGLang, its top-k log-probs at every position ('top_k') or only the log-prob of the sampled token
    ('sampled_token'); see the module docstring for the loss each form gives."""
    teacher_top_k: int = 20
    """k of teacher_signal='top_k'."""

    def __post_init__(self) -> None:
        check_choices(self, "objective")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"objective.jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if not 0.0 <= self.suppress_weight <= 1.0:
            raise ValueError(f"objective.suppress_weight (beta_s) must be in [0, 1], got {self.suppress_weight}")
        if self.guidance != "none" and self.detection.detector == "none":
            raise ValueError(
                f"objective.guidance={self.guidance!r} needs a detector (it acts at divergent positions); set"
                " detection.detector to 'window_ot' or 'lookahead', or guidance='none'"
            )
        if not 0.0 <= self.pg_discount < 1.0:
            raise ValueError(f"objective.pg_discount must be in [0, 1), got {self.pg_discount}")
        if self.guidance_coef < 0.0:
            raise ValueError(f"objective.guidance_coef (lambda) must be >= 0, got {self.guidance_coef}")
        if self.guidance_budget is not None and self.guidance_budget < 1:
            raise ValueError(f"objective.guidance_budget must be >= 1 or None, got {self.guidance_budget}")
        if self.guidance_budget is not None and self.guidance != "teacher_window":
            raise ValueError(
                f"objective.guidance_budget caps the windows of teacher_window guidance; guidance={self.guidance!r}"
                " samples none (set guidance_budget=None)"
            )
        if not 0.0 < self.guidance_gamma <= 1.0:
            raise ValueError(f"objective.guidance_gamma must be in (0, 1], got {self.guidance_gamma}")
        if self.normalization == "constant" and not (self.normalization_constant or 0) > 0:
            raise ValueError("objective.normalization='constant' needs normalization_constant > 0")
        if self.rho_clip is not None and self.rho_clip <= 0.0:
            raise ValueError(f"objective.rho_clip must be > 0 or None, got {self.rho_clip}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"objective.chunk_size must be >= 1 or None, got {self.chunk_size}")
        self._check_teacher_signal()

    def _check_teacher_signal(self) -> None:
        if self.teacher_signal == "logits":
            return
        if self.teacher_top_k < 1:
            raise ValueError(f"objective.teacher_top_k must be >= 1, got {self.teacher_top_k}")
        if self.divergence != "reverse_kl":
            raise ValueError(
                f"objective.teacher_signal={self.teacher_signal!r} gives the reverse KL only (a served teacher reports"
                f" log-probs, not its whole distribution); set objective.divergence=reverse_kl"
            )
        allowed = ("reverse_kl", "cross_entropy") if self.teacher_signal == "top_k" else ("forward_kl", "cross_entropy")
        if self.guidance == "teacher_window" and self.guidance_divergence not in allowed:
            raise ValueError(
                f"objective.guidance_divergence={self.guidance_divergence!r} is not available with"
                f" teacher_signal={self.teacher_signal!r}; choose one of {allowed}"
                + (
                    " (the branch tokens u_j are the teacher's samples: log p_T(u_j) - log p_S(u_j) estimates the"
                    " forward KL) or teacher_signal=top_k"
                    if self.teacher_signal == "sampled_token"
                    else ""
                )
            )

    @property
    def omega_gamma(self) -> float:
        """The geometric ratio of omega (1.0 gives uniform weights)."""
        return self.guidance_gamma if self.guidance_weights == "geometric" else 1.0


def preset(name: str) -> Config:
    """The Config of a named algorithm (see the module docstring); change fields with dataclasses.replace."""
    det = detection.Config
    configs = {
        "opd": lambda: Config(detection=det(detector="none"), guidance="none"),
        "opd_pg": lambda: Config(detection=det(detector="none"), guidance="none", opd="pg"),
        "opd_suppress": lambda: Config(detection=det(detector="window_ot"), guidance="none"),
        "topd": lambda: Config(detection=det(detector="window_ot"), guidance="teacher_window"),
        "topd_lookahead": lambda: Config(detection=det(detector="lookahead"), guidance="on_path"),
        "topd_budget": lambda: Config(detection=det(detector="window_ot"), guidance_budget=TINY_GUIDANCE_BUDGET),
        "topd_upweight": lambda: Config(detection=det(detector="window_ot"), guidance="upweight"),
        "topd_random_windows": lambda: Config(detection=det(detector="window_ot"), guidance_at="random"),
        "topd_oracle": lambda: Config(detection=det(detector="oracle"), guidance="teacher_window"),
        "opd_kl_discount": lambda: Config(detection=det(detector="none"), guidance="none", opd="pg", pg_discount=0.9),
    }
    if name not in configs:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    return configs[name]()


@dataclass(kw_only=True, slots=True)
class ServedTeacher:
    """A served teacher's report on a batch's N positions (in place of its logits), detached.

    `top_ids`/`top_logprobs` are set for teacher_signal='top_k'. Masked positions may hold anything finite (0s).
    """

    token_logprobs: Tensor
    """[N] log p_T(y_t) of the batch's tokens."""
    top_ids: Tensor | None = None
    """[N, k] the teacher's k most likely ids at each position (global ids, below the true vocabulary)."""
    top_logprobs: Tensor | None = None
    """[N, k] their log-probs."""

    def __post_init__(self) -> None:
        n = self.token_logprobs.shape[0]
        if self.token_logprobs.dim() != 1:
            raise ValueError(f"ServedTeacher.token_logprobs must be [N], got {tuple(self.token_logprobs.shape)}")
        if (self.top_ids is None) != (self.top_logprobs is None):
            raise ValueError("ServedTeacher: top_ids and top_logprobs go together")
        if self.top_ids is not None and (self.top_ids.shape != self.top_logprobs.shape or self.top_ids.shape[0] != n):
            raise ValueError(
                f"ServedTeacher: top_ids {tuple(self.top_ids.shape)} and top_logprobs {tuple(self.top_logprobs.shape)}"
                f" must both be [N, k] with N = {n}"
            )

    @staticmethod
    def concat(parts: list[ServedTeacher]) -> ServedTeacher:
        """The reports of consecutive position ranges as one."""
        top = parts[0].top_ids is not None
        return ServedTeacher(
            token_logprobs=torch.cat([p.token_logprobs for p in parts]),
            top_ids=torch.cat([p.top_ids for p in parts]) if top else None,  # type: ignore[misc]
            top_logprobs=torch.cat([p.top_logprobs for p in parts]) if top else None,  # type: ignore[misc]
        )

    def select_windows(self, lengths: Tensor, rows: Tensor) -> ServedTeacher:
        """Of a report packed window after window (window g holds `lengths[g]` rows), windows `rows` [G] packed the
        same way, in that order."""
        offsets = (torch.cumsum(lengths, 0) - lengths).tolist()
        n = lengths.tolist()
        idx = [i for r in rows.tolist() for i in range(offsets[r], offsets[r] + n[r])]
        index = torch.tensor(idx, dtype=torch.long)
        top = (None, None) if self.top_ids is None else (self.top_ids[index], self.top_logprobs[index])
        return ServedTeacher(token_logprobs=self.token_logprobs[index], top_ids=top[0], top_logprobs=top[1])

    def slice(self, start: int, stop: int) -> ServedTeacher:
        """Positions [start, stop)."""
        top = (None, None) if self.top_ids is None else (self.top_ids[start:stop], self.top_logprobs[start:stop])
        return ServedTeacher(token_logprobs=self.token_logprobs[start:stop], top_ids=top[0], top_logprobs=top[1])

    def window_rows(self, lengths: Tensor, windows: range) -> ServedTeacher:
        """The rows of windows `windows.start .. windows.stop - 1` of a report packed window after window (window g
        holds `lengths[g]` rows): what one branch micro-batch's guidance needs."""
        offsets = torch.cumsum(lengths, 0) - lengths
        if len(windows) == 0:
            return self.slice(0, 0)
        last = windows.stop - 1
        return self.slice(int(offsets[windows.start]), int(offsets[last] + lengths[last]))


def sampled_log_ratio(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """[N] r_t = log p_S(y_t) - log p_T(y_t) as a value, with the score-function gradient r_t * grad log p_S(y_t):
    the one-sample reverse-KL estimate at the student's own sampled token (teacher log-probs detached)."""
    r = (student_logprobs - teacher_logprobs.to(student_logprobs)).detach()
    return r * torch.exp(student_logprobs - student_logprobs.detach())


def _served_divergence(cfg: Config, s: Tensor, tokens: Tensor, served: ServedTeacher, kw: dict) -> Tensor:
    if cfg.teacher_signal == "top_k":
        if served.top_ids is None:
            raise ValueError("teacher_signal='top_k' needs the teacher's top-k (ServedTeacher.top_ids)")
        k = cfg.teacher_top_k
        return topk_divergence(s, served.top_ids[:, :k].to(s.device), served.top_logprobs[:, :k].to(s.device), **kw)
    return sampled_log_ratio(token_logprobs(s, tokens, **kw), served.token_logprobs.to(s.device))


@dataclass(kw_only=True, slots=True)
class TokenTerms:
    """Per-token quantities on the rollout, `[N]` each, differentiable with respect to the student's logits."""

    divergence: Tensor | None
    """d_t (cfg.divergence); computed for dense OPD, for any detector and for on_path guidance."""
    student_logprobs: Tensor | None
    """log p_S(y_t) (opd_pg); 0 where masked."""
    teacher_logprobs: Tensor | None
    """log p_T(y_t) (opd_pg), detached; 0 where masked."""
    seconds: float
    """Wall time of the forward computation (the OPD step's share of the metrics)."""


@dataclass(kw_only=True, slots=True)
class BranchTerms:
    """Guidance values g_j on the branch sequences (x, y_<t, u_1..u_K) of the divergent positions."""

    positions: Tensor
    """[G] anchor positions t (divergent positions of the batch)."""
    lengths: Tensor
    """[G] real window lengths K'_g."""
    values: Tensor
    """[sum(lengths)] g_j, window after window, differentiable with respect to the student's branch logits."""
    seconds: float


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _flatten(logits: Tensor, n: int, what: str) -> Tensor:
    if logits.dim() == 3:
        logits = logits.reshape(-1, logits.shape[-1])
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"{what}: expected [N, V_local] or [B, T, V_local] logits, N = {n}; got {tuple(logits.shape)}")
    return logits


def _check_teacher(cfg: Config, teacher: Tensor | ServedTeacher | None, fn: str) -> None:
    served = isinstance(teacher, ServedTeacher)
    if served and cfg.teacher_signal == "logits":
        raise ValueError(f"{fn}: a ServedTeacher needs objective.teacher_signal='top_k' or 'sampled_token'")
    if not served and teacher is not None and cfg.teacher_signal != "logits":
        raise ValueError(f"{fn}: teacher_signal={cfg.teacher_signal!r} takes a ServedTeacher, not teacher logits")


def token_terms(
    cfg: Config,
    batch: TokenBatch,
    student_logits: Tensor,
    teacher: Tensor | ServedTeacher,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> TokenTerms:
    """Per-token d_t and/or log-probs of the rollout tokens from this rank's `[N, V_local]` vocabulary shards.

    `teacher` is the teacher's `[N, V_local]` logits shard (teacher_signal='logits') or a served teacher's report on
    the same N positions (`ServedTeacher`, teacher_signal 'top_k' or 'sampled_token')."""
    n = batch.num_positions
    s = _flatten(student_logits, n, "token_terms: student_logits")
    _check_teacher(cfg, teacher, "token_terms")
    served = teacher if isinstance(teacher, ServedTeacher) else None
    t = None if served is not None else _flatten(teacher, n, "token_terms: teacher_logits")
    if served is not None and served.token_logprobs.shape[0] != n:
        raise ValueError(f"token_terms: the ServedTeacher covers {served.token_logprobs.shape[0]} positions, N = {n}")
    start = _now(s.device)
    need_d = cfg.opd == "dense" or cfg.detection.detector != "none" or cfg.guidance == "on_path"
    kw = {"vocab_size": vocab_size, "group": group, "chunk_size": cfg.chunk_size}
    # masked positions may hold any id (padding, -100): score a valid id there and zero it out
    tok = torch.where(batch.response_mask, batch.tokens, torch.zeros_like(batch.tokens)).to(s.device)
    if served is None:
        d = token_divergence(s, t, cfg.divergence, beta=cfg.jsd_beta, **kw) if need_d else None
    else:
        d = _served_divergence(cfg, s, tok, served, kw) if need_d else None
    slp = tlp = None
    if cfg.opd == "pg":
        slp = token_logprobs(s, tok, **kw)
        if served is None:
            with torch.no_grad():
                tlp = token_logprobs(t, tok, **kw)
        else:
            tlp = torch.where(batch.response_mask.to(s.device), served.token_logprobs.to(slp), torch.zeros_like(slp))
    return TokenTerms(divergence=d, student_logprobs=slp, teacher_logprobs=tlp, seconds=_now(s.device) - start)


def branch_terms(
    cfg: Config,
    positions: Tensor,
    windows: Windows,
    student_logits: Tensor,
    teacher_logits: Tensor | ServedTeacher | None,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> BranchTerms:
    """g_j on the branch windows: `[W, V_local]` shards, W = sum(windows.lengths), rows window after window, row j of
    window g being the distribution over u_j given (x, y_<t_g, u_<j). `teacher_logits` may be None for
    guidance_divergence='cross_entropy' (it needs only the student); for a served teacher it is the teacher's report
    on the W window tokens (`ServedTeacher`: top-k for reverse_kl, the log-probs of u_j for forward_kl)."""
    w = int(windows.lengths.sum())
    if positions.shape != (windows.lengths.shape[0],):
        raise ValueError(f"branch_terms: {positions.numel()} positions for {windows.lengths.shape[0]} windows")
    if student_logits.dim() != 2 or student_logits.shape[0] != w:
        raise ValueError(
            f"branch_terms: expected packed [W, V_local] branch logits with W = sum(lengths) = {w}, got"
            f" {tuple(student_logits.shape)}"
        )
    start = _now(student_logits.device)
    kw = {"vocab_size": vocab_size, "group": group, "chunk_size": cfg.chunk_size}
    if cfg.guidance_divergence != "cross_entropy":
        _check_teacher(cfg, teacher_logits, "branch_terms")
    if cfg.guidance_divergence == "cross_entropy":
        values = -token_logprobs(student_logits, windows.packed().to(student_logits.device), **kw)
    elif isinstance(teacher_logits, ServedTeacher):
        served = teacher_logits
        if served.token_logprobs.shape[0] != w:
            raise ValueError(f"branch_terms: the ServedTeacher covers {served.token_logprobs.shape[0]} rows, W = {w}")
        if cfg.teacher_signal == "top_k":
            k = cfg.teacher_top_k
            ids, lps = served.top_ids[:, :k].to(student_logits.device), served.top_logprobs[:, :k]
            values = topk_divergence(student_logits, ids, lps.to(student_logits.device), **kw)
        else:  # forward_kl sample on the teacher's own tokens u_j: value log q(u_j) - log p(u_j), gradient -grad log p
            slp = token_logprobs(student_logits, windows.packed().to(student_logits.device), **kw)
            values = served.token_logprobs.to(slp) - slp
    else:
        if teacher_logits is None:
            raise ValueError(f"branch_terms: guidance_divergence={cfg.guidance_divergence!r} needs teacher_logits")
        values = token_divergence(student_logits, teacher_logits, cfg.guidance_divergence, **kw)
    return BranchTerms(
        positions=positions, lengths=windows.lengths, values=values, seconds=_now(student_logits.device) - start
    )


def normalizer(
    cfg: Config, batch: TokenBatch, dtype: torch.dtype = torch.float32, *, group: ProcessGroup | None = None
) -> Tensor:
    """[N] weights 1/N per response position (0 elsewhere), for the chosen normalisation mode.

    With `group` (the data-parallel group of a step split over replicas), the counts are all-reduced over it:
    token_mean divides by the response tokens of the whole step, sequence_mean by the rollouts with a response of
    the whole step (times each rollout's own length), so every replica's weights belong to one objective.
    """
    m = batch.response_mask
    mf = m.to(dtype)
    if cfg.normalization == "constant":
        return mf / cfg.normalization_constant
    if cfg.normalization == "token_mean":
        total = mf.sum().reshape(1)
        if group is not None:
            dist.all_reduce(total, group=group)  # response tokens of the whole step
        return mf / total.clamp(min=1.0)
    n_seq = int(batch.seq_ids.max()) + 1 if batch.num_positions else 0
    per_seq = torch.zeros(n_seq, dtype=dtype, device=m.device).index_add_(0, batch.seq_ids, mf)
    n_active = (per_seq > 0).sum().to(dtype).reshape(1)
    if group is not None:
        dist.all_reduce(n_active, group=group)  # rollouts with a response, whole step
    return mf / (per_seq[batch.seq_ids].clamp(min=1.0) * n_active.clamp(min=1.0))


def _opd_per_token(cfg: Config, batch: TokenBatch, terms: TokenTerms, metrics: dict) -> Tensor:
    """[N] per-token OPD term: d_t (dense), or -A_t rho_t = r_t.detach() * rho_t (pg)."""
    if cfg.opd == "dense":
        return terms.divergence
    slp, tlp = terms.student_logprobs, terms.teacher_logprobs
    m = batch.response_mask.to(slp.device)
    r = (slp - tlp).detach()  # A_t = -r_t, detached
    if cfg.pg_discount > 0:  # A_t = -sum_{j>=t} gamma^(j-t) r_j within the response
        r = discounted_future_sum(torch.where(m, r, torch.zeros_like(r)), batch.seq_ids.to(r.device), cfg.pg_discount)
    if batch.rollout_logprobs is None:
        w_is = torch.ones_like(slp)
    else:
        roll = torch.where(m, batch.rollout_logprobs.to(slp.device, slp.dtype), slp.detach())
        w_is = torch.exp(slp.detach() - roll)
    raw = w_is
    if cfg.rho_clip is not None:
        w_is = w_is.clamp(max=cfg.rho_clip)
    rho = w_is * torch.exp(slp - slp.detach())  # value min(rho, c); gradient min(rho, c) * grad log p_S(y_t)
    n_resp = max(int(m.sum()), 1)
    metrics["opd/log_ratio_mean"] = float((r * m).sum()) / n_resp
    metrics["opd/rho_mean"] = float((raw * m).sum()) / n_resp
    metrics["opd/rho_clipped_share"] = float(((raw != w_is) & m).sum()) / n_resp
    return torch.where(m, r * rho, torch.zeros_like(r))


def discounted_future_sum(values: Tensor, seq_ids: Tensor, gamma: float) -> Tensor:
    """[N] y_t = sum_{j>=t, same sequence} gamma^(j-t) values_j, for packed sequences (each contiguous, in order):
    y_t = values_t + gamma * y_{t+1} run backwards, restarting at every sequence boundary. Vectorised over sequences:
    one pass over the longest sequence's positions."""
    n = values.numel()
    if n == 0:
        return values.clone()
    starts = torch.ones(n, dtype=torch.bool, device=values.device)
    starts[1:] = seq_ids[1:] != seq_ids[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(n, device=values.device), 0), 0).values
    col = torch.arange(n, device=values.device) - first  # index within the sequence
    row = torch.cumsum(starts.long(), 0) - 1
    grid = values.new_zeros(int(row[-1]) + 1, int(col.max()) + 1)
    grid[row, col] = values
    acc = values.new_zeros(grid.shape[0])
    for j in range(grid.shape[1] - 1, -1, -1):
        acc = grid[:, j] + gamma * acc
        grid[:, j] = acc
    return grid[row, col]


def _omega(lengths: Tensor, gamma: float, dtype: torch.dtype) -> Tensor:
    """[sum(lengths)] omega_j = gamma^j / sum_{i<=K'} gamma^i per window (uniform for gamma = 1), packed."""
    if lengths.numel() == 0:
        return torch.zeros(0, dtype=dtype, device=lengths.device)
    win = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(win.numel(), device=lengths.device) - starts[win] + 1
    w = torch.pow(torch.tensor(gamma, dtype=torch.float64, device=lengths.device), j.to(torch.float64))
    total = torch.zeros(lengths.numel(), dtype=torch.float64, device=lengths.device).index_add_(0, win, w)
    return (w / total[win]).to(dtype)


def teacher_window_loss(cfg: Config, anchor_weights: Tensor, branch: BranchTerms) -> Tensor:
    """L_g of teacher_window guidance: sum_g n_{t_g} sum_j omega_gj g_gj.

    `anchor_weights` [G] are the normaliser weights n_t at the branch anchors (`branch.positions`), in that order;
    the branch values are packed window after window. A 0-dim tensor, differentiable through `branch.values`.
    """
    lengths = branch.lengths.to(branch.values.device)
    dt = branch.values.dtype
    omega = _omega(lengths, cfg.omega_gamma, dt)
    per_value = torch.repeat_interleave(anchor_weights.to(branch.values.device, dt), lengths)
    return (per_value * omega * branch.values).sum()


def _guided(cfg: Config, detection: Detection | None, dev: torch.device) -> Tensor:
    """[G] the anchors guidance acts on (`Detection.guidance_positions`: divergent, or the random control's)."""
    if detection is None:
        raise ValueError(f"loss: guidance={cfg.guidance!r} acts at divergent positions and needs a detection")
    return detection.guidance_positions().to(dev)


def _guidance_loss(
    cfg: Config,
    batch: TokenBatch,
    terms: TokenTerms,
    detection: Detection | None,
    branch: BranchTerms | None,
    norm: Tensor,
    metrics: dict[str, float],
) -> tuple[Tensor, int]:
    """L_g (before lambda) and the number of guided anchors; fills 'guidance/tokens' and 'time/guidance_s'."""
    dev, dt = norm.device, norm.dtype
    if cfg.guidance == "none":
        return torch.zeros((), dtype=dt, device=dev), 0
    anchors = _guided(cfg, detection, dev)
    metrics["time/guidance_s"] = 0.0  # on_path and upweight reuse the OPD step's d_t: no extra forward
    if cfg.guidance == "teacher_window":
        if branch is None:
            raise ValueError("loss: guidance='teacher_window' needs branch (branch_terms on the guided positions)")
        pos = branch.positions.to(dev)
        if pos.numel() and not bool(torch.isin(pos, anchors).all()):
            raise ValueError("loss: branch.positions must be guided positions (detection.guidance_positions())")
        metrics["guidance/tokens"] = float(branch.lengths.sum())
        metrics["time/guidance_s"] = branch.seconds
        return teacher_window_loss(cfg, norm[pos], branch).to(dt), pos.numel()
    if cfg.guidance == "upweight":
        metrics["guidance/tokens"] = float(anchors.numel())
        return (norm[anchors] * terms.divergence[anchors]).sum(), anchors.numel()
    idx, w = future_weights(batch, anchors, cfg.detection.window, cfg.omega_gamma)  # on_path
    contrib = (w.to(dev, dt) * norm[anchors].unsqueeze(1)).reshape(-1)
    extra = torch.zeros_like(norm).index_add_(0, idx.reshape(-1), contrib)
    metrics["guidance/tokens"] = float((w > 0).sum())
    return torch.where(extra != 0, extra * terms.divergence, torch.zeros_like(norm)).sum(), anchors.numel()


def _opd_weights(cfg: Config, detection: Detection | None, norm: Tensor) -> Tensor:
    """[N] w_t n_t: beta_s on candidates judged non-divergent, 0 at guided positions when the window replaces the
    OPD term there, n_t elsewhere."""
    weight = norm.clone()
    if detection is None or cfg.detection.detector == "none":
        return weight
    weight = torch.where(detection.suppressed_mask().to(norm.device), weight * cfg.suppress_weight, weight)
    if cfg.guidance != "none" and cfg.guidance_replaces_opd:
        weight[detection.guidance_positions().to(norm.device)] = 0.0
    return weight


def loss(
    cfg: Config,
    batch: TokenBatch,
    terms: TokenTerms,
    detection: Detection | None = None,
    branch: BranchTerms | None = None,
    *,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The scalar TOPD loss of a micro-batch and its diagnostics.

    L = sum_t n_t w_t l_t + lambda * L_g, with n_t the normaliser weights (`normalizer`), w_t = beta_s on
    non-divergent candidates (0 at guided t with guidance_replaces_opd) and 1 elsewhere, l_t the OPD term
    (`_opd_per_token`) and, over the guided anchors t (divergent, or random with guidance_at='random'):
        teacher_window: L_g = sum_g n_{t_g} sum_j omega_gj g_gj over the branch windows (`teacher_window_loss`),
        on_path:        L_g = sum_t n_t sum_{j=1..K'} omega_j d_{t+j} (K' cut at the response end),
        upweight:       L_g = sum_t n_t d_t.
    `weights` [N] replaces `normalizer(cfg, batch)` when the normalisation spans more than this micro-batch (a
    training step split into micro-batches and data-parallel replicas).
    Returns (0-dim tensor, metrics): 'loss*', 'opd/*', 'guidance/*', 'time/*' and the detection's 'detect/*'.
    """
    metrics: dict[str, float] = {}
    if cfg.detection.detector != "none" and detection is None:
        raise ValueError(f"loss: detector {cfg.detection.detector!r} is configured but no detection was passed")
    per_tok = _opd_per_token(cfg, batch, terms, metrics)
    dev, dt = per_tok.device, per_tok.dtype
    if weights is not None and weights.shape != (batch.num_positions,):
        raise ValueError(f"loss: weights must be [N] = [{batch.num_positions}], got {tuple(weights.shape)}")
    norm = (normalizer(cfg, batch, dt) if weights is None else weights.to(dt)).to(dev)
    weight = _opd_weights(cfg, detection, norm)
    # padded or masked rows have weight 0; where() keeps any value there out of the sum
    loss_opd = torch.where(weight != 0, weight * per_tok, torch.zeros_like(per_tok)).sum()
    loss_g, g_windows = _guidance_loss(cfg, batch, terms, detection, branch, norm, metrics)
    total = loss_opd + cfg.guidance_coef * loss_g
    _loss_metrics(cfg, batch, terms, detection, metrics, total, loss_opd, loss_g, g_windows)
    return total, metrics


def _loss_metrics(
    cfg: Config,
    batch: TokenBatch,
    terms: TokenTerms,
    detection: Detection | None,
    metrics: dict[str, float],
    total: Tensor,
    loss_opd: Tensor,
    loss_g: Tensor,
    g_windows: int,
) -> None:
    n_resp = max(int(batch.response_mask.sum()), 1)
    metrics["loss"] = float(total.detach())
    metrics["loss/opd"] = float(loss_opd.detach())
    metrics["loss/guidance"] = float(loss_g.detach())
    if terms.divergence is not None:
        m = batch.response_mask.to(terms.divergence.device)
        metrics["opd/divergence_mean"] = float(torch.where(m, terms.divergence.detach(), 0.0).sum()) / n_resp
    metrics["opd/response_tokens"] = float(n_resp)
    metrics["guidance/windows"] = float(g_windows)
    metrics["time/opd_s"] = terms.seconds
    metrics[f"teacher/form_{cfg.teacher_signal}"] = 1.0  # which teacher signal the loss used (see teacher_signal)
    metrics["teacher/top_k"] = float(cfg.teacher_top_k if cfg.teacher_signal == "top_k" else 0)
    metrics.setdefault("time/guidance_s", 0.0)
    if detection is not None:
        metrics.update(detection.metrics)
        metrics["opd/suppressed"] = float((~detection.divergent).sum()) if cfg.detection.detector != "none" else 0.0
    t_extra = metrics.get("detect/time_s", 0.0) + metrics["time/guidance_s"]
    metrics["time/detect_guidance_over_opd"] = t_extra / terms.seconds if terms.seconds > 0 else math.nan


__all__ = [
    "PRESETS",
    "TINY_GUIDANCE_BUDGET",
    "BranchTerms",
    "Config",
    "ServedTeacher",
    "TokenTerms",
    "branch_terms",
    "loss",
    "normalizer",
    "preset",
    "sampled_log_ratio",
    "teacher_window_loss",
    "token_terms",
]
