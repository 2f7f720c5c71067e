"""Guidance windows packed after their rollout: one row per rollout instead of one whole-prefix row per window.

Per-branch layout (`batch.BranchBatch`): the branch of anchor (b, j) is its own row `tokens[b, : j + 1] + u_1..u_K'`,
and logits rows j .. j + K' - 1 score u_1..u_K'. Every branch re-runs its whole prefix.

Packed layout (`PackedBatch`): row b holds the rollout's S tokens, then, for each of its windows g (anchor j_g,
length K'_g), the tokens u_1..u_{K'_g - 1}:

    columns  0 .. S-1                    | c_1 .. c_1 + K'_1 - 2       | c_2 ...            | padding
    tokens   x, y (right-padded to S)    | u_1 .. u_{K'_1 - 1} of g=1  | window 2 ...       |
    RoPE     0 .. S-1                    | j_1 + 1 .. j_1 + K'_1 - 1   | j_2 + 1 ...        |
    sees     causal                      | columns 0..j_1 + own window | 0..j_2 + own ...   |

Window token u_i sits at rotary position j + i and attends to rollout columns 0..j and to u_1..u_i of its own window,
exactly the keys and positions it has in its branch row; u_K' is never an input (nothing scores a token after it).
The logits scoring u_1..u_K' are the rollout's own row j (the same prefix (x, y_<=j): the distribution over the next
token) followed by the rows of u_1..u_{K'-1}. So one forward over the packed rows gives every number of the rollout
pass and of the branch pass, and training on it gives the same loss and gradients; attention masks make the sharing
exact (masked keys get probability 0), only the summation order of the matrix products differs.

Tokens per step: S + sum_g (K'_g - 1) per row (padded to the step's widest row) instead of S + sum_g (j_g + K'_g).
The rows and masks feed `training.forward` (MicroBatch.window_mask, models.positions for RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from topd_megatron.algorithm.batch import StepBatch
from topd_megatron.algorithm.types import Windows
from topd_megatron.models.positions import WindowMask
from topd_megatron.training.forward import MicroBatch


@dataclass(kw_only=True, slots=True)
class PackedBatch:
    """A step's rollout rows with the guidance windows of their anchors packed after them (module docstring)."""

    tokens: Tensor
    """[B, W] int64; W = S + the largest sum_g (K'_g - 1) of a row."""
    positions: Tensor
    """[B, W] int64 rotary positions."""
    mask: WindowMask
    """[B, W] anchors and window starts of every column."""
    loss_mask: Tensor
    """[B, W] float: the response tokens of the rollout columns (0 on window columns and padding)."""
    rollout_width: int
    """S: columns 0..S-1 are the StepBatch's rows, unchanged."""
    window_rows: Tensor
    """[sum K'] flat indices b * W + column of the logits rows scoring the window tokens, window after window."""
    branch_rows: Tensor
    """[G] the row of each branch (non-decreasing: branches are in ascending flat position order)."""
    lengths: Tensor
    """[G] real window lengths K'."""
    micro_batch_size: int

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_branches(self) -> int:
        return int(self.lengths.numel())

    @property
    def window_tokens(self) -> int:
        """Tokens appended after the rollouts (sum over branches of K' - 1), padding excluded."""
        return int((self.lengths - 1).clamp(min=0).sum())

    def microbatches(self) -> list[MicroBatch]:
        mb, out = self.micro_batch_size, []
        for i in range(self.tokens.shape[0] // mb):
            rows = slice(i * mb, (i + 1) * mb)
            out.append(
                MicroBatch(
                    tokens=self.tokens[rows],
                    position_ids=self.positions[rows],
                    loss_mask=self.loss_mask[rows],
                    index=i,
                    window_mask=WindowMask(anchor=self.mask.anchor[rows], window_start=self.mask.window_start[rows]),
                )
            )
        return out

    def rows_of(self, microbatch: int) -> range:
        """The branches (indices into positions / windows) whose rows a micro-batch holds."""
        lo, hi = microbatch * self.micro_batch_size, (microbatch + 1) * self.micro_batch_size
        rows = self.branch_rows
        return range(int(torch.searchsorted(rows, lo)), int(torch.searchsorted(rows, hi)))

    def window_logits(self, microbatch: int, logits: Tensor) -> Tensor:
        """Packed `[sum K', V_local]` rows of a micro-batch's logits `[mb, W, V_local]` scoring its branches' window
        tokens, window after window (the row order `objective.branch_terms` expects); a copy, not a view."""
        branches = self.rows_of(microbatch)
        offsets = torch.cumsum(self.lengths, 0) - self.lengths
        if len(branches) == 0:
            return logits.new_zeros(0, logits.shape[-1])
        lo = int(offsets[branches.start])
        hi = int(offsets[branches.stop - 1] + self.lengths[branches.stop - 1])
        index = self.window_rows[lo:hi] - microbatch * self.micro_batch_size * self.width
        return logits.reshape(-1, logits.shape[-1])[index.to(logits.device)]


def pack_windows(
    step: StepBatch, positions: Tensor, windows: Windows, *, pad_id: int, width_multiple: int = 1
) -> PackedBatch:
    """Pack the guidance windows `windows` (one per flat position in `positions`, ascending) after their rollouts;
    rows are padded to a multiple of `width_multiple` tokens (TP with sequence parallelism)."""
    return pack_rows(
        step.tokens,
        step.response_mask,
        positions,
        windows,
        pad_id=pad_id,
        micro_batch_size=step.micro_batch_size,
        width_multiple=width_multiple,
    )


def pack_rows(
    rows: Tensor,
    response_mask: Tensor,
    positions: Tensor,
    windows: Windows,
    *,
    pad_id: int,
    micro_batch_size: int,
    width_multiple: int = 1,
) -> PackedBatch:
    """`pack_windows` on plain tensors: `rows` [B, S] (B a multiple of `micro_batch_size`), flat target positions
    p = row * (S - 1) + j in ascending order, one window each."""
    s = rows.shape[1]
    s1 = s - 1
    rows_of = [int(p) // s1 for p in positions]
    extra = [0] * rows.shape[0]
    for r, n in zip(rows_of, windows.lengths.tolist(), strict=True):
        extra[r] += max(n - 1, 0)
    b, w = rows.shape[0], s + max(extra, default=0)
    w = -(-w // width_multiple) * width_multiple  # sequence parallelism splits the rows over the TP ranks
    tokens = torch.full((b, w), pad_id, dtype=torch.long)
    tokens[:, :s] = rows
    pos, anchor = torch.arange(w).repeat(b, 1), torch.arange(w).repeat(b, 1)
    start = anchor + 1
    loss_mask = torch.zeros(b, w)
    loss_mask[:, :s] = response_mask.float()
    fill = [s] * b
    window_rows: list[int] = []
    for r, p, u, n in zip(rows_of, positions.tolist(), windows.tokens, windows.lengths.tolist(), strict=True):
        j, c = p % s1, fill[r]
        window_rows.append(r * w + j)  # the rollout's own row j scores u_1
        if n > 1:
            span = slice(c, c + n - 1)
            tokens[r, span] = u[: n - 1]
            pos[r, span] = torch.arange(j + 1, j + n)
            anchor[r, span] = j
            start[r, span] = c
            window_rows.extend(range(r * w + c, r * w + c + n - 1))
            fill[r] = c + n - 1
        elif n == 0:
            window_rows.pop()  # an empty window scores nothing
    return PackedBatch(
        tokens=tokens,
        positions=pos,
        mask=WindowMask(anchor=anchor, window_start=start),
        loss_mask=loss_mask,
        rollout_width=s,
        window_rows=torch.tensor(window_rows, dtype=torch.long),
        branch_rows=torch.tensor(rows_of, dtype=torch.long),
        lengths=windows.lengths.clone(),
        micro_batch_size=micro_batch_size,
    )
