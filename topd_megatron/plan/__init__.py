"""The planner behind `topd plan`: per-GPU memory of every rank role, a step-time estimate and preflight checks for a
RunConfig on its ClusterConfig, from config files only (docs/scale.md has the formulas and their validation).

    architecture.py   model shapes from config.json (or the public table) and exact parameter counts
    layout.py         parallel sizes and the step's shapes per data-parallel rank
    memory.py         GiB per component for each rank role
    step_time.py      FLOPs at MFU, HBM-bound decoding
    preflight.py      checkpoints, tokenizer identity, data files, output directory
    feasibility.py    plan(cfg) -> Plan: the verdict and its reasons
    report.py         rich tables and JSON
    cli.py            `topd plan RECIPE [--set KEY=VALUE ...] [--strict] [--json-out PATH]`
"""

from topd_megatron.plan.feasibility import Plan, plan

__all__ = ["Plan", "plan"]
