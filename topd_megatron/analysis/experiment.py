"""`topd run tiny`: OPD and TOPD compared on the tiny embedded default, with the paper's diagnostics.

    topd run tiny [--tp 2 --pp 1 --steps 30 --seeds 1 --json-out PATH]

1. prepare the tiny teacher/student pair for the task (cached, see `topd_megatron.analysis.prepare`);
2. train the same student initialisation with each arm (`opd`, `opd_suppress`, `topd`, `topd_lookahead`) and each
   seed, on tp*pp gloo ranks, evaluating avg@k on held-out problems during and after training;
3. label the student's high-loss tokens with the oracle (`topd_megatron.analysis.oracle`) and score both detectors;
4. print the table (accuracy +- stderr, share of non-divergent candidates, detector precision/recall, step time and
   overhead against OPD), write metrics (JSONL, TensorBoard per run), plots and `--json-out`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from topd_megatron.algorithm import objective
from topd_megatron.analysis.oracle import OracleConfig, run_oracle
from topd_megatron.analysis.plots import plot_accuracy, plot_heatmap
from topd_megatron.analysis.prepare import PrepareConfig, prepare
from topd_megatron.choices import check_choices
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.launch import spawn
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.task_eval import EvalConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.rollout.sglang.weight_sync import SyncMode
from topd_megatron.seeds import arm_parallel_seed
from topd_megatron.training.loop import train
from topd_megatron.training.metrics import read_metrics
from topd_megatron.training.optim import OptimConfig

DEFAULT_ARMS = ("opd", "opd_suppress", "topd", "topd_lookahead")
"""The arms of the main job (a subset of objective.PRESETS)."""


def arm_detector(arm: str) -> str | None:
    """The detector a preset runs (None for plain OPD), read from the preset itself."""
    detector = objective.preset(arm).detection.detector
    return None if detector == "none" else detector


@dataclass(kw_only=True, slots=True)
class TinyConfig:
    """The tiny comparison; defaults finish in about 15 minutes on a 2-core CPU (preparation included)."""

    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 1
    tp: int = 2
    pp: int = 1
    steps: int = 30
    prompts_per_step: int = 16
    samples_per_prompt: int = 2
    micro_batch_size: int = 16
    lr: float = 3e-4
    window: int = 8
    """K, the detector/guidance window. The synthetic traces are ~24 tokens: the paper's K=50 would span them."""
    eval_problems: int = 100
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_every: int = 15
    oracle_prompts: int = 32
    task: str = "topd_megatron.tasks.synthetic:default"
    rollout: Literal["embedded", "sglang"] = "embedded"
    """'embedded' or 'sglang' (a student SGLang server per run, weights pushed after every step)."""
    sync_mode: SyncMode = "distributed"
    """Weight sync to the SGLang student server: 'disk', 'tensor' or 'distributed'."""
    out_dir: str = "runs/tiny"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in objective.PRESETS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {objective.PRESETS}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        check_choices(self)


def arm_objective(arm: str, window: int) -> objective.Config:
    cfg = objective.preset(arm)
    return dataclasses.replace(cfg, detection=dataclasses.replace(cfg.detection, window=window))


def run_config(cfg: TinyConfig, student: Path, teacher: Path, arm: str, seed: int, eval_at_start: bool) -> RunConfig:
    return RunConfig(
        student=ModelConfig(path=str(student), dtype="float32"),
        teacher=ModelConfig(path=str(teacher), dtype="float32"),
        run_dir=str(Path(cfg.out_dir) / f"{arm}-seed{seed}"),
        task=cfg.task,
        rollout=cfg.rollout,
        sglang=SGLangConfig(sync_mode=cfg.sync_mode),
        parallel=ParallelConfig(tp=cfg.tp, pp=cfg.pp, seed=arm_parallel_seed(seed)),
        objective=arm_objective(arm, cfg.window),
        optim=OptimConfig(lr=cfg.lr, clip_grad=1.0),
        train=TrainConfig(
            steps=cfg.steps,
            prompts_per_step=cfg.prompts_per_step,
            samples_per_prompt=cfg.samples_per_prompt,
            micro_batch_size=cfg.micro_batch_size,
            eval_every=cfg.eval_every,
            save_every=cfg.steps,
            seed=seed,
            eval_at_start=eval_at_start,
        ),
        eval=EvalConfig(
            problems=cfg.eval_problems,
            k=cfg.eval_k,
            temperature=cfg.eval_temperature,
            max_new_tokens=cfg.prepare.max_new_tokens,
        ),
    )


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summarize_run(run_dir: Path, k: int) -> dict[str, Any]:
    train = read_metrics(run_dir, "train")
    evals = read_metrics(run_dir, "eval")
    steady = train[1:] or train  # the first step pays one-off costs (warm-up)
    return {
        "curve": [(e["step"], e[f"avg@{k}"], e[f"avg@{k}_stderr"]) for e in evals],
        "final": evals[-1] if evals else {},
        "step_time_s": _mean([m["time/step_s"] for m in steady]),
        "non_divergent_share": _mean([m.get("detect/non_divergent_share") for m in train]),
        "train_loss_last": train[-1]["loss"] if train else math.nan,
    }


