"""`qwen3_4b_from_30b_a3b`: the paper's setting. Student Qwen3-4B-Instruct-2507, MoE teacher
Qwen3-30B-A3B-Instruct-2507 (128 experts, 8 active), DAPO-Math-17k prompts, MATH-500 held out, one 8-GPU node.

Layout (checked by `topd plan qwen3_4b_from_30b_a3b`): TP=2 (divides the teacher's 4 KV heads), EP=4 for the
teacher's experts, DP=4; the student's SGLang server shares the node (mem_fraction 0.25 of each GPU), the teacher is
colocated in Megatron (its windows come from the colocated teacher).
"""

from __future__ import annotations

from recipes._paths import checkpoint, run_dir
from topd_megatron import objective
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.evaluate import EvalConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.optim import OptimConfig
from topd_megatron.parallel import ParallelConfig
from topd_megatron.rollout.sglang import SGLangConfig
from topd_megatron.rollout.sglang_server import ServerConfig


def qwen3_4b_from_30b_a3b() -> RunConfig:
    return RunConfig(
        student=ModelConfig(path=checkpoint("Qwen3-4B-Instruct-2507"), dtype="bfloat16", seq_length=8192),
        teacher=ModelConfig(path=checkpoint("Qwen3-30B-A3B-Instruct-2507"), dtype="bfloat16", seq_length=8192),
        run_dir=run_dir("qwen3_4b_from_30b_a3b"),
        task="topd_megatron.tasks.math_jsonl:dapo_math500",
        rollout="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(
                role="student",
                model_path="<student>",
                tp=1,
                dp=8,
                dtype="bfloat16",
                mem_fraction=0.25,
                max_total_tokens=None,
            ),
            sync_mode="distributed",
        ),
        parallel=ParallelConfig(tp=2, pp=1, ep=4),
        objective=objective.preset("topd"),
        optim=OptimConfig(lr=1e-6, clip_grad=1.0),
        train=TrainConfig(
            steps=200,
            prompts_per_step=64,
            samples_per_prompt=4,
            micro_batch_size=4,
            temperature=1.0,
            max_new_tokens=6144,
            eval_every=25,
            save_every=25,
        ),
        eval=EvalConfig(problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=6144),
        cluster=ClusterConfig(nodes=1, gpus_per_node=8, gpu_memory_gib=80.0),
    )
