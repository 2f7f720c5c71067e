"""`topd plan RECIPE [--set KEY=VALUE ...] [--strict] [--json-out PATH] [--device cuda|cpu] [--top N]`: memory per rank
role, step-time estimate and preflight of a recipe on its cluster, before any GPU time, then the best node splits of
the same cluster (plan/search.py: training vs student servers vs teacher servers vs time-sliced colocation), fastest
first. Exit 0 when the recipe's layout is feasible, 2 (with the reasons) when not.

    python -m topd_megatron.plan.cli llama3_8b_from_70b --set parallel.tp=4
    main(["topd_70b", "--json-out", "plan.json"])         # the argv after `plan`

`add_arguments(parser)` and `run(args)` let another argparse program mount the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from topd_megatron import recipes
from topd_megatron.plan.feasibility import plan
from topd_megatron.plan.report import layout_to_json, plan_to_json, render, render_layouts
from topd_megatron.plan.search import search_layouts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name (see recipes/): tiny, qwen3_4b_from_30b_a3b, ...")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set parallel.tp=4 (repeatable)",
    )
    parser.add_argument("--strict", action="store_true", help="checkpoints, data or paths missing here are errors")
    parser.add_argument("--json-out", default=None, help="also write the plan as JSON here")
    parser.add_argument(
        "--top", type=int, default=5, help="show this many of the best node splits of the cluster (0: no search)"
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cuda: TransformerEngine layers and GPU loss chunks; cpu: Megatron-Core's local spec (gloo runs)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = recipes.get(args.recipe, args.set)
    except ValueError as e:
        print(f"topd plan: error: {e}", file=sys.stderr)
        return 2
    result = plan(cfg, strict=args.strict, device=args.device)
    console = Console()
    render(result, console)
    layouts = search_layouts(cfg, device=args.device)[: args.top] if args.top > 0 else []
    if layouts:
        render_layouts(layouts, result, console)
    if args.json_out:
        data = plan_to_json(result) | {"layouts": [layout_to_json(c) for c in layouts]}
        Path(args.json_out).write_text(json.dumps(data, indent=2) + "\n")
    if result.feasible:
        return 0
    for reason in result.reasons():
        print(f"topd plan: infeasible: {reason}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topd plan", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
