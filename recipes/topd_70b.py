"""`topd_70b`: student Llama-3.3-70B-Instruct, teacher Llama-3.1-405B-Instruct with an FP8 forward, DAPO-Math-17k
prompts, MATH-500 held out; responses up to 6,144 tokens in 8,192-token sequences, K = 50 teacher windows;
`sbatch slurm/topd_70b.sh` runs it on 18 nodes of 8 H100-80GB.

Layout (`topd plan topd_70b`; see docs/scale.md), 16 + 1 + 1 nodes:
- training, 16 nodes: TP=8 within a node, PP=2 (40 student layers per stage), DP=8, sequence parallelism, no
  recomputation, micro-batches of 1; the student alone: 56.0 GiB per GPU on the first stage (its states 30.8, two
  micro-batches of activations in flight 21.0), 46.5 GiB on the last;
- the teacher is served by SGLang only (teacher_source='sglang'): one server on a node of its own, the bf16
  checkpoint quantized to FP8 at load (`--quantization fp8`: 47.7 GiB of weights per GPU at TP=8, a KV pool of
  337k tokens), which scores the rollouts, samples the near-future windows and scores the branch windows; the loss
  takes its top-20 log-probs (objective.teacher_signal='top_k');
- student rollouts: one SGLang server (TP=8, bf16) on a node of its own, its weights pushed after every step;
- the Slurm script starts both servers and sets sglang.student.url / sglang.teacher.url and sglang.sync_address.
Why served: the alternative, the 405B teacher colocated in Megatron in FP8 (fp8_weights: 23.9 GiB per GPU at TP=8,
PP=2) with a teacher server for the windows, fits only with full recomputation (64.9 GiB on the last stage) and plans
at about 6,030 s per step, most of it the teacher's forward over the full-prefix branch rows (1,890 s) and the
recomputed branch training (2,580 s); served, the teacher scores only the window tokens of the branches, and a step
plans at about 4,290 s (1,940 s of it training the student on the branch rows) on the same 18 nodes. teacher.fp8 and
teacher.fp8_weights below apply when the teacher is built in Megatron (`--set teacher_source=megatron
objective.teacher_signal=logits ...`).
"""

from __future__ import annotations

import dataclasses

from topd_megatron.algorithm import objective
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.optim import OptimConfig

from ._common import MATH_TASK, checkpoint, gpu_server, math_eval, run_dir


def topd_70b() -> RunConfig:
    return RunConfig(
        student=ModelConfig(
            path=checkpoint("Llama-3.3-70B-Instruct"),
            dtype="bfloat16",
            seq_length=8192,
            recompute="full",
            transformer_engine=False,  # Megatron-Core's local attention takes the packed windows' mask
        ),
        teacher=ModelConfig(
            path=checkpoint("Llama-3.1-405B-Instruct"),
            dtype="bfloat16",
            seq_length=8192,
            fp8="tensorwise",
            fp8_weights=True,
        ),
        run_dir=run_dir("topd_70b"),
        task=MATH_TASK,
        rollout="sglang",
        teacher_source="sglang",
        sglang=SGLangConfig(
            student=gpu_server("student", tp=8, dp=1, mem_fraction=0.85, servers=8, startup_timeout_s=1800.0),
            teacher=gpu_server(
                "teacher",
                tp=8,
                dp=1,
                mem_fraction=0.85,
                servers=10,
                extra_args=("--quantization", "fp8"),
                startup_timeout_s=3600.0,
            ),
            sync_mode="distributed",
            colocate="time_slice",
        ),
        parallel=ParallelConfig(tp=8, pp=2, sequence_parallel=True),
        objective=dataclasses.replace(objective.preset("topd"), teacher_signal="top_k"),
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
        eval=math_eval(),
        cluster=ClusterConfig(
            nodes=8, gpus_per_node=8, gpu_memory_gib=80.0, student_server_nodes=0, teacher_server_nodes=10
        ),
    )
