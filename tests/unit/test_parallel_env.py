"""Parallel setup reads torchrun and Slurm environments; layouts are validated up front."""

from __future__ import annotations

import pytest

from topd_megatron.distributed.env import dist_env
from topd_megatron.distributed.parallel import ParallelConfig

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_torchrun_variables_win(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }.items():
        clean_env.setenv(k, v)
    env = dist_env()
    assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_slurm_variables_when_srun_launches_every_task(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "127.0.0.1",
    }.items():
        clean_env.setenv(k, v)
    env = dist_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    assert env["MASTER_PORT"] == str(20000 + 4242 % 20000)  # every task derives the same port
    assert env["MASTER_ADDR"]


def test_single_process_default(clean_env: pytest.MonkeyPatch) -> None:
    env = dist_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 0}, "parallel.tp must be >= 1"),
        ({"pp": 1, "vpp": 2}, "needs pp >= 2"),
        ({"tp": 1, "sequence_parallel": True}, "needs tp > 1"),
    ],
)
def test_bad_layouts_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)
