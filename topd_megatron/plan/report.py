"""A Plan as rich tables (one per rank role: GiB per component, total, headroom; the step-time estimate; the
preflight checks; the verdict) and as JSON.

    render(plan, Console())
    json.dumps(plan_to_json(plan))
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from topd_megatron.plan.architecture import Architecture
from topd_megatron.plan.feasibility import Plan
from topd_megatron.plan.memory import GIB, RoleMemory, human_count
from topd_megatron.plan.search import SAFE_HEADROOM_GIB, Candidate


def _model_line(role: str, arch: Architecture | None, source: str) -> str:
    if arch is None:
        return f"{role}: unknown"
    active = f", {human_count(arch.active_params())} active" if arch.is_moe else ""
    return (
        f"{role}: {arch.name} ({arch.model_type}, {human_count(arch.params())} params{active}, {arch.layers} layers,"
        f" {arch.heads}/{arch.kv_heads} heads, vocab {arch.vocab}) from {source}"
    )


def role_table(role: RoleMemory) -> Table:
    table = Table(title=f"{role.role}: {role.total_gib:.1f} / {role.budget_gib:g} GiB", title_justify="left")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for name, gib in role.components.items():
        table.add_row(name, f"{gib:.2f}")
    table.add_section()
    table.add_row("total", f"{role.total_gib:.2f}")
    headroom = role.headroom_gib
    table.add_row("headroom", f"[{'green' if headroom >= 0 else 'red'}]{headroom:.2f}[/]")
    if len(role.phases) > 1:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in role.phases.items())
        table.caption = f"peak phase: {role.peak_phase} (step-dependent GiB by phase: {phases})"
    for note in role.notes:
        table.caption = (table.caption + "; " if table.caption else "") + note
    return table


def render(plan: Plan, console: Console) -> None:
    cfg, lay, sh = plan.cfg, plan.layout, plan.shape
    console.print(_model_line("student", plan.student, plan.sources.get("student", "")))
    console.print(_model_line("teacher", plan.teacher, plan.sources.get("teacher", "")))
    console.print(
        f"layout: {lay.world} training GPUs ({cfg.cluster.nodes} x {cfg.cluster.gpus_per_node}, "
        f"{cfg.cluster.gpu_memory_gib:g} GiB), TP={lay.tp} PP={lay.pp} VPP={lay.vpp} CP={lay.cp} EP={lay.ep}"
        f" DP={lay.dp} expert-DP={lay.edp} SP={'on' if lay.sequence_parallel else 'off'}; rollout={cfg.rollout}"
    )
    rows = f"packed after their rollouts: rows of {sh.branch_seq} tokens" if sh.packed else f"{sh.branch_rows} rows"
    console.print(
        f"step per DP rank: {sh.rollouts} rollouts in {sh.microbatches} micro-batches of {sh.micro_batch} x {sh.seq}"
        f" tokens; {sh.candidates} candidates, {sh.branches} branch sequences ({rows})"
    )
    for role in plan.roles:
        console.print(role_table(role))
    if plan.step_time is not None:
        st = plan.step_time
        table = Table(title=f"step time estimate: {st.total_s:,.1f} s", title_justify="left")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        table.add_column("PFLOP", justify="right")
        for name, sec in st.seconds.items():
            flops = st.flops.get(name)
            table.add_row(name, f"{sec:,.1f}", f"{flops / 1e15:,.1f}" if flops is not None else "-")
        table.caption = "; ".join(st.notes)
        console.print(table)
    if plan.checks:
        table = Table(title="preflight", title_justify="left")
        for col in ("check", "status", "detail"):
            table.add_column(col)
        colors = {"ok": "green", "not checked": "yellow", "error": "red"}
        for c in plan.checks:
            table.add_row(c.name, f"[{colors[c.status]}]{c.status}[/]", c.detail)
        console.print(table)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if plan.feasible:
        console.print("[bold green]feasible[/]")
    else:
        console.print("[bold red]infeasible:[/]")
        for r in plan.reasons():
            console.print(f"  - {r}")


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """Everything `render` shows, as plain JSON-able values."""

    def arch(a: Architecture | None) -> dict[str, Any] | None:
        if a is None:
            return None
        return dataclasses.asdict(a) | {"params": a.params(), "active_params": a.active_params()}

    st = plan.step_time
    return {
        "feasible": plan.feasible,
        "reasons": plan.reasons(),
        "warnings": plan.warnings,
        "student": arch(plan.student),
        "teacher": arch(plan.teacher),
        "sources": plan.sources,
        "layout": dataclasses.asdict(plan.layout) | {"dp": plan.layout.dp, "edp": plan.layout.edp},
        "step_shape": dataclasses.asdict(plan.shape),
        "roles": [
            {
                "role": r.role,
                "budget_gib": r.budget_gib,
                "total_gib": r.total_gib,
                "headroom_gib": r.headroom_gib,
                "components_gib": r.components,
                "peak_phase": r.peak_phase,
                "phases_gib": r.phases,
                "host_gib": r.host_bytes / GIB,
                "notes": r.notes,
            }
            for r in plan.roles
        ],
        "step_time": None
        if st is None
        else {"total_s": st.total_s, "seconds": st.seconds, "flops": st.flops, "notes": st.notes},
        "preflight": [dataclasses.asdict(c) for c in plan.checks],
    }


def render_layouts(layouts: list[Candidate], current: Plan, console: Console) -> None:
    """The best node splits of the cluster (plan/search.py), with the recipe's own layout for comparison."""
    now = current.step_time.total_s if current.step_time is not None else float("nan")
    total = current.cfg.cluster.total_nodes
    table = Table(
        title=f"best layouts on the same {total} nodes (recipe's layout: {now:,.0f} s per step)", title_justify="left"
    )
    for col in ("step s", "OPD s", "TOPD / OPD", "worst GPU GiB", "layout"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for c in layouts:
        worst = max((r.total_gib for r in c.plan.roles), default=0.0)
        tight = " (tight)" if c.tight else ""
        table.add_row(f"{c.step_s:,.0f}", f"{c.opd_s:,.0f}", f"{c.ratio:.2f}", f"{worst:.1f}{tight}", c.name)
    table.caption = (
        "OPD s: the same layout with the detector and guidance off; tight: less than"
        f" {SAFE_HEADROOM_GIB:g} GiB of headroom on some GPU (the planner's packed activations measure a few per cent"
        " low), not adopted by the recipes; set a layout with its cluster.*, sglang.* and student.* fields"
        " (docs/scale.md)"
    )
    console.print(table)


def layout_to_json(c: Candidate) -> dict[str, Any]:
    cfg = c.cfg
    return {
        "name": c.name,
        "step_s": c.step_s,
        "opd_s": c.opd_s,
        "ratio": c.ratio,
        "headroom_gib": c.headroom_gib,
        "tight": c.tight,
        "cluster": dataclasses.asdict(cfg.cluster),
        "student_servers": cfg.sglang.student.servers,
        "teacher_servers": cfg.sglang.teacher.servers if cfg.sglang.teacher is not None else 0,
        "colocate": cfg.sglang.colocate,
        "student_attention": "local" if cfg.student.transformer_engine is False else "recipe",
        "student_recompute": cfg.student.recompute,
        "seconds": c.plan.step_time.seconds if c.plan.step_time is not None else {},
    }