def run_tiny(cfg: TinyConfig, *, world_timeout: float = 3600.0) -> dict[str, Any]:
    """Run the whole comparison; returns the JSON-able results."""
    prepared = prepare(dataclasses.replace(cfg.prepare, task=cfg.task))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = cfg.tp * cfg.pp
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in cfg.arms}
    for seed in range(cfg.seeds):
        for i, arm in enumerate(cfg.arms):
            rc = run_config(cfg, prepared.student_dir, prepared.teacher_dir, arm, seed, eval_at_start=i == 0)
            print(f"[topd] seed {seed} arm {arm}: {cfg.steps} steps on {world} ranks -> {rc.run_dir}", flush=True)
            spawn(train, world, (rc,), timeout=world_timeout)
            runs[arm].append(summarize_run(Path(rc.run_dir), cfg.eval_k))
    # every arm starts from the same student and evaluates it with the same seed: one step-0 evaluation per seed
    for seed in range(cfg.seeds):
        start = [p for p in runs[cfg.arms[0]][seed]["curve"] if p[0] == 0]
        for arm in cfg.arms[1:]:
            runs[arm][seed]["curve"] = start + runs[arm][seed]["curve"]

    base = run_config(cfg, prepared.student_dir, prepared.teacher_dir, cfg.arms[0], 0, eval_at_start=False)
    ocfg = OracleConfig(
        prompts=cfg.oracle_prompts,
        objective=arm_objective("topd", cfg.window),
        max_new_tokens=cfg.prepare.max_new_tokens,
    )
    print(f"[topd] oracle: labelling the candidates of {cfg.oracle_prompts} student rollouts", flush=True)
    oracle = [r for r in spawn(run_oracle, world, (base, ocfg), timeout=world_timeout) if r is not None][0]

    results = compile_results(cfg, runs, oracle, prepared.report)

    results["plots"] = {
        "accuracy": str(plot_accuracy(runs, cfg.eval_k, out / "accuracy.png")),
        "heatmap": str(plot_heatmap(oracle["heatmap"], out / "divergence_heatmap.png")),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    return results


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


def compile_results(
    cfg: TinyConfig, runs: dict[str, list[dict[str, Any]]], oracle: dict[str, Any], prepare_report: dict[str, Any]
) -> dict[str, Any]:
    k = cfg.eval_k
    key = f"avg@{k}"
    opd_time = _mean([r["step_time_s"] for r in runs.get("opd", [])])
    table = []
    for arm, rs in runs.items():
        finals = [r["final"].get(key, math.nan) for r in rs]
        if len(finals) > 1:
            acc, err = statistics.mean(finals), statistics.stdev(finals) / math.sqrt(len(finals))
            err_kind = "over seeds"
        else:
            acc, err = finals[0], rs[0]["final"].get(f"{key}_stderr", math.nan)
            err_kind = "over problems"
        detector = arm_detector(arm)
        step_time = _mean([r["step_time_s"] for r in rs])
        table.append(
            {
                "arm": arm,
                key: acc,
                "stderr": err,
                "stderr_kind": err_kind,
                "non_divergent_share": _mean([r["non_divergent_share"] for r in rs]) if detector else None,
                "detector": detector,
                "precision": oracle[detector]["precision"] if detector else None,
                "recall": oracle[detector]["recall"] if detector else None,
                "auroc": oracle[detector]["auroc"] if detector else None,
                "step_time_s": step_time,
                "overhead_vs_opd": step_time / opd_time if opd_time and not math.isnan(opd_time) else None,
            }
        )
    start = runs[cfg.arms[0]][0]["curve"][0] if runs[cfg.arms[0]][0]["curve"] else None
    return {
        "config": dataclasses.asdict(cfg) | {"non_divergent_quantile": arm_objective("topd", cfg.window).detection.q_d},
        "student_start": {key: start[1], "stderr": start[2]} if start else None,
        "table": table,
        "oracle": {k_: v for k_, v in oracle.items() if k_ != "heatmap"},
        "prepare": {
            r: {"accuracy": prepare_report[r]["accuracy"], "params": prepare_report[r]["params"]}
            for r in ("teacher", "student")
        },
        "runs": runs,
    }


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    k = results["config"]["eval_k"]
    key = f"avg@{k}"
    oracle = results["oracle"]
    table = Table(
        title=f"TOPD on the tiny task: {key} on held-out problems (T={results['config']['eval_temperature']})"
    )
    for col in ("arm", key, "non-divergent", "detector P / R", "AUROC", "step time (s)", "x OPD"):
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)

    def f(x: Any, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for row in results["table"]:
        pr = f"{f(row['precision'], '.2f')} / {f(row['recall'], '.2f')}" if row["detector"] else "-"
        table.add_row(
            row["arm"],
            f"{row[key]:.3f} ± {f(row['stderr'], '.3f')}",
            f(row["non_divergent_share"], ".2f"),
            pr,
            f(row["auroc"], ".2f"),
            f(row["step_time_s"], ".2f"),
            f(row["overhead_vs_opd"], ".2f"),
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    q_d = results["config"]["non_divergent_quantile"]
    console.print(
        f"non-divergent: share of candidates judged surface form by the detector; with tau the {q_d} quantile of D"
        f" (detection.q_d) it is {q_d} by construction. P / R: the detector's precision and recall for real forks"
        " against the oracle; AUROC: P(D of a real fork > D of a surface mismatch), 0.5 = chance."
    )
    start = results["student_start"]
    if start:
        console.print(
            f"student before distillation: {key} {start[key]:.3f} ± {start['stderr']:.3f}; teacher"
            f" {results['prepare']['teacher']['accuracy']:.3f} (preparation check)"
        )
    console.print(
        f"oracle on {oracle['candidates']} high-loss tokens of the initial student: {oracle['forks']} real forks,"
        f" {oracle['surface']} surface mismatches, {oracle['unlabelled']} unlabelled -> surface share"
        f" {f(oracle['surface_share'], '.2f')} (paper: ~0.30)"
    )
    console.print(f"plots: {results['plots']['accuracy']}, {results['plots']['heatmap']}")
