"""`topd_70b`: student Llama-3.3-70B-Instruct, teacher Llama-3.1-405B-Instruct with an FP8 forward (TransformerEngine),
DAPO-Math-17k prompts, MATH-500 held out; `sbatch slurm/topd_70b.sh` runs it.

Layout (chosen with `topd plan topd_70b`; see docs/scale.md): 16 training nodes of 8 H100-80GB, TP=8 within a node,
PP=2 (80 student layers, 126 teacher layers: 40 and 63 per stage), DP=8, sequence parallel, full recomputation of the
student; the 405B teacher in FP8 is colocated on the training ranks (its vocab shards line up with the student's);
student rollouts come from SGLang servers (70B, TP=8, one node each) on 4 nodes of their own; the Slurm script
sets sglang.student.url to them and sglang.sync_address to the first training node.
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


def topd_70b() -> RunConfig:
    return RunConfig(
        student=ModelConfig(
            path=checkpoint("Llama-3.3-70B-Instruct"), dtype="bfloat16", seq_length=8192, recompute="full"
        ),
        teacher=ModelConfig(path=checkpoint("Llama-3.1-405B-Instruct"), dtype="bfloat16", seq_length=8192),
        run_dir=run_dir("topd_70b"),
        task="topd_megatron.tasks.math_jsonl:dapo_math500",
        rollout="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(
                role="student",
                model_path="<student>",
                tp=8,
                dp=4,
                dtype="bfloat16",
                mem_fraction=0.85,
                max_total_tokens=None,
                startup_timeout_s=1800.0,
            ),
            sync_mode="distributed",
        ),
        parallel=ParallelConfig(tp=8, pp=2, sequence_parallel=True),
        objective=objective.preset("topd"),
        optim=OptimConfig(lr=5e-7, clip_grad=1.0),
        train=TrainConfig(
            steps=100,
            prompts_per_step=128,
            samples_per_prompt=4,
            micro_batch_size=1,
            temperature=1.0,
            max_new_tokens=6144,
            eval_every=20,
            save_every=10,
        ),
        eval=EvalConfig(problems=500, k=4, temperature=0.6, top_p=0.95, max_new_tokens=6144),
        cluster=ClusterConfig(nodes=16, gpus_per_node=8, gpu_memory_gib=80.0, student_server_nodes=4),
    )
