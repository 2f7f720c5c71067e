"""Per-GPU memory of every rank role of a run, component by component, in bytes (reported in GiB = 2^30 bytes).

Model states (the student as topd_megatron/training/optim.py builds it: Megatron DDP with grad_reduce_in_fp32=True
and the distributed optimizer; P = parameters on the rank):
    student weights     P * bytes(dtype)                               bf16: 2, fp32: 4
    gradient buffer     P * 4                                          fp32 DDP buffer
    optimizer state     P * (4 main + 4 Adam m + 4 Adam v) / shards    bf16/fp16 params (fp32 main params)
                        P * (4 m + 4 v) / shards                       fp32 params (they are the main params)
                        shards: DP * CP for dense parameters, the expert DP for routed experts; 1 without the
                        distributed optimizer
    teacher weights     P_T * bytes(dtype); with teacher.fp8_weights (Megatron's fp8_param) the transformer-layer
                        linear weights P_lin take FP8_BYTES_PER_PARAM, embeddings, output layer and norms keep the
                        dtype
    FP8 weight copies   model.fp8 without fp8_weights: TransformerEngine casts the bf16 layer linears to FP8 and
                        caches the result between micro-batches (Megatron passes is_first_microbatch): P_lin *
                        FP8_BYTES_PER_PARAM for the teacher (forward only: row-wise copy), P_lin * 2 *
                        FP8_BYTES_PER_PARAM for a student trained in FP8 (row-wise copy + the column-wise one its
                        backward needs); with fp8_weights the student keeps the column-wise copy only (P_lin * 1)
P on a rank: layers / PP of the layer parameters, TP-split matrices / TP, norms and routers whole, routed experts
/ (EP * ETP); the first stage adds the input embedding, the last the final norm and the output layer (a tied output
layer is a second copy of the embedding on the last stage when PP > 1). Vocabulary rows are padded as Megatron pads.

Activations of one training micro-batch of the student (after Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", redone for RMSNorm/GQA/SwiGLU layers without dropout), in elements of
the compute dtype per token per layer; t = TP, sp = TP with sequence parallelism else 1, h, a, g, d, f as in
architecture.py, S the sequence length:
  local (Megatron-Core local spec: unfused PyTorch, the CPU path; measured tensor by tensor, docs/scale.md):
    each RMSNorm block      (2h + 1)/sp + h/sp     input, x * rstd, rstd; normalized output (next linear's input)
    attention core          (3 a d + a S)/t        query, keys and values expanded to a heads, softmax probs
    output projection       a d/t                  its input
    Q/K norms (Qwen3)       (a + 2g) d/t + (a + g) d/t + (a + g)/t (+ a d/t when a rank holds > 1 KV group:
                            the query is copied by a reshape)
    MLP                     5 f/t                  fc1 output (2f), copied up-projection (f), SiLU output, fc2 input
    selective recompute     attention core -> (a + g) d/t (rotated q, k kept by the checkpoint)
                            + (a + 2g) d/t when no Q/K norm holds the QKV output (v is a view of it)
  te (TransformerEngine spec, flash attention: the GPU path; an estimate, not measured here):
    each RMSNorm block      (2h + 1)/sp            input and normalized output kept by the fused norm + linear
    attention core          (a + 2g) d/t + a d/t + 2a/t    q, k, v after RoPE, output, fp32 log-sum-exp
    Q/K norms (Qwen3)       (a + 2g) d/t           the QKV output, kept by the norms
    MLP                     3 f/t                  fc1 output (SwiGLU input), SwiGLU output (fc2 input)
    MoE MLP (either spec)   2E + k (h + 3 f_e/t) + 3 f_s/t   router probs (fp32), dispatched tokens, experts
    selective recompute     no change (flash attention keeps no S x S term; the recomputed core keeps the same)
  full recompute (either)   h/sp per layer (its input); while a layer is recomputed its activations and their
                            gradients are alive too (RECOMPUTE_TRANSIENT_LAYERS layers' worth), after the loss's
                            buffers are freed: the backward peak holds the larger of the two
Per micro-batch outside the layers: the first stage keeps the token ids (8 bytes/token) and a TP mask (1 byte/token
at TP > 1); the last stage one more RMSNorm block; local spec: RoPE cos/sin 4 S d per layer (S d once with full
recompute); both: the explicit [S, S] boolean attention mask the code passes.
Micro-batches in flight (Megatron's 1F1B): PP on the first stage, 1 on the last; interleaved (VPP) stages hold
min(M * VPP, 2 (PP - 1) + (VPP - 1) PP + 1) chunks of layers / (PP * VPP) (first) and (VPP - 1) PP + 1 (last).
CP divides the tokens of a rank.

Logits (last stage only; V_r = padded vocabulary rows, b S V_r/t one micro-batch's [b, S, V_r/t] shard;
training/step.py):
    teacher logits, rollouts   B S V_r/t * bytes(teacher)    kept from scoring until the update; 0 on the GPU with
                               train.offload_teacher_logits (on CUDA): they wait in pinned host memory, B/b blocks of
                               PowerOf2Ceil(b S V_r/t * bytes) (PyTorch's caching host allocator rounds), and come
                               back one micro-batch at a time
    teacher window rows        G K V_r/t * bytes(teacher)    teacher_window guidance: of each branch micro-batch only
                               the rows scoring the window tokens are kept ([sum K', V_r/t], worst case K' = K) until
                               the update
    d_t of the step            B S * 4                       the detector's no-grad student pass keeps only d_t
    loss working set           LOSS_LOGIT_BUFFERS * b S V_r/t * bytes(student) + b S V_r/t * bytes(teacher)
                               + CHUNK_BUFFERS * min(chunk, b S) V_r/t * 4   (loss.py's chunked fp32 buffers)
A no-grad forward of one micro-batch (forward.forward_logits) holds the larger of one layer's activations and, on
the last stage, NOGRAD_LOGIT_COPIES [b, S, V_r/t] logits (the output layer's [S, b] result and its transposed
contiguous copy, which is what is kept or reduced; without offload that copy is already part of the kept logits, so
one more). Its reduction then runs on the copy alone:
    teacher scoring            kept, or sent to the host (offload)
    student d_t                the [:, :-1] slice flattened (a copy when b > 1), the teacher's micro-batch (copied
                               back from the host, or flattened when b > 1), CHUNK_BUFFERS fp32 chunks
    branch scoring             the window rows cut out (small)
A teacher served by SGLang only (teacher_source='sglang') has no weights, logits or forward on the training ranks:
its reports take 4 + 12 k bytes per position (top_k) or 4 (sampled_token), for the rollouts and the window tokens.
Peak of a role = its model states + overhead + colocated servers + the largest of its phases:
    rollout   (embedded engine) no-grad generation forward of 4 b rows (the prefill) + their KV cache
    score     teacher logits on the GPU + the teacher's no-grad forward of a micro-batch
    d_t       (with a detector) teacher logits on the GPU + d_t + the student's no-grad forward and its reduction
    detect    teacher logits on the GPU + d_t + a teacher-window generation forward in-process (window_ot without a
              teacher server: 4 b rows) + their KV cache (S + (K - 1) x candidates per rollout columns each)
    branches  teacher logits on the GPU + d_t + window rows + the teacher's no-grad forward of a branch micro-batch
    backward  teacher logits on the GPU + window rows + d_t + activations in flight + the larger of the loss working
              set (last stage) and the full-recompute transient
A no-grad layer's activations are counted as the training activations of that layer (an upper bound).

SGLang servers: weights P * bytes(server dtype) / server TP and a KV pool of (mem_fraction * GPU - weights) bytes
(or max_total_tokens tokens), KV bytes per token = 2 * layers * ceil(g / server TP) * d * bytes; colocated servers
(cluster.*_server_nodes == 0) take mem_fraction of every GPU they use plus SGLANG_RUNTIME_OVERHEAD_GIB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from topd_megatron.algorithm.loss import default_chunk_size
from topd_megatron.config import RunConfig
from topd_megatron.models.build import ModelConfig, padded_vocab
from topd_megatron.plan.architecture import Architecture
from topd_megatron.plan.layout import Attention, Layout, StepShape, attention_kind, teacher_served, time_sliced
from topd_megatron.rollout.sglang.server import ServerConfig

GIB = float(1 << 30)
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "half": 2, "bf16": 2, "fp16": 2, "auto": 2}

FRAMEWORK_OVERHEAD_GIB = 4.0
"""Per training GPU: CUDA context (~0.6 GiB), NCCL communicator buffers, cuBLAS/TE workspaces, allocator
fragmentation."""
SGLANG_RUNTIME_OVERHEAD_GIB = 3.0
"""Per server GPU, outside --mem-fraction-static: CUDA context, CUDA graphs, the forward's activations."""
FP8_BYTES_PER_PARAM = 1.0
"""Bytes of an FP8 copy of a weight (E4M3; the per-tensor or per-block scales are negligible)."""
NOGRAD_LOGIT_COPIES = 2
"""[b, S, V_r/t] logits alive at the end of a no-grad forward: the output layer's [S, b] result and the transposed
contiguous copy GPTModel returns."""
HOST_MEMORY_GIB_PER_NODE = 2048.0
"""Host memory of a training node (DGX H100: 2 TiB); ClusterConfig does not say."""
PINNED_HOST_SHARE = 0.5
"""Share of a node's host memory the offloaded teacher logits (pinned) may take: data loading, the checkpoint
writer, NCCL and a colocated SGLang server need the rest."""
LOSS_LOGIT_BUFFERS = 3
"""[b, S, V_r/t] buffers in the student dtype around the loss of a micro-batch: the flattened logits the loss
saves, their gradient, the gradient of the unflattened logits."""
CHUNK_BUFFERS = 4
"""[chunk, V_r/t] fp32 buffers of the chunked loss (loss.py): student and teacher rows, exp, one temporary."""
RECOMPUTE_TRANSIENT_LAYERS = 1.25
"""Full recompute: a layer being recomputed and back-propagated holds its activations and the gradients of its
intermediates, measured at 1.1-1.25 layers' worth of activations on the tiny CPU runs (docs/scale.md)."""
EMBEDDED_ROWS_PER_MICROBATCH = 4
"""The embedded rollout engine generates train.micro_batch_size * 4 rows per forward (train.py)."""

