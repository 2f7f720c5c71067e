"""Benchmark (not a test): the training step of OPD and of each TOPD preset on the tiny prepared pair, phase by phase,
with each arm's ratio to OPD measured in the same run.

Every arm trains the same student (the pair `topd prepare` makes, cached under ~/.cache/topd-megatron/prepared/) for
`--steps` steps on `--tp` x `--pp` gloo ranks (one CPU thread each) through the real loop
(`topd_megatron.training.loop.train`, the settings of `topd run tiny`: 16 prompts x 2 rollouts per step, K = 8, each
arm's tuned learning rate; tau the per-step quantile, as without the oracle's calibration), one arm after the other,
repeated for `--rounds` rounds in alternating order so that a change of machine load hits every arm alike. It reads
the step's own timers from each run's metrics.jsonl (the first step of every run is dropped: warm-up), and prints per
phase the median seconds over all kept steps of all rounds, the spread (min-max of the per-round medians) and the
ratio of the arm's median step time to OPD's:

    time/rollout_s        student rollouts (the embedded engine, or SGLang with --rollout sglang)
    time/score_s          teacher logits + the detector's no-grad student pass (d_t)
    time/detect_s         candidates, D_t; window_ot samples its teacher windows here (time/windows_s of it)
    time/branch_score_s   teacher_window guidance: the branch rows (packed) and the teacher's scores of them
    time/backward_s       forward + backward: one pass over packed rows (two passes per-branch)
    time/update_s         optimizer step
    time/windows_s        of the above, the engine sampling teacher (and fresh student) windows
    time/step_s           the whole step, weight sync included
and the tokens the branch training adds to the rollouts' pass over the rollout tokens (guidance/train_tokens /
step/rollout_tokens: the packed window columns, or the whole-prefix rows with `topd:rows`).

Run from the repository root (every preset by default, about 10-15 minutes on 2 CPU cores; the prepared pair is made
first if it is not cached, about 5 minutes more):
    .venv/bin/python bench/step_time.py
    .venv/bin/python bench/step_time.py --arms opd,topd --steps 6 --rounds 3 --markdown
    .venv/bin/python bench/step_time.py --with-rows       # also topd on one whole-prefix row per window, same rounds
    .venv/bin/python bench/step_time.py --json-out step_time.json
The recorded results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_megatron.analysis.experiment import DEFAULT_ARMS, TinyConfig, run_config  # noqa: E402
from topd_megatron.analysis.prepare import prepare  # noqa: E402
from topd_megatron.distributed.launch import spawn  # noqa: E402
from topd_megatron.training.loop import train  # noqa: E402
from topd_megatron.training.metrics import read_metrics  # noqa: E402

PHASES = (
    "time/rollout_s",
    "time/score_s",
    "time/detect_s",
    "time/branch_score_s",
    "time/backward_s",
    "time/update_s",
    "time/windows_s",
    "time/step_s",
)


ROWS = ":rows"
"""An arm ending in this runs teacher_window guidance on one whole-prefix row per window (no pack_guidance)."""


def run_arm(cfg: TinyConfig, arm: str, out: Path, *, packed: bool) -> list[dict[str, float]]:
    """Train one arm for cfg.steps steps; its train metrics, warm-up step dropped."""
    prepared = prepare(dataclasses.replace(cfg.prepare, task=cfg.task))
    preset = arm.removesuffix(ROWS)
    rc = run_config(cfg, prepared.student_dir, prepared.teacher_dir, preset, seed=0, taus={})
    rc.run_dir = str(out / arm.replace(":", "-"))
    rc.train.eval_every = 0
    rc.train.pack_guidance = packed and not arm.endswith(ROWS)
    rc.eval = dataclasses.replace(rc.eval, problems=1, k=1)  # the one evaluation after the last step: negligible
    spawn(train, cfg.tp * cfg.pp, (rc,), timeout=3600.0)
    return read_metrics(rc.run_dir, "train")[1:]


def summarize(per_round: dict[str, list[list[dict[str, float]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> phase -> median (over all kept steps), lo / hi (min / max of the per-round medians)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm, rounds in per_round.items():
        out[arm] = {}
        for phase in PHASES + ("guidance/train_tokens", "step/rollout_tokens", "sglang/cached_token_share"):
            steps = [m[phase] for r in rounds for m in r if m.get(phase) is not None]
            if not steps:
                continue
            medians = [statistics.median([m[phase] for m in r if m.get(phase) is not None]) for r in rounds if r]
            out[arm][phase] = {"median": statistics.median(steps), "lo": min(medians), "hi": max(medians)}
    return out


def render(summary: dict[str, dict[str, dict[str, float]]], markdown: bool) -> str:
    opd = summary.get("opd", {}).get("time/step_s", {}).get("median")
    cols = [p.removeprefix("time/").removesuffix("_s") for p in PHASES]
    lines = []
    head = ["arm", *cols, "x OPD", "branch tokens / rollout tokens"]
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append("  ".join(f"{h:>14}" for h in head))
    for arm, phases in summary.items():
        cells = []
        for p in PHASES:
            v = phases.get(p)
            cells.append("-" if v is None else f"{v['median']:.2f} ({v['lo']:.2f}-{v['hi']:.2f})")
        step = phases.get("time/step_s", {}).get("median")
        ratio = f"{step / opd:.2f}" if opd and step else "-"
        tok = phases.get("guidance/train_tokens", {}).get("median")
        roll = phases.get("step/rollout_tokens", {}).get("median")
        share = f"{tok / roll:.2f}" if tok is not None and roll else "-"
        row = [arm, *cells, ratio, share]
        lines.append("| " + " | ".join(row) + " |" if markdown else "  ".join(f"{c:>14}" for c in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated presets; opd is always run")
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="repeat every arm this many times, alternating order")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rollout", choices=["embedded", "sglang"], default="embedded")
    parser.add_argument("--unpacked", action="store_true", help="every arm on one whole-prefix row per window")
    parser.add_argument("--with-rows", action="store_true", help="also run topd on whole-prefix rows (topd:rows)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    arms = ["opd"] + [a for a in args.arms.split(",") if a and a != "opd"]
    if args.with_rows:
        arms.append("topd" + ROWS)
    presets = tuple(dict.fromkeys(a.removesuffix(ROWS) for a in arms))
    cfg = TinyConfig(arms=presets, steps=args.steps, tp=args.tp, pp=args.pp, rollout=args.rollout)
    per_round: dict[str, list[list[dict[str, float]]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="topd-bench-step-") as tmp:
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for arm in order:
                print(f"[bench] round {r + 1}/{args.rounds}: {arm}", file=sys.stderr, flush=True)
                per_round[arm].append(run_arm(cfg, arm, Path(tmp) / f"round{r}", packed=not args.unpacked))
    summary = summarize(per_round)
    print(
        f"steps per run {args.steps} (first dropped), rounds {args.rounds}, TP={args.tp} PP={args.pp},"
        f" rollout={args.rollout}, guidance {'per-branch rows' if args.unpacked else 'packed'};"
        " median seconds (min-max of the per-round medians)"
    )
    print(render(summary, args.markdown))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
