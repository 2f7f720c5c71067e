"""Process groups and Megatron model parallelism, from torchrun or Slurm environment variables.

Order at process start (every entry point follows it):
    1. `env.init_process_group()` reads RANK/WORLD_SIZE/... (torchrun) or SLURM_PROCID/SLURM_NTASKS/... (srun),
                                applies the CPU platform layer when CUDA is absent, picks nccl (GPU) or gloo (CPU);
    2. `init_model_parallel(cfg)` calls megatron.core `initialize_model_parallel` for TP/PP/VPP/CP/EP and seeds
                                every RNG (Megatron's model-parallel RNG tracker included).
Student and teacher share these groups: the teacher must use the student's TP size (its vocab shards line up with
the student's for the loss) and may use fewer layers per stage, but lives on the same pipeline ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from topd_megatron.distributed.env import init_process_group


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Model-parallel layout. Data parallelism is whatever remains of the world size."""

    tp: int = 1
    """Tensor-parallel size; the vocabulary is sharded over it for logits and the loss."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None for the plain 1F1B schedule."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-parallel size (MoE teachers/students)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (requires tp > 1)."""
    seed: int = 1234
    """Base seed; Megatron offsets it per TP/PP rank for its model-parallel RNG tracker."""
    cpu_threads: int | None = None
    """torch intra-op threads per rank (None: torch's default); 1 when several runs share a small CPU machine."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(f"parallel.vpp={self.vpp} needs pp >= 2 and vpp >= 1 (set vpp=None for no interleaving)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"parallel.cpu_threads must be >= 1 or None, got {self.cpu_threads}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=True needs tp > 1; set sequence_parallel=False for tp=1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel CUDA/CPU RNG tracker (TP-rank-aware)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_model_parallel(cfg: ParallelConfig) -> None:
    """Initialise Megatron's parallel state for `cfg` on the already-created default group, then seed."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        init_process_group()
    world = dist.get_world_size()
    if world % cfg.model_parallel_size != 0:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {cfg.tp}*{cfg.pp}*{cfg.cp} = {cfg.model_parallel_size};"
            f" launch a multiple of {cfg.model_parallel_size} ranks or change the layout"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        virtual_pipeline_model_parallel_size=cfg.vpp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
    )
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)
