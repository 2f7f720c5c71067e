"""`topd run tiny`: OPD, TOPD and controls on the tiny embedded default, with paired statistics over seeds.

    topd run tiny [--seeds 3 --steps N --arms opd,topd,... --workers 2 --json-out PATH]

1. prepare the tiny teacher, student and capacity-ceiling control for the task (cached, `analysis.prepare`);
2. calibrate: label two disjoint sets of initial-student rollouts with the oracle (`analysis.oracle`); each
   detector's tau is chosen on the first set and frozen, and the frozen detectors are scored on the second;
3. train every arm with every seed from the same student initialisation (Megatron-Core ranks through
   `training.loop.train`; `workers` runs side by side), and evaluate it on held-out problems at the end: avg@k at
   T=1 (the primary metric) and greedy accuracy, per problem;
4. evaluate the references with the same protocol: the initial student (per seed), the teacher, the capacity
   ceiling;
5. compare every arm with OPD seed by seed (paired differences and their 95% t intervals; an ordering is claimed only
   where the interval excludes 0), print the table, write `results.json`, metrics and plots.

The design and the pre-registered primary metric are in docs/tiny.md. Any `Task` runs (`--task module:attr`); the
oracle-detector arm needs a task that labels its choices (`tasks.LabelsChoices`) and is left out otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from topd_megatron.algorithm import objective
from topd_megatron.analysis.oracle import OracleConfig, run_oracle
from topd_megatron.analysis.plots import plot_final_accuracy, plot_heatmap
from topd_megatron.analysis.prepare import PrepareConfig, Prepared, prepare
from topd_megatron.analysis.statistics import Interval, t_interval, verdict
from topd_megatron.choices import check_choices
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.launch import spawn
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.evaluation.task_eval import EvalConfig, evaluate_task
from topd_megatron.models.build import ModelConfig
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.rollout.sglang.weight_sync import SyncMode
from topd_megatron.seeds import arm_parallel_seed
from topd_megatron.tasks import LabelsChoices, load_task
from topd_megatron.training.loop import train
from topd_megatron.training.metrics import read_metrics
from topd_megatron.training.optim import OptimConfig
from topd_megatron.training.session import EngineSpec, rank_session

DEFAULT_ARMS = objective.PRESETS
"""Every preset: the six methods (topd_budget: topd under a guidance budget) and the four controls
(objective.PRESETS)."""
PRIMARY = "avg"
"""The pre-registered primary metric: avg@k at T=1 on the held-out problems after the last step (docs/tiny.md)."""
RECORDS = "eval_records.jsonl"
TUNED_LR: dict[str, float] = {
    "opd": 1e-4,
    "opd_pg": 2e-4,
    "opd_suppress": 2e-4,
    "topd": 2e-4,
    "topd_lookahead": 4e-4,
    "topd_budget": 2e-4,
    "topd_upweight": 2e-4,
    "topd_random_windows": 2e-4,
    "topd_oracle": 2e-4,
    "opd_kl_discount": 2e-4,
}
"""Each arm's learning rate as selected by `python tools/tune_tiny.py` (the same grid 1e-4, 2e-4, 4e-4, 8e-4 for every
arm, 2 seeds, 60 steps, validation draw 1; docs/tiny.md "Tuning" records every figure)."""


def arm_detector(arm: str) -> str | None:
    """The detector a preset runs (None for plain OPD), read from the preset itself."""
    detector = objective.preset(arm).detection.detector
    return None if detector == "none" else detector


@dataclass(kw_only=True, slots=True)
class TinyConfig:
    """The tiny comparison; the defaults finish in about 15 minutes on 2 CPU cores (preparation included)."""

    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 3
    """Training seeds per arm (the unit of the paired comparison)."""
    steps: int = 60
    tp: int = 1
    pp: int = 1
    workers: int = 2
    """Runs side by side, each on tp*pp ranks with one CPU thread per rank."""
    prompts_per_step: int = 16
    samples_per_prompt: int = 2
    micro_batch_size: int = 32
    lr: float | None = None
    """Adam learning rate of every arm; None: each arm's rate from the tuning study (TUNED_LR, docs/tiny.md)."""
    clip_grad: float = 1.0
    window: int = 8
    """K, the detector/guidance window. The drift traces are ~27 tokens: the paper's K=50 would span them."""
    eval_problems: int = 256
    eval_problem_seed: int = 0
    """Which draw of held-out problems is evaluated (the tuning study validated on draw 1; the job reports draw 0)."""
    eval_k: int = 4
    eval_temperature: float = 1.0
    oracle_prompts: int = 64
    """Initial-student rollouts in each of the oracle's two sets (calibration, evaluation)."""
    task: str = "topd_megatron.tasks.drift:default"
    rollout: Literal["embedded", "sglang"] = "embedded"
    """'embedded' or 'sglang' (a student SGLang server per run, weights pushed after every step)."""
    sync_mode: SyncMode = "distributed"
    """Weight sync to the SGLang student server: 'disk', 'tensor' or 'distributed'."""
    out_dir: str = "runs/tiny"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)

    def __post_init__(self) -> None:
        check_choices(self)
        unknown = [a for a in self.arms if a not in objective.PRESETS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {objective.PRESETS}")
        if "opd" not in self.arms:
            raise ValueError("--arms must include opd: every arm is compared with it")
        if self.seeds < 1 or self.steps < 1 or self.workers < 1:
            raise ValueError(f"--seeds, --steps and --workers must be >= 1, got {self.seeds}, {self.steps}")


LEFT_OUT = "the task does not label its choices (tasks.LabelsChoices)"
"""Why an oracle-detector arm is left out of a job on a task that cannot label its choices."""


def expected_cost(arm: str) -> float:
    """A rough relative cost of one run of `arm` (for scheduling only): sampling near-future windows dominates (the
    detector's teacher and fresh student windows), then guidance branch rows, then the rest of an OPD step."""
    obj = objective.preset(arm)
    det = obj.detection
    windows = det.detector == "window_ot"
    cost = 1.0 + (2.0 if windows else 0.0) + (1.0 if windows and det.student_window == "fresh" else 0.0)
    if obj.guidance in ("teacher_window", "on_path"):
        cost += 1.0 + (0.5 if obj.guidance_at == "random" else 0.0)
    return cost


def arm_lr(cfg: TinyConfig, arm: str) -> float:
    """The learning rate `arm` trains with: the job's --lr if given, else the arm's tuned rate (OPD's by default)."""
    if cfg.lr is not None:
        return cfg.lr
    return TUNED_LR.get(arm, TUNED_LR["opd"])


def arm_objective(arm: str, window: int, taus: dict[str, float]) -> objective.Config:
    """The preset with the job's window and the detector's calibrated, frozen tau."""
    cfg = objective.preset(arm)
    tau = taus.get(cfg.detection.detector)
    det = dataclasses.replace(cfg.detection, window=window, tau=None if tau is None or math.isnan(tau) else tau)
    return dataclasses.replace(cfg, detection=det)


def eval_config(cfg: TinyConfig, seed: int) -> EvalConfig:
    """The evaluation protocol, with seed `seed`'s eval samples (the start and every arm of a seed share them)."""
    return EvalConfig(
        problems=cfg.eval_problems,
        problem_seed=cfg.eval_problem_seed,
        k=cfg.eval_k,
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.prepare.max_new_tokens,
        seed=1234 + 1000 * seed,
        greedy=True,
        records_file=RECORDS,
    )


def run_config(cfg: TinyConfig, student: Path, teacher: Path, arm: str, seed: int, taus: dict[str, float]) -> RunConfig:
    """One run of the comparison: `arm` with training seed `seed` on the prepared pair, tau frozen from `taus`."""
    return RunConfig(
        student=ModelConfig(path=str(student), dtype="float32"),
        teacher=ModelConfig(path=str(teacher), dtype="float32"),
        run_dir=str(Path(cfg.out_dir) / "runs" / f"{arm}-seed{seed}"),
        task=cfg.task,
        rollout=cfg.rollout,
        sglang=SGLangConfig(sync_mode=cfg.sync_mode),
        parallel=ParallelConfig(tp=cfg.tp, pp=cfg.pp, seed=arm_parallel_seed(seed), cpu_threads=1),
        objective=arm_objective(arm, cfg.window, taus),
        optim=OptimConfig(lr=arm_lr(cfg, arm), clip_grad=cfg.clip_grad),
        train=TrainConfig(
            steps=cfg.steps,
            prompts_per_step=cfg.prompts_per_step,
            samples_per_prompt=cfg.samples_per_prompt,
            micro_batch_size=cfg.micro_batch_size,
            max_new_tokens=cfg.prepare.max_new_tokens,
            eval_every=0,
            eval_at_start=False,
            save_checkpoints=False,
            seed=seed,
        ),
        eval=eval_config(cfg, seed),
    )


@dataclass(kw_only=True, slots=True)
class ReferenceJob:
    """Evaluate one fixed model with the job's protocol (the initial student, the teacher, the ceiling)."""

    name: str
    model: str
    run: RunConfig


def evaluate_reference(rank: int, world: int, job: ReferenceJob) -> list[dict[str, Any]] | None:
    """Rank body: the per-problem records of `job.model` (rank 0; None elsewhere)."""
    run = job.run
    engine = EngineSpec(kind="embedded", micro_batch_size=256, run_dir=run.run_dir)
    model = ModelConfig(path=job.model, dtype="float32")
    with rank_session(run.parallel, model, engine=engine) as session:
        _, records = evaluate_task(run.eval, session.engine, session.tokenizer, load_task(run.task), step_seed=0)
    return records if rank == 0 else None


def _final_records(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / RECORDS).read_text().splitlines() if line]
    last = max(r["step"] for r in rows)
    return [r for r in rows if r["step"] == last]


