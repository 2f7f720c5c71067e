"""Step-time estimate of a run: FLOPs at the cluster's MFU for compute-bound work, HBM bandwidth for decoding.

    est = estimate_step_time(cfg, student_arch, teacher_arch, layout, shape, device="cuda")
    est.seconds["train (student forward + backward)"], est.total_s

FLOPs (N = matmul parameters per token, `Architecture.matmul_params`: active weights without the input embedding;
T tokens; S the step width; attention over a causal prefix adds 4 * layers * a * d * S * CAUSAL_FRACTION per
token):
    forward                     F(T) = 2 N T + attention
    student training            3 F(T) (forward + backward); 4 F(T) with full recompute; + one attention forward with
                                selective recompute
    teacher scoring             F(T) on the rollouts
    student scoring             F(T) when a detector needs the whole step's d_t
    FP8 (model.fp8)             that model's 2 N T GEMM FLOPs run at FP8_SPEEDUP times the peak (attention stays
                                bf16); an SGLang server with an FP8 --quantization prefills its GEMMs at FP8_SPEEDUP
    windows (window_ot)         C candidates x K tokens of the teacher, and as many of the student with
                                student_window='fresh' (the default): in-process (no server for the role,
                                rollout/windows.py) each rollout with windows prefilled once into the KV cache,
                                F(min(B, C) S), then K decode forwards of the C windows' next tokens over about S
                                cached keys; on a role's servers, per rollout (SGLangEngine.generate_windows): a
                                prefill of every rollout once (`window_prefill_tokens`; nothing when the role's KV
                                caches, over all its servers, still hold the step's rollouts: a served teacher's from
                                scoring, the student's from generating them unless time slicing released them) + K
                                decode steps of C sequences with S * WINDOW_PREFIX_FRACTION of context. Both roles on
                                servers sample at once (SGLangEngine.generate_window_pair): the slower one counts on
                                servers of their own; on the same GPUs (both sharing the training GPUs) the two add
                                up (each decode is bound by the GPUs' HBM bandwidth, which they share). A
                                served teacher whose caches cannot hold the step scores and samples in `window_parts`
                                parts (training/scoring.py `part_plan`): its windows' prefixes are cached
    branches (teacher_window)   per-branch rows: teacher F(T_b) + student training of T_b over R rows of S_b tokens
                                (whole prefixes); packed (StepShape.packed): the teacher's forward over the packed
                                rows (B x S_p) and the student's training of the B x (S_p - S) window columns;
                                objective.guidance_budget caps the branches per rollout
    PP bubble                   pipelined passes take (1 + (PP - 1) / (VPP * M)) longer (M micro-batches)
    guidance windows            teacher_window guidance without window_ot's windows at the divergent candidates (another
                                detector, guidance_at='random'): the teacher's windows at the B guided positions,
                                sampled in phase 3 like window_ot's (`_guidance_windows`)
A teacher served by SGLang only (teacher_source='sglang') scores the rollouts on its servers' GPUs at MFU, F(T); the
branches cost it nothing more: its windows come with its log-probs and top-k at every window position, computed by
the decode that sampled them (SGLangEngine windows with top_k, training/scoring.py `report_on_windows`).
Rollouts: with SGLang, prefill at MFU on the server GPUs, then max_new_tokens decode steps, each bound by HBM
bandwidth: (weights per GPU + concurrent sequences * S / 2 * KV bytes per token per GPU) / (DECODE_HBM_TBPS *
DECODE_BANDWIDTH_EFFICIENCY), in waves when the KV pool cannot hold every sequence at once; with the embedded engine
(KV-cached, at MFU) a prefill F(B P) of the prompts (P = S - response) and one forward of B tokens per response token
over the cached prefix (P + response / 2 keys on average). `decode_flops`: T new tokens attending to c cached keys.
Offloaded teacher logits (train.offload_teacher_logits): each last-stage rank copies its B S V_r/t teacher logits
to the host once and back once per pass that reads them (d_t with a detector, the backward), at PCIE_GBPS, not
overlapped with compute (an upper bound).
SGLang servers: a role's `servers` x TP x DP GPUs prefill together and split the sequences between them.
Weight sync (rollout=sglang, every step): the student's HF weights (P x bytes) gathered to global rank 0's host
memory (export, PCIE_GBPS), then pushed: 'distributed' one broadcast to every server (host -> GPU at PCIE_GBPS, then
NETWORK_GBPS), 'tensor' one host -> GPU copy per server, 'disk' a write and one read per server at DISK_GBPS.
Time-sliced colocation (sglang.colocate='time_slice'): each step copies the student's Megatron states to host memory
before the rollouts and back after (2 x bytes / PCIE_GBPS; the fp32 gradient buffers are freed, not copied). With
time_slice_span='step' (`span_keeps_weights`) only the optimizer state moves, once: the weights stay for the d_t pass
beside the whole student servers, whose KV caches keep the rollouts for the fresh student windows. With 'call' the
weights move too, once more per part of the step with fresh student windows (they need the student servers again
after each part's d_t pass), and the servers' caches no longer hold the rollouts.
Not estimated: evaluation, checkpoints, the optimizer step (memory-bound, small), the detector's OT solve (CPU).
Every phase runs after the previous one (the loop is synchronous), so times add up, with two overlaps: the two roles'
windows on their own servers, and pipelined parts (`_pipelined_parts`: a served teacher scores part i + 1 during
part i's d_t pass and windows; each part then takes half the window-cache budget, `window_parts`), a row of negative
seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from topd_megatron.config import RunConfig
from topd_megatron.models.build import padded_vocab
from topd_megatron.plan.architecture import Architecture
from topd_megatron.plan.layout import RESPONSE_FRACTION, Layout, StepShape, span_keeps_weights, time_sliced
from topd_megatron.plan.memory import (
    GIB,
    colocated_servers,
    dtype_bytes,
    offloads_teacher_logits,
    rank_params,
    server_memory,
    student_state_bytes,
    teacher_fp8,
    teacher_served,
)

CAUSAL_FRACTION = 0.5
"""Share of the S x S attention scores a causal mask leaves (flash attention skips the rest)."""
FP8_SPEEDUP = 2.0
"""FP8 peak over the bf16 peak (ClusterConfig.gpu_peak_tflops is the bf16 one)."""
DECODE_HBM_TBPS = 3.35
"""HBM bandwidth of an H100 SXM in TB/s (H200: 4.8)."""
DECODE_BANDWIDTH_EFFICIENCY = 0.7
"""Share of the HBM bandwidth a decode step achieves."""
WINDOW_PREFIX_FRACTION = 0.5
"""Average candidate prefix as a share of S (candidates are spread over the responses)."""
PCIE_GBPS = 25.0
"""Host <-> GPU copy rate per GPU in GB/s (pinned memory over PCIe Gen5 x16, about half its peak, as 8 GPUs share
the host's links)."""
NETWORK_GBPS = 40.0
"""Node-to-node rate of one NCCL broadcast in GB/s (a 400 Gb/s InfiniBand NIC at 80%)."""
DISK_GBPS = 2.0
"""Shared-filesystem write or read rate of one process in GB/s (the 'disk' weight sync)."""


def window_prefill_tokens(rollout_prefix_tokens: float, windows: float, *, cached_rollouts: bool) -> float:
    """Prompt tokens a server computes for windows sampled per rollout (SGLangEngine.generate_windows): each
    rollout's longest needed prefix once (nothing when the rollouts are still in its radix cache from scoring), then
    one token per window request (SGLang matches at most all but the last prompt token in its cache)."""
    return (0.0 if cached_rollouts else rollout_prefix_tokens) + windows


@dataclass(slots=True)
class StepTime:
    """Seconds per training step by phase (global: all data-parallel replicas work in parallel)."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    """FLOPs of the compute-bound phases, summed over all ranks."""
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def forward_flops(arch: Architecture, tokens: float, seq: int) -> float:
    """F(T): 2 N T + causal attention scores and values (2 matmuls x 2 FLOPs x a d x S * CAUSAL_FRACTION)."""
    return gemm_flops(arch, tokens) + attention_flops(arch, tokens, seq)


def gemm_flops(arch: Architecture, tokens: float) -> float:
    """2 N T: the weight GEMMs of a forward (what FP8 speeds up)."""
    return 2 * arch.matmul_params() * tokens


def forward_seconds(arch: Architecture, tokens: float, seq: int, rate: float, fp8: bool) -> float:
    """A forward's time at `rate` FLOP/s: its GEMMs at FP8_SPEEDUP times the rate with FP8."""
    return gemm_flops(arch, tokens) / (rate * (FP8_SPEEDUP if fp8 else 1.0)) + attention_flops(arch, tokens, seq) / rate


def decode_flops(arch: Architecture, tokens: float, context: float) -> float:
    """A KV-cached forward of `tokens` new tokens, each attending to `context` cached keys (no causal halving)."""
    return forward_flops(arch, tokens, int(context / CAUSAL_FRACTION))


def attention_flops(arch: Architecture, tokens: float, seq: int) -> float:
    return 4 * arch.layers * arch.heads * arch.head_dim * seq * CAUSAL_FRACTION * tokens


def training_flops(arch: Architecture, tokens: float, seq: int, recompute: str) -> float:
    fwd = forward_flops(arch, tokens, seq)
    if recompute == "full":
        return 4 * fwd
    return 3 * fwd + (attention_flops(arch, tokens, seq) if recompute == "selective" else 0.0)


def training_seconds(arch: Architecture, tokens: float, seq: int, recompute: str, rate: float, fp8: bool) -> float:
    """`training_flops` at `rate`, the GEMMs at FP8_SPEEDUP times it with FP8."""
    passes = 4 if recompute == "full" else 3
    attn = attention_flops(arch, tokens, seq) * (passes + (1 if recompute == "selective" else 0))
    return passes * gemm_flops(arch, tokens) / (rate * (FP8_SPEEDUP if fp8 else 1.0)) + attn / rate


def _decode_seconds(
    arch: Architecture,
    cfg: RunConfig,
    role: str,
    sequences: int,
    prefix: int,
    new: int,
    prefill_tokens: int,
    kv_per_sequence: float,
) -> float:
    """SGLang: prefill of `prefill_tokens` at MFU, then `new` HBM-bound decode steps of `sequences` continuations of
    `prefix` tokens each; the KV pool holds kv_tokens / `kv_per_sequence` of them at once (the rest wait for the
    next wave)."""
    server = cfg.sglang.student if role == "student" else cfg.sglang.teacher
    assert server is not None
    c = cfg.cluster
    gpus = server.tp * server.dp * server.servers
    mem = server_memory(arch, server, c.gpu_memory_gib)
    prefill = forward_seconds(arch, prefill_tokens, prefix, gpus * c.gpu_peak_tflops * 1e12 * c.mfu, mem.fp8)
    per_replica = -(-sequences // (server.dp * server.servers))
    context = prefix + new / 2
    capacity = max(int(mem.kv_tokens // max(kv_per_sequence, 1.0)), 1)
    waves = -(-per_replica // capacity)
    concurrent = min(per_replica, capacity)
    step_bytes = mem.weights + concurrent * context * mem.kv_bytes_per_token
    decode = waves * new * step_bytes / (DECODE_HBM_TBPS * 1e12 * DECODE_BANDWIDTH_EFFICIENCY)
    return prefill + decode


def estimate_step_time(
    cfg: RunConfig,
    student: Architecture,
    teacher: Architecture,
    layout: Layout,
    shape: StepShape,
    device: str = "cuda",
) -> StepTime:
    c, det = cfg.cluster, cfg.objective.detection
    dp = max(layout.dp, 1)
    rate = c.training_gpus * c.gpu_peak_tflops * 1e12 * c.mfu
    t_fp8, s_fp8 = teacher_fp8(cfg), cfg.student.fp8 is not None
    bubble = 1.0 + (layout.pp - 1) / (layout.vpp * max(shape.microbatches, 1))
    s = shape.seq
    tokens = shape.tokens * dp
    est = StepTime()
    response = round(cfg.train.max_new_tokens * RESPONSE_FRACTION)
    prompt = max(s - response, 1)

    rollouts = shape.rollouts * dp
    if cfg.rollout == "sglang":
        est.seconds["rollout (SGLang: prefill + HBM-bound decode)"] = _decode_seconds(
            student, cfg, "student", rollouts, prompt, response, rollouts * prompt, prompt + response
        )
    else:
        name, context = "rollout (in-process, KV cache)", prompt + response / 2
        est.flops[name] = forward_flops(student, rollouts * prompt, prompt) + response * decode_flops(
            student, rollouts, context
        )
        est.seconds[name] = forward_seconds(student, rollouts * prompt, prompt, rate, s_fp8) + response * (
            forward_seconds(student, rollouts, int(context / CAUSAL_FRACTION), rate, s_fp8)
        )

    def forward(name: str, arch: Architecture, n: float, seq: int, fp8: bool) -> None:
        est.flops[name] = forward_flops(arch, n, seq)
        est.seconds[name] = forward_seconds(arch, n, seq, rate, fp8) * bubble

    def train(name: str, n: float, seq: int, recompute: str) -> None:
        est.flops[name] = training_flops(student, n, seq, recompute)
        est.seconds[name] = training_seconds(student, n, seq, recompute, rate, s_fp8) * bubble

    served = teacher_served(cfg) and cfg.sglang.teacher is not None
    server_rate = 0.0
    server_fp8 = False
    if served:
        assert cfg.sglang.teacher is not None
        t_server = cfg.sglang.teacher
        server_rate = t_server.servers * t_server.tp * t_server.dp * c.gpu_peak_tflops * 1e12 * c.mfu
        server_fp8 = server_memory(teacher, cfg.sglang.teacher, c.gpu_memory_gib).fp8
        name = "teacher scoring (SGLang prefill)"
        est.flops[name] = forward_flops(teacher, tokens, s)
        est.seconds[name] = forward_seconds(teacher, tokens, s, server_rate, server_fp8)
    else:
        forward("teacher scoring forward", teacher, tokens, s, t_fp8)
    if det.detector != "none":
        forward("student scoring forward", student, tokens, s, s_fp8)
    if offloads_teacher_logits(cfg, device):
        rows = padded_vocab(teacher.vocab, cfg.teacher, layout.tp)
        per_rank = shape.rows * s * rows / layout.tp * dtype_bytes(cfg.teacher.dtype)
        copies = 2 + (1 if det.detector != "none" else 0)  # to the host, back for d_t, back for the backward
        est.seconds["teacher logits offload (host copies)"] = copies * per_rank / (PCIE_GBPS * 1e9)
    parts, pipelined = window_part_plan(cfg, teacher, shape, dp)
    if det.detector == "window_ot":
        on_servers = _window_phases(est, cfg, student, teacher, shape, dp, tokens, rate, (s_fp8, t_fp8), parts)
        if pipelined and cfg.cluster.teacher_server_nodes > 0:  # teacher servers on the training GPUs: no overlap
            _pipelined_parts(est, parts, on_servers)
    if shape.branches:
        packed = " (packed after the rollouts)" if shape.packed else ""
        if not windows_sampled_by_detector(cfg):
            _guidance_windows(est, cfg, teacher, shape, dp, tokens, rate, t_fp8)
        if served:  # the teacher's windows come with its report on their tokens: nothing to score again
            est.notes.append(
                "branch scoring: none (the cross-entropy on the window tokens reads no teacher)"
                if cfg.objective.guidance_divergence == "cross_entropy"
                else "branch scoring: none on the teacher servers: its windows come with its report on their tokens"
                " (the log-probs and top-k of the decode that sampled them)"
            )
        else:
            forward(f"branch scoring (teacher forward{packed})", teacher, shape.branch_score_tokens * dp, s, t_fp8)
        name = f"branch training (student forward + backward{packed})"
        train(name, shape.branch_tokens * dp, s, cfg.student.recompute)
    train("train (student forward + backward)", tokens, s, cfg.student.recompute)
    if cfg.rollout == "sglang":
        est.seconds["weight sync (student servers)"] = weight_sync_seconds(cfg, student)
    if time_sliced(cfg):
        states = swapped_state_bytes(cfg, student, layout)
        # per call, the fresh student windows need the student servers again, once per part of the step
        per_call = fresh_student_windows(cfg) and not span_keeps_weights(cfg)
        windows = parts if per_call else 0
        est.seconds["time slicing (Megatron states to host and back)"] = (1 + windows) * 2 * states / (PCIE_GBPS * 1e9)
        if span_keeps_weights(cfg):
            est.notes.append(
                "time slicing swaps once per step: the student servers stay whole from the rollouts to the end of"
                " detection, beside Megatron's weights (the d_t pass); only the optimizer state goes to the host"
            )
        if windows:
            est.notes.append(
                f"time slicing swaps {1 + windows} times per step: for the rollouts, and for the fresh student windows"
                + (f" of each of the {windows} parts" if windows > 1 else "")
            )
    if layout.pp > 1:
        est.notes.append(f"pipeline bubble factor {bubble:.3f} on pipelined passes")
    est.notes.append(
        f"{tokens:,} rollout tokens per step ({shape.rows * dp} rows x {s}), {shape.branch_tokens * dp:,} branch"
        f" training tokens ({shape.branch_tokens / max(shape.tokens, 1):.2f} x the rollouts'"
        f"{', packed' if shape.packed else ''}); weight sync of"
        f" {student.params() * dtype_bytes(cfg.student.dtype) / GIB:.1f} GiB"
    )
    return est


def fresh_student_windows(cfg: RunConfig) -> bool:
    """Whether window_ot samples the student's own windows at the candidates (detection.student_window='fresh')."""
    det = cfg.objective.detection
    return det.detector == "window_ot" and det.student_window == "fresh"


def in_process_window_flops(arch: Architecture, rows: int, windows: int, seq: int, window: int) -> float:
    """In-process windows (rollout/windows.py): a prefill of `rows` rollout rows of `seq` tokens, then `window` decode
    forwards of all `windows` windows at once, each query attending to a whole row (`seq` keys)."""
    return forward_flops(arch, rows * seq, seq) + window * decode_flops(arch, windows, seq)


def in_process_window_seconds(
    arch: Architecture, rows: int, windows: int, seq: int, window: int, rate: float, fp8: bool
) -> float:
    """`in_process_window_flops` at `rate` FLOP/s (the training GPUs' peak x MFU): no per-forward overheads, weight
    or KV reads, a lower bound that bench/window_decode.py measures against on a device."""
    return forward_seconds(arch, rows * seq, seq, rate, fp8) + window * forward_seconds(
        arch, windows, int(seq / CAUSAL_FRACTION), rate, fp8
    )


def _window_phases(
    est: StepTime,
    cfg: RunConfig,
    student: Architecture,
    teacher: Architecture,
    shape: StepShape,
    dp: int,
    tokens: float,
    rate: float,
    fp8: tuple[bool, bool],
    teacher_parts: int,
) -> dict[str, float]:
    """window_ot's near-future windows: the teacher's at every candidate, and the student's with
    student_window='fresh'. Per role on its SGLang servers (per rollout, `_decode_seconds`), or in-process on the
    training GPUs. With both roles on servers, both are sampled at once (SGLangEngine.generate_window_pair): the
    phase takes the slower of the two where their servers have GPUs of their own, their sum where both share the
    training GPUs (`colocated_servers`: they share those GPUs' HBM bandwidth; every colocated server is assumed to
    span all the training GPUs, as the recipes' do); `teacher_parts`: the step's parts (`window_part_plan`). Returns
    each served role's seconds."""
    det, s = cfg.objective.detection, shape.seq
    candidates, rollouts = shape.candidates * dp, shape.rollouts * dp
    per_rollout = max(shape.candidates // max(shape.rollouts, 1), 1)
    roles = {"teacher": (teacher, fp8[1])} | ({"student": (student, fp8[0])} if fresh_student_windows(cfg) else {})
    on_servers: dict[str, float] = {}
    for role, (arch, role_fp8) in roles.items():
        server = cfg.sglang.student if role == "student" else cfg.sglang.teacher
        if cfg.rollout == "sglang" and server is not None:
            # per rollout: each rollout's prefix prefilled once (nothing when the role's KV caches still hold the
            # step's rollouts), then every candidate adds its K window tokens
            parts = teacher_parts if role == "teacher" else 1
            held = rollouts_stay_cached(cfg, role, arch, tokens)
            cached = held or parts > 1
            if parts > 1:
                est.notes.append(
                    f"scoring and windows in {parts} parts of the step, each fitting the teacher servers' window-cache"
                    " budget: every window finds its prefix cached from scoring"
                )
            on_servers[role] = _decode_seconds(
                arch,
                cfg,
                role,
                candidates,
                int(s * WINDOW_PREFIX_FRACTION),
                det.window,
                int(window_prefill_tokens(rollouts * s, candidates, cached_rollouts=cached)),
                det.window + s / per_rollout,
            )
            if held:
                est.notes.append(f"the {role} servers' KV caches hold the step's rollouts: its windows reuse them")
        else:
            name, rows = f"{role} windows (in-process, per rollout, KV cache)", min(rollouts, candidates)
            est.flops[name] = in_process_window_flops(arch, rows, candidates, s, det.window)
            est.seconds[name] = in_process_window_seconds(arch, rows, candidates, s, det.window, rate, role_fp8)
            if role == "teacher":
                est.notes.append(
                    "window_ot without a teacher SGLang server generates the windows in-process (the training GPUs'"
                    " own forward passes); set sglang.teacher to serve them. The in-process windows are counted at MFU"
                    " (a rollout's windows share its cache, so each decode forward reads the prefix once), without"
                    " eager decoding's per-forward overheads or weight reads: a lower bound, unmeasured on GPUs"
                )
    if len(on_servers) == 2:
        same_gpus = {"teacher", "student"} <= {role for role, _ in colocated_servers(cfg)}
        est.seconds[WINDOWS_AT_ONCE] = sum(on_servers.values()) if same_gpus else max(on_servers.values())
        shared = " on the same GPUs (both roles' servers share the training GPUs): their times add up"
        est.notes.append(
            "windows: the teacher's servers {teacher:.1f} s and the student's {student:.1f} s, at the same time".format(
                **on_servers
            )
            + (shared if same_gpus else "")
        )
    else:
        for role, seconds in on_servers.items():
            est.seconds[f"{role} windows (SGLang, per rollout)"] = seconds
    return on_servers


WINDOWS_AT_ONCE = "windows (SGLang, per rollout; teacher's and student's servers at once)"
"""The windows phase when both roles sample on servers (SGLangEngine.generate_window_pair)."""
PIPELINE_OVERLAP = "overlap: the teacher scores each next part during a part's d_t pass and windows"


def _pipelined_parts(est: StepTime, parts: int, windows: dict[str, float]) -> None:
    """Scoring and windows in P pipelined parts (training/scoring.py `pipelines_parts`): the teacher servers score part
    i + 1 while the training GPUs run part i's d_t pass and both roles sample part i's windows. Per part (a P-th of each
    phase): scoring T, d_t D, the teacher's windows W_t, the student's W_s (W = max of the two: the teacher servers have
    nodes of their own whenever parts are pipelined). In sequence the parts take P (T + D + W); pipelined T + (P - 1)
    max(D + W, T + W_t) + D + W (the teacher's windows of part i share its servers with the scoring of part i + 1). The
    difference is a row of negative seconds."""
    score = next((v for k, v in est.seconds.items() if k.startswith("teacher scoring")), 0.0) / parts
    d_t = est.seconds.get("student scoring forward", 0.0) / parts
    w_t, w_s = windows.get("teacher", 0.0) / parts, windows.get("student", 0.0) / parts
    w = max(w_t, w_s)
    sequential = parts * (score + d_t + w)
    pipelined = score + (parts - 1) * max(d_t + w, score + w_t) + d_t + w
    if sequential - pipelined > 0:
        est.seconds[PIPELINE_OVERLAP] = -(sequential - pipelined)
        est.notes.append(
            f"pipelined parts: the teacher's scoring of each next part runs beside the d_t pass and windows of the one"
            f" before ({sequential:.1f} s of scoring, d_t and windows take {pipelined:.1f} s)"
        )


def window_parts(cfg: RunConfig, teacher: Architecture, shape: StepShape, dp: int) -> int:
    """The number of parts of `window_part_plan`."""
    return window_part_plan(cfg, teacher, shape, dp)[0]


def window_part_plan(cfg: RunConfig, teacher: Architecture, shape: StepShape, dp: int) -> tuple[int, bool]:
    """Parts of a step that phases 1-2 run one after the other, and whether they are pipelined (training/scoring.py
    `part_plan`): with window_ot sampling from a teacher served by SGLang, as many as make each part's rollouts and
    window tokens fit its share of the teacher servers' window-cache budget (window_cache_share of their pools, split
    over the data-parallel replicas); half the share each when pipelined (the next part is scored while this one's
    windows are sampled), which needs that many micro-batches; else parts in sequence, at most one per micro-batch;
    (1, False) when the step fits."""
    det, server = cfg.objective.detection, cfg.sglang.teacher
    if det.detector != "window_ot" or server is None or not teacher_served(cfg):
        return 1, False
    mem = server_memory(teacher, server, cfg.cluster.gpu_memory_gib)
    budget = mem.kv_tokens * server.dp * server.servers * cfg.sglang.window_cache_share
    need = shape.rollouts * shape.seq + det.window * shape.candidates
    share = budget / max(dp, 1)
    whole, halves = -(-need // max(int(share), 1)), -(-need // max(int(share / 2), 1))
    microbatches = max(shape.microbatches, 1)
    if whole > 1 and halves <= microbatches:
        return int(halves), True
    return int(min(max(whole, 1), microbatches)), False


def windows_sampled_by_detector(cfg: RunConfig) -> bool:
    """Whether teacher_window guidance reuses window_ot's teacher windows at the divergent candidates; else phase 3
    samples the teacher's windows at the guided positions (step.build_branches: `_guidance_windows`)."""
    return cfg.objective.detection.detector == "window_ot" and cfg.objective.guidance_at != "random"


def _guidance_windows(
    est: StepTime,
    cfg: RunConfig,
    teacher: Architecture,
    shape: StepShape,
    dp: int,
    tokens: float,
    rate: float,
    fp8: bool,
) -> None:
    """The teacher's windows at the B guided positions when the detector did not sample them: per rollout on the
    teacher's servers (each rollout's prefix prefilled again unless its caches hold the step's rollouts), or
    in-process on the training GPUs."""
    det, s = cfg.objective.detection, shape.seq
    count, rollouts = shape.branches * dp, shape.rollouts * dp
    if cfg.rollout == "sglang" and cfg.sglang.teacher is not None:
        per_rollout = max(shape.branches // max(shape.rollouts, 1), 1)
        cached = rollouts_stay_cached(cfg, "teacher", teacher, tokens)
        prefill = int(window_prefill_tokens(rollouts * s, count, cached_rollouts=cached))
        est.seconds["guidance windows (SGLang teacher, per rollout)"] = _decode_seconds(
            teacher,
            cfg,
            "teacher",
            count,
            int(s * WINDOW_PREFIX_FRACTION),
            det.window,
            prefill,
            det.window + s / per_rollout,
        )
        return
    name, rows = "guidance windows (teacher in-process, per rollout, KV cache)", min(rollouts, count)
    est.flops[name] = forward_flops(teacher, rows * s, s) + det.window * decode_flops(teacher, count, s)
    est.seconds[name] = forward_seconds(teacher, rows * s, s, rate, fp8) + det.window * forward_seconds(
        teacher, count, int(s / CAUSAL_FRACTION), rate, fp8
    )


def rollouts_stay_cached(cfg: RunConfig, role: str, arch: Architecture, rollout_tokens: float) -> bool:
    """Whether the role's servers' KV caches, together, still hold every rollout of the step when its windows are
    sampled: the teacher's when it scored them (a served teacher), the student's when it generated them and kept its
    cache (not when time slicing released it before the windows: span 'call')."""
    server = cfg.sglang.teacher if role == "teacher" else cfg.sglang.student
    released = role == "student" and time_sliced(cfg) and not span_keeps_weights(cfg)
    if server is None or (role == "teacher" and not teacher_served(cfg)) or released:
        return False
    mem = server_memory(arch, server, cfg.cluster.gpu_memory_gib)
    return mem.kv_tokens * server.dp * server.servers >= rollout_tokens


def weight_sync_seconds(cfg: RunConfig, student: Architecture) -> float:
    """One weight sync to every student server (module docstring)."""
    nbytes = student.params() * dtype_bytes(cfg.student.dtype)
    n = cfg.sglang.student.servers
    export = nbytes / (PCIE_GBPS * 1e9)
    if cfg.sglang.sync_mode == "distributed":
        return export + nbytes / (PCIE_GBPS * 1e9) + nbytes / (NETWORK_GBPS * 1e9)
    if cfg.sglang.sync_mode == "tensor":
        return export + n * nbytes / (PCIE_GBPS * 1e9)
    return export + (1 + n) * nbytes / (DISK_GBPS * 1e9)


def swapped_state_bytes(cfg: RunConfig, student: Architecture, layout: Layout) -> float:
    """What one time-slicing swap copies to the host (and back) on the fullest GPU (first stage): the optimizer state
    and, unless the step's span keeps them (`span_keeps_weights`), the weights; the fp32 gradient buffers are freed
    and zeroed again, not copied (Megatron-Core's offload_to_cpu / reload_from_cpu)."""
    stage = "only" if layout.pp == 1 else "first"
    params = rank_params(student, layout, padded_vocab(student.vocab, cfg.student, layout.tp), stage)
    states = student_state_bytes(params, cfg.student, layout, cfg.optim.use_distributed_optimizer)
    keep = ("student gradient", "student weights") if span_keeps_weights(cfg) else ("student gradient",)
    return sum(v for k, v in states.items() if not k.startswith(keep))
