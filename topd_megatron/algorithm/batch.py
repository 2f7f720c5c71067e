"""From generations to the padded tensors and micro-batches a training step works on.

A step's rollouts become one right-padded `[B, S]` token matrix (prompt + response, B rounded up to whole
micro-batches with all-padding rows) and the TOPD `TokenBatch` over *targets*: position (b, j) of the TokenBatch is
token `tokens[b, j + 1]`, scored by the logits the model produces at position j. So the logits `[b, S, V_local]` of a
micro-batch align with its TokenBatch slice through `logits[:, :-1]`, and a flat position p of the step is
row p // (S - 1), target index p % (S - 1).

Branch sequences for teacher_window guidance, (x, y_<t, u_1..u_K'), are built from the same numbering: for position
(b, j) the branch is `tokens[b, : j + 1] + u`, and its logits at positions j .. j + K' - 1 score u_1..u_K'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from topd_megatron.algorithm.types import TokenBatch, Windows
from topd_megatron.rollout.engine import Generation
from topd_megatron.training.forward import MicroBatch, make_microbatch


@dataclass(kw_only=True, slots=True)
class StepBatch:
    """The rollouts of one training step on this data-parallel rank."""

    tokens: Tensor
    """[B, S] int64 prompt + response, right-padded with `pad_id`; rows >= num_rollouts are all padding."""
    response_mask: Tensor
    """[B, S] bool: response tokens (EOS included)."""
    rollout_logprobs: Tensor
    """[B, S] float32: log-prob of each response token under the policy that sampled it (0 elsewhere)."""
    num_rollouts: int
    micro_batch_size: int

    @property
    def num_microbatches(self) -> int:
        return self.tokens.shape[0] // self.micro_batch_size

    @property
    def targets_per_row(self) -> int:
        return self.tokens.shape[1] - 1

    def token_batch(self) -> TokenBatch:
        """The TokenBatch over targets of the whole step (N = B * (S - 1))."""
        return TokenBatch.from_padded(
            self.tokens[:, 1:], self.response_mask[:, 1:], rollout_logprobs=self.rollout_logprobs[:, 1:]
        )

    def microbatches(self) -> list[MicroBatch]:
        mb = self.micro_batch_size
        mask = self.response_mask.float()
        return [
            make_microbatch(self.tokens[i * mb : (i + 1) * mb], mask[i * mb : (i + 1) * mb], index=i)
            for i in range(self.num_microbatches)
        ]

    def part(self, first: int, stop: int) -> StepBatch:
        """Micro-batches [first, stop) as a step of their own (rows first * mb .. stop * mb - 1; its micro-batches
        and positions numbered from 0): its positions are positions [first * P, stop * P) of this step's
        `token_batch()`, P = micro_batch_size * (S - 1)."""
        lo, hi = first * self.micro_batch_size, stop * self.micro_batch_size
        return StepBatch(
            tokens=self.tokens[lo:hi],
            response_mask=self.response_mask[lo:hi],
            rollout_logprobs=self.rollout_logprobs[lo:hi],
            num_rollouts=min(max(self.num_rollouts - lo, 0), hi - lo),
            micro_batch_size=self.micro_batch_size,
        )

    def position_range(self, microbatch: int) -> tuple[int, int]:
        """[start, stop) of a micro-batch's positions in `token_batch()`."""
        per = self.micro_batch_size * self.targets_per_row
        return microbatch * per, (microbatch + 1) * per


