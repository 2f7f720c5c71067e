"""`tiny`: the tiny embedded default on CPU gloo ranks: TOPD (window-OT detector, suppression, teacher-window
guidance) on the prepared tiny pair and the drift task, exactly one arm of `topd run tiny`."""

from __future__ import annotations

import dataclasses
import os

from topd_megatron.analysis.experiment import TinyConfig, run_config
from topd_megatron.analysis.prepare import prepared_paths
from topd_megatron.config import RunConfig


def tiny() -> RunConfig:
    """TP=2 on two gloo ranks (change with parallel.tp/pp), 30 steps, fp32, embedded rollouts, checkpoints every 10
    steps. The run directory is $TOPD_OUT/tiny (default runs/tiny-recipe/tiny); the checkpoints are those
    `topd prepare` makes (launchers run it). TOPD's tau is the per-step quantile here (no oracle calibration: that is
    part of `topd run tiny`)."""
    tiny_cfg = TinyConfig(tp=2, steps=30, out_dir=os.environ.get("TOPD_OUT", "runs/tiny-recipe"))
    student, teacher = prepared_paths(tiny_cfg.prepare)
    cfg = run_config(tiny_cfg, student, teacher, arm="topd", seed=0, taus={})
    cfg.run_dir = os.path.join(tiny_cfg.out_dir, "tiny")
    cfg.parallel.cpu_threads = None
    cfg.train = dataclasses.replace(cfg.train, eval_every=15, eval_at_start=True, save_checkpoints=True, save_every=10)
    cfg.eval = dataclasses.replace(cfg.eval, problems=100, records_file=None)
    cfg.cluster.nodes, cfg.cluster.gpus_per_node = 1, tiny_cfg.tp * tiny_cfg.pp
    return cfg
