"""`qwen3_4b_from_30b_a3b`: the paper's setting. Student Qwen3-4B-Instruct-2507, MoE teacher
Qwen3-30B-A3B-Instruct-2507 (128 experts, 8 active), DAPO-Math-17k prompts, MATH-500 held out, one 8-GPU node;
responses up to 6,144 tokens in 8,192-token sequences, K = 50 teacher windows (objective preset 'topd').

Layout (`topd plan qwen3_4b_from_30b_a3b`, 80 GiB H100s; the planner's worst case: every rollout 6,144 tokens long,
64 candidates, 70% of them divergent):
- training: TP=4 (divides the teacher's 4 KV heads; against TP=2 it halves the vocabulary shard and the student's
  states), EP=2 for the teacher's experts, DP=2, full recomputation of the student, micro-batches of 1;
  Megatron-Core's local attention for both models (`transformer_engine=False`): it takes the per-window mask of
  packed guidance, so each rollout's 45 windows are trained and teacher-scored packed after it (rows of 10,397
  tokens, 0.27 x the rollout tokens) instead of as 4,301 whole-prefix rows per replica;
- the teacher is built in Megatron (bf16) and gives full logits; its rollout logits wait in host memory
  (train.offload_teacher_logits: 96 GiB pinned per rank, 768 GiB per node, instead of 56 GiB per GPU);
- student rollouts: an SGLang server (TP=2 x DP=4) time-sliced with training (sglang.colocate='time_slice': it takes
  0.55 of every GPU from the step's rollouts to the end of its detection, beside Megatron's weights and the d_t pass,
  while the optimizer state waits in host memory, and releases it while Megatron trains; CUDA only);
- teacher windows: a colocated SGLang server of the teacher, TP=8 (bf16), mem_fraction 0.12 of each GPU the whole
  time (generated in-process without a KV cache instead, a step would plan at about 18,400 s);
- 48 prompts x 4 samples per step: the teacher's window rows kept for the branches ([sum K', V/TP], 15.2 GiB per GPU
  here) grow with the rollouts per GPU, and 64 prompts would need 1 TiB of pinned host memory per node (the offloaded
  blocks round up to powers of two), all of the share the planner allows.
Per GPU at the peak (the backward): 55.8 of 80 GiB (the teacher server share 12.6, student states 11.2, teacher 7.5,
window rows 15.2, framework 4, activations and loss 5.2); while the student server samples, 74.6 GiB (the teacher's
weights stay beside it). About 171 s per step (rollouts 59, windows 56: the teacher's 36 and the student's fresh windows
20 (their rollouts still in the server's cache), sampled at once but on the same GPUs, whose HBM bandwidth both decodes
need, so their times add up; train 24, branch scoring 7, branch training 6; the OPD step on this layout: 94 s, TOPD /
OPD 1.82); the previous layout (TransformerEngine attention: one whole-prefix row per window, the student server sharing
0.12 of every GPU) planned 1,483 s, 1,065 s of it training the student on those rows. Selective recomputation plans 3%
faster at 77.8 GiB; full recomputation keeps 5 GiB of headroom on every role.
"""

from __future__ import annotations

from topd_megatron.algorithm import objective
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.optim import OptimConfig

from ._common import MATH_TASK, gpu_server, math_eval, packing_model, run_dir


def qwen3_4b_from_30b_a3b() -> RunConfig:
    return RunConfig(
        student=packing_model("Qwen3-4B-Instruct-2507", recompute="full"),
        teacher=packing_model("Qwen3-30B-A3B-Instruct-2507"),
        run_dir=run_dir("qwen3_4b_from_30b_a3b"),
        task=MATH_TASK,
        rollout="sglang",
        sglang=SGLangConfig(
            student=gpu_server("student", tp=2, dp=4, mem_fraction=0.55),
            teacher=gpu_server("teacher", tp=8, dp=1, mem_fraction=0.12),
            sync_mode="distributed",
            colocate="time_slice",
        ),
        parallel=ParallelConfig(tp=4, pp=1, ep=2),
        objective=objective.preset("topd"),
        optim=OptimConfig(lr=1e-6, clip_grad=1.0),
        train=TrainConfig(
            steps=200,
            prompts_per_step=48,
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
