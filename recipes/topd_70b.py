"""`topd_70b`: student Llama-3.3-70B-Instruct, teacher Llama-3.1-405B-Instruct with an FP8 forward, DAPO-Math-17k
prompts, MATH-500 held out; responses up to 6,144 tokens in 8,192-token sequences, K = 50 teacher windows;
`sbatch slurm/topd_70b.sh` runs it on 18 nodes of 8 H100-80GB.

Layout (`topd plan topd_70b`, the fastest feasible split of its 18 nodes that the planner's search finds with at least
2 GiB of headroom on every GPU; see docs/scale.md), 8 + 10 nodes:
- training, 8 nodes: TP=8 within a node, PP=2 (40 student layers per stage), DP=4, sequence parallelism, micro-batches
  of 1; Megatron-Core's local attention (`transformer_engine=False`), which takes the per-window mask of packed
  guidance (each rollout's guided windows packed after it: rows of 8,976 tokens instead of 2,048 whole-prefix branch
  rows per replica; 0.10 x the rollout tokens), with full recomputation; the student alone: 57.4 GiB per GPU at the
  peak, the weight sync (states 37.0, the resumed server weights 16.4, framework 4). Selective recomputation plans
  295 s (OPD 258 s) but leaves 1.5 GiB of headroom on the first PP stage, within what the planner's packed
  activations are measured to miss (topd plan marks it tight);
- student rollouts: one SGLang server per training node (TP=8, bf16, mem_fraction 0.72), time-sliced with training
  (sglang.colocate='time_slice'): from a step's rollouts to the end of its detection the servers stay whole beside
  Megatron's weights (8.2 GiB) and its d_t pass (1.7 GiB), while the optimizer shard waits in host memory
  (time_slice_span='step': 74.5 GiB per GPU); while Megatron trains, the servers' weights and KV cache are released
  (SGLang's memory saver, CUDA only); the 8 servers sit behind an sglang-router and all receive the weights after
  every step;
- the teacher is served by SGLang only (teacher_source='sglang'): 10 servers, one per node, the bf16 checkpoint
  quantized to FP8 at load (`--quantization fp8`: 47.7 GiB of weights per GPU at TP=8, a 337k-token KV pool each),
  behind a router: they score the rollouts and sample the near-future windows (per rollout, each prefix prefilled
  once), returning their top-20 log-probs at every window position with them (no second scoring of the branches);
  the loss takes their top-20 log-probs (objective.teacher_signal='top_k');
- the Slurm script starts every server and sets sglang.student.urls / sglang.teacher.urls and sglang.sync_address.
Guidance budget (objective.guidance_budget = 16, stated here because it departs from the method's default of a window
at every divergent candidate): teacher-window guidance on the 16 most divergent candidates of each rollout, of the
~45 the planner's worst case makes divergent (64 candidates, 70% divergent); the others stay divergent (not
suppressed, their OPD term kept) without a window. The windows are still sampled at every candidate (window_ot's
detection needs them); the budget bounds what is trained. On the tiny job its counterpart (topd_budget: one window
per rollout, 44% of the guided windows kept against 36% here) measured +0.084 [+0.031, +0.137] avg@4 against
uncapped topd over 20 paired seeds (docs/tiny.md): higher, mostly because uncapped topd collapses on some seeds
there; so the toy gives no sign that the cap costs accuracy, and shows that it changes the arm. Nothing has measured
it on long math traces. `--set objective.guidance_budget=None` restores the method's default: 344 s, TOPD / OPD
1.21.
About 324 s per step (train 114, rollouts 88, teacher scoring 66, student d_t 29, windows 24: the teacher's on its
servers, with the student's fresh windows (15) beside them on theirs, their rollouts still cached, weight sync 15,
branch training 11, one state swap 1, less 25 s of overlap); the step's rollouts and windows do not fit the teacher
servers' KV pools at once, so scoring and windows run in 7 pipelined parts (training/scoring.py `score_and_detect`):
each part finds its prefixes cached from its scoring, and the teacher scores the next part during this part's d_t
pass and windows. The OPD step on this layout plans at 285 s (TOPD / OPD 1.14). The previous layout (16 training
nodes, one student and one teacher server node, TransformerEngine attention: one whole-prefix row per window)
planned 4,288 s.
teacher.fp8 and teacher.fp8_weights below apply when the teacher is built in Megatron (`--set teacher_source=megatron
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

from ._common import MATH_TASK, checkpoint, gpu_server, math_eval, packing_model, run_dir


def topd_70b() -> RunConfig:
    return RunConfig(
        student=packing_model("Llama-3.3-70B-Instruct", recompute="full"),
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
            student=gpu_server("student", tp=8, dp=1, mem_fraction=0.72, servers=8, startup_timeout_s=1800.0),
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
        objective=dataclasses.replace(objective.preset("topd"), teacher_signal="top_k", guidance_budget=16),
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