def build_step_batch(generations: list[Generation], *, pad_id: int, micro_batch_size: int) -> StepBatch:
    """Pack generations (prompt + output) into a StepBatch."""
    if not generations:
        raise ValueError("build_step_batch: no generations")
    rows = [g.prompt_ids + g.output_ids for g in generations]
    width = max(len(r) for r in rows)
    n = -(-len(rows) // micro_batch_size) * micro_batch_size
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    logprobs = torch.zeros(n, width, dtype=torch.float32)
    for i, (g, row) in enumerate(zip(generations, rows, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        p, o = len(g.prompt_ids), len(g.output_ids)
        mask[i, p : p + o] = True
        logprobs[i, p : p + o] = torch.tensor(g.output_logprobs, dtype=torch.float32)
    return StepBatch(
        tokens=tokens,
        response_mask=mask,
        rollout_logprobs=logprobs,
        num_rollouts=len(generations),
        micro_batch_size=micro_batch_size,
    )


def prefixes(step: StepBatch, positions: Tensor) -> list[list[int]]:
    """(x, y_<t) for each flat target position: the row's tokens before the target token."""
    s1 = step.targets_per_row
    return [step.tokens[int(p) // s1, : int(p) % s1 + 1].tolist() for p in positions]


def windows_from_generations(generations: list[Generation], k: int) -> Windows:
    """Pack up to `k` generated tokens per prefix into Windows (real lengths kept; an EOS ends a window)."""
    tokens = torch.zeros(len(generations), k, dtype=torch.long)
    lengths = torch.zeros(len(generations), dtype=torch.long)
    for i, g in enumerate(generations):
        out = g.output_ids[:k]
        tokens[i, : len(out)] = torch.tensor(out, dtype=torch.long)
        lengths[i] = len(out)
    return Windows(tokens=tokens, lengths=lengths)


@dataclass(kw_only=True, slots=True)
class BranchBatch:
    """Branch sequences (x, y_<t, u_1..u_K') of the guidance positions, padded into micro-batches."""

    tokens: Tensor
    """[R, S_b] int64, R rounded up to whole micro-batches (extra rows all padding)."""
    starts: Tensor
    """[G] index j of the first logits row scoring u_1 in each real branch row (its anchor's target index)."""
    lengths: Tensor
    """[G] real window lengths K'."""
    micro_batch_size: int

    @property
    def num_branches(self) -> int:
        return int(self.lengths.numel())

    def microbatches(self) -> list[MicroBatch]:
        mb = self.micro_batch_size
        return [make_microbatch(self.tokens[i * mb : (i + 1) * mb], index=i) for i in range(self.tokens.shape[0] // mb)]

    def rows_of(self, microbatch: int) -> range:
        """The real branches (indices into positions/windows) held by a micro-batch."""
        lo = microbatch * self.micro_batch_size
        return range(lo, min(lo + self.micro_batch_size, self.num_branches))

    def window_logits(self, microbatch: int, logits: Tensor) -> Tensor:
        """Packed `[sum K', V_local]` rows of a micro-batch's branch logits `[mb, S_b, V_local]` scoring the window
        tokens, window after window (the row order `objective.branch_terms` expects)."""
        parts = []
        for r, g in enumerate(self.rows_of(microbatch)):
            j, n = int(self.starts[g]), int(self.lengths[g])
            parts.append(logits[r, j : j + n])
        if not parts:
            return logits.new_zeros(0, logits.shape[-1])
        return torch.cat(parts, dim=0)


def build_branch_batch(
    step: StepBatch, positions: Tensor, windows: Windows, *, pad_id: int, micro_batch_size: int
) -> BranchBatch:
    """Branch rows for guidance `positions` (flat, ascending) with their teacher `windows` (same order)."""
    rows = []
    for pre, w, n in zip(prefixes(step, positions), windows.tokens, windows.lengths, strict=True):
        rows.append(pre + w[: int(n)].tolist())
    g = len(rows)
    width = max((len(r) for r in rows), default=2)
    n_rows = max(1, -(-g // micro_batch_size)) * micro_batch_size
    tokens = torch.full((n_rows, width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    starts = torch.tensor([int(p) % step.targets_per_row for p in positions], dtype=torch.long)
    return BranchBatch(tokens=tokens, starts=starts, lengths=windows.lengths.clone(), micro_batch_size=micro_batch_size)