def accuracy(records: list[dict[str, Any]]) -> dict[str, float]:
    """avg@k (mean over problems of the share of correct samples) and greedy accuracy of per-problem records."""
    avg = statistics.fmean(sum(r["correct"]) / len(r["correct"]) for r in records)
    greedy = statistics.fmean(float(r["greedy_correct"]) for r in records)
    return {"avg": avg, "greedy": greedy}


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """A finished run: final accuracy, measured non-divergent share, step time and its phases (medians)."""
    train_rows = read_metrics(run_dir, "train")
    steady = train_rows[1:] or train_rows  # the first step pays one-off costs (warm-up)

    def median(key: str) -> float:
        values = [m[key] for m in steady if m.get(key) is not None]
        return statistics.median(values) if values else math.nan

    phases = ("rollout", "score", "detect", "branch_score", "backward", "update", "step")
    return {
        **accuracy(_final_records(run_dir)),
        "non_divergent_share": median("detect/non_divergent_share"),
        "guided_windows": median("guidance/windows"),
        "seconds": {p: median(f"time/{p}_s") for p in phases},
        "loss_last": train_rows[-1]["loss"] if train_rows else math.nan,
    }


class Scheduler:
    """Runs rank jobs `workers` at a time (each `spawn` is its own process tree)."""

    def __init__(self, workers: int, world: int, timeout: float) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.world, self.timeout = world, timeout

    def submit(self, fn: Any, arg: Any, label: str) -> Future:
        def job() -> Any:
            t0 = time.perf_counter()
            out = [r for r in spawn(fn, self.world, (arg,), timeout=self.timeout) if r is not None][0]
            print(f"[topd] {label} done in {time.perf_counter() - t0:.0f} s", flush=True)
            return out

        return self.pool.submit(job)


