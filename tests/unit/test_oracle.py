"""The oracle's scoring of detectors: precision/recall for real forks and the threshold-free AUROC."""

from __future__ import annotations

import itertools
import math

import torch

from topd_megatron.analysis.oracle import FORK, SURFACE, UNLABELLED, fork_auroc, precision_recall

F, S, U = FORK, SURFACE, UNLABELLED


def test_precision_recall_counts_labelled_candidates_only() -> None:
    labels = torch.tensor([F, F, S, S, S, U, U])
    divergent = torch.tensor([True, False, True, False, False, True, False])
    pr = precision_recall(divergent, labels)
    assert pr == {"precision": 0.5, "recall": 0.5, "labelled": 5.0}
    none_flagged = precision_recall(torch.zeros(7, dtype=torch.bool), labels)
    assert math.isnan(none_flagged["precision"]) and none_flagged["recall"] == 0.0


def test_auroc_matches_pairwise_definition() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    scores[3] = float("nan")  # no window: ranks above every number
    labels = torch.tensor([F, S, U, F] * 10)
    forks = [float(x) for x, lab in zip(scores, labels, strict=True) if lab == F]
    surface = [float(x) for x, lab in zip(scores, labels, strict=True) if lab == S]

    def key(x: float) -> float:
        return math.inf if math.isnan(x) else x

    wins = sum(
        1.0 if key(a) > key(b) else 0.5 if key(a) == key(b) else 0.0 for a, b in itertools.product(forks, surface)
    )
    assert fork_auroc(scores, labels) == wins / (len(forks) * len(surface))


def test_auroc_extremes_and_empty_classes() -> None:
    labels = torch.tensor([F, F, S, S])
    assert fork_auroc(torch.tensor([3.0, 4.0, 1.0, 2.0]), labels) == 1.0
    assert fork_auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels) == 0.0
    assert fork_auroc(torch.ones(4), labels) == 0.5
    assert math.isnan(fork_auroc(torch.ones(2), torch.tensor([S, U])))
