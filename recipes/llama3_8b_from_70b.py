"""`llama3_8b_from_70b`: student Llama-3.1-8B-Instruct, teacher Llama-3.3-70B-Instruct (same Llama-3 tokenizer),
DAPO-Math-17k prompts, MATH-500 held out, one 8-GPU node.

Layout (checked by `topd plan llama3_8b_from_70b`): TP=8 (the 70B teacher's 140 GB of bf16 weights spread over the
node), DP=1; the student's SGLang server shares the node (mem_fraction 0.2); the teacher is colocated in Megatron.
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


def llama3_8b_from_70b() -> RunConfig:
    return RunConfig(
        student=ModelConfig(
            path=checkpoint("Llama-3.1-8B-Instruct"), dtype="bfloat16", seq_length=8192, recompute="selective"
        ),
        teacher=ModelConfig(path=checkpoint("Llama-3.3-70B-Instruct"), dtype="bfloat16", seq_length=8192),
        run_dir=run_dir("llama3_8b_from_70b"),
        task="topd_megatron.tasks.math_jsonl:dapo_math500",
        rollout="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(
                role="student",
                model_path="<student>",
                tp=1,
                dp=8,
                dtype="bfloat16",
                mem_fraction=0.2,
                max_total_tokens=None,
            ),
            sync_mode="distributed",
        ),
        parallel=ParallelConfig(tp=8, pp=1, sequence_parallel=True),
        objective=objective.preset("topd"),
        optim=OptimConfig(lr=1e-6, clip_grad=1.0),
        train=TrainConfig(
            steps=200,
            prompts_per_step=64,
            samples_per_prompt=4,
            micro_batch_size=2,
            temperature=1.0,
            max_new_tokens=6144,
            eval_every=25,
            save_every=25,
        ),
        eval=EvalConfig(problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=6144),
        cluster=ClusterConfig(nodes=1, gpus_per_node=8, gpu_memory_gib=80.0),
    )
