"""The process environment of one rank: its rank and world from torchrun or Slurm variables, a free port, and the
default process group (NCCL with one GPU per local rank, gloo on CPU with the platform layer applied)."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess

import torch
import torch.distributed as dist

from topd_megatron.distributed import platform


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS may reuse it; callers bind soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def dist_env() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from torchrun, else from srun, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        }
    else:
        out = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        out["MASTER_ADDR"] = _slurm_master_addr() if "SLURM_PROCID" in env else "127.0.0.1"
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif "SLURM_JOB_ID" in env:
        # Every task of a Slurm job derives the same port from the job id.
        out["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    else:
        out["MASTER_PORT"] = str(free_port())
    return out


def init_process_group(timeout_s: float = 600.0) -> None:
    """Create the default process group (idempotent): nccl with one GPU per local rank, gloo on CPU."""
    platform.apply()
    if dist.is_initialized():
        return
    env = dist_env()
    os.environ.update(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(env["LOCAL_RANK"]) % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