def run_tiny(cfg: TinyConfig, *, world_timeout: float = 3600.0) -> dict[str, Any]:
    """Run the whole comparison; returns the JSON-able results."""
    t_start = time.perf_counter()
    task = load_task(cfg.task)
    prepared = prepare(dataclasses.replace(cfg.prepare, task=cfg.task))
    budget = prepared.report.get("max_new_tokens", cfg.prepare.max_new_tokens)  # the task's longest trace + slack
    cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, max_new_tokens=budget))
    arms = [a for a in cfg.arms if arm_detector(a) != "oracle" or isinstance(task, LabelsChoices)]
    left_out = sorted(set(cfg.arms) - set(arms))
    if left_out:
        print(f"[topd] {', '.join(left_out)}: left out, {LEFT_OUT}", flush=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sched = Scheduler(cfg.workers, cfg.tp * cfg.pp, world_timeout)
    base = run_config(cfg, prepared.student_dir, prepared.teacher_dir, "opd", 0, {})
    ocfg = OracleConfig(
        prompts=cfg.oracle_prompts,
        objective=arm_objective("topd", cfg.window, {}),
        max_new_tokens=cfg.prepare.max_new_tokens,
    )
    oracle_run = dataclasses.replace(base, run_dir=str(out / "oracle"))
    oracle = sched.submit(_run_oracle, (oracle_run, ocfg), "oracle (calibration + detector scores)")
    # Longest jobs first, so that the last ones to finish are short (the order changes no number: every run is
    # seeded on its own). Only as many tau-free runs as there are other workers go before the oracle's tau is known.
    jobs = sorted(((a, s) for a in arms for s in range(cfg.seeds)), key=lambda j: -expected_cost(j[0]))
    needs_tau = {a for a in arms if arm_detector(a) in ("window_ot", "lookahead")}
    early = [j for j in jobs if j[0] not in needs_tau][: max(cfg.workers - 1, 0)]
    futures = {j: _submit_run(sched, cfg, prepared, *j, {}) for j in early}
    taus = oracle.result()["tau"]
    futures |= {j: _submit_run(sched, cfg, prepared, *j, taus) for j in jobs if j not in futures}
    refs = _submit_references(sched, cfg, prepared, base)
    runs = {key: f.result() for key, f in futures.items()}
    references = {name: accuracy(f.result()) for name, f in refs.items()}
    results = compile_results(cfg, arms, runs, references, oracle.result(), prepared.report)
    results["arms_left_out"] = {a: LEFT_OUT for a in left_out}
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["plots"] = {
        "accuracy": str(plot_final_accuracy(results, out / "accuracy.png")),
        "heatmap": str(plot_heatmap(oracle.result()["heatmap"], out / "divergence_heatmap.png")),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=json_default) + "\n")
    sched.pool.shutdown()
    return results


