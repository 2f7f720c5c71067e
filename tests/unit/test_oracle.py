"""The oracle's labels and its scoring of detectors, on hand-built cases: the agreement class, AUROC, precision and
recall at a frozen threshold with bootstrap CIs, the random flagger, the calibrated threshold."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from topd_megatron.analysis.oracle import AGREEMENT, FORK, SURFACE, UNLABELLED, classify, label_counts, score_detector
from topd_megatron.analysis.statistics import (
    auroc,
    bootstrap,
    precision_recall,
    t_interval,
    verdict,
    youden_threshold,
)

F, S, A, U = FORK, SURFACE, AGREEMENT, UNLABELLED


@pytest.mark.parametrize(
    "student_ok,teacher_ok,agree,label",
    [
        (True, True, True, A),  # the student sampled the teacher's token: no mismatch at all
        (False, False, True, A),  # even if the continuation then fails
        (True, True, False, S),  # only the wording changed
        (False, True, False, F),  # the student's token broke the reasoning
        (False, False, False, U),  # an earlier fork already broke the prefix
        (True, False, False, U),  # only the student's token works: not a fork of the teacher's reasoning
    ],
)
def test_classify(student_ok: bool, teacher_ok: bool, agree: bool, label: int) -> None:
    assert classify(student_ok, teacher_ok, agree) == label


def test_label_counts_leave_agreements_out_of_the_surface_share() -> None:
    counts = label_counts(np.array([F, S, S, A, A, A, U]))
    assert (counts["fork"], counts["surface"], counts["agreement"], counts["unlabelled"]) == (1, 2, 3, 1)
    assert counts["candidates"] == 7 and counts["surface_share"] == pytest.approx(2 / 3)


def test_auroc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    scores[3] = math.nan  # no window: ranks above every number
    positive = np.array([True, False, False, True] * 10)

    def key(x: float) -> float:
        return math.inf if math.isnan(x) else x

    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if key(a) > key(b) else 0.5 if key(a) == key(b) else 0.0 for a, b in itertools.product(pos, neg))
    assert auroc(scores, positive) == wins / (len(pos) * len(neg))
    assert auroc(np.array([3.0, 4.0, 1.0, 2.0]), np.array([True, True, False, False])) == 1.0
    assert math.isnan(auroc(np.ones(2), np.array([False, False])))


def test_precision_recall_and_the_frozen_threshold() -> None:
    p, r = precision_recall(np.array([True, False, True, False]), np.array([True, True, False, False]))
    assert (p, r) == (0.5, 0.5)
    p, r = precision_recall(np.zeros(3, dtype=bool), np.array([True, False, False]))
    assert math.isnan(p) and r == 0.0
    # forks score high, surface low: Youden's J puts tau between them
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3, math.nan])
    positive = np.array([True, True, True, False, False, False, True])
    tau = youden_threshold(scores, positive)
    assert 0.3 < tau <= 0.7
    assert math.isnan(youden_threshold(scores, np.zeros(7, dtype=bool)))


def test_score_detector_reports_cis_and_the_random_flagger() -> None:
    labels = np.array([F] * 10 + [S] * 30 + [A] * 5 + [U] * 5)
    scores = np.concatenate([np.linspace(0.6, 1.0, 10), np.linspace(0.0, 0.7, 30), np.zeros(10)])
    out = score_detector(scores, labels, tau=0.5, seed=1)
    assert out["labelled"] == 40 and out["forks"] == 10
    flagged = scores[:40] >= 0.5
    assert out["flag_rate"] == pytest.approx(flagged.mean())
    assert out["recall"]["mean"] == 1.0 and out["precision"]["mean"] == pytest.approx(10 / flagged.sum())
    for key in ("auroc", "precision", "recall"):
        assert out[key]["low"] <= out[key]["mean"] <= out[key]["high"]
    # a random flagger at the same rate: precision is the forks' base rate, recall the flag rate
    assert out["random_flagger"]["precision"]["mean"] == pytest.approx(10 / 40)
    assert out["random_flagger"]["recall"]["mean"] == pytest.approx(flagged.mean())
    assert out["auroc"]["mean"] > 0.9


def test_t_interval_and_verdicts() -> None:
    clear = t_interval([0.10, 0.12, 0.11])
    assert clear.low > 0 and verdict(clear) == "higher"
    mixed = t_interval([0.10, -0.08, 0.02])
    assert mixed.low < 0 < mixed.high and verdict(mixed) == "no difference detected"
    assert verdict(t_interval([-0.3, -0.31, -0.29])) == "lower"
    single = t_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and verdict(single) == "no difference detected"
    # the t interval of three seeds is wide: t(0.975, 2) = 4.30 standard errors
    x = [0.0, 1.0, 2.0]
    assert t_interval(x).high - 1.0 == pytest.approx(4.302652729 * 1.0 / math.sqrt(3), rel=1e-6)


def test_bootstrap_covers_the_mean_of_a_sample() -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(1.0, 1.0, 400)
    ci = bootstrap(lambda i: float(data[i].mean()), data.size, seed=0)
    assert ci.low < data.mean() < ci.high and ci.high - ci.low == pytest.approx(2 * 1.96 / 20, rel=0.25)
