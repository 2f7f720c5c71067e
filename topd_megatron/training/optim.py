"""The student's DDP wrapping and Megatron optimizer (the teacher never gets either).

    ddp = ddp_config(cfg)                                   # pass to build_model(..., wrap_with_ddp=True)
    optimizer = build_optimizer(cfg, student)               # megatron.core MegatronOptimizer over student chunks

Order inside a training step (Megatron's contract):
    for m in student.modules: m.zero_grad_buffer()          # DDP grad buffers
    optimizer.zero_grad()
    run_pipeline(..., forward_only=False)                   # backward accumulates into main_grad; DDP reduces
    finalize_model_grads(student.modules)                   # DP reduction, SP norms, tied embeddings
    ok, grad_norm, _ = optimizer.step()                     # clip by clip_grad, step, copy to model params
    scheduler.step(increment=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from topd_megatron.choices import check_choices


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Student optimizer (Megatron's Adam) and gradient handling."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state (and fp32 main params) over data-parallel ranks (ZeRO-1)."""
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


def ddp_config(cfg: OptimConfig) -> Any:
    """Megatron DDP settings matching the optimizer (fp32 gradient reduction, no overlap: exact and simple)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )


def build_optimizer(cfg: OptimConfig, student: Any) -> Any:
    """A MegatronOptimizer over the student's (DDP-wrapped) chunks, in the student's dtype with fp32 main params."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    provider = student.provider
    config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=provider.params_dtype == torch.bfloat16,
        fp16=provider.params_dtype == torch.float16,
        params_dtype=provider.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, student.modules)


def build_scheduler(cfg: OptimConfig, optimizer: Any, total_steps: int) -> Any:
    """Megatron's OptimizerParamScheduler: linear warmup, then constant / cosine / linear decay to min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.decay != "constant" else cfg.lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.decay,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
