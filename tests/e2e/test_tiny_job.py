"""The main job end to end at a reduced size: preparation (SFT of the tiny pair and the ceiling, cached), the
oracle's calibration, several arms and seeds side by side, references, paired statistics, table, plots and JSON.
Marked slow: a cold cache pays for the preparation (~3-5 minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from topd_megatron.analysis.experiment import TinyConfig, print_table, run_tiny


def _small(tmp_path: Path, **kw) -> TinyConfig:
    base = {"steps": 3, "seeds": 2, "eval_problems": 16, "eval_k": 2, "oracle_prompts": 8, "out_dir": str(tmp_path)}
    return TinyConfig(**(base | kw))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a cold preparation on a loaded machine takes well over the suite's 900 s
def test_tiny_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _small(tmp_path / "tiny", arms=("opd", "topd", "topd_oracle", "topd_random_windows"))
    results = run_tiny(cfg, world_timeout=1800)
    print_table(results)
    out = capsys.readouterr().out
    assert "vs OPD (paired)" in out and "random flagger" in out and "halfway" in out
    rows = {r["arm"]: r for r in results["table"]}
    assert list(rows) == ["opd", "topd", "topd_oracle", "topd_random_windows"]
    assert rows["opd"]["overhead_vs_opd"] == pytest.approx(1.0) and "vs_opd" not in rows["opd"]
    for arm in ("topd", "topd_oracle", "topd_random_windows"):
        paired = rows[arm]["vs_opd"]["avg"]
        assert len(paired["per_seed"]) == 2
        assert paired["verdict"] in ("higher", "lower", "no difference detected")
        runs = [results["runs"][f"{a}-seed{s}"]["avg"] for a in (arm, "opd") for s in range(2)]
        assert paired["per_seed"] == [runs[0] - runs[2], runs[1] - runs[3]]
    contrasts = [(c["arm"], c["other"]) for c in results["contrasts"]]  # the pre-registered ones whose arms ran
    assert contrasts == [("topd", "topd_random_windows"), ("topd_oracle", "topd")]
    assert "topd - topd_random_windows (paired)" in out
    assert rows["topd"]["tau"] == results["oracle"]["tau"]["window_ot"]  # frozen from the calibration set
    assert 0.0 <= rows["topd"]["non_divergent_share"] <= 1.0
    refs = results["references"]
    assert set(refs) == {"student_start", "teacher", "ceiling"}
    assert refs["teacher"]["avg"] > refs["student_start"]["avg"]
    ev = results["oracle"]["evaluation"]
    assert ev["fork"] + ev["surface"] + ev["agreement"] + ev["unlabelled"] == ev["candidates"] > 0
    assert set(results["oracle"]["detectors"]) == {"window_ot", "lookahead", "oracle"}
    for plot in results["plots"].values():
        assert Path(plot).stat().st_size > 10_000
    saved = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert saved["table"][0]["arm"] == "opd"
    run = tmp_path / "tiny" / "runs" / "topd-seed1"
    assert (run / "metrics.jsonl").is_file() and (run / "eval_records.jsonl").is_file()
    assert any((run / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_job_runs_a_task_of_another_family(tmp_path: Path) -> None:
    """Any Task runs: the synthetic task (single-token numbers, no choice labels) leaves the oracle-detector arm out
    and everything else works the same way."""
    cfg = _small(tmp_path / "other", task="topd_megatron.tasks.synthetic:default", arms=("opd", "topd", "topd_oracle"))
    results = run_tiny(cfg, world_timeout=1800)
    assert [r["arm"] for r in results["table"]] == ["opd", "topd"]
    assert "topd_oracle" in results["arms_left_out"]
    assert set(results["oracle"]["detectors"]) == {"window_ot", "lookahead"}


@pytest.mark.slow
def test_tiny_job_with_sglang_rollouts(tmp_path: Path) -> None:
    """`topd run tiny --rollout sglang`: rollouts and evaluation from a student SGLang server per run, weights pushed
    over the distributed group after every step."""
    cfg = _small(tmp_path / "tiny", arms=("opd",), steps=2, seeds=1, rollout="sglang", workers=1)
    results = run_tiny(cfg, world_timeout=1800)
    (row,) = results["table"]
    assert row["arm"] == "opd" and 0.0 <= row["avg"]["mean"] <= 1.0
    lines = (tmp_path / "tiny" / "runs" / "opd-seed0" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["split"] == "train"]
    assert len(train) == 2 and all(r["sync/bytes"] > 0 and r["sglang/restarts"] == 0.0 for r in train)
    assert list((tmp_path / "tiny" / "runs" / "opd-seed0" / "sglang").glob("sglang-student-*.log"))
