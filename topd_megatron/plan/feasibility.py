"""`plan(cfg)`: is a run's layout feasible on its cluster, and why not? Works from config files only (no GPU, no
Megatron): architectures from config.json (or the public table), the layout, the memory of every rank role, the
step-time estimate and the preflight checks.

    p = plan(recipes.get("llama3_8b_from_70b"))
    p.feasible, p.reasons()          # False, ["training rank needs 121.3 GiB of 80 GiB (...)", ...]

Refused (each with its reason; all are collected, not just the first):
- TP not dividing attention heads, KV heads or the vocabulary (unless pad_vocab_to_multiple_of), PP x VPP not
  dividing layers, EP not dividing experts (models/build.py `check_layout`, for the student and the teacher);
- a world size (cluster.nodes * gpus_per_node) not divisible by TP * PP * CP, or by ETP * EP * PP (Megatron's expert
  groups, ETP = TP), or sequence parallelism at TP = 1;
- prompts_per_step not divisible by DP; with VPP, a number of micro-batches that is not a multiple of PP;
- student and teacher vocabularies that differ (their vocab shards must line up; a teacher served by SGLang only,
  `teacher_source='sglang'`, is not built in Megatron: only its true vocabulary is compared);
- any rank role over cluster.gpu_memory_gib; offloaded teacher logits over PINNED_HOST_SHARE of a node's host
  memory (HOST_MEMORY_GIB_PER_NODE); SGLang servers that need more GPUs than they have, whose weights do
  not fit in mem_fraction, or whose KV pool holds less than one sequence;
- failed preflight checks (preflight.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from topd_megatron.config import RunConfig
from topd_megatron.models.build import check_layout, padded_vocab
from topd_megatron.plan.architecture import Architecture, resolve
from topd_megatron.plan.layout import Layout, StepShape, layout_of, span_keeps_weights, step_shape, time_sliced
from topd_megatron.plan.memory import (
    GIB,
    HOST_MEMORY_GIB_PER_NODE,
    PINNED_HOST_SHARE,
    RoleMemory,
    Stage,
    colocated_servers,
    megatron_beside_servers,
    server_memory,
    server_role,
    teacher_served,
    training_role,
)
from topd_megatron.plan.preflight import Check, preflight
from topd_megatron.plan.step_time import StepTime, estimate_step_time
from topd_megatron.rollout.sglang.server import ServerConfig


@dataclass(slots=True)
class Plan:
    """The planner's verdict on one RunConfig."""

    cfg: RunConfig
    layout: Layout
    shape: StepShape
    student: Architecture | None = None
    teacher: Architecture | None = None
    sources: dict[str, str] = field(default_factory=dict)
    """Where each architecture came from (a config.json or the public table)."""
    roles: list[RoleMemory] = field(default_factory=list)
    step_time: StepTime | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.reasons()

    def reasons(self) -> list[str]:
        """Why the run is refused: layout and memory errors, then failed preflight checks."""
        return self.errors + [f"preflight: {c.name}: {c.detail}" for c in self.checks if c.status == "error"]


def _hf_view(arch: Architecture) -> SimpleNamespace:
    """The attributes models/build.py `check_layout` reads from an HF config."""
    return SimpleNamespace(
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        vocab_size=arch.vocab,
        num_hidden_layers=arch.layers,
        num_experts=arch.num_experts or None,
    )


def layout_errors(cfg: RunConfig, layout: Layout, shape: StepShape, archs: dict[str, Architecture]) -> list[str]:
    errors = []
    p, c = cfg.parallel, cfg.cluster
    served = teacher_served(cfg)
    for role, arch in archs.items():
        if role == "teacher" and served:
            continue  # not built in Megatron: its server's layout is checked with the servers
        try:
            check_layout(_hf_view(arch), p, getattr(cfg, role), role)
        except ValueError as e:
            errors.append(str(e))
    mp = p.tp * p.pp * p.cp
    if layout.world % mp:
        errors.append(
            f"world size {layout.world} (cluster.nodes={c.nodes} x gpus_per_node={c.gpus_per_node}) is not divisible"
            f" by TP*PP*CP = {p.tp}*{p.pp}*{p.cp} = {mp}"
        )
    emp = layout.etp * p.ep * p.pp
    if layout.world % emp:
        errors.append(
            f"world size {layout.world} is not divisible by expert TP*EP*PP = {layout.etp}*{p.ep}*{p.pp} = {emp}"
            " (Megatron's expert-parallel groups; expert TP = TP)"
        )
    if p.sequence_parallel and p.tp == 1:
        errors.append("sequence_parallel needs TP > 1")
    if layout.dp and cfg.train.prompts_per_step % layout.dp:
        errors.append(
            f"train.prompts_per_step={cfg.train.prompts_per_step} is not divisible by DP={layout.dp}: replicas"
            " would get different numbers of rollouts"
        )
    if layout.vpp > 1 and layout.dp and (shape.microbatches < p.pp or shape.microbatches % p.pp):
        errors.append(
            f"the interleaved schedule (VPP={layout.vpp}) needs a number of micro-batches that is a multiple of"
            f" PP={p.pp}; a step has {shape.microbatches} (rollouts per replica / micro_batch_size)"
        )
    if "student" in archs and "teacher" in archs:
        s, t = archs["student"], archs["teacher"]
        s_rows, t_rows = padded_vocab(s.vocab, cfg.student, p.tp), padded_vocab(t.vocab, cfg.teacher, p.tp)
        if served:
            s_rows = t_rows  # no teacher shards to line up: the true vocabularies must still agree
        if (s.vocab, s_rows) != (t.vocab, t_rows):
            errors.append(
                f"teacher vocabulary ({t.vocab} true / {t_rows} padded rows) differs from the student's ({s.vocab} /"
                f" {s_rows}): their vocab shards would not line up"
            )
    return errors


