"""Resume a training checkpoint at another layout: TP2->TP1, PP2->PP1, TP1->TP2, DP2->DP1 on gloo ranks.

For each switch, a run trains 4 steps at layout A with a checkpoint after step 2; the step-2 checkpoint is then
(1) loaded at layout B and saved again there: every stored tensor (weights, fp32 main parameters, Adam exp_avg and
exp_avg_sq, at their global shapes) is bit-identical to the one written at A, and every parameter's Adam step counter
equals the saved step count, each in its own tensor; (2) resumed at B for steps 3-4: the losses equal those of the
run that continued at A within float tolerance (the reduction order changes with the layout, nothing else).

Rollouts are greedy (train.temperature=0): the embedded engine draws its sampling noise per TP rank and DP replica
(seeds.py), so sampled rollouts differ between layouts by design; greedy ones depend only on the weights. The
uninterrupted run at A stands for the same-layout continuation (tests/distributed/test_train.py shows that a resume
at the saved layout reproduces it exactly).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.test_train import make_config
from topd_megatron.config import RunConfig
from topd_megatron.distributed.launch import DistributedFailure, spawn
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.training.loop import train
from topd_megatron.training.metrics import read_metrics

LOSS_RTOL = 1e-4
"""Relative tolerance on the continued losses: float32 sums in another order, amplified over two Adam steps."""

SWITCHES = {
    "tp2_to_tp1": ((2, 1, 2), (1, 1, 1), "any_layout"),
    "pp2_to_pp1": ((1, 2, 2), (1, 1, 1), "any_layout"),
    "tp1_to_tp2": ((1, 1, 1), (2, 1, 2), "any_layout"),
    "dp2_to_dp1": ((1, 1, 2), (1, 1, 1), "any_layout"),
    "dp2_to_dp1_same_model_parallel": ((1, 1, 2), (1, 1, 1), "same_model_parallel"),
}
"""name -> ((TP, PP, ranks) at A, (TP, PP, ranks) at B, train.checkpoint_optimizer)."""


def _config(pair: tuple[Path, Path], run_dir: Path, tp: int, pp: int, fmt: str = "any_layout") -> RunConfig:
    cfg = make_config(pair, run_dir, "opd", steps=4, tp=tp, pp=pp, save_every=2, eval_at_start=False)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, temperature=0.0, checkpoint_optimizer=fmt))


def _reload_and_resave(rank: int, world: int, cfg: RunConfig, src: str, dst: str) -> dict:
    """Load the training checkpoint `src` at `cfg`'s layout and save it again to the run directory `dst`; report the
    Adam step counters as loaded (value set, whether every parameter has its own tensor)."""
    from topd_megatron.models.checkpoint import load_training_state, save_training_state
    from topd_megatron.training.loop import training_layout
    from topd_megatron.training.optim import build_optimizer, build_scheduler, ddp_config
    from topd_megatron.training.session import rank_session

    with rank_session(cfg.parallel, cfg.student, ddp=ddp_config(cfg.optim)) as session:
        optimizer = build_optimizer(cfg.optim, session.student)
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)
        meta = load_training_state(Path(src), session.student, optimizer, scheduler, training_layout(cfg, world))
        chained = getattr(optimizer, "chained_optimizers", [optimizer])
        states = [s for opt in chained for s in opt.optimizer.state.values()]
        steps = {float(s["step"]) for s in states}
        own_tensors = len({id(s["step"]) for s in states}) == len(states)
        save_training_state(dst, meta["step"], session.student, optimizer, scheduler, meta["extra"])
    return {"steps": sorted(steps), "own_tensors": own_tensors, "states": len(states), "saved": meta["optimizer_steps"]}


def _full_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint at its global shape, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from topd_megatron.models.safe_load import read_dist_metadata

    meta = read_dist_metadata(directory)
    state = {
        k: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in meta.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state


def _branch_at(run_a: Path, out: Path, step: int) -> None:
    """A copy of run A as it was right after the checkpoint of `step`: later checkpoints and metrics dropped."""
    shutil.copytree(run_a, out, ignore=shutil.ignore_patterns("tensorboard"))
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (out / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")


SLOW = {"tp1_to_tp2", "dp2_to_dp1", "dp2_to_dp1_same_model_parallel"}
"""Each switch takes ~30-40 s on 2 CPU cores: TP2->TP1 and PP2->PP1 run in the default suite, the rest with -m slow."""


@pytest.mark.parametrize(
    "switch", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in SWITCHES]
)
def test_resume_at_another_layout(synthetic_pair, tmp_path: Path, switch: str) -> None:
    (tp_a, pp_a, world_a), (tp_b, pp_b, world_b), fmt = SWITCHES[switch]
    run_a = tmp_path / "a"
    spawn(train, world_a, (_config(synthetic_pair, run_a, tp_a, pp_a, fmt),), timeout=900)
    ckpt = run_a / "checkpoints" / "step_000002"

    # (1) the state after resharding, element for element
    cfg_b = _config(synthetic_pair, tmp_path / "resaved", tp_b, pp_b, fmt)
    report = spawn(_reload_and_resave, world_b, (cfg_b, str(ckpt), str(tmp_path / "resaved")), timeout=600)[0]
    saved_steps = json.loads((ckpt / "train_state.json").read_text())["optimizer_steps"]
    assert saved_steps == [2] and report["saved"] == saved_steps
    assert report["steps"] == [2.0] and report["own_tensors"] and report["states"] > 0, report
    before = _full_tensors(ckpt / "state")
    after = _full_tensors(tmp_path / "resaved" / "checkpoints" / "step_000002" / "state")
    assert "embedding.word_embeddings.weight" in before and "output_layer.weight" in before  # the model's weights
    if fmt == "any_layout":  # model-space optimizer state: the same tensors at any layout
        assert before.keys() == after.keys()
        kinds = {k.split(".")[2] for k in before if k.startswith("optimizer.state.")}
        assert {"exp_avg", "exp_avg_sq"} <= kinds, kinds
    for key in before.keys() & after.keys():  # same_model_parallel: flat per-DP-group buckets, the weights compared
        assert before[key].shape == after[key].shape and torch.equal(before[key], after[key]), key

    # (2) the continued loss curve
    run_b = tmp_path / "b"
    _branch_at(run_a, run_b, 2)
    spawn(train, world_b, (dataclasses.replace(cfg_b, run_dir=str(run_b)),), timeout=900)
    rows_a = read_metrics(run_a, "train")
    rows_b = read_metrics(run_b, "train")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert rows_b[:2] == rows_a[:2]  # the history before the switch is kept as it was
    for a, b in zip(rows_a[2:], rows_b[2:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert b["rollout/response_tokens"] == a["rollout/response_tokens"]


@pytest.mark.parametrize(
    ("fmt", "change", "message"),
    [
        ("any_layout", "optimizer", "use_distributed_optimizer=True when saved, False now"),
        ("same_model_parallel", "tp", "train.checkpoint_optimizer=same_model_parallel, which loads only at the TP/PP"),
    ],
)
def test_a_layout_that_cannot_resume_fails_before_any_model_is_built(
    synthetic_pair, tmp_path: Path, fmt: str, change: str, message: str
) -> None:
    run = tmp_path / "run"
    cfg = _config(synthetic_pair, run, 1, 1, fmt)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1))
    spawn(train, 1, (cfg,), timeout=600)
    other = dataclasses.replace(cfg, parallel=ParallelConfig(tp=2))
    if change == "optimizer":
        other = dataclasses.replace(other, optim=dataclasses.replace(cfg.optim, use_distributed_optimizer=False))
    with pytest.raises(DistributedFailure, match=message) as err:
        spawn(train, 2, (other,), timeout=600)
    assert "rank_session" not in str(err.value) and "build_model" not in str(err.value)