Stage = Literal["only", "first", "last"]


def human_count(n: float) -> str:
    """1.23B, 45.6M, 7.8k."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def teacher_fp8(cfg: RunConfig) -> bool:
    """Whether the teacher's GEMMs run in FP8 (teacher.fp8 set; a teacher served by SGLang only is not built)."""
    return cfg.teacher.fp8 is not None and not teacher_served(cfg)


def offloads_teacher_logits(cfg: RunConfig, device: str) -> bool:
    """train.offload_teacher_logits takes effect on CUDA only, and only for a Megatron teacher's logits."""
    return cfg.train.offload_teacher_logits and device == "cuda" and not teacher_served(cfg)


def pow2_ceil(n: float) -> int:
    """The smallest power of two >= n (PyTorch's pinned host allocations are rounded so)."""
    n = math.ceil(n)
    return 1 << (n - 1).bit_length() if n > 1 else max(n, 0)


def served_report_bytes(positions: int, signal: str, top_k: int) -> float:
    """objective.ServedTeacher over `positions`: an fp32 log-prob each, plus int64 ids and fp32 log-probs of the
    top k with teacher_signal='top_k'."""
    return positions * (4 + (12 * top_k if signal == "top_k" else 0))


# -- parameters on a rank ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RankParams:
    """Parameters held by one rank."""

    dense: float
    """Everything but routed experts (sharded over DP * CP by the distributed optimizer)."""
    expert: float
    """Routed-expert weights (sharded over the expert DP)."""
    layer_linear: float
    """Of `dense + expert`: weights of linear layers inside transformer layers (what an FP8 forward stores in FP8)."""

    @property
    def total(self) -> float:
        return self.dense + self.expert


