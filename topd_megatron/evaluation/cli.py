"""`topd eval --model PATH --benchmarks aime24,aime25 --k 16 [...]`: sample k completions per benchmark problem
through a rollout engine, grade them, print avg@k/pass@k per benchmark and write records, summary and (--plot) a plot.

    python -m topd_megatron.evaluation.cli --model ckpts/qwen3-1p7b --benchmarks aime24,math500 --k 16
    python -m topd_megatron.evaluation.cli --model M --benchmarks gsm8k --limit 5 --rollout embedded --tp 2
    torchrun --nproc-per-node 8 -m topd_megatron.evaluation.cli --model M --tp 2      # 4 data-parallel replicas

On one machine the command starts tp * pp * dp ranks itself (gloo on CPU, NCCL on GPU); under torchrun or srun it
runs as one rank of the launched job. Bad input (unknown benchmark, missing model, k < 1, a prompt the chat template
cannot render) exits 2 with one message before any rank starts. `add_arguments(parser)` and `run(args)` let
another argparse program mount the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from topd_megatron.distributed.launch import run_ranks
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.prompting import DEFAULT_INSTRUCTION, PromptConfig
from topd_megatron.evaluation.runner import EvalRunConfig, preflight, run_eval, student_server
from topd_megatron.logs import quiet_third_party


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory or topd checkpoint")
    parser.add_argument(
        "--benchmarks",
        default="aime24,aime25",
        help="comma-separated: aime24, aime25, math500, gsm8k or .jsonl paths, each optionally NAME:RULE"
        " (rule boxed or gsm8k)",
    )
    parser.add_argument("--k", type=int, default=16, help="completions sampled per problem")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout", default="sglang", choices=["sglang", "embedded"], help="where samples come from")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the Megatron model")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the Megatron model")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas when topd starts the ranks itself")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--sglang-url", default=None, help="attach to this running SGLang server (its weights become the model's)"
    )
    parser.add_argument("--sglang-tp", type=int, default=1, help="tensor-parallel size of the started SGLang server")
    parser.add_argument("--out-dir", default="runs/eval", help="records/, summary.json, avg_at_k.png, sglang/ logs")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="appended to every problem ('' for none)")
    parser.add_argument("--system", default=None, help="a system message (default: the chat template's own)")
    thinking = parser.add_mutually_exclusive_group()
    thinking.add_argument(
        "--enable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=True,
        default=None,
        help="Qwen3 hybrid templates: think before answering",
    )
    thinking.add_argument(
        "--no-thinking", dest="enable_thinking", action="store_const", const=False, help="Qwen3: answer directly"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of every benchmark")
    parser.add_argument("--grade-timeout", type=int, default=5, help="seconds math-verify may spend on one answer")
    parser.add_argument("--plot", action="store_true", help="also write avg_at_k.png")
    parser.add_argument("--json-out", default=None, help="also write the summary here")
    parser.add_argument("--timeout", type=float, default=86400.0, help="seconds before a hung run is stopped")


def config_from_args(args: argparse.Namespace) -> Any:
    """The EvalRunConfig the arguments describe (ValueError on bad values)."""
    if args.dp < 1:
        raise ValueError(f"--dp must be >= 1, got {args.dp}")
    custom_server = args.sglang_url or args.sglang_tp != 1
    sglang = student_server(args.dtype, tp=args.sglang_tp, url=args.sglang_url) if custom_server else None
    return EvalRunConfig(
        model=args.model,
        benchmarks=tuple(b.strip() for b in args.benchmarks.split(",") if b.strip()),
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prompt=PromptConfig(instruction=args.instruction, system=args.system, enable_thinking=args.enable_thinking),
        rollout=args.rollout,
        sglang=sglang,
        parallel=ParallelConfig(tp=args.tp, pp=args.pp),
        dtype=args.dtype,
        out_dir=args.out_dir,
        grade_timeout_s=args.grade_timeout,
        limit=args.limit,
        plot=args.plot,
    )


def _fmt(mean: float, stderr: float | None) -> str:
    return f"{mean:.3f}" if stderr is None else f"{mean:.3f} ± {stderr:.3f}"


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """One row per benchmark and the macro average: avg@k and pass@j ± standard error, status counts."""
    k = summary["k"]
    pass_keys = [key for key in summary["macro"] if key.startswith("pass@") and not key.endswith("_stderr")]
    s = summary["sampling"]
    table = Table(
        title=f"{summary['model']}",
        caption=f"{summary['rollout']} rollouts: k={k}, T={s['temperature']}, top-p={s['top_p']},"
        f" max_new_tokens={s['max_new_tokens']}, seed={s['seed']}; ± is the standard error over problems",
    )
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for key in (f"avg@{k}", *pass_keys):
        table.add_column(key, justify="right")
    for col in ("no answer", "unparsable", "timeout", "truncated", "mean tokens"):
        table.add_column(col, justify="right")
    for name, b in summary["benchmarks"].items():
        st = b["statuses"]
        table.add_row(
            name,
            str(b["problems"]),
            *(_fmt(b[key], b[f"{key}_stderr"]) for key in (f"avg@{k}", *pass_keys)),
            str(st["no_answer"]),
            str(st["unparsable"]),
            str(st["timeout"]),
            str(b["truncated"]),
            f"{b['mean_response_tokens']:.1f}",
        )
    m = summary["macro"]
    table.add_section()
    table.add_row(
        "macro average",
        "",
        *(_fmt(m[key], m[f"{key}_stderr"]) for key in (f"avg@{k}", *pass_keys)),
        *([""] * 5),
    )
    console.print(table)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        preflight(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"topd eval: error: {e}", file=sys.stderr)
        return 2
    world = cfg.parallel.tp * cfg.parallel.pp * args.dp
    report = run_ranks(run_eval, world, cfg, timeout=args.timeout)
    if report is None:  # a non-zero rank of a torchrun/srun job
        return 0
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for every column instead of 80
        console = Console(width=160)
    print_summary(report, console)
    print(f"records and summary in {cfg.out_dir}")
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topd eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)

    quiet_third_party()
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
