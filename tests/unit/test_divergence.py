"""Candidates, windows, the detectors and the OT solvers (docs/topd.md, TOPD steps 1-2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import _reference_topd as ref
from topd_megatron.algorithm import detection as dv
from topd_megatron.algorithm import types


def batch_of(layout, seed=0):
    """layout: (prompt, response, padding) per rollout."""
    seq, mask = [], []
    for b, (p, r, pad) in enumerate(layout):
        seq += [b] * (p + r + pad)
        mask += [False] * p + [True] * r + [False] * pad
    g = torch.Generator().manual_seed(seed)
    n = len(seq)
    return types.TokenBatch(
        tokens=torch.randint(0, 50, (n,), generator=g), seq_ids=torch.tensor(seq), response_mask=torch.tensor(mask)
    )


# ------------------------------------------------------------------ OT


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ot_equals_brute_force_over_permutations(k, seed):
    rng = np.random.default_rng(seed)
    cost = rng.uniform(0, 2, (k, k))
    assert dv.ot_exact(cost) == pytest.approx(ref.ot_bruteforce(cost), abs=1e-12)


@pytest.mark.parametrize("n,m", [(1, 3), (3, 1), (2, 3), (3, 2), (2, 4), (4, 2)])
def test_exact_ot_with_unequal_lengths_equals_brute_force(n, m):
    cost = np.random.default_rng(n * 10 + m).uniform(0, 2, (n, m))
    assert dv.ot_exact(cost) == pytest.approx(ref.ot_bruteforce(cost), abs=1e-8)


def test_exact_ot_of_identical_windows_is_zero_and_order_free():
    e = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    cost = (1 - e @ e[[3, 1, 4, 0, 2]].T).numpy()  # same tokens, shuffled
    assert dv.ot_exact(cost) == pytest.approx(0.0, abs=1e-12)


def test_sinkhorn_approaches_exact_ot_and_handles_padding():
    rng = np.random.default_rng(0)
    lens = [(4, 4), (3, 5), (5, 2), (1, 1), (2, 5)]
    cost = torch.zeros(len(lens), 5, 5, dtype=torch.float64)
    exact = []
    for i, (n, m) in enumerate(lens):
        c = rng.uniform(0, 2, (n, m))
        cost[i, :n, :m] = torch.from_numpy(c)
        cost[i, n:, :] = 7.0  # padding must not matter
        cost[i, :, m:] = 7.0
        exact.append(dv.ot_exact(c))
    n = torch.tensor([a for a, _ in lens])
    m = torch.tensor([b for _, b in lens])
    approx = dv.ot_sinkhorn(cost, n, m, eps=0.005, iters=1000)
    torch.testing.assert_close(approx, torch.tensor(exact, dtype=torch.float64), atol=2e-2, rtol=0)
    # batched equals one at a time
    for i, (a, b) in enumerate(lens):
        one = dv.ot_sinkhorn(cost[i : i + 1, :a, :b], n[i : i + 1], m[i : i + 1], eps=0.05, iters=100)
        torch.testing.assert_close(one, dv.ot_sinkhorn(cost, n, m, eps=0.05, iters=100)[i : i + 1])


# ------------------------------------------------------------------ candidates and windows


def test_candidates_top_q_per_rollout_capped_and_never_masked():
    batch = batch_of([(2, 10, 0), (0, 7, 3), (1, 1, 0)])
    loss = torch.rand(batch.num_positions, generator=torch.Generator().manual_seed(1)) + 1
    loss[~batch.response_mask] = 100.0  # masked positions are never candidates, whatever their loss
    cfg = dv.Config(q=0.3, max_candidates=2)
    got = dv.select_candidates(cfg, batch, loss)
    for b, n_resp in enumerate([10, 7, 1]):
        pos = [p for p in range(batch.num_positions) if batch.seq_ids[p] == b and batch.response_mask[p]]
        k = min(2, math.ceil(0.3 * n_resp - 1e-9))
        expect = sorted(sorted(pos, key=lambda p: -float(loss[p]))[:k])
        assert [p for p in got.positions.tolist() if batch.seq_ids[p] == b] == expect
    torch.testing.assert_close(got.loss, loss[got.positions])
    assert dv.select_candidates(dv.Config(q=1.0, max_candidates=None), batch, loss).positions.numel() == 18


def test_candidate_ties_go_to_the_earlier_position():
    batch = batch_of([(0, 10, 0)])
    got = dv.select_candidates(dv.Config(q=0.2, max_candidates=None), batch, torch.ones(10))
    assert got.positions.tolist() == [0, 1]
    assert dv.select_candidates(dv.Config(q=0.2), batch, torch.ones(10) * 0.0).positions.tolist() == [0, 1]


def test_windows_stop_at_the_end_of_the_response_run():
    batch = batch_of([(1, 4, 2), (0, 3, 0)])  # positions: 0 prompt, 1-4 resp, 5-6 pad | 7-9 resp
    assert dv.response_run_end(batch).tolist() == [-1, 4, 4, 4, 4, -1, -1, 9, 9, 9]
    w = dv.rollout_windows(batch, torch.tensor([1, 3, 4, 8]), window=3)
    assert w.lengths.tolist() == [3, 2, 1, 2]
    assert w.packed().tolist() == batch.tokens[[1, 2, 3, 3, 4, 4, 8, 9]].tolist()
    idx, weights = dv.future_weights(batch, torch.tensor([1, 3, 4, 9]), window=2, gamma=0.5)
    assert (weights > 0).sum(1).tolist() == [2, 1, 0, 0]
    torch.testing.assert_close(weights[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert idx[0].tolist() == [2, 3]


def test_lookahead_scores_discounted_mean_of_the_next_divergences():
    batch = batch_of([(0, 5, 0)])
    d = torch.tensor([9.0, 1.0, 2.0, 3.0, 4.0])
    cfg = dv.Config(detector="lookahead", window=2, lookahead_gamma=0.5)
    scores = dv.lookahead_scores(cfg, batch, torch.tensor([0, 3, 4]), d)
    assert scores[0] == pytest.approx((0.5 * 1 + 0.25 * 2) / 0.75)
    assert scores[1] == pytest.approx(4.0)
    assert math.isnan(scores[2])  # no future token


def test_threshold_quantile_or_fixed():
    s = torch.tensor([0.1, 0.4, math.nan, 0.2, 0.9], dtype=torch.float64)
    assert dv.threshold(dv.Config(q_d=0.5), s) == pytest.approx(np.quantile([0.1, 0.4, 0.2, 0.9], 0.5))
    assert dv.threshold(dv.Config(tau=0.33), s) == 0.33
    assert math.isnan(dv.threshold(dv.Config(), torch.tensor([math.nan], dtype=torch.float64)))


# ------------------------------------------------------------------ detect


def _window_ot_inputs(seed=0):
    batch = batch_of([(1, 8, 0), (0, 6, 2)], seed)
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(batch.num_positions, generator=g)
    emb = torch.randn(50, 6, generator=g, dtype=torch.float64)
    cfg = dv.Config(q=0.5, max_candidates=None, window=3, q_d=0.5, student_window="rollout")
    cands = dv.select_candidates(cfg, batch, d)
    c = cands.positions.numel()
    u = types.Windows(tokens=torch.randint(0, 50, (c, 3), generator=g), lengths=torch.randint(1, 4, (c,), generator=g))
    return batch, d, emb, cfg, cands, u


def test_detect_window_ot_scores_the_windows_with_exact_ot():
    batch, d, emb, cfg, cands, u = _window_ot_inputs()
    det = dv.detect(cfg, batch, cands, d, teacher_windows=u, embedding=emb, vocab_size=50)
    e = torch.nn.functional.normalize(emb, dim=1)
    sw = dv.rollout_windows(batch, cands.positions, 3)
    for i in range(cands.positions.numel()):
        ut = u.tokens[i, : u.lengths[i]]
        st = sw.tokens[i, : sw.lengths[i]]
        assert float(det.scores[i]) == pytest.approx(ref.ot_bruteforce((1 - e[ut] @ e[st].T).numpy()), abs=1e-8)
    tau = np.quantile(det.scores.numpy(), 0.5)
    assert det.tau == pytest.approx(tau)
    assert det.divergent.tolist() == (det.scores >= det.tau).tolist()
    # masks and positions agree
    assert det.divergent_mask().nonzero().flatten().tolist() == det.guidance_positions().tolist()
    assert (det.divergent_mask() | det.suppressed_mask()).tolist() == det.candidate_mask().tolist()
    assert det.guidance_windows(u).tokens.shape[0] == int(det.divergent.sum())
    m = det.metrics
    assert m["detect/candidates"] == cands.positions.numel() and m["detect/windows"] == cands.positions.numel()
    assert m["detect/non_divergent_share"] == pytest.approx(1 - det.divergent.float().mean().item())
    for key in ("detect/D_mean", "detect/D_p50", "detect/loss_D_spearman", "detect/time_s", "detect/tau"):
        assert key in m


def test_fresh_student_windows_are_the_default_and_are_what_ot_compares():
    """The paper's detector compares two windows drawn from the same prefix: with student_window='fresh' (the default)
    D_t is the OT distance between the teacher's and the fresh student window, whatever the rollout's own tokens."""
    batch, d, emb, _, cands, u = _window_ot_inputs()
    assert dv.Config().student_window == "fresh"
    fresh = dv.Config(q=0.5, max_candidates=None, window=3, q_d=0.5)
    s = types.Windows(tokens=u.tokens.flip(0), lengths=u.lengths.flip(0))
    det = dv.detect(fresh, batch, cands, d, teacher_windows=u, student_windows=s, embedding=emb, vocab_size=50)
    e = torch.nn.functional.normalize(emb, dim=1)
    for i in range(cands.positions.numel()):
        ut, st = u.tokens[i, : u.lengths[i]], s.tokens[i, : s.lengths[i]]
        assert float(det.scores[i]) == pytest.approx(ref.ot_bruteforce((1 - e[ut] @ e[st].T).numpy()), abs=1e-8)
    same = dv.detect(fresh, batch, cands, d, teacher_windows=u, student_windows=u, embedding=emb, vocab_size=50)
    assert torch.allclose(same.scores, torch.zeros_like(same.scores), atol=1e-12)  # identical windows: distance 0
    assert det.metrics["detect/windows"] == 2 * cands.positions.numel()


def test_oracle_detector_uses_the_task_labels_and_a_frozen_tau():
    batch = batch_of([(0, 4, 0)])
    d = torch.tensor([0.1, 0.9, 0.5, 0.7])
    cfg = dv.Config(detector="oracle", q=1.0)
    cands = dv.select_candidates(cfg, batch, d)
    det = dv.detect(cfg, batch, cands, d, choice_kinds=["surface", "reasoning", None, "surface"])
    assert det.tau == dv.ORACLE_TAU and det.scores[:2].tolist() == [0.0, 1.0] and math.isnan(det.scores[2])
    assert det.divergent.tolist() == [False, True, True, False]  # unknown: kept divergent, like a missing window
    with pytest.raises(ValueError, match="oracle detector needs choice_kinds"):
        dv.detect(cfg, batch, cands, d)


def test_guided_positions_replace_the_divergent_ones_and_survive_restrict():
    batch = batch_of([(0, 4, 0), (0, 4, 0)])
    d = torch.arange(8, dtype=torch.float32)
    cfg = dv.Config(detector="lookahead", q=0.5, tau=0.0)
    det = dv.detect(cfg, batch, dv.select_candidates(cfg, batch, d), d)
    moved = det.with_guided(torch.tensor([1, 5]))
    assert moved.guidance_positions().tolist() == [1, 5] and moved.divergent.tolist() == det.divergent.tolist()
    assert moved.restrict(4, 8).guidance_positions().tolist() == [1]
    assert (
        det.restrict(4, 8).guidance_positions().tolist()
        == (det.guidance_positions()[det.guidance_positions() >= 4] - 4).tolist()
    )


def test_detect_sinkhorn_is_close_to_exact():
    batch, d, emb, cfg, cands, u = _window_ot_inputs(1)
    exact = dv.detect(cfg, batch, cands, d, teacher_windows=u, embedding=emb)
    sk = dv.Config(
        q=0.5,
        max_candidates=None,
        window=3,
        q_d=0.5,
        ot_solver="sinkhorn",
        sinkhorn_eps=0.003,
        sinkhorn_iters=3000,
        student_window="rollout",
    )
    approx = dv.detect(sk, batch, cands, d, teacher_windows=u, embedding=emb)
    torch.testing.assert_close(approx.scores, exact.scores, atol=2e-2, rtol=0)


def test_detect_none_keeps_every_candidate_and_no_window_candidates_are_divergent():
    batch = batch_of([(0, 3, 0)])
    d = torch.tensor([0.1, 0.2, 5.0])
    cands = dv.select_candidates(dv.Config(q=1.0), batch, d)
    det = dv.detect(dv.Config(detector="none", q=1.0), batch, cands, d)
    assert det.divergent.all() and det.suppressed_mask().sum() == 0
    la = dv.detect(dv.Config(detector="lookahead", q=1.0, tau=100.0), batch, cands, d)
    assert la.divergent.tolist() == [False, False, True]  # the last token has no future: kept


def test_detect_errors_are_clear():
    batch, d, emb, cfg, cands, u = _window_ot_inputs()
    with pytest.raises(ValueError, match="window_ot needs teacher_windows"):
        dv.detect(cfg, batch, cands, d, embedding=emb)
    with pytest.raises(ValueError, match="teacher windows for"):
        dv.detect(cfg, batch, cands, d, teacher_windows=u.select(torch.tensor([0])), embedding=emb)
    fresh = dv.Config(q=0.5, window=3, student_window="fresh")
    with pytest.raises(ValueError, match="student_window='fresh' needs student_windows"):
        dv.detect(fresh, batch, cands, d, teacher_windows=u, embedding=emb)
    empty = types.Windows(tokens=u.tokens, lengths=torch.zeros_like(u.lengths))
    with pytest.raises(ValueError, match="needs >= 1 token"):
        dv.detect(cfg, batch, cands, d, teacher_windows=empty, embedding=emb)
    with pytest.raises(ValueError, match="per_token_loss must be"):
        dv.select_candidates(cfg, batch, d[:-1])


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"q": 0.0}, "q must be in"),
        ({"max_candidates": 0}, "max_candidates"),
        ({"q_d": 1.5}, "q_d"),
        ({"window": 0}, "window"),
        ({"detector": "ot"}, "detector"),
        ({"sinkhorn_eps": 0.0}, "sinkhorn_eps"),
        ({"lookahead_gamma": 0.0}, "lookahead_gamma"),
        ({"tau": math.inf}, "tau"),
    ],
)
def test_config_checks(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dv.Config(**kw)


def test_token_batch_checks_and_padded_layout():
    tokens = torch.arange(6).reshape(2, 3)
    mask = torch.tensor([[False, True, True], [True, True, False]])
    b = types.TokenBatch.from_padded(tokens, mask)
    assert b.seq_ids.tolist() == [0, 0, 0, 1, 1, 1] and b.response_mask.tolist() == mask.reshape(-1).tolist()
    with pytest.raises(ValueError, match="non-decreasing"):
        types.TokenBatch(
            tokens=torch.zeros(3, dtype=torch.long),
            seq_ids=torch.tensor([1, 0, 0]),
            response_mask=torch.ones(3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="must all be"):
        types.TokenBatch(tokens=tokens, seq_ids=torch.zeros(6, dtype=torch.long), response_mask=mask.reshape(-1))