def layout_warnings(cfg: RunConfig, layout: Layout, shape: StepShape, archs: dict[str, Architecture]) -> list[str]:
    out = []
    t, p = cfg.train, cfg.parallel
    if shape.rollouts % t.micro_batch_size:
        out.append(
            f"{shape.rollouts} rollouts per replica are not a multiple of micro_batch_size={t.micro_batch_size}:"
            f" the step is padded with {shape.rows - shape.rollouts} all-padding rows"
        )
    if p.ep > 1 and not any(a.is_moe for a in archs.values()):
        out.append(f"EP={p.ep} has no effect: neither model has routed experts")
    if layout.vpp > 1 and shape.branches:
        out.append(
            "VPP with teacher_window guidance: the branch pass's micro-batch count varies from step to step and must"
            f" also be a multiple of PP={p.pp} for the interleaved schedule"
        )
    if cfg.teacher.seq_length < cfg.student.seq_length:
        out.append(
            f"teacher.seq_length={cfg.teacher.seq_length} < student.seq_length={cfg.student.seq_length}: the teacher"
            " scores the same sequences"
        )
    if p.cp > 1:
        out.append("CP > 1: the planner divides each rank's tokens by CP; topd's batches are built for CP = 1")
    student = cfg.sglang.student
    if cfg.rollout == "sglang" and cfg.cluster.student_server_nodes and not (student.url or student.urls):
        out.append(
            "sglang.student.urls is empty although cluster.student_server_nodes > 0: rank 0 launches the servers on"
            " its own node; set the urls of the servers started on the server nodes (slurm/topd_70b.sh does)"
        )
    t = cfg.sglang.teacher
    if cfg.rollout == "sglang" and t is not None and cfg.cluster.teacher_server_nodes and not (t.url or t.urls):
        out.append(
            "sglang.teacher.urls is empty although cluster.teacher_server_nodes > 0: rank 0 launches the servers on"
            " its own node; set the urls of the servers started on the server nodes (slurm/topd_70b.sh does)"
        )
    if cfg.train.offload_teacher_logits and teacher_served(cfg):
        out.append("train.offload_teacher_logits has no effect with teacher_source=sglang (no teacher logits)")
    return out


def _server_errors(
    cfg: RunConfig, who: str, arch: Architecture, server: ServerConfig, gpus: int, seq: int
) -> list[str]:
    errors = []
    mem = server_memory(arch, server, cfg.cluster.gpu_memory_gib)
    need = server.tp * server.dp * server.servers
    if need > gpus:
        errors.append(
            f"SGLang {who} servers need servers*TP*DP = {server.servers}*{server.tp}*{server.dp} = {need} GPUs;"
            f" {gpus} are available to them"
        )
    if arch.heads % server.tp:
        errors.append(f"SGLang {who} server TP={server.tp} does not divide {arch.heads} attention heads")
    if mem.weights >= mem.static:
        errors.append(
            f"SGLang {who} server weights ({mem.weights / GIB:.1f} GiB per GPU at TP={server.tp}) do not fit in"
            f" mem_fraction={server.mem_fraction:g} of {cfg.cluster.gpu_memory_gib:g} GiB"
            f" ({mem.static / GIB:.1f} GiB)"
        )
    elif mem.kv_tokens < seq:
        errors.append(
            f"SGLang {who} server KV pool holds {mem.kv_tokens} tokens, less than one sequence of {seq} tokens"
        )
    return errors


def _stages(pp: int) -> list[Stage]:
    return ["only"] if pp == 1 else ["first", "last"]