def rank_params(arch: Architecture, layout: Layout, vocab_rows: int, stage: Stage) -> RankParams:
    """Parameters on one rank of `stage` ('only' when PP = 1); see the module docstring."""
    att, dense, moe = arch.attention(), arch.dense_mlp(), arch.moe_mlp()
    layers = att * arch.layers + dense * arch.dense_layers + moe * arch.moe_layers
    pp, tp = layout.pp, layout.tp
    layer_dense = (layers.tp / tp + layers.replicated) / pp
    expert = layers.expert / (layout.ep * layout.etp) / pp
    linear = layers.tp / tp / pp + expert
    embed = vocab_rows * arch.hidden / tp
    extra = 0.0
    if stage in ("only", "first"):
        extra += embed
    if stage in ("only", "last"):
        extra += arch.hidden  # final norm
        if not arch.tied_embeddings or stage == "last":
            extra += embed  # output layer (a tied one is a second copy on the last stage when PP > 1)
    return RankParams(dense=layer_dense + extra, expert=expert, layer_linear=linear)


def student_state_bytes(
    params: RankParams, model: ModelConfig, layout: Layout, use_distributed_optimizer: bool
) -> dict[str, float]:
    """Weights, fp32 gradient buffer and Adam state of the student on one rank (bytes)."""
    wbytes = dtype_bytes(model.dtype)
    per_param_optim = 8 if wbytes == 4 else 12  # fp32: m + v (the params are the main params); else + fp32 main
    if use_distributed_optimizer:
        optim = per_param_optim * (params.dense / max(layout.dp * layout.cp, 1) + params.expert / max(layout.edp, 1))
    else:
        optim = per_param_optim * params.total
    weights = params.total * wbytes
    if model.fp8_weights:  # Megatron's fp8_param: layer linears in FP8 (the fp32 main params stay)
        weights = params.layer_linear * FP8_BYTES_PER_PARAM + (params.total - params.layer_linear) * wbytes
    return {
        "student weights" + (" (FP8 layer linears)" if model.fp8_weights else ""): weights,
        "student gradient buffer (fp32)": params.total * 4,
        "student optimizer (Adam" + (", fp32 main params" if wbytes != 4 else "") + ")": optim,
    }


def teacher_weight_bytes(params: RankParams, model: ModelConfig) -> float:
    """The frozen teacher's weights: layer linears in FP8 with fp8_weights, the rest in its dtype."""
    wbytes = dtype_bytes(model.dtype)
    if not model.fp8_weights:
        return params.total * wbytes
    return params.layer_linear * FP8_BYTES_PER_PARAM + (params.total - params.layer_linear) * wbytes


