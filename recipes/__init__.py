"""Recipes: plain functions returning a complete `RunConfig`, named after what they train.

    tiny                    CPU, gloo ranks: the tiny embedded default (prepared tiny pair, synthetic task, TOPD)
    qwen3_4b_from_30b_a3b   the paper's setting: Qwen3-4B-Instruct-2507 from the MoE Qwen3-30B-A3B-Instruct-2507,
                            expert parallelism, one 8-GPU node
    llama3_8b_from_70b      Llama-3.1-8B-Instruct from Llama-3.3-70B-Instruct, one 8-GPU node
    topd_70b                Llama-3.3-70B-Instruct from Llama-3.1-405B-Instruct (FP8 teacher forward), multi-node

    from topd_megatron import recipes
    cfg = recipes.get("tiny")                               # a RunConfig
    cfg = recipes.get("topd_70b", ["train.steps=10"])       # with dotted-key overrides

This folder is not an installed package: `topd_megatron.recipes` mounts it (as `topd_recipes`) when a recipe is
asked for, so recipe modules import each other relatively. Register a new recipe in RECIPES below.

Checkpoint, data and output locations of the GPU recipes come from environment variables (defaults in brackets):
TOPD_CKPT_DIR [checkpoints] holds the Hugging Face (or converted topd) checkpoint directories named as on the Hub
(e.g. Qwen3-4B-Instruct-2507); TOPD_SHARED_DATA holds the math JSONL files (see topd_megatron.paths); TOPD_OUT [runs]
receives run directories. `recipes/launch.py` runs any recipe through nemo-run; `topd train --recipe NAME` and the
Slurm scripts run them directly; `topd plan NAME` checks a recipe's layout against the cluster before any GPU time.
"""

from __future__ import annotations

from topd_megatron.recipes import Recipe

from . import llama3_8b_from_70b, qwen3_4b_from_30b_a3b, tiny, topd_70b

RECIPES = (
    Recipe("tiny", tiny.tiny, "CPU gloo ranks, the tiny embedded default", needs_tiny_pair=True),
    Recipe(
        "qwen3_4b_from_30b_a3b",
        qwen3_4b_from_30b_a3b.qwen3_4b_from_30b_a3b,
        "Qwen3-4B-Instruct-2507 from Qwen3-30B-A3B-Instruct-2507 (MoE, EP), one 8-GPU node",
    ),
    Recipe(
        "llama3_8b_from_70b",
        llama3_8b_from_70b.llama3_8b_from_70b,
        "Llama-3.1-8B-Instruct from Llama-3.3-70B-Instruct, one 8-GPU node",
    ),
    Recipe(
        "topd_70b",
        topd_70b.topd_70b,
        "Llama-3.3-70B-Instruct from Llama-3.1-405B-Instruct (FP8 teacher forward), multi-node",
    ),
)
"""Every recipe `topd train --recipe`, `topd plan`, `recipes/launch.py` and the Slurm scripts can name."""
