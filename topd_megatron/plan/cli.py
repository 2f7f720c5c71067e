"""`topd plan RECIPE [--set KEY=VALUE ...] [--strict] [--json-out PATH] [--device cuda|cpu]`: memory per rank role,
step-time estimate and preflight of a recipe on its cluster, before any GPU time. Exit 0 when feasible, 2 (with the
reasons) when not.

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
from topd_megatron.plan.report import plan_to_json, render


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
    render(result, Console())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(plan_to_json(result), indent=2) + "\n")
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
