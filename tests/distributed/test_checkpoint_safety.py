"""Training checkpoints are read without executing code, and a bad one is refused with one clear error.

A real checkpoint (one training step on a gloo rank) is copied and damaged: a malicious pickle planted as the RNG
file, next to it, or as the dist_checkpointing metadata; a malicious non-tensor item in a torch_dist directory;
truncated or missing files. `topd train` refuses each before any rank starts (exit 2, the file named), the rank-level
loader refuses it too, and the planted payload never runs (the payload is live: a plain `torch.load` runs it).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.test_train import make_config
from topd_megatron import cli
from topd_megatron.config import RunConfig
from topd_megatron.distributed.launch import DistributedFailure, spawn
from topd_megatron.models.safe_load import UnsafeCheckpointError, check_dist_checkpoint
from topd_megatron.training.loop import train


class Payload:
    """Unpickling this creates `marker`: it stands for any code a checkpoint could run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(synthetic_pair, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    """A run with one training step and its checkpoint (TP=1, one rank)."""
    run = tmp_path_factory.mktemp("safety") / "run"
    cfg = make_config(synthetic_pair, run, "opd", steps=1, tp=1, eval_at_start=False)
    spawn(train, 1, (cfg,), timeout=600)
    return cfg, run


def _copy(trained: tuple[RunConfig, Path], dest: Path) -> tuple[RunConfig, Path, Path]:
    """A copy of the trained run that resumes for one more step: (config, config file, its checkpoint)."""
    cfg, run = trained
    shutil.copytree(run, dest)
    cfg = dataclasses.replace(cfg, run_dir=str(dest), train=dataclasses.replace(cfg.train, steps=2))
    path = dest.parent / f"{dest.name}.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return cfg, path, dest / "checkpoints" / "step_000001"


def _topd_train(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["train", "--config", str(config)])
    return code, capsys.readouterr().err


def test_a_pickle_planted_as_the_rng_file_is_refused(trained, tmp_path: Path, capsys) -> None:
    cfg, config, ckpt = _copy(trained, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    rng = ckpt / "rng" / "rank_00000.safetensors"
    torch.save({"torch": Payload(marker)}, rng)

    code, err = _topd_train(config, capsys)
    assert code == 2 and "rank_00000.safetensors is not a safetensors RNG state" in err, err
    with pytest.raises(DistributedFailure, match="is not a safetensors RNG state"):
        spawn(train, 1, (cfg,), timeout=600)  # the loader inside the ranks refuses it as well
    assert not marker.exists(), "the planted pickle ran"
    torch.load(io.BytesIO(rng.read_bytes()), weights_only=False)  # what an unguarded loader would do
    assert marker.exists(), "the payload is live"


def test_a_pickle_next_to_the_rng_state_is_refused(trained, tmp_path: Path, capsys) -> None:
    _, config, ckpt = _copy(trained, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), ckpt / "rng" / "rank_00000.pt")  # the file name older versions used
    code, err = _topd_train(config, capsys)
    assert code == 2 and "holds ['rank_00000.pt']" in err and "never unpickles" in err, err
    assert not marker.exists()


def test_malicious_dist_checkpoint_metadata_is_refused(trained, tmp_path: Path, capsys) -> None:
    _, config, ckpt = _copy(trained, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    code, err = _topd_train(config, capsys)
    assert code == 2 and "open' is not allowed in checkpoint metadata" in err and ".metadata" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("wrapped", [False, True], ids=["pickle", "pickle-in-a-bytesio"])
def test_a_malicious_non_tensor_item_is_refused(tmp_path: Path, wrapped: bool) -> None:
    """torch.distributed.checkpoint stores non-tensor items as bytes that Megatron's loader unpickles with
    weights_only=False; the check reads them with torch's weights_only unpickler first, and looks inside a byte
    stream too (importing Megatron-Core allows that unpickler to build BytesIO: the outcome must not depend on what
    the process imported before)."""
    import megatron.core  # noqa: F401  (registers its safe globals, BytesIO among them, as a training process has)
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "payload-ran"
    item: object = Payload(marker)  # the default planner pickles it with torch.save
    if wrapped:
        blob = io.BytesIO()
        torch.save(Payload(marker), blob)
        blob.seek(0)
        item = blob  # pickled again around the payload's bytes
    dcp.save({"weight": torch.ones(3), "common_state": item}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    with pytest.raises(UnsafeCheckpointError, match="item 'common_state'"):
        check_dist_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate_metadata", "is corrupt"),
        ("garbage_train_state", "cannot read"),
        ("older_format", "start the run in a new run_dir"),
        ("dangling_pointer", "which is incomplete"),
        ("missing_rng", "is incomplete (no rng/ or state/)"),
    ],
)
def test_a_corrupt_or_unreadable_checkpoint_is_one_clear_error(trained, tmp_path: Path, capsys, damage, message):
    _, config, ckpt = _copy(trained, tmp_path / "run")
    if damage == "truncate_metadata":
        meta = ckpt / "state" / ".metadata"
        meta.write_bytes(meta.read_bytes()[:100])
    elif damage == "garbage_train_state":
        (ckpt / "train_state.json").write_text("{not json")
    elif damage == "older_format":
        state = json.loads((ckpt / "train_state.json").read_text())
        (ckpt / "train_state.json").write_text(json.dumps(state | {"format": "topd-megatron/1"}))
    elif damage == "dangling_pointer":
        (ckpt.parent / "latest").write_text("step_000009\n")
    else:
        shutil.rmtree(ckpt / "rng")
    code, err = _topd_train(config, capsys)
    assert code == 2 and message in err, err
    assert err.startswith("topd: error:") and "Traceback" not in err


def test_a_full_disk_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(
    synthetic_pair, trained, tmp_path: Path
) -> None:
    """RUN/checkpoints on a size-limited filesystem (tmpfs) with room for one checkpoint and a half: the checkpoint of
    step 1 is written, the one of step 2 fills the disk. The run fails with an error naming the full disk and the
    checkpoint that is still the latest; the partial directory is gone; that checkpoint resumes the run to its end
    (on a disk with room), with the metrics of a run that never hit the full disk."""
    import os
    import subprocess

    from topd_megatron.models.checkpoint import latest_checkpoint
    from topd_megatron.training.metrics import read_metrics

    if os.geteuid() != 0:
        pytest.fail("mounting a size-limited tmpfs for this test needs root")
    _, run = trained
    size = sum(f.stat().st_size for f in (run / "checkpoints" / "step_000001").rglob("*") if f.is_file())
    cfg = make_config(synthetic_pair, tmp_path / "run", "opd", steps=2, tp=1, eval_at_start=False, save_every=1)
    straight = dataclasses.replace(cfg, run_dir=str(tmp_path / "straight"))
    spawn(train, 1, (straight,), timeout=600)

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(ckpts)], check=True)
    try:
        with pytest.raises(DistributedFailure) as err:
            spawn(train, 1, (cfg,), timeout=600)
        message = str(err.value)
        assert "CheckpointWriteError: could not write the checkpoint of step 2" in message, message[-3000:]
        assert "MiB free there after cleaning up" in message  # torch's zip writer hides the ENOSPC it hit
        assert "step_000001 is still the latest checkpoint and loads" in message
        assert latest_checkpoint(tmp_path / "run").name == "step_000001"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]  # no partial directory left
        kept = shutil.copytree(ckpts, tmp_path / "kept")
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)
    shutil.rmtree(ckpts)
    shutil.copytree(kept, ckpts)
    spawn(train, 1, (cfg,), timeout=600)  # resumes from step 1 on a disk with room
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    drop = ("time/", "sync/", "detect/time_s")
    rows = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / "run")]
    assert rows == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(straight.run_dir)]
