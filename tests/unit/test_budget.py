"""The per-rollout guidance budget (algorithm/budget.py, objective.guidance_budget)."""

from __future__ import annotations

import math

import pytest
import torch

from topd_megatron.algorithm import detection, objective
from topd_megatron.algorithm.budget import within_budget
from topd_megatron.algorithm.types import Candidates, Detection, TokenBatch, Windows
from topd_megatron.training.scoring import place_guidance


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


def test_budget_must_be_positive_and_have_windows_to_cap() -> None:
    with pytest.raises(ValueError, match="guidance_budget"):
        objective.Config(guidance_budget=0)
    assert objective.Config(guidance_budget=8).guidance_budget == 8
    with pytest.raises(ValueError, match="guidance_budget caps the windows of teacher_window"):
        objective.Config(detection=detection.Config(detector="lookahead"), guidance="on_path", guidance_budget=2)


def _tokens(seq_ids: torch.Tensor) -> TokenBatch:
    n = seq_ids.numel()
    mask = torch.ones(n, dtype=torch.bool)
    return TokenBatch(tokens=torch.zeros(n, dtype=torch.long), response_mask=mask, seq_ids=seq_ids)


def test_the_budget_decides_where_guidance_acts_and_which_windows_train() -> None:
    """`place_guidance` marks the budgeted anchors as the guided positions: the loss, the OPD weights (with the window
    replacing the OPD term) and the windows reused from detection all follow them."""
    det, seq_ids = _detection()
    cfg = objective.Config(guidance_budget=2, guidance_replaces_opd=True)
    placed = place_guidance(cfg, _tokens(seq_ids), det, seed=0)
    assert placed.guidance_positions().tolist() == [3, 4, 12, 18, 21]
    windows = Windows(tokens=torch.arange(9).unsqueeze(1).repeat(1, 2), lengths=torch.full((9,), 2))
    assert placed.guidance_windows(windows).tokens[:, 0].tolist() == [1, 2, 4, 6, 7]  # the candidates' own rows
    weights = objective._opd_weights(cfg, placed, torch.ones(30, dtype=torch.float64))
    assert weights[[3, 4, 12, 18, 21]].tolist() == [0.0] * 5  # replaced by their windows
    assert weights[[1, 15]].tolist() == [1.0, 1.0]  # divergent without a window: OPD term kept, not suppressed
    assert weights[[7, 25]].tolist() == [0.0, 0.0]  # non-divergent: suppressed (beta_s = 0)
    assert place_guidance(objective.Config(), _tokens(seq_ids), det, seed=0) is det  # no budget: unchanged


def test_random_placement_respects_the_budget() -> None:
    det, seq_ids = _detection()
    cfg = objective.Config(guidance_budget=2, guidance_at="random")
    guided = place_guidance(cfg, _tokens(seq_ids), det, seed=3).guidance_positions()
    per_rollout = torch.bincount(seq_ids[guided], minlength=3).tolist()
    assert per_rollout == [2, 2, 1]  # min(divergent candidates, budget) random positions per rollout
    with pytest.raises(ValueError, match="not candidates"):
        det.with_guided(torch.tensor([0, 2])).guidance_windows(Windows(tokens=torch.zeros(9, 2), lengths=torch.ones(9)))
