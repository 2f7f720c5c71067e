"""The main job's comparison logic on given run summaries: paired differences against OPD seed by seed, their t
intervals and verdicts, OPD's gain over the start, the halfway mark, and the printed table."""

from __future__ import annotations

import math

import pytest

from topd_megatron.analysis.experiment import TinyConfig, compile_results, print_table


def _run(avg: float, greedy: float, step: float = 0.5, share: float = math.nan) -> dict:
    return {"avg": avg, "greedy": greedy, "non_divergent_share": share, "seconds": {"step": step}}


def test_paired_comparison_claims_only_what_the_intervals_support(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TinyConfig(arms=("opd", "topd", "opd_pg"), seeds=3)
    runs = {
        ("opd", 0): _run(0.70, 0.90),
        ("opd", 1): _run(0.74, 0.92),
        ("opd", 2): _run(0.68, 0.88),
        ("topd", 0): _run(0.75, 0.91, 1.0, 0.4),  # consistently +0.05: higher
        ("topd", 1): _run(0.80, 0.90, 1.0, 0.5),
        ("topd", 2): _run(0.72, 0.90, 1.0, 0.6),
        ("opd_pg", 0): _run(0.72, 0.80, 0.25),  # mixed sign: no difference detected
        ("opd_pg", 1): _run(0.70, 0.95, 0.25),
        ("opd_pg", 2): _run(0.70, 0.84, 0.25),
    }
    refs = {f"start-seed{s}": {"avg": 0.40, "greedy": 0.44} for s in range(3)}
    refs |= {"teacher": {"avg": 0.96, "greedy": 1.0}, "ceiling": {"avg": 0.9, "greedy": 0.99}}
    oracle = {"tau": {"window_ot": 0.5}, "detectors": {}, "evaluation": {}, "calibration": {}}
    results = compile_results(cfg, ["opd", "topd", "opd_pg"], runs, refs, oracle, {})
    rows = {r["arm"]: r for r in results["table"]}
    topd = rows["topd"]["vs_opd"]["avg"]
    assert topd["per_seed"] == pytest.approx([0.05, 0.06, 0.04])
    assert topd["interval"]["low"] > 0 and topd["verdict"] == "higher"
    assert rows["opd_pg"]["vs_opd"]["avg"]["verdict"] == "no difference detected"
    assert rows["topd"]["overhead_vs_opd"] == pytest.approx(2.0) and rows["topd"]["tau"] == 0.5
    assert rows["topd"]["non_divergent_share"] == pytest.approx(0.5)
    gain = results["opd_gain_over_start"]["avg"]
    assert gain["per_seed"] == pytest.approx([0.30, 0.34, 0.28]) and gain["interval"]["low"] > 0
    assert results["halfway_to_teacher"]["avg"] == pytest.approx(0.68)
    results["oracle"] = {
        "evaluation": {"candidates": 0, "fork": 0, "surface": 0, "agreement": 0, "unlabelled": 0, "surface_share": 0},
        "detectors": {},
    }
    print_table(results)
    out = capsys.readouterr().out
    assert "higher" in out and "n.d." in out and "halfway 0.680" in out


def _opd_topd_and(arm: str, avgs: tuple[float, ...]) -> dict:
    """compile_results over 3 seeds of opd (0.70), topd (0.60, 0.62, 0.61) and `arm` (avg@4 `avgs`); greedy 0.9."""
    arms = ["opd", "topd", arm]
    cfg = TinyConfig(arms=tuple(arms), seeds=3)
    runs = {("opd", s): _run(0.70, 0.90) for s in range(3)}
    runs |= {("topd", s): _run(v, 0.9, 1.0, 0.5) for s, v in enumerate((0.60, 0.62, 0.61))}
    runs |= {(arm, s): _run(v, 0.9, 1.0, 0.5) for s, v in enumerate(avgs)}
    refs = {f"start-seed{s}": {"avg": 0.40, "greedy": 0.44} for s in range(3)} | {"teacher": {"avg": 1, "greedy": 1}}
    oracle = {"tau": {"window_ot": 0.5}, "detectors": {}, "evaluation": {}, "calibration": {}}
    return compile_results(cfg, arms, runs, refs, oracle, {})


def test_pre_registered_contrasts_pair_arms_other_than_opd(capsys: pytest.CaptureFixture[str]) -> None:
    """topd - topd_upweight is computed seed by seed like the OPD comparisons; a contrast whose arm is not in the job
    (topd_random_windows, topd_oracle here) is left out rather than reported empty."""
    results = _opd_topd_and("topd_upweight", (0.70, 0.71, 0.73))
    [con] = results["contrasts"]
    assert (con["arm"], con["other"]) == ("topd", "topd_upweight")
    assert con["avg"]["per_seed"] == pytest.approx([-0.10, -0.09, -0.12])
    assert con["avg"]["verdict"] == "lower" and con["greedy"]["verdict"] == "no difference detected"
    results["oracle"] = {
        "evaluation": {"candidates": 0, "fork": 0, "surface": 0, "agreement": 0, "unlabelled": 0, "surface_share": 0},
        "detectors": {},
    }
    print_table(results)
    assert "topd - topd_upweight (paired): avg@4 -0.103" in capsys.readouterr().out


def test_the_guidance_budget_is_compared_with_topd() -> None:
    """H5: topd_budget - topd seed by seed, where both arms ran."""
    [con] = _opd_topd_and("topd_budget", (0.61, 0.60, 0.64))["contrasts"]
    assert (con["arm"], con["other"]) == ("topd_budget", "topd")
    assert con["avg"]["per_seed"] == pytest.approx([0.01, -0.02, 0.03])
    assert con["avg"]["verdict"] == "no difference detected"