def memory_plan(
    cfg: RunConfig, student: Architecture, teacher: Architecture, layout: Layout, shape: StepShape, device: str
) -> tuple[list[RoleMemory], list[str], list[str]]:
    """Every role's peak memory, the errors it implies and warnings (servers decoding in waves)."""
    roles = [training_role(cfg, student, teacher, layout, shape, st, device) for st in _stages(layout.pp)]
    errors: list[str] = []
    warnings: list[str] = []
    c = cfg.cluster
    if cfg.rollout == "sglang":
        colocated = {who for who, _ in colocated_servers(cfg)}
        servers = [("student", student, cfg.sglang.student, c.student_server_nodes)]
        if cfg.sglang.teacher is not None:
            servers.append(("teacher", teacher, cfg.sglang.teacher, c.teacher_server_nodes))
        for who, arch, server, nodes in servers:
            if server.url and who not in colocated and not nodes:
                continue  # attached to servers started elsewhere: nothing of ours to plan
            here = who in colocated
            kept = megatron_beside_servers(roles[: len(_stages(layout.pp))], span=span_keeps_weights(cfg))
            roles.append(server_role(cfg, who, arch, server, here, shape.seq, kept if who == "student" else None))
            gpus = layout.world if here else nodes * c.gpus_per_node
            errors += _server_errors(cfg, who, arch, server, gpus, shape.seq)
            per_replica = -(-shape.rollouts * max(layout.dp, 1) // (server.dp * server.servers))
            held = server_memory(arch, server, c.gpu_memory_gib).kv_tokens // max(shape.seq, 1)
            if who == "student" and 0 < held < per_replica:
                warnings.append(
                    f"SGLang {who} server: its KV pool holds {held} sequences of {shape.seq} tokens at once, a step"
                    f" sends {per_replica} to each replica: they decode in {-(-per_replica // held)} waves"
                )
    student_server = cfg.sglang.student
    if time_sliced(cfg) and not (student_server.url or student_server.urls):
        # SGLang sizes its pool as mem_fraction x the memory free when it starts, less its weights
        resident = max(r.total_gib - r.phases.get(r.peak_phase, 0.0) for r in roles if r.role.startswith("training"))
        warnings.append(
            f"the trainer launches the time-sliced student servers after building the Megatron models ({resident:.1f}"
            f" GiB per GPU then): SGLang sizes its KV pool from the memory free when it starts, about"
            f" {student_server.mem_fraction * resident:.1f} GiB less than planned; start the servers first"
            " (python -m topd_megatron.rollout.sglang.serve, as slurm/topd_70b.sh does) and attach them"
            " (sglang.student.urls)"
        )
    host = max((r.host_bytes for r in roles), default=0.0)
    if host:
        ranks = min(c.gpus_per_node, max(layout.world // layout.pp, 1))  # last-stage ranks on one node
        per_node, limit = host * ranks / GIB, HOST_MEMORY_GIB_PER_NODE * PINNED_HOST_SHARE
        if per_node > limit:
            errors.append(
                f"offloaded teacher logits need {per_node:,.0f} GiB of pinned host memory per node ({ranks} last-stage"
                f" ranks x {host / GIB:,.1f} GiB), over {PINNED_HOST_SHARE:g} of {HOST_MEMORY_GIB_PER_NODE:g} GiB"
            )
    for r in roles:
        if not r.fits:
            top = sorted(r.components.items(), key=lambda kv: -kv[1])[:3]
            errors.append(
                f"{r.role} needs {r.total_gib:.1f} GiB of {r.budget_gib:g} GiB (peak in {r.peak_phase}; largest: "
                + ", ".join(f"{k} {v:.1f}" for k, v in top)
                + ")"
            )
    return roles, errors, warnings


def plan(cfg: RunConfig, *, strict: bool = False, device: str = "cuda", run_preflight: bool = True) -> Plan:
    """Plan `cfg` on its cluster (see the module docstring). `device`: 'cuda' (TransformerEngine, flash attention,
    the GPU chunk budget) or 'cpu' (Megatron-Core's local spec). `strict` makes missing local paths errors."""
    layout = layout_of(cfg)
    shape = step_shape(cfg, layout, device)
    result = Plan(cfg=cfg, layout=layout, shape=shape)
    archs: dict[str, Architecture] = {}
    for role in ("student", "teacher"):
        try:
            archs[role], result.sources[role] = resolve(getattr(cfg, role).path)
        except ValueError as e:
            result.errors.append(f"{role}: {e}")
    result.student, result.teacher = archs.get("student"), archs.get("teacher")
    result.errors += layout_errors(cfg, layout, shape, archs)
    result.warnings += layout_warnings(cfg, layout, shape, archs)
    if result.student is not None and result.teacher is not None:
        result.roles, mem_errors, mem_warnings = memory_plan(cfg, result.student, result.teacher, layout, shape, device)
        result.errors += mem_errors
        result.warnings += mem_warnings
        result.step_time = estimate_step_time(cfg, result.student, result.teacher, layout, shape, device)
    if run_preflight:
        result.checks = preflight(cfg, strict=strict)
    return result
