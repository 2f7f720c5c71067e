"""The main job end to end, at a reduced size: preparation (SFT of the tiny pair, cached), two arms, oracle,
table, plots and JSON. Marked slow: the first run pays for the preparation (~3 minutes on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from topd_megatron.analysis.experiment import TinyConfig, print_table, run_tiny


@pytest.mark.slow
def test_tiny_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TinyConfig(
        arms=("opd", "topd"),
        steps=3,
        eval_every=3,
        eval_problems=12,
        eval_k=2,
        oracle_prompts=6,
        out_dir=str(tmp_path / "tiny"),
    )
    results = run_tiny(cfg, world_timeout=1800)
    print_table(results)
    out = capsys.readouterr().out
    assert "opd" in out and "topd" in out and "surface share" in out
    rows = {r["arm"]: r for r in results["table"]}
    assert set(rows) == {"opd", "topd"}
    assert rows["opd"]["overhead_vs_opd"] == pytest.approx(1.0)
    assert rows["topd"]["detector"] == "window_ot" and 0.0 <= rows["topd"]["non_divergent_share"] <= 1.0
    assert 0.0 <= rows["topd"]["avg@2"] <= 1.0
    oracle = results["oracle"]
    assert (
        oracle["candidates"] > 0 and oracle["forks"] + oracle["surface"] + oracle["unlabelled"] == oracle["candidates"]
    )
    assert results["prepare"]["teacher"]["accuracy"] >= 0.95 and results["prepare"]["student"]["accuracy"] <= 0.60
    for plot in results["plots"].values():
        assert Path(plot).stat().st_size > 10_000
    saved = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert saved["table"][0]["arm"] == "opd"
    for arm in ("opd", "topd"):
        run = tmp_path / "tiny" / f"{arm}-seed0"
        assert (run / "metrics.jsonl").is_file() and any((run / "tensorboard").iterdir())


@pytest.mark.slow
def test_tiny_job_with_sglang_rollouts(tmp_path: Path) -> None:
    """`topd run tiny --rollout sglang`: rollouts and evaluation from a student SGLang server per run, weights pushed
    over the distributed group after every step."""
    cfg = TinyConfig(
        arms=("opd",),
        steps=2,
        eval_every=2,
        eval_problems=8,
        eval_k=1,
        oracle_prompts=4,
        rollout="sglang",
        out_dir=str(tmp_path / "tiny"),
    )
    results = run_tiny(cfg, world_timeout=1800)
    (row,) = results["table"]
    assert row["arm"] == "opd" and 0.0 <= row["avg@1"] <= 1.0
    train = [json.loads(line) for line in (tmp_path / "tiny" / "opd-seed0" / "metrics.jsonl").read_text().splitlines()]
    syncs = [r for r in train if r["split"] == "train"]
    assert len(syncs) == 2 and all(r["sync/bytes"] > 0 and r["sglang/restarts"] == 0.0 for r in syncs)
    assert list((tmp_path / "tiny" / "opd-seed0" / "sglang").glob("sglang-student-*.log"))
