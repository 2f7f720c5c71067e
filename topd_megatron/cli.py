"""The `topd` command.

    topd run tiny [--tp 2] [--pp 1] [--steps 30] [--seeds 1] [--rollout embedded|sglang] [--json-out PATH]
                                                         the main job: OPD vs TOPD on the tiny embedded default
    topd train (--config FILE | --recipe NAME) [--set KEY=VALUE ...]   train or resume one run
    topd plan RECIPE [--set KEY=VALUE ...] [--strict]  memory per GPU role, step time, preflight (exit 2: infeasible)
    topd eval --model PATH --benchmarks aime24,aime25 --k 16   avg@k / pass@k through SGLang or the embedded engine
    topd prepare [--task module:attr] [--force]          SFT the tiny teacher/student pair for a task (cached)
    topd agree --student DIR --teacher DIR [--tp N]      per-position student/teacher agreement on any pair

On one machine, `topd` starts the ranks itself (gloo on CPU, NCCL on GPU). Under torchrun or srun (RANK/WORLD_SIZE or
SLURM_PROCID set), it runs as one rank of the launched job instead:

    torchrun --nproc-per-node 8 -m topd_megatron.cli agree --student S --teacher T --tp 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from topd_megatron import recipes
from topd_megatron.algorithm.objective import PRESETS
from topd_megatron.analysis import agreement, experiment
from topd_megatron.analysis.prepare import PrepareConfig, prepare
from topd_megatron.config import config_from_dict
from topd_megatron.distributed.env import dist_env
from topd_megatron.distributed.launch import launched_externally, run_ranks
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation import cli as eval_cli
from topd_megatron.logs import quiet_third_party
from topd_megatron.models.build import ModelConfig, check_layout
from topd_megatron.models.checkpoint import check_checkpoint_files, check_resumable, latest_checkpoint
from topd_megatron.models.format import checkpoint_kind, hf_dir
from topd_megatron.models.tokenizer import check_same_tokenizer
from topd_megatron.overrides import apply_overrides
from topd_megatron.plan import cli as plan_cli
from topd_megatron.tasks import load_task
from topd_megatron.training.loop import check_prompt_lengths, train, training_layout
from topd_megatron.training.preemption import REQUEUE_EXIT_CODE, read_marker

DEFAULT_TASK = "topd_megatron.tasks.drift:default"


def _print_agreement(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="student vs teacher, per response position (example 0)")
    for col in ("pos", "token", "student top-1", "teacher top-1", "agree", "KL(s||t)", "log p_s", "log p_t"):
        table.add_column(col, justify="right" if col not in ("token", "student top-1", "teacher top-1") else "left")
    for p in report["positions"]:
        if p["example"] != 0:
            continue
        table.add_row(
            str(p["position"]),
            repr(p["token"]),
            repr(p["student_top"]),
            repr(p["teacher_top"]),
            "yes" if p["agree"] else "no",
            f"{p['reverse_kl']:.4f}",
            f"{p['student_logprob']:.3f}",
            f"{p['teacher_logprob']:.3f}",
        )
    console.print(table)
    layout = report["layout"]
    console.print(
        f"layout TP={layout['tp']} PP={layout['pp']} on {layout['world']} ranks; vocabulary {report['vocab_size']}"
        f" ({report['padded_vocab_size']} rows); {report['response_tokens']} response tokens:"
        f" top-1 agreement {report['top1_agreement']:.3f}, mean reverse KL {report['mean_reverse_kl']:.4f}"
    )


def cmd_agree(args: argparse.Namespace, student: str, teacher: str) -> int:
    cfg = agreement.AgreementConfig(
        student=ModelConfig(path=student, dtype=args.dtype),
        teacher=ModelConfig(path=teacher, dtype=args.dtype),
        parallel=ParallelConfig(tp=args.tp, pp=args.pp),
    )
    _preflight(cfg)
    report = run_ranks(agreement.run, args.tp * args.pp, cfg, timeout=args.timeout)
    if report is None:
        return 0
    _print_agreement(report)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def _preflight(cfg: Any) -> None:
    """Cheap checks before any rank starts: checkpoints complete, layouts valid, tokenizers identical."""
    from transformers import AutoConfig

    dirs = {}
    for role in ("student", "teacher"):
        mcfg = getattr(cfg, role)
        dirs[role] = hf_dir(mcfg.path)
        check_layout(AutoConfig.from_pretrained(dirs[role], local_files_only=True), cfg.parallel, mcfg, role)
    check_same_tokenizer(dirs["student"], dirs["teacher"])


RUN_OPTIONS = ("tp", "pp", "steps", "seeds", "workers", "lr", "task", "out_dir", "rollout", "sync_mode")


def cmd_run_tiny(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name) is not None}
    if args.arms is not None:
        given["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    cfg = experiment.TinyConfig(**given)  # the defaults of every option not given are TinyConfig's
    results = experiment.run_tiny(cfg, world_timeout=args.timeout)
    experiment.print_table(results)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=experiment.json_default) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def load_run_config(args: argparse.Namespace) -> Any:
    """The RunConfig of `--config FILE` or `--recipe NAME`, with every `--set KEY=VALUE` applied."""
    if args.recipe:
        return recipes.get(args.recipe, args.set)
    path = Path(args.config)
    if not path.is_file():
        raise ValueError(f"--config {path} does not exist")
    return apply_overrides(config_from_dict(json.loads(path.read_text())), args.set)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    if args.recipe and not launched_externally():
        if recipes.recipe(args.recipe).needs_tiny_pair:
            prepare()  # cached; under torchrun/srun the launcher runs `topd prepare` once before starting ranks
    for role in ("student", "teacher"):
        checkpoint_kind(getattr(cfg, role).path)  # a missing or partial checkpoint fails before any rank starts
    task = load_task(cfg.task)
    check_prompt_lengths(cfg, task, task.train_problems(cfg.train.problem_pool, seed=cfg.train.seed))
    world = cfg.parallel.tp * cfg.parallel.pp * args.dp
    if launched_externally():
        world = int(dist_env()["WORLD_SIZE"])
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is not None:  # a run to resume: its checkpoint must load at this layout and run no code when read
        check_resumable(ckpt, training_layout(cfg, world))
        check_checkpoint_files(ckpt)
    report = run_ranks(
        train,
        cfg.parallel.tp * cfg.parallel.pp * args.dp,
        cfg,
        timeout=args.timeout,
        forward_signals=cfg.train.stop_signals,  # `kill -TERM <topd pid>` reaches the ranks it started
    )
    if report is not None:
        print(json.dumps(report, indent=2, default=str))
    stopped = read_marker(cfg.run_dir)
    if stopped is not None:
        print(
            f"topd: stopped on {stopped['signal']} after step {stopped['step']} with a checkpoint; run the same"
            f" command again to resume (exit code {REQUEUE_EXIT_CODE}: requeue)",
            file=sys.stderr,
        )
        return REQUEUE_EXIT_CODE
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    prepared = prepare(PrepareConfig(task=args.task), force=args.force)
    report = prepared.report
    for role in ("teacher", "student"):
        r = report[role]
        print(
            f"{role}: {r['params']} parameters, accuracy {r['accuracy']:.3f} (avg@{r['eval_k']},"
            f" T={r['eval_temperature']}; greedy {r['greedy_accuracy']:.3f}) on {r['eval_problems']} held-out problems"
        )
    print(f"prepared in {prepared.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="topd", description="TOPD: trajectory-aware on-policy distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (ranks on this machine: tp*pp)")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
        p.add_argument("--json-out", default=None, help="also write the results as JSON here")
        p.add_argument("--timeout", type=float, default=3600.0, help="seconds before a hung run is stopped")

    run = sub.add_parser("run", help="run a named job; `tiny` compares OPD, TOPD and controls on the embedded default")
    run.add_argument("recipe", choices=["tiny"])
    defaults = experiment.TinyConfig()
    run.add_argument("--tp", type=int, default=None, help=f"tensor-parallel size of every run [{defaults.tp}]")
    run.add_argument("--pp", type=int, default=None, help=f"pipeline-parallel size of every run [{defaults.pp}]")
    run.add_argument("--workers", type=int, default=None, help=f"runs side by side [{defaults.workers}]")
    run.add_argument("--steps", type=int, default=None, help=f"training steps per run [{defaults.steps}]")
    run.add_argument("--seeds", type=int, default=None, help=f"training seeds per arm [{defaults.seeds}]")
    run.add_argument("--lr", type=float, default=None, help=f"learning rate of every arm [{defaults.lr}]")
    run.add_argument("--arms", default=None, help=f"comma-separated presets to train [all: {', '.join(PRESETS)}]")
    run.add_argument("--task", default=None, help=f"task as module:attr [{defaults.task}]")
    run.add_argument("--out-dir", default=None, help=f"metrics, TensorBoard logs and plots [{defaults.out_dir}]")
    run.add_argument("--rollout", default=None, choices=["embedded", "sglang"], help="where rollouts are sampled")
    run.add_argument(
        "--sync-mode",
        default=None,
        choices=["disk", "tensor", "distributed"],
        help="with --rollout sglang: how the student's weights reach its server after every step",
    )
    run.add_argument("--json-out", default=None, help="also write the results as JSON here")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds before a hung run is stopped")
    tr = sub.add_parser("train", help="train (or resume) one run from a RunConfig JSON file")
    source = tr.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="JSON of a topd_megatron.config.RunConfig (dataclasses.asdict)")
    source.add_argument("--recipe", help="a recipe name (see recipes/): tiny, qwen3_4b_from_30b_a3b, ...")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set train.steps=2 (repeatable)",
    )
    tr.add_argument("--dp", type=int, default=1, help="data-parallel replicas when topd starts the ranks itself")
    tr.add_argument("--timeout", type=float, default=86400.0, help="seconds before a hung run is stopped")
    prep = sub.add_parser("prepare", help="SFT the tiny teacher and student for a task (cached)")
    prep.add_argument("--task", default=DEFAULT_TASK, help="task as module:attr")
    prep.add_argument("--force", action="store_true", help="redo it even if a cached preparation exists")
    plan = sub.add_parser("plan", help="memory per GPU role, step time and preflight of a recipe, before GPU time")

    plan_cli.add_arguments(plan)
    eval_cli.add_arguments(sub.add_parser("eval", help="avg@k / pass@k on math benchmarks through the rollout engine"))
    agree = sub.add_parser("agree", help="per-position student/teacher agreement on a pair of checkpoints")
    agree.add_argument("--student", required=True, help="HF or topd checkpoint directory")
    agree.add_argument("--teacher", required=True, help="HF or topd checkpoint directory")
    agree.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common(agree)

    args = parser.parse_args(argv)

    quiet_third_party()
    try:
        if args.command == "run":
            return cmd_run_tiny(args)
        if args.command == "prepare":
            return cmd_prepare(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "plan":
            return plan_cli.run(args)
        if args.command == "eval":
            return eval_cli.run(args)
        return cmd_agree(args, args.student, args.teacher)
    except ValueError as e:  # configuration and input errors: one clear message, no traceback
        print(f"topd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
