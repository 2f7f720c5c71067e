"""The types the method's stages exchange: a batch of rollout positions, K-token windows, candidates, a detection.

Batch layout (`TokenBatch`): N packed positions; the positions of one rollout are contiguous and in order; row i of
the logits is the distribution the model gives to `tokens[i]` (already shifted: p_t = pi(.|x, y_<t) for y_t).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(kw_only=True, slots=True)
class TokenBatch:
    """The rollout tokens of one micro-batch, packed: N positions, each rollout's positions contiguous and in order."""

    tokens: Tensor
    """[N] int64: y_t, the sampled token at each position (global vocabulary id; any value where masked)."""
    seq_ids: Tensor
    """[N] int64: rollout index of each position, non-decreasing (0..B-1)."""
    response_mask: Tensor
    """[N] bool: m_t, the response positions the loss and the detector use (False on prompt and padding)."""
    rollout_logprobs: Tensor | None = None
    """[N] float: log-prob of y_t under the policy that sampled the rollout (opd_pg's importance ratio); None when
    the rollout is exactly on-policy."""

    def __post_init__(self) -> None:
        n = self.tokens.shape
        if self.tokens.dim() != 1 or self.seq_ids.shape != n or self.response_mask.shape != n:
            raise ValueError(
                f"TokenBatch: tokens, seq_ids and response_mask must all be [N]; got {tuple(self.tokens.shape)},"
                f" {tuple(self.seq_ids.shape)}, {tuple(self.response_mask.shape)} (use TokenBatch.from_padded for"
                " [B, T] inputs)"
            )
        if self.response_mask.dtype != torch.bool:
            raise TypeError(f"TokenBatch: response_mask must be bool, got {self.response_mask.dtype}")
        if self.rollout_logprobs is not None and self.rollout_logprobs.shape != n:
            raise ValueError(f"TokenBatch: rollout_logprobs must be [N], got {tuple(self.rollout_logprobs.shape)}")
        if n[0] > 1 and bool((self.seq_ids[1:] < self.seq_ids[:-1]).any()):
            raise ValueError("TokenBatch: seq_ids must be non-decreasing (each rollout's positions contiguous)")
        if n[0] and int(self.seq_ids.min()) < 0:
            raise ValueError("TokenBatch: seq_ids must be >= 0")

    @classmethod
    def from_padded(cls, tokens: Tensor, response_mask: Tensor, rollout_logprobs: Tensor | None = None) -> TokenBatch:
        """[B, T] tokens/mask (and log-probs) -> packed N = B*T; logits [B, T, V_local] reshape to [B*T, V_local]."""
        b, t = tokens.shape
        seq = torch.arange(b, device=tokens.device).repeat_interleave(t)
        lp = None if rollout_logprobs is None else rollout_logprobs.reshape(-1)
        return cls(tokens=tokens.reshape(-1), seq_ids=seq, response_mask=response_mask.reshape(-1), rollout_logprobs=lp)

    @property
    def num_positions(self) -> int:
        return self.tokens.shape[0]