def fp8_copy_bytes(params: RankParams, model: ModelConfig, training: bool) -> float:
    """FP8 copies TransformerEngine keeps of the layer linears besides the weights (see the module docstring)."""
    if model.fp8 is None:
        return 0.0
    copies = (1 if model.fp8_weights else 2) if training else (0 if model.fp8_weights else 1)
    return params.layer_linear * copies * FP8_BYTES_PER_PARAM


# -- activations -------------------------------------------------------------------------------------------------------
def layer_activation_elems(
    arch: Architecture, layout: Layout, seq: int, attention: Attention, recompute: str, moe: bool = False
) -> float:
    """Elements (compute dtype) kept per token by one layer for its backward; see the module docstring."""
    h, a, g, d, t, sp = arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, layout.tp, layout.sp
    if recompute == "full":
        return h / sp
    if attention == "local":
        norm = (2 * h + 1) / sp + h / sp
        if recompute == "selective":
            core = (a + g) * d / t + (0 if arch.qk_norm else (a + 2 * g) * d / t)
        else:
            core = (3 * a * d + a * seq) / t
        qk = 0.0
        if arch.qk_norm:
            qk = (a + 2 * g) * d / t + (a + g) * d / t + (a + g) / t + (a * d / t if g // t > 1 else 0.0)
        attn = norm + core + a * d / t + qk
        mlp_dense = norm + 5 * arch.ffn / t
    else:
        norm = (2 * h + 1) / sp
        qk = (a + 2 * g) * d / t if arch.qk_norm else 0.0
        attn = norm + (a + 2 * g) * d / t + a * d / t + 2 * a / t + qk
        mlp_dense = norm + 3 * arch.ffn / t
    if not moe:
        return attn + mlp_dense
    k, fe = arch.experts_per_token, arch.moe_ffn
    mlp_moe = norm + 2 * arch.num_experts + k * (h + 3 * fe / layout.etp) + 3 * arch.shared_expert_ffn / t
    return attn + mlp_moe


def mean_layer_elems(arch: Architecture, layout: Layout, seq: int, attention: Attention, recompute: str) -> float:
    """Per-token elements of an average layer (dense and MoE layers in their proportions)."""
    dense = layer_activation_elems(arch, layout, seq, attention, recompute, moe=False)
    if not arch.moe_layers:
        return dense
    moe = layer_activation_elems(arch, layout, seq, attention, recompute, moe=True)
    return (dense * arch.dense_layers + moe * arch.moe_layers) / arch.layers


def inflight_layers(arch: Architecture, layout: Layout, microbatches: int, stage: Stage) -> float:
    """Layers' worth of one micro-batch's activations a rank of `stage` keeps at its peak (1F1B / interleaved)."""
    pp, vpp = layout.pp, layout.vpp
    if pp == 1:
        return float(arch.layers)
    chunk = arch.layers / (pp * vpp)
    if vpp == 1:
        return chunk * (min(pp, microbatches) if stage == "first" else 1)
    if stage == "first":
        chunks = min(microbatches * vpp, 2 * (pp - 1) + (vpp - 1) * pp + 1)
    else:
        chunks = min(microbatches * vpp, (vpp - 1) * pp + 1)
    return chunk * chunks


def training_activation_bytes(
    arch: Architecture, layout: Layout, shape: StepShape, model: ModelConfig, attention: Attention, stage: Stage
) -> dict[str, float]:
    """Activations the training pass keeps for backward on a rank of `stage` at its peak (bytes): layers in
    flight and what lives outside the layers (the recompute transient is `recompute_transient_bytes`)."""
    b, s, cp = shape.micro_batch, shape.train_seq, layout.cp  # packed windows widen the training rows
    tokens = b * s / cp
    wb = dtype_bytes(model.dtype)
    per_layer = mean_layer_elems(arch, layout, s, attention, model.recompute) * tokens * wb
    layers = inflight_layers(arch, layout, shape.microbatches, stage)
    out = {f"student activations ({layers:g} layers x micro-batch {b} x {s} tokens)": per_layer * layers}
    extra = s * s  # the explicit boolean attention mask
    if attention == "local":
        layers_here = arch.layers / layout.pp
        extra += (s * arch.head_dim if model.recompute == "full" else 4 * s * arch.head_dim * layers_here) * wb
    if stage in ("only", "first"):
        extra += tokens * (8 + (1 if layout.tp > 1 else 0))
    if stage in ("only", "last"):
        h, sp = arch.hidden, layout.sp
        norm = (2 * h + 1) / sp + (h / sp if attention == "local" else 0.0)
        extra += norm * tokens * wb
    out["student activations outside layers"] = extra
    return out


def recompute_transient_bytes(
    arch: Architecture, layout: Layout, shape: StepShape, model: ModelConfig, attention: Attention
) -> float:
    """With full recompute: one layer's activations rebuilt for its backward, with the gradients of its
    intermediates (RECOMPUTE_TRANSIENT_LAYERS layers' worth; 0 otherwise). The loss's buffers are freed by then, so
    the backward peak holds the larger of the two, not both."""
    if model.recompute != "full":
        return 0.0
    tokens = shape.micro_batch * shape.train_seq / layout.cp
    one = mean_layer_elems(arch, layout, shape.train_seq, attention, "none") * tokens * dtype_bytes(model.dtype)
    return RECOMPUTE_TRANSIENT_LAYERS * one


def forward_working_bytes(
    arch: Architecture, layout: Layout, rows: int, seq: int, model: ModelConfig, att: Attention
) -> float:
    """About what a no-grad forward of `rows` x `seq` tokens keeps alive inside the layers: one layer's
    activations."""
    return mean_layer_elems(arch, layout, seq, att, "none") * rows * seq / layout.cp * dtype_bytes(model.dtype)


def nograd_forward_bytes(layer: float, mb_logits: float, reduction: float = 0.0) -> float:
    """Peak of a no-grad forward of one micro-batch: the larger of one layer's activations (`layer`), the output
    layer's logits with their transposed copy (NOGRAD_LOGIT_COPIES x `mb_logits`), and the copy with what its
    reduction allocates (`reduction`)."""
    return max(layer, NOGRAD_LOGIT_COPIES * mb_logits, mb_logits + reduction)


def embedded_kv_bytes(arch: Architecture, layout: Layout, rows: int, seq: int, nbytes: int) -> float:
    """The embedded engine's static KV cache on one rank: `rows` sequences of `seq` tokens, this stage's layers, the
    rank's KV heads."""
    return rows * seq * arch.kv_bytes_per_token(nbytes, layout.tp) / layout.pp


def logits_bytes(rows: int, seq: int, vocab_rows: int, layout: Layout, nbytes: int) -> float:
    """[rows, seq, V_r / TP] logits."""
    return rows * seq / layout.cp * vocab_rows / layout.tp * nbytes


def loss_working_bytes(
    shape: StepShape,
    vocab_rows: int,
    layout: Layout,
    student: ModelConfig,
    teacher: ModelConfig,
    device: str,
    served: bool = False,
) -> float:
    """The loss of one training micro-batch (see the module docstring)."""
    mb_logits = logits_bytes(shape.micro_batch, shape.train_seq, vocab_rows, layout, 1)
    return (
        LOSS_LOGIT_BUFFERS * mb_logits * dtype_bytes(student.dtype)
        + (0.0 if served else mb_logits * dtype_bytes(teacher.dtype))
        + chunk_buffer_bytes(shape, vocab_rows, layout, device)
    )


def chunk_buffer_bytes(shape: StepShape, vocab_rows: int, layout: Layout, device: str) -> float:
    """CHUNK_BUFFERS [chunk, V_r/t] fp32 buffers of loss.py's chunked divergence."""
    v_local = vocab_rows // layout.tp
    chunk = min(
        default_chunk_size(v_local, "cuda" if device == "cuda" else "cpu", layout.tp),
        shape.micro_batch * shape.train_seq,
    )
    return CHUNK_BUFFERS * chunk * v_local * 4


def dt_reduction_bytes(
    shape: StepShape,
    vocab_rows: int,
    layout: Layout,
    student: ModelConfig,
    teacher: ModelConfig,
    device: str,
    offload: bool,
    served: bool,
) -> float:
    """What the detector's d_t of one micro-batch allocates next to the student's logits (no grad): the flattened
    [:, :-1] slice (a copy when b > 1), the teacher's micro-batch (copied back from the host with offload, a
    flattened copy when b > 1; nothing for a served teacher's report) and the chunk buffers."""
    mb = logits_bytes(shape.micro_batch, shape.seq, vocab_rows, layout, 1)
    copy = shape.micro_batch > 1
    student_copy = mb * dtype_bytes(student.dtype) if copy else 0.0
    teacher_copy = mb * dtype_bytes(teacher.dtype) if (offload or copy) and not served else 0.0
    return student_copy + teacher_copy + chunk_buffer_bytes(shape, vocab_rows, layout, device)


def offloaded_logits_host_bytes(shape: StepShape, vocab_rows: int, layout: Layout, teacher: ModelConfig) -> float:
    """Pinned host memory of one last-stage rank's offloaded teacher logits: one block per micro-batch, rounded up
    to a power of two by PyTorch's caching host allocator."""
    mb = logits_bytes(shape.micro_batch, shape.seq, vocab_rows, layout, dtype_bytes(teacher.dtype))
    return shape.microbatches * pow2_ceil(mb)


# -- SGLang servers ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServerMemory:
    """One GPU of an SGLang server."""

    weights: float
    kv_pool: float
    kv_bytes_per_token: float
    static: float
    """--mem-fraction-static of the GPU (weights + KV pool must fit in it)."""
    fp8: bool = False
    """Weights quantized to FP8 (`--quantization fp8` or another FP8 method in extra_args)."""

    @property
    def kv_tokens(self) -> int:
        return int(max(self.kv_pool, 0.0) // self.kv_bytes_per_token)


def server_arg(server: ServerConfig, name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in the server's extra_args (None when absent)."""
    args = list(server.extra_args)
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def layer_linear_params(arch: Architecture) -> int:
    """Weights of the linear layers inside the transformer layers (what FP8 quantization stores in 1 byte)."""
    att, dense, moe = arch.attention(), arch.dense_mlp(), arch.moe_mlp()
    layers = att * arch.layers + dense * arch.dense_layers + moe * arch.moe_layers
    return layers.tp + layers.expert


def server_memory(arch: Architecture, server: ServerConfig, gpu_gib: float) -> ServerMemory:
    """Weights per GPU: P * bytes(dtype) / TP, the layer linears at FP8_BYTES_PER_PARAM with an FP8 quantization
    (embeddings, output layer and norms stay in the dtype); KV bytes per token in the dtype, or 1 byte with an FP8
    --kv-cache-dtype."""
    nbytes = dtype_bytes(server.dtype)
    quant = server_arg(server, "--quantization") or ""
    fp8 = "fp8" in quant
    params = float(arch.params())
    weights = params * nbytes
    if fp8:
        linear = layer_linear_params(arch)
        weights = linear * FP8_BYTES_PER_PARAM + (params - linear) * nbytes
    weights /= server.tp
    kv_dtype = server_arg(server, "--kv-cache-dtype") or ""
    kv_tok = arch.kv_bytes_per_token(1 if "fp8" in kv_dtype else nbytes, server.tp)
    static = server.mem_fraction * gpu_gib * GIB
    pool = static - weights
    if server.max_total_tokens is not None:
        pool = min(pool, server.max_total_tokens * kv_tok)
    return ServerMemory(weights=weights, kv_pool=pool, kv_bytes_per_token=kv_tok, static=static, fp8=fp8)


# -- roles ------------------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class RoleMemory:
    """Peak memory of one GPU role, component by component (GiB)."""

    role: str
    budget_gib: float
    components: dict[str, float] = field(default_factory=dict)
    peak_phase: str = ""
    """The phase of the step that sets the peak (its components are in `components`)."""
    phases: dict[str, float] = field(default_factory=dict)
    """GiB of each phase's step-dependent memory (the largest is in `components`)."""
    notes: list[str] = field(default_factory=list)
    host_bytes: float = 0.0
    """Pinned host memory this rank keeps (offloaded teacher logits), not counted in the GPU total."""

    @property
    def total_gib(self) -> float:
        return sum(self.components.values())

    @property
    def headroom_gib(self) -> float:
        return self.budget_gib - self.total_gib

    @property
    def fits(self) -> bool:
        return self.headroom_gib >= 0.0


def _gib(d: dict[str, float]) -> dict[str, float]:
    return {k: v / GIB for k, v in d.items() if v}


def colocated_servers(cfg: RunConfig) -> list[tuple[str, ServerConfig]]:
    """SGLang servers that share the training GPUs (launched by the run, on no nodes of their own)."""
    if cfg.rollout != "sglang":
        return []
    out = []
    if cfg.cluster.student_server_nodes == 0 and not cfg.sglang.student.url:
        out.append(("student", cfg.sglang.student))
    t = cfg.sglang.teacher
    if t is not None and cfg.cluster.teacher_server_nodes == 0 and not t.url:
        out.append(("teacher", t))
    return out


def training_role(
    cfg: RunConfig,
    student: Architecture,
    teacher: Architecture,
    layout: Layout,
    shape: StepShape,
    stage: Stage,
    device: str,
) -> RoleMemory:
    """Peak memory of a training rank of `stage`."""
    names = {"only": "training rank", "first": "training rank, first PP stage", "last": "training rank, last PP stage"}
    role = RoleMemory(role=names[stage], budget_gib=cfg.cluster.gpu_memory_gib)
    rows = padded_vocab(student.vocab, cfg.student, layout.tp)
    s_params = rank_params(student, layout, rows, stage)
    t_params = rank_params(teacher, layout, padded_vocab(teacher.vocab, cfg.teacher, layout.tp), stage)
    static = student_state_bytes(s_params, cfg.student, layout, cfg.optim.use_distributed_optimizer)
    static["student FP8 weight copies (TE)"] = fp8_copy_bytes(s_params, cfg.student, training=True)
    served = teacher_served(cfg)
    offload = offloads_teacher_logits(cfg, device)
    if not served:
        t_name = "teacher weights" + (" (FP8 layer linears)" if cfg.teacher.fp8_weights else "")
        static[t_name] = teacher_weight_bytes(t_params, cfg.teacher)
        static["teacher FP8 weight copies (TE)"] = fp8_copy_bytes(t_params, cfg.teacher, training=False)
    static["CUDA context and framework"] = FRAMEWORK_OVERHEAD_GIB * GIB
    for who, server in colocated_servers(cfg):
        if who == "student" and time_sliced(cfg):
            continue  # released while Megatron trains (its weights come back for the sync: the "sync" phase)
        static[f"SGLang {who} server share (mem_fraction {server.mem_fraction:g} + runtime)"] = (
            server.mem_fraction * cfg.cluster.gpu_memory_gib + SGLANG_RUNTIME_OVERHEAD_GIB
        ) * GIB

    s_att, t_att = attention_kind(cfg.student, device), attention_kind(cfg.teacher, device)
    last = stage in ("only", "last")
    sb, tb = dtype_bytes(cfg.student.dtype), dtype_bytes(cfg.teacher.dtype)
    obj, b = cfg.objective, shape.micro_batch
    detector = obj.detection.detector != "none"

    def on_last(x: float) -> float:
        return x if last else 0.0

    # teacher logits (or a served teacher's reports) of the rollouts, kept until the update
    t_mb = on_last(logits_bytes(b, shape.seq, rows, layout, tb))
    t_step = on_last(logits_bytes(shape.rows, shape.seq, rows, layout, tb))
    t_windows = on_last(shape.branches * shape.window * rows / layout.tp * tb)
    if served:
        t_step = served_report_bytes(shape.rows * shape.seq, obj.teacher_signal, obj.teacher_top_k)
        t_windows = served_report_bytes(shape.branches * shape.window, obj.teacher_signal, obj.teacher_top_k)
        roll_name, win_name = "teacher reports (served), rollouts (whole step)", "teacher reports (served), windows"
    else:
        roll_name = "teacher logits, rollouts (whole step)"
        win_name = "teacher logits, branch window rows (whole step)"
    kept = {roll_name: 0.0 if offload else t_step}
    if offload:
        role.host_bytes = on_last(offloaded_logits_host_bytes(shape, rows, layout, cfg.teacher))
    d_t = {"d_t of the step (fp32)": float(shape.rows * shape.seq * 4) if detector else 0.0}
    t_layer = forward_working_bytes(teacher, layout, b, shape.seq, cfg.teacher, t_att)
    s_layer = forward_working_bytes(student, layout, b, shape.seq, cfg.student, s_att)
    gen_rows = b * EMBEDDED_ROWS_PER_MICROBATCH

    phases: dict[str, dict[str, float]] = {}
    if cfg.rollout == "embedded":
        phases["rollout"] = {
            "student generation forward (in-process, no grad)": nograd_forward_bytes(
                forward_working_bytes(student, layout, gen_rows, shape.seq, cfg.student, s_att),
                on_last(logits_bytes(gen_rows, shape.seq, rows, layout, sb)),
            ),
            "student KV cache (in-process)": embedded_kv_bytes(student, layout, gen_rows, shape.seq, sb),
        }
    if not served:
        # kept: the transposed copy is what is kept, so one more [b, S, V_r/t] is alive; offload: both until copied
        phases["score"] = kept | {
            "teacher scoring forward (one micro-batch, no grad)": max(t_layer, (2 if offload else 1) * t_mb),
        }
    if detector:
        reduction = on_last(dt_reduction_bytes(shape, rows, layout, cfg.student, cfg.teacher, device, offload, served))
        phases["d_t"] = (
            kept
            | d_t
            | {
                "student d_t forward (one micro-batch, no grad)": nograd_forward_bytes(
                    s_layer, on_last(logits_bytes(b, shape.seq, rows, layout, sb)), reduction
                )
            }
        )
    in_process_windows = cfg.rollout == "embedded" or cfg.sglang.teacher is None
    # a rollout's cache holds its S tokens and K - 1 blocks of one token per window (rollout/windows.py)
    window_seq = shape.seq + (shape.window - 1) * -(-shape.candidates // max(shape.rollouts, 1))
    if obj.detection.detector == "window_ot" and in_process_windows and not served:
        phases["detect"] = (
            kept
            | d_t
            | {
                "teacher window generation forward (in-process, no grad)": nograd_forward_bytes(
                    forward_working_bytes(teacher, layout, gen_rows, shape.seq, cfg.teacher, t_att),
                    on_last(logits_bytes(gen_rows, shape.seq, rows, layout, tb)),
                ),
                "teacher KV cache (in-process windows)": embedded_kv_bytes(teacher, layout, gen_rows, window_seq, tb),
            }
        )
    if shape.branches and not served:
        phases["branches"] = (
            kept
            | d_t
            | {
                win_name: t_windows,
                "teacher branch forward (one micro-batch, no grad)": nograd_forward_bytes(
                    forward_working_bytes(teacher, layout, b, shape.branch_seq, cfg.teacher, t_att),
                    on_last(logits_bytes(b, shape.branch_seq, rows, layout, tb)),
                ),
            }
        )
    backward = kept | d_t | {win_name: t_windows}
    backward.update(training_activation_bytes(student, layout, shape, cfg.student, s_att, stage))
    transients = {
        "loss working set (one micro-batch)": (
            loss_working_bytes(shape, rows, layout, cfg.student, cfg.teacher, device, served) if last else 0.0
        ),
        "student recompute transient (layer being recomputed)": recompute_transient_bytes(
            student, layout, shape, cfg.student, s_att
        ),
    }
    largest = max(transients, key=lambda k: transients[k])
    backward[largest] = transients[largest]
    phases["backward"] = backward
    if time_sliced(cfg):  # the server's weights are resumed next to Megatron's states to receive the new ones
        weights = server_memory(student, cfg.sglang.student, cfg.cluster.gpu_memory_gib).weights
        phases["sync"] = {"SGLang student server weights (resumed for the weight sync)": weights}

    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    role.components = _gib(static) | _gib(phases[peak])
    role.peak_phase = peak
    role.phases = {k: v / GIB for k, v in totals.items()}
    teacher_note = "" if served else f", teacher {human_count(t_params.total)}"
    role.notes.append(f"parameters on this rank: student {human_count(s_params.total)}{teacher_note}")
    if role.host_bytes:
        role.notes.append(f"teacher logits offloaded to pinned host memory: {role.host_bytes / GIB:.1f} GiB")
    return role


def megatron_beside_servers(training: list[RoleMemory], *, span: bool) -> dict[str, float]:
    """GiB a training rank keeps on its GPU beside its whole time-sliced student servers (the fullest pipeline stage):
    a Megatron teacher's weights (and TE's FP8 copies: time slicing never offloads the teacher), and in a step's span
    (time_slice_span='step') the student's weights and the largest of phases 1-2 that run beside the servers (the
    teacher's scoring forward, the d_t pass, in-process windows)."""

    def kept(r: RoleMemory) -> dict[str, float]:
        teacher = sum(v for k, v in r.components.items() if k.startswith(("teacher weights", "teacher FP8 weight")))
        out = {"Megatron's teacher weights (never offloaded)": teacher}
        if span:
            weights = sum(v for k, v in r.components.items() if k.startswith(("student weights", "student FP8 weight")))
            phases = {p: r.phases.get(p, 0.0) for p in ("score", "d_t", "detect")}
            largest = max(phases, key=lambda p: phases[p])
            out["Megatron's student weights (kept for the d_t pass)"] = weights
            out[f"phases 1-2 beside the servers (largest: {largest})"] = phases[largest]
        return out

    return max((kept(r) for r in training), key=lambda d: sum(d.values()), default={})


def server_role(
    cfg: RunConfig,
    who: str,
    arch: Architecture,
    server: ServerConfig,
    colocated: bool,
    seq: int,
    beside: dict[str, float] | None = None,
) -> RoleMemory:
    """One GPU of an SGLang server: weights and KV pool inside mem_fraction, plus the runtime outside it (and, for a
    time-sliced student server, what Megatron keeps beside it: `beside`, GiB)."""
    gpu = cfg.cluster.gpu_memory_gib
    mem = server_memory(arch, server, gpu)
    sliced = colocated and who == "student" and time_sliced(cfg)
    where = " (time-sliced with training)" if sliced else (" (share of a training GPU)" if colocated else "")
    name = f"{who} server GPU{where}"
    budget = server.mem_fraction * gpu if colocated and not sliced else gpu
    role = RoleMemory(role=name, budget_gib=budget)
    pool = max(mem.kv_pool, 0.0)
    weights = f"{who} weights (server TP={server.tp}{', FP8' if mem.fp8 else ''})"
    role.components = _gib({weights: mem.weights, "KV-cache pool": pool})
    if sliced:  # Megatron's states wait in host memory; its CUDA context and framework stay, and other servers
        role.components["training rank's CUDA context and framework"] = FRAMEWORK_OVERHEAD_GIB
        role.components |= {k: v for k, v in (beside or {}).items() if v}
        for other, share in colocated_servers(cfg):
            if other != who:
                role.components[f"SGLang {other} server share (mem_fraction {share.mem_fraction:g} + runtime)"] = (
                    share.mem_fraction * gpu + SGLANG_RUNTIME_OVERHEAD_GIB
                )
    if not colocated or sliced:
        role.components["SGLang runtime (outside mem_fraction)"] = SGLANG_RUNTIME_OVERHEAD_GIB
    role.peak_phase = "serving"
    seqs = mem.kv_tokens / seq if seq else 0.0
    role.notes.append(
        f"KV cache: {mem.kv_bytes_per_token / 1024:.0f} KiB/token per GPU, {mem.kv_tokens:,} tokens"
        f" = {seqs:.1f} sequences of {seq} tokens"
    )
    return role
