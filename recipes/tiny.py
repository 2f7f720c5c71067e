"""`tiny`: the tiny embedded default on CPU gloo ranks: TOPD (window-OT detector, suppression, teacher-window
guidance) on the prepared tiny pair and the synthetic task, exactly one arm of `topd run tiny`."""

from __future__ import annotations

import os

from topd_megatron.analysis.experiment import TinyConfig, run_config
from topd_megatron.analysis.prepare import PrepareConfig, prepared_paths
from topd_megatron.config import RunConfig


def tiny() -> RunConfig:
    """TP=2 on two gloo ranks (change with parallel.tp/pp), 30 steps, fp32, embedded rollouts. The run directory is
    $TOPD_OUT/tiny (default runs/tiny-recipe); the checkpoints are those `topd prepare` makes (launchers run it)."""
    prep = PrepareConfig()
    student, teacher = prepared_paths(prep)
    tiny_cfg = TinyConfig(out_dir=os.environ.get("TOPD_OUT", "runs/tiny-recipe"))
    cfg = run_config(tiny_cfg, student, teacher, arm="topd", seed=0, eval_at_start=True)
    cfg.run_dir = os.path.join(tiny_cfg.out_dir, "tiny")
    cfg.cluster.nodes, cfg.cluster.gpus_per_node = 1, tiny_cfg.tp * tiny_cfg.pp
    return cfg