def _run_oracle(rank: int, world: int, args: tuple[RunConfig, OracleConfig]) -> dict[str, Any] | None:
    return run_oracle(rank, world, *args)


def _train_and_summarize(rank: int, world: int, rc: RunConfig) -> dict[str, Any] | None:
    train(rank, world, rc)
    return summarize_run(Path(rc.run_dir)) if rank == 0 else None


def _submit_run(sched: Scheduler, cfg: TinyConfig, prepared: Prepared, arm: str, seed: int, taus: dict) -> Future:
    rc = run_config(cfg, prepared.student_dir, prepared.teacher_dir, arm, seed, taus)
    (Path(rc.run_dir) / RECORDS).unlink(missing_ok=True)
    return sched.submit(_train_and_summarize, rc, f"{arm} seed {seed} ({cfg.steps} steps)")


def _submit_references(sched: Scheduler, cfg: TinyConfig, prepared: Prepared, base: RunConfig) -> dict[str, Future]:
    """The initial student under every seed's eval samples; the teacher and the ceiling under seed 0's."""
    jobs = {f"start-seed{s}": (str(prepared.student_dir), s) for s in range(cfg.seeds)}
    jobs["teacher"] = (str(prepared.teacher_dir), 0)
    if prepared.ceiling_dir is not None:
        jobs["ceiling"] = (str(prepared.ceiling_dir), 0)
    futures = {}
    for name, (model, seed) in jobs.items():
        run = dataclasses.replace(base, run_dir=str(Path(cfg.out_dir) / "references"), eval=eval_config(cfg, seed))
        futures[name] = sched.submit(evaluate_reference, ReferenceJob(name=name, model=model, run=run), name)
    return futures


def json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Interval):
        return o.as_dict()
    return str(o)


def _paired(runs: dict[tuple[str, int], dict], arm: str, other: str, seeds: int, metric: str) -> dict[str, Any]:
    """Per-seed differences arm - other on `metric`, their mean and 95% t interval, and the verdict."""
    diffs = [runs[arm, s][metric] - runs[other, s][metric] for s in range(seeds)]
    interval = t_interval(diffs)
    return {"per_seed": diffs, "interval": interval.as_dict(), "verdict": verdict(interval)}


CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("topd", "topd_upweight", "H3: the windows' content (same extra mass at the same positions, no window)"),
    ("topd", "topd_random_windows", "H3: the windows' placement (as many windows, at random positions)"),
    ("topd_oracle", "topd", "H4: detection (the task's own fork labels instead of window-OT)"),
    ("topd_budget", "topd", "H5: the guidance budget (at most B windows per rollout instead of every divergent one)"),
)
"""The comparisons between arms other than OPD (docs/tiny.md: H3 and H4 pre-registered, H5 added with the guidance
budget), run where both arms are in the job."""


def compile_results(
    cfg: TinyConfig,
    arms: list[str],
    runs: dict[tuple[str, int], dict[str, Any]],
    references: dict[str, dict[str, float]],
    oracle: dict[str, Any],
    prepare_report: dict[str, Any],
) -> dict[str, Any]:
    """The table (arms in `arms` order, each compared with OPD seed by seed), the pre-registered contrasts between
    other arms (`CONTRASTS`, same pairing), OPD's gain over the start, and the references."""
    starts = {s: references[f"start-seed{s}"] for s in range(cfg.seeds)}
    opd_time = statistics.fmean(runs["opd", s]["seconds"]["step"] for s in range(cfg.seeds))
    table = []
    for arm in arms:
        rs = [runs[arm, s] for s in range(cfg.seeds)]
        detector = arm_detector(arm)
        step_time = statistics.fmean(r["seconds"]["step"] for r in rs)
        row: dict[str, Any] = {
            "arm": arm,
            "lr": arm_lr(cfg, arm),
            "detector": detector,
            "avg": t_interval([r["avg"] for r in rs]).as_dict(),
            "greedy": t_interval([r["greedy"] for r in rs]).as_dict(),
            "non_divergent_share": statistics.fmean(r["non_divergent_share"] for r in rs) if detector else None,
            "tau": oracle["tau"].get(detector) if detector else None,
            "detector_scores": oracle["detectors"].get(detector) if detector else None,
            "step_time_s": step_time,
            "overhead_vs_opd": step_time / opd_time if opd_time else math.nan,
        }
        if arm != "opd":
            row["vs_opd"] = {m: _paired(runs, arm, "opd", cfg.seeds, m) for m in ("avg", "greedy")}
        table.append(row)
    gain = {
        m: {
            "per_seed": [runs["opd", s][m] - starts[s][m] for s in range(cfg.seeds)],
            "interval": t_interval([runs["opd", s][m] - starts[s][m] for s in range(cfg.seeds)]).as_dict(),
        }
        for m in ("avg", "greedy")
    }
    contrasts = [
        {"arm": a, "other": b, "question": q, **{m: _paired(runs, a, b, cfg.seeds, m) for m in ("avg", "greedy")}}
        for a, b, q in CONTRASTS
        if a in arms and b in arms
    ]
    start = {m: statistics.fmean(starts[s][m] for s in range(cfg.seeds)) for m in ("avg", "greedy")}
    teacher = references["teacher"]
    halfway = {m: (start[m] + teacher[m]) / 2 for m in ("avg", "greedy")}
    return {
        "config": dataclasses.asdict(cfg),
        "primary_metric": f"avg@{cfg.eval_k} at T={cfg.eval_temperature} on {cfg.eval_problems} held-out problems",
        "table": table,
        "contrasts": contrasts,
        "opd_gain_over_start": gain,
        "references": {"student_start": start, **{k: v for k, v in references.items() if not k.startswith("start")}},
        "halfway_to_teacher": halfway,
        "oracle": {k: v for k, v in oracle.items() if k != "heatmap"},
        "prepare": {
            r: {k: prepare_report[r][k] for k in ("accuracy", "greedy_accuracy", "params")}
            for r in ("teacher", "student", "ceiling")
            if r in prepare_report
        },
        "runs": {f"{a}-seed{s}": r for (a, s), r in runs.items()},
    }


