"""What the GPU recipes share: where checkpoints and runs live (environment variables with defaults), the math task,
the SGLang server settings and the evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from topd_megatron.evaluation.task_eval import EvalConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.server import ServerConfig


def checkpoint(name: str) -> str:
    """$TOPD_CKPT_DIR/NAME (default checkpoints/NAME): a Hugging Face or converted topd checkpoint directory."""
    return str(Path(os.environ.get("TOPD_CKPT_DIR", "checkpoints")) / name)


def run_dir(name: str) -> str:
    """$TOPD_OUT/NAME (default runs/NAME)."""
    return str(Path(os.environ.get("TOPD_OUT", "runs")) / name)


MATH_TASK = "topd_megatron.tasks.math_jsonl:dapo_math500"
"""DAPO-Math-17k training prompts, MATH-500 held out."""


def packing_model(name: str, **kw: Any) -> ModelConfig:
    """A bf16 model of 8,192-token sequences on Megatron-Core's local attention, which takes the per-window mask of
    packed guidance windows (TransformerEngine's attention cannot: topd plan's search picks this where it pays);
    `kw`: further ModelConfig fields (recompute)."""
    return ModelConfig(path=checkpoint(name), dtype="bfloat16", seq_length=8192, transformer_engine=False, **kw)


def gpu_server(role: str, *, tp: int, dp: int, mem_fraction: float, **kw: Any) -> ServerConfig:
    """A bf16 SGLang server on the role's own checkpoint (`<student>` / `<teacher>`), its KV cache sized by SGLang
    from `mem_fraction` (no CPU token cap); `kw`: further ServerConfig fields (extra_args, startup_timeout_s)."""
    return ServerConfig(
        role=role,
        model_path=f"<{role}>",
        tp=tp,
        dp=dp,
        dtype="bfloat16",
        mem_fraction=mem_fraction,
        max_total_tokens=None,
        **kw,
    )


def math_eval() -> EvalConfig:
    """MATH-500 avg@4 (T=0.6, top-p 0.95, 6,144 new tokens) plus AIME24 and AIME25 at every evaluation."""
    return EvalConfig(
        problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=6144, benchmarks=("aime24", "aime25")
    )
