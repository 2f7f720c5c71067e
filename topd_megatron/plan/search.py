"""Search the node splits of a recipe's cluster: how many nodes train, serve the student, serve the teacher, or train
and serve the student by turns; plan each (memory, step time) and rank the feasible ones by planned step time.

    best = search_layouts(recipes.get("topd_70b"))        # [Candidate], fastest feasible first
    best[0].cfg                                           # the RunConfig of that layout

What varies, on the recipe's total nodes (cluster.total_nodes) and GPUs per node:
- student servers: `time_slice` on the training nodes (sglang.colocate; the servers take the GPUs while Megatron's
  states wait in host memory), or S dedicated nodes (S >= 1), each node one server per TP x DP GPUs;
- teacher servers (when the recipe serves the teacher or its windows): R dedicated nodes, or the recipe's own
  placement (colocated on the training GPUs) when it has no teacher server nodes;
- the student's attention: the recipe's, or Megatron-Core's local attention (which packs the guidance windows;
  TransformerEngine's cannot: layout.packs) with selective or full recomputation (the local attention keeps an
  S x S softmax per layer otherwise).
Training takes the remaining nodes; a split is kept only if its world size divides into TP x PP and the prompts into
data-parallel replicas. A feasible layout with less than SAFE_HEADROOM_GIB to spare on some GPU is listed but marked
tight: the recipes adopt the fastest layout that is not. Each candidate is planned like `topd plan` (`plan(cfg,
run_preflight=False)`), and with the detector and guidance off (the OPD step on the same layout) for the TOPD / OPD
ratio.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from topd_megatron.config import RunConfig
from topd_megatron.plan.feasibility import Plan, plan
from topd_megatron.plan.layout import span_keeps_weights, time_sliced
from topd_megatron.plan.memory import SGLANG_RUNTIME_OVERHEAD_GIB, megatron_beside_servers

SAFE_HEADROOM_GIB = 2.0
"""The least headroom on every GPU of a layout that a recipe adopts; below it a layout is `tight`. The planner's
activations of packed rows measure at 0.95-0.97 of what Megatron allocates (bench/plan_vs_measured.py, docs/scale.md
"Validation"): on topd_70b's 36.8 GiB of activations with selective recomputation that is 1.1-2.0 GiB, before any
allocator fragmentation."""
SERVER_MEM_FRACTION = 0.85
"""mem_fraction of a server on nodes of its own or time-sliced with training (the GPU is the server's then)."""


@dataclass(slots=True)
class Candidate:
    """One planned layout."""

    name: str
    cfg: RunConfig
    plan: Plan
    opd_s: float
    """Planned step time of the OPD step (detector and guidance off) on the same layout."""

    @property
    def step_s(self) -> float:
        return self.plan.step_time.total_s if self.plan.step_time is not None else float("inf")

    @property
    def ratio(self) -> float:
        return self.step_s / self.opd_s if self.opd_s else float("inf")

    @property
    def headroom_gib(self) -> float:
        """The least headroom of any whole GPU of the layout (a server's share of a training GPU is sized to its share
        by construction; the training GPU's own table counts it)."""
        whole = [r for r in self.plan.roles if r.budget_gib >= self.cfg.cluster.gpu_memory_gib]
        return min((r.headroom_gib for r in whole), default=0.0)

    @property
    def tight(self) -> bool:
        """Feasible on paper with less than SAFE_HEADROOM_GIB to spare on some GPU: not a layout to adopt."""
        return self.headroom_gib < SAFE_HEADROOM_GIB


def opd_variant(cfg: RunConfig) -> RunConfig:
    """The same run with the detector and guidance off (`--set objective.detection.detector=none --set
    objective.guidance=none`, and `--set objective.guidance_budget=None` where the recipe caps the windows)."""
    obj = dataclasses.replace(
        cfg.objective,
        detection=dataclasses.replace(cfg.objective.detection, detector="none"),
        guidance="none",
        guidance_budget=None,
    )
    return dataclasses.replace(cfg, objective=obj)


def _servers(gpus: int, tp: int, dp: int) -> int:
    return gpus // (tp * dp) if gpus % (tp * dp) == 0 else 0


def split(
    cfg: RunConfig,
    student_nodes: int,
    teacher_nodes: int | None,
    recompute: str | None = None,
    colocate: str = "time_slice",
) -> RunConfig | None:
    """`cfg` on its total nodes with `student_nodes` dedicated student-server nodes (0: on the training GPUs, shared
    as `colocate` says) and `teacher_nodes` dedicated teacher-server nodes (None: the recipe's teacher placement);
    `recompute` set: Megatron-Core's local attention (packed guidance) with that student recompute. None when the
    split leaves no training node or the servers do not tile their nodes."""
    c, g = cfg.cluster, cfg.cluster.gpus_per_node
    total = c.total_nodes
    t_nodes = c.teacher_server_nodes if teacher_nodes is None else teacher_nodes
    train_nodes = total - student_nodes - t_nodes
    if train_nodes < 1:
        return None
    s_cfg = cfg.sglang.student
    s_gpus = (student_nodes or train_nodes) * g
    s_servers = _servers(s_gpus, s_cfg.tp, s_cfg.dp)
    if not s_servers:
        return None
    shared = student_nodes == 0 and colocate == "share"  # the recipe's share of each training GPU stays
    fraction = s_cfg.mem_fraction if shared else SERVER_MEM_FRACTION
    if student_nodes == 0 and not shared and cfg.sglang.teacher is not None and t_nodes == 0:
        # a teacher server sharing the training GPUs keeps its share (and runtime) while the student samples
        fraction -= cfg.sglang.teacher.mem_fraction + SGLANG_RUNTIME_OVERHEAD_GIB / c.gpu_memory_gib
    student_server = dataclasses.replace(s_cfg, servers=s_servers, mem_fraction=fraction, url=None)
    teacher_server = cfg.sglang.teacher
    if teacher_server is not None and t_nodes:
        t_servers = _servers(t_nodes * g, teacher_server.tp, teacher_server.dp)
        if not t_servers:
            return None
        teacher_server = dataclasses.replace(teacher_server, servers=t_servers, url=None)
    sglang = dataclasses.replace(
        cfg.sglang,
        student=student_server,
        teacher=teacher_server,
        colocate=colocate if student_nodes == 0 else "share",
    )
    cluster = dataclasses.replace(
        c, nodes=train_nodes, student_server_nodes=student_nodes, teacher_server_nodes=t_nodes
    )
    student, teacher = cfg.student, cfg.teacher
    if recompute is not None:  # both Megatron models must take the packed rows' mask
        student = dataclasses.replace(student, transformer_engine=False, recompute=recompute)
        teacher = dataclasses.replace(teacher, transformer_engine=False)
    return dataclasses.replace(cfg, cluster=cluster, sglang=sglang, student=student, teacher=teacher)


def _name(cfg: RunConfig) -> str:
    c = cfg.cluster
    student = f"{c.student_server_nodes} nodes"
    if c.student_server_nodes == 0:
        student = "time-sliced" if cfg.sglang.colocate == "time_slice" else "shared GPUs"
    teacher = f"{c.teacher_server_nodes} nodes" if c.teacher_server_nodes else "colocated"
    attention = "TE/recipe attention"
    if cfg.student.transformer_engine is False:
        attention = f"local attention, packed, {cfg.student.recompute} recompute"
    return f"train {c.nodes} | student servers {student} | teacher servers {teacher} | {attention}"


def leave_room_for_megatron(cfg: RunConfig, *, device: str = "cuda") -> RunConfig:
    """A time-sliced student server with its mem_fraction lowered by what Megatron keeps beside it on the GPU (a
    Megatron teacher's weights; in a step's span the student's weights and phases 1-2: plan/memory.py
    `megatron_beside_servers`), so that the GPU holds both; `cfg` unchanged otherwise."""
    if not time_sliced(cfg):
        return cfg
    planned = plan(cfg, device=device, run_preflight=False)
    training = [r for r in planned.roles if r.role.startswith("training rank")]
    kept = sum(megatron_beside_servers(training, span=span_keeps_weights(cfg)).values())
    if not kept:
        return cfg
    server = cfg.sglang.student
    fraction = server.mem_fraction - kept / cfg.cluster.gpu_memory_gib
    student = dataclasses.replace(server, mem_fraction=round(fraction, 3))
    return dataclasses.replace(cfg, sglang=dataclasses.replace(cfg.sglang, student=student))


def search_layouts(cfg: RunConfig, *, device: str = "cuda") -> list[Candidate]:
    """Every split (module docstring), planned; feasible ones first, fastest first."""
    if cfg.rollout != "sglang":
        return []
    total = cfg.cluster.total_nodes
    needs_teacher_nodes = cfg.sglang.teacher is not None and cfg.cluster.teacher_server_nodes > 0
    teacher_options: list[int | None] = list(range(1, total)) if needs_teacher_nodes else [None]
    out: list[Candidate] = []
    options = [(0, "share"), (0, "time_slice")] + [(n, "share") for n in range(1, total)]
    for recompute in (None, "selective", "full"):
        for (s_nodes, colocate), t_nodes in itertools.product(options, teacher_options):
            variant = split(cfg, s_nodes, t_nodes, recompute, colocate)
            variant = leave_room_for_megatron(variant, device=device) if variant is not None else None
            planned = plan(variant, device=device, run_preflight=False) if variant is not None else None
            if planned is None or not planned.feasible:
                continue
            opd = plan(opd_variant(variant), device=device, run_preflight=False)
            opd_s = opd.step_time.total_s if opd.step_time is not None else 0.0
            out.append(Candidate(name=_name(variant), cfg=variant, plan=planned, opd_s=opd_s))
    unique = {c.name: c for c in sorted(out, key=lambda c: -c.step_s)}  # a variant equal to another: keep one
    return sorted(unique.values(), key=lambda c: c.step_s)


__all__ = ["SAFE_HEADROOM_GIB", "Candidate", "leave_room_for_megatron", "opd_variant", "search_layouts", "split"]