def _ci(x: dict[str, float] | None, spec: str = ".3f") -> str:
    if not x or x.get("mean") is None or math.isnan(x["mean"]):
        return "-"
    if x.get("low") is None or math.isnan(x["low"]):
        return format(x["mean"], spec)
    return f"{x['mean']:{spec}} [{x['low']:{spec}}, {x['high']:{spec}}]"


def _signed(x: dict[str, float]) -> str:
    return _ci(x, "+.3f")


def print_table(results: dict[str, Any]) -> None:
    """The paired comparison as a table, then the references, OPD's gain, the oracle and the detectors."""
    from rich.console import Console
    from rich.table import Table

    c = results["config"]
    k, seeds = c["eval_k"], c["seeds"]
    table = Table(title=f"OPD vs TOPD on the tiny task, {seeds} seeds: mean [95% CI over seeds]")
    cols = (
        "arm",
        f"avg@{k} T=1",
        "vs OPD (paired)",
        "greedy",
        "vs OPD (paired)",
        "non-div.",
        "AUROC",
        "s/step",
        "x OPD",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=True)
    f = lambda x, spec=".2f": "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)  # noqa: E731
    for row in results["table"]:
        vs = row.get("vs_opd")
        det = row["detector_scores"]
        table.add_row(
            row["arm"],
            _ci(row["avg"]),
            f"{_signed(vs['avg']['interval'])} {_short(vs['avg']['verdict'])}" if vs else "(baseline)",
            _ci(row["greedy"]),
            f"{_signed(vs['greedy']['interval'])} {_short(vs['greedy']['verdict'])}" if vs else "(baseline)",
            f(row["non_divergent_share"]),
            _ci(det["auroc"], ".2f") if det else "-",
            f(row["step_time_s"]),
            f(row["overhead_vs_opd"]),
        )
    console = Console(width=max(Console().width, 200))
    console.print(table)
    for con in results.get("contrasts", []):
        console.print(
            f"{con['arm']} - {con['other']} (paired): avg@{k} {_signed(con['avg']['interval'])}"
            f" {_short(con['avg']['verdict'])}, greedy {_signed(con['greedy']['interval'])}"
            f" {_short(con['greedy']['verdict'])}; {con['question']}"
        )
    refs, half, gain = results["references"], results["halfway_to_teacher"], results["opd_gain_over_start"]
    for m, label in (("avg", f"avg@{k} T=1"), ("greedy", "greedy")):
        line = (
            f"{label}: student before distillation {refs['student_start'][m]:.3f}, teacher {refs['teacher'][m]:.3f}"
            + (f", capacity ceiling {refs['ceiling'][m]:.3f}" if "ceiling" in refs else "")
            + f"; halfway {half[m]:.3f}; OPD's gain over the start {_signed(gain[m]['interval'])}"
        )
        console.print(line)
    console.print(
        "vs OPD: the arm minus OPD, seed by seed (same student, same prompts order, same eval samples); 'higher' /"
        " 'lower' only where the 95% CI excludes 0. non-div.: share of candidates the detector judged surface form at"
        " its frozen tau (a measurement). AUROC: fork vs surface on the oracle's evaluation set."
    )
    _print_oracle(console, results["oracle"])


def _short(v: str) -> str:
    return {"higher": "higher", "lower": "lower"}.get(v, "n.d.")


def _print_oracle(console: Any, oracle: dict[str, Any]) -> None:
    ev = oracle["evaluation"]
    console.print(
        f"oracle (evaluation set): {ev['candidates']} candidates: {ev['fork']} forks, {ev['surface']} surface"
        f" mismatches, {ev['agreement']} agreements, {ev['unlabelled']} unlabelled (surface share"
        f" {ev['surface_share']:.2f}; the paper reports ~0.30 on math reasoning)"
    )
    for name, d in oracle["detectors"].items():
        rnd = d["random_flagger"]
        console.print(
            f"  {name}: tau {d['tau']:.3g} (frozen on the calibration set), flags {d['flag_rate']:.2f};"
            f" AUROC {_ci(d['auroc'], '.2f')}, precision {_ci(d['precision'], '.2f')}, recall"
            f" {_ci(d['recall'], '.2f')}; a random flagger at that rate: precision {_ci(rnd['precision'], '.2f')},"
            f" recall {rnd['recall']['mean']:.2f}"
        )
