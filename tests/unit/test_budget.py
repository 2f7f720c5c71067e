"""The per-rollout guidance budget (algorithm/budget.py, objective.guidance_budget)."""

from __future__ import annotations

import math

import pytest
import torch

from topd_megatron.algorithm import objective
from topd_megatron.algorithm.budget import within_budget
from topd_megatron.algorithm.types import Candidates, Detection


def _detection() -> tuple[Detection, torch.Tensor]:
    # rollouts of 10 positions each; candidates in rollouts 0, 1 and 2
    seq_ids = torch.arange(3).repeat_interleave(10)
    positions = torch.tensor([1, 3, 4, 7, 12, 15, 18, 21, 25])
    scores = torch.tensor([0.5, 0.9, math.nan, 0.2, 0.3, 0.3, 0.8, 0.1, 0.6], dtype=torch.float64)
    divergent = torch.tensor([True, True, True, False, True, True, True, True, False])
    det = Detection(
        num_positions=30,
        candidates=Candidates(positions=positions, loss=torch.ones(9)),
        scores=scores,
        divergent=divergent,
        tau=0.25,
        metrics={},
    )
    return det, seq_ids


def test_budget_keeps_the_most_divergent_windows_of_each_rollout() -> None:
    det, seq_ids = _detection()
    kept = det.guidance_positions()[within_budget(det, seq_ids, 2)].tolist()
    # rollout 0: divergent 1 (0.5), 3 (0.9), 4 (NaN: counts as the most divergent) -> 4 and 3
    # rollout 1: 12 (0.3), 15 (0.3), 18 (0.8) -> 18, then the tie 0.3 goes to the earlier 12
    # rollout 2: 21 (0.1) alone (25 is not divergent)
    assert kept == [3, 4, 12, 18, 21]
    assert within_budget(det, seq_ids, None).all() and within_budget(det, seq_ids, 3).all()
    assert within_budget(det, seq_ids, 1).sum() == 3


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="guidance_budget"):
        objective.Config(guidance_budget=0)
    assert objective.Config(guidance_budget=8).guidance_budget == 8
