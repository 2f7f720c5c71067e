"""The tuning study behind `topd run tiny`'s learning rates: the same grid for every arm, on a validation draw.

    python tools/tune_tiny.py --out runs/tune                      # every arm, lr grid 1e-4 2e-4 4e-4 8e-4, 2 seeds
    python tools/tune_tiny.py --arms opd --lrs 1e-4,3e-4,1e-3 --seeds 2 --steps 40 --out runs/tune-opd

Every arm gets the same budget: the same learning rates, seeds and steps, evaluated on held-out draw 1
(`TinyConfig.eval_problem_seed=1`), never on the draw the job reports (draw 0). For each arm the learning rate with the
highest mean validation avg@k (T=1) is selected; ties go to the smaller rate. Prints one line per (arm, lr) and writes
`<out>/tuning.json` with every run's validation figures and the selection (docs/tiny.md records it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from topd_megatron.algorithm.objective import PRESETS
from topd_megatron.analysis.experiment import TinyConfig, json_default, run_tiny


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(PRESETS))
    parser.add_argument("--lrs", default="1e-4,2e-4,4e-4,8e-4")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=TinyConfig().steps)
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args(argv)
    arms = tuple(a for a in args.arms.split(",") if a)
    if "opd" not in arms:
        arms = ("opd", *arms)
    lrs = [float(x) for x in args.lrs.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid: dict[str, dict[str, dict]] = {}
    for lr in lrs:
        cfg = TinyConfig(
            arms=arms,
            seeds=args.seeds,
            steps=args.steps,
            lr=lr,
            eval_problems=args.eval_problems,
            eval_problem_seed=1,
            out_dir=str(out / f"lr{lr:g}"),
        )
        results = run_tiny(cfg)
        for row in results["table"]:
            entry = {m: row[m]["mean"] for m in ("avg", "greedy")}
            entry["per_seed"] = [results["runs"][f"{row['arm']}-seed{s}"]["avg"] for s in range(args.seeds)]
            grid.setdefault(row["arm"], {})[f"{lr:g}"] = entry
            print(f"[tune] {row['arm']:22s} lr {lr:g}: validation avg {entry['avg']:.3f} greedy {entry['greedy']:.3f}")
        grid.setdefault("_start", {})[f"{lr:g}"] = results["references"]["student_start"]
    selected = {
        arm: min(by_lr, key=lambda lr: (-round(by_lr[lr]["avg"], 6), float(lr)))
        for arm, by_lr in grid.items()
        if not arm.startswith("_")
    }
    summary = {
        "grid": grid,
        "selected_lr": selected,
        "protocol": dataclasses.asdict(cfg) | {"lrs": lrs},
        "rule": "highest mean validation avg@k (T=1) over seeds; ties to the smaller learning rate",
    }
    (out / "tuning.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    for arm, lr in selected.items():
        print(f"[tune] selected {arm}: lr {lr} (validation avg {statistics.fmean(grid[arm][lr]['per_seed']):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
