"""`llama3_8b_from_70b`: student Llama-3.1-8B-Instruct, teacher Llama-3.3-70B-Instruct (same Llama-3 tokenizer),
DAPO-Math-17k prompts, MATH-500 held out, one 8-GPU node; responses up to 6,144 tokens in 8,192-token sequences,
K = 50 teacher windows (objective preset 'topd').

Layout (`topd plan llama3_8b_from_70b`, 80 GiB H100s; the planner's worst case: every rollout 6,144 tokens long, 64
candidates, 70% of them divergent):
- training: TP=8 with sequence parallelism (the 70B teacher's 131 GiB of bf16 weights spread over the node: 16.4 GiB
  per GPU), DP=1, selective recomputation of the student, micro-batches of 1; Megatron-Core's local attention for
  both models (`transformer_engine=False`), which packs each rollout's 45 guidance windows after it (rows of 10,400
  tokens, 0.27 x the rollout tokens) instead of 5,735 whole-prefix branch rows;
- the teacher is built in Megatron (bf16) and gives full logits; its rollout logits wait in host memory
  (train.offload_teacher_logits: 32 GiB pinned per rank, 256 GiB per node, instead of 31 GiB per GPU);
- student rollouts: an SGLang server (TP=4 x DP=2) time-sliced with training (sglang.colocate='time_slice': 0.42 of
  every GPU from the step's rollouts to the end of its detection, beside Megatron's weights and the d_t pass, while
  the optimizer state waits in host memory; released while Megatron trains; CUDA only);
- teacher windows: a colocated SGLang server of the teacher quantized to FP8 at load (`--quantization fp8`, 8.5 GiB
  per GPU at TP=8), mem_fraction 0.14 of each GPU the whole time;
- 32 prompts x 4 samples per step: the teacher's window rows kept for the branches ([sum K', V/TP], 8.6 GiB per GPU
  here) grow with the rollouts per GPU.
Per GPU at the peak (the backward): 70.6 of 80 GiB (student states 16.8, teacher 16.4, the teacher server share 14.2,
activations and loss 10.6, window rows 8.6, framework 4); while the student server samples, 74.5 GiB (the
teacher's 16.4 GiB stay beside it). About 283 s per step (windows 75: the teacher's 63 and the student's 12, at
once on the same GPUs, so their times add up; branch scoring by the teacher's packed forward 72, teacher scoring 57,
rollouts 40, train 20; the OPD step on this layout: 122 s, TOPD / OPD 2.31); the previous layout (one whole-prefix
row per window) planned 3,967 s, 2,540 s of it the teacher scoring those rows.
"""

from __future__ import annotations

from topd_megatron.algorithm import objective
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.optim import OptimConfig

from ._common import MATH_TASK, gpu_server, math_eval, packing_model, run_dir


def llama3_8b_from_70b() -> RunConfig:
    return RunConfig(
        student=packing_model("Llama-3.1-8B-Instruct", recompute="selective"),
        teacher=packing_model("Llama-3.3-70B-Instruct"),
        run_dir=run_dir("llama3_8b_from_70b"),
        task=MATH_TASK,
        rollout="sglang",
        sglang=SGLangConfig(
            student=gpu_server("student", tp=4, dp=2, mem_fraction=0.42),
            teacher=gpu_server("teacher", tp=8, dp=1, mem_fraction=0.14, extra_args=("--quantization", "fp8")),
            sync_mode="distributed",
            colocate="time_slice",
        ),
        parallel=ParallelConfig(tp=8, pp=1, sequence_parallel=True),
        objective=objective.preset("topd"),
        optim=OptimConfig(lr=1e-6, clip_grad=1.0),
        train=TrainConfig(
            steps=200,
            prompts_per_step=32,
            samples_per_prompt=4,
            micro_batch_size=1,
            temperature=1.0,
            max_new_tokens=6144,
            eval_every=25,
            save_every=25,
            offload_teacher_logits=True,
        ),
        eval=math_eval(),
        cluster=ClusterConfig(nodes=1, gpus_per_node=8, gpu_memory_gib=80.0),
    )