@dataclass(kw_only=True, slots=True)
class Windows:
    """K-token windows for C anchor positions (teacher samples u, or student samples s), padded."""

    tokens: Tensor
    """[C, K_max] int64 global ids; entries at or past a row's length are ignored."""
    lengths: Tensor
    """[C] int64 real lengths (a window cut short by EOS keeps its real length, EOS included)."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.lengths.shape != (self.tokens.shape[0],):
            raise ValueError(
                f"Windows: tokens must be [C, K] and lengths [C]; got {tuple(self.tokens.shape)},"
                f" {tuple(self.lengths.shape)}"
            )
        if self.lengths.numel() and (int(self.lengths.min()) < 0 or int(self.lengths.max()) > self.tokens.shape[1]):
            raise ValueError(f"Windows: lengths must be in [0, {self.tokens.shape[1]}]")

    def valid(self) -> Tensor:
        """[C, K_max] bool: which entries are real window tokens."""
        k = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return k.unsqueeze(0) < self.lengths.unsqueeze(1)

    def packed(self) -> Tensor:
        """[sum(lengths)] the real tokens, window after window (the row order of branch logits)."""
        return self.tokens[self.valid()]

    def select(self, rows: Tensor) -> Windows:
        return Windows(tokens=self.tokens[rows], lengths=self.lengths[rows])


@dataclass(kw_only=True, slots=True)
class Candidates:
    """The high-loss positions of a batch (TOPD step 1)."""

    positions: Tensor
    """[C] int64 flat positions into the batch, ascending; the row order of every per-candidate tensor."""
    loss: Tensor
    """[C] the per-token loss l_t at those positions."""


@dataclass(kw_only=True, slots=True)
class Detection:
    """Scores and decisions for the candidates of a batch (TOPD step 2)."""

    num_positions: int
    """N, the batch's positions (for the [N] masks)."""
    candidates: Candidates
    scores: Tensor
    """[C] float64 D_t; NaN where the candidate has no window (no future token), such candidates count as divergent."""
    divergent: Tensor
    """[C] bool: D_t >= tau (or no window)."""
    tau: float
    """The threshold used (NaN when no candidate had a score)."""
    metrics: dict[str, float]
    """Diagnostics (docs/topd.md): 'detect/*' keys."""
    guided: Tensor | None = None
    """[G] ascending positions guidance acts on when they are not the divergent candidates (the random-placement
    control, `with_guided`); None: the divergent candidates."""

    def candidate_mask(self) -> Tensor:
        """[N] bool: candidate positions."""
        m = torch.zeros(self.num_positions, dtype=torch.bool, device=self.candidates.positions.device)
        m[self.candidates.positions] = True
        return m

    def divergent_mask(self) -> Tensor:
        """[N] bool: divergent candidate positions."""
        m = torch.zeros(self.num_positions, dtype=torch.bool, device=self.candidates.positions.device)
        m[self.candidates.positions[self.divergent]] = True
        return m

    def suppressed_mask(self) -> Tensor:
        """[N] bool: high-loss positions judged non-divergent (they get weight beta_s in the OPD term)."""
        m = torch.zeros(self.num_positions, dtype=torch.bool, device=self.candidates.positions.device)
        m[self.candidates.positions[~self.divergent]] = True
        return m

    def guidance_positions(self) -> Tensor:
        """[G] ascending positions that need guidance (teacher_window: branch sequences to score, in this order)."""
        return self.candidates.positions[self.divergent] if self.guided is None else self.guided

    def with_guided(self, positions: Tensor) -> Detection:
        """The same detection with guidance at `positions` [G] (ascending) instead of the divergent candidates."""
        return dataclasses.replace(self, guided=positions)

    def restrict(self, start: int, stop: int) -> Detection:
        """The detection of positions [start, stop) of this batch, renumbered from 0 (a micro-batch's share of a
        step-wide detection: same tau, same decisions)."""
        pos = self.candidates.positions
        keep = (pos >= start) & (pos < stop)
        cands = Candidates(positions=pos[keep] - start, loss=self.candidates.loss[keep])
        guided = None
        if self.guided is not None:
            guided = self.guided[(self.guided >= start) & (self.guided < stop)] - start
        return Detection(
            num_positions=stop - start,
            candidates=cands,
            scores=self.scores[keep.to(self.scores.device)],
            divergent=self.divergent[keep.to(self.divergent.device)],
            tau=self.tau,
            metrics=self.metrics,
            guided=guided,
        )

    def guidance_windows(self, teacher_windows: Windows) -> Windows:
        """The detection's teacher windows (one row per candidate) restricted to the guided positions: the divergent
        candidates, or the candidates `with_guided` kept (a guidance budget). Guided positions that are not
        candidates (the random control) have no window here: sample theirs."""
        return teacher_windows.select(self.guidance_rows().to(teacher_windows.tokens.device))

    def guidance_rows(self) -> Tensor:
        """[G] the candidate index of each guided position (`guidance_positions()` order); ValueError when a guided
        position is not a candidate (the random control)."""
        pos = self.candidates.positions
        if self.guided is None:
            return self.divergent.nonzero().flatten()
        rows = torch.searchsorted(pos, self.guided.to(pos.device))
        if rows.numel() and not bool((pos[rows.clamp(max=max(pos.numel() - 1, 0))] == self.guided).all()):
            raise ValueError("guidance_windows: guided positions that are not candidates have no window")
        return rows
