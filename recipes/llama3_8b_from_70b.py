"""`llama3_8b_from_70b`: student Llama-3.1-8B-Instruct, teacher Llama-3.3-70B-Instruct (same Llama-3 tokenizer),
DAPO-Math-17k prompts, MATH-500 held out, one 8-GPU node; responses up to 6,144 tokens in 8,192-token sequences,
K = 50 teacher windows (objective preset 'topd').

Layout (`topd plan llama3_8b_from_70b`, 80 GiB H100s; the planner's worst case: every rollout 6,144 tokens long, 64
candidates, 70% of them divergent):
- training: TP=8 with sequence parallelism (the 70B teacher's 131 GiB of bf16 weights spread over the node: 16.4 GiB
  per GPU), DP=1, full recomputation of the student, micro-batches of 1;
- the teacher is built in Megatron (bf16) and gives full logits; its rollout logits wait in host memory
  (train.offload_teacher_logits: 32 GiB pinned per rank, 256 GiB per node, instead of 31 GiB per GPU);
- student rollouts: a colocated SGLang server, TP=4 x DP=2 over the node, mem_fraction 0.08 of each GPU;
- teacher windows: a colocated SGLang server of the teacher quantized to FP8 at load (`--quantization fp8`, 8.5 GiB
  per GPU at TP=8), mem_fraction 0.14 of each GPU; a bf16 one (mem_fraction 0.25) leaves 0.2 GiB of headroom, and
  generating the windows in-process without a KV cache would make a step about 185,000 s;
- 32 prompts x 4 samples per step: the teacher's window rows kept for the branches ([sum K', V/TP], 8.6 GiB per GPU
  here) grow with the rollouts per GPU; 48 prompts plan at 75.3 GiB, too close to 80 GiB for estimated activations.
Per GPU at the peak (the backward): 71.0 of 80 GiB (the two server shares 23.6, student states 16.8, teacher 16.4,
window rows 8.6, framework 4, activations and loss 1.6); about 3,970 s per step, 2,540 s of it the teacher scoring
the full-prefix branch rows. Alternatives the planner shows: an FP8 Megatron teacher (teacher.fp8='tensorwise',
fp8_weights=True) fits 48 prompts at 67.3 GiB, 4,130 s; a teacher served by SGLang only (teacher_source='sglang',
top-k log-probs instead of full distributions) fits 64 prompts at 59.2 GiB, 2,190 s.
"""

from __future__ import annotations

from topd_megatron.algorithm import objective
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.training.optim import OptimConfig

from ._common import MATH_TASK, checkpoint, gpu_server, math_eval, run_dir


def llama3_8b_from_70b() -> RunConfig:
    return RunConfig(
        student=ModelConfig(
            path=checkpoint("Llama-3.1-8B-Instruct"),
            dtype="bfloat16",
            seq_length=8192,
            recompute="selective",
            transformer_engine=False,  # packed guidance windows need Megatron-Core's local attention
        ),
        teacher=ModelConfig(
            path=checkpoint("Llama-3.3-70B-Instruct"), dtype="bfloat16", seq_length=8192, transformer_engine=False
        ),
        run_dir=run_dir("llama3_8b_from_70b"),
        task=MATH_TASK,
        rollout="sglang",
        sglang=SGLangConfig(
            student=gpu_server("student", tp=4, dp=2, mem_fraction=0.67),
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
