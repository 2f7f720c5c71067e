"""The per-rollout guidance budget (objective.guidance_budget): teacher_window guidance on at most B windows per
rollout, the divergent candidates with the largest D_t (a candidate without a score, NaN, counts as the most
divergent, as detection counts it divergent); ties go to the earlier position. Candidates left out keep their
decision (divergent: full OPD weight, no suppression) but get no window, so the windows sampled, scored and trained
per rollout are bounded by B whatever the response length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from topd_megatron.algorithm.types import Detection


def within_budget(detection: Detection, seq_ids: Tensor, budget: int | None) -> Tensor:
    """[G] bool over `detection.guidance_positions()`: which divergent candidates keep their window. `seq_ids` [N]
    are the batch's rollout ids (TokenBatch.seq_ids)."""
    divergent = detection.divergent.nonzero().flatten()
    keep = torch.ones(divergent.numel(), dtype=torch.bool)
    if budget is None or divergent.numel() == 0:
        return keep
    positions = detection.candidates.positions[divergent].cpu()
    scores = detection.scores[divergent].cpu().double().nan_to_num(nan=float("inf"))
    rollout = seq_ids.cpu()[positions]
    order = torch.sort(-scores, stable=True).indices  # largest D first, ties by position (positions ascend)
    order = order[torch.sort(rollout[order], stable=True).indices]  # grouped by rollout, keeping that order
    counts = torch.bincount(rollout[order])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel()) - starts[rollout[order]]
    keep[order] = rank < budget
    return keep
