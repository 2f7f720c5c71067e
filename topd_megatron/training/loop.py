"""The on-policy distillation loop, top to bottom. One call of `train` is one rank of the job.

    prompts -> student rollouts -> teacher scoring -> detection (+ teacher windows) -> loss and backward through
    get_forward_backward_func -> Megatron optimizer step -> weight sync to the rollout engine -> eval / checkpoint

Single machine: `topd train` / `topd run tiny` start the ranks; clusters: torchrun/srun start them and every rank
calls `train(rank, world, cfg)` (nemo-run: `train_run(cfg)`). A run directory that holds a checkpoint is resumed
from it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from topd_megatron.algorithm.batch import build_step_batch
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.launch import run_ranks
from topd_megatron.evaluation.runner import evaluate_benchmarks_in_training
from topd_megatron.evaluation.task_eval import evaluate_task
from topd_megatron.models.checkpoint import (
    TrainingLayout,
    check_resumable,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from topd_megatron.models.format import hf_dir
from topd_megatron.models.tokenizer import encode_prompt, load_tokenizer
from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.rollout.sglang.engine import SGLangEngine
from topd_megatron.seeds import benchmark_eval_seed, rollout_seed, window_seed
from topd_megatron.tasks import LabelsChoices, Problem, Task, load_task
from topd_megatron.training.colocation import MegatronStates, SamplingSpan, TimeSlicedEngine, check_time_slicing
from topd_megatron.training.metrics import MetricsLogger, keep_before
from topd_megatron.training.optim import build_optimizer, build_scheduler, ddp_config
from topd_megatron.training.preemption import StopSignals, clear_marker, write_marker
from topd_megatron.training.scoring import ChoiceLabeller, scoring_context
from topd_megatron.training.served_selftest import served_selftest
from topd_megatron.training.session import EngineSpec, RankSession, rank_session
from topd_megatron.training.step import StepContext, train_step
from topd_megatron.training.teacher import teacher_hf_dir


class TooManyBadSteps(RuntimeError):
    """The loss was not finite in more steps than train.max_bad_steps allows."""


class StoppedWithoutCheckpoint(RuntimeError):
    """A stop signal reached a run that writes no checkpoints (train.save_checkpoints false): its work is lost."""


def prompts_for_step(pool: list[Problem], step: int, cfg: TrainConfig, dp_rank: int, dp_size: int) -> list[Problem]:
    """This replica's prompts of `step`: a fixed walk through the pool, so the data position is the step itself."""
    start = step * cfg.prompts_per_step
    chosen = [pool[(start + i) % len(pool)] for i in range(cfg.prompts_per_step)]
    return [p for p in chosen[dp_rank::dp_size] for _ in range(cfg.samples_per_prompt)]


def should_run(every: int, step: int, last: int) -> bool:
    """Periodic actions run after steps every, 2*every, ... and always after the last step."""
    return step == last or (every > 0 and step % every == 0)


def gather_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics of the reporting ranks (last pipeline stage, TP rank 0), averaged over data-parallel replicas (loss
    shares summed: together they are the step's objective). Collective; every rank gets the result."""
    from megatron.core import parallel_state as ps

    reporting = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, metrics if reporting else None)
    parts = [m for m in everyone if m is not None]
    keys = parts[0].keys()
    return {k: sum(p[k] for p in parts) / (1 if k.startswith("loss") else len(parts)) for k in keys}


def save_run_config(cfg: RunConfig) -> Path:
    """RUN_DIR/run_config.json: the run's config (`dataclasses.asdict`; `topd train --config` reads it back). It
    holds no secret: API keys are named by variable or file (`sglang.*.api_key_env` / `api_key_file`)."""
    path = Path(cfg.run_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tmp.replace(path)
    return path


def training_layout(cfg: RunConfig, world: int) -> TrainingLayout:
    """The layout `cfg` trains with on `world` ranks, as a training checkpoint records it."""
    return TrainingLayout(
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        vpp=cfg.parallel.vpp,
        world=world,
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        dtype=cfg.student.dtype,
    )


@dataclass(kw_only=True, slots=True)
class Evaluation:
    """The periodic evaluation of a run: the task's held-out problems, then the configured benchmarks."""

    cfg: RunConfig
    session: RankSession
    task: Task
    logger: MetricsLogger

    def __call__(self, step: int) -> dict[str, float]:
        cfg, s = self.cfg, self.session
        assert s.engine is not None
        summary, records = evaluate_task(cfg.eval, s.engine, s.tokenizer, self.task, step_seed=step)
        if cfg.eval.records_file and self.logger.enabled:
            with (Path(cfg.run_dir) / cfg.eval.records_file).open("a") as f:
                f.writelines(json.dumps({"step": step} | r) + "\n" for r in records)
        if cfg.eval.benchmarks:  # the recipe's math benchmarks, graded like `topd eval`
            summary |= evaluate_benchmarks_in_training(
                cfg.eval.benchmarks,
                model_dir=s.student.tokenizer_dir,
                engine=s.engine,
                tokenizer=s.tokenizer,
                k=cfg.eval.k,
                temperature=cfg.eval.temperature,
                top_p=cfg.eval.top_p,
                max_new_tokens=cfg.eval.max_new_tokens,
                seed=benchmark_eval_seed(cfg.eval.seed, step),
                limit=cfg.eval.benchmark_limit,
            )
        self.logger.log(step, "eval", summary)
        return summary


def rollout_metrics(tokenizer: Any, task: Task, problems: list[Problem], rollouts: list[Generation]) -> dict:
    """Accuracy and length of the step's rollouts."""
    texts = [tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in rollouts]
    correct = sum(task.is_correct(t, p) for t, p in zip(texts, problems, strict=True))
    return {
        "rollout/accuracy": correct / len(texts),
        "rollout/response_tokens": sum(len(g.output_ids) for g in rollouts) / len(rollouts),
    }


def run_step(
    ctx: StepContext, session: RankSession, cfg: RunConfig, task: Task, pool: list[Problem], step: int
) -> dict[str, float]:
    """Step `step` (0-based) end to end: rollouts, the TOPD step, weight sync; the gathered metrics (collective)."""
    from megatron.core import parallel_state as ps

    assert session.engine is not None
    t0 = time.perf_counter()
    tok = session.tokenizer
    problems = prompts_for_step(pool, step, cfg.train, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    params = SamplingParams(
        temperature=cfg.train.temperature,
        top_p=cfg.train.top_p,
        max_new_tokens=cfg.train.max_new_tokens,
        stop_token_ids=(tok.eos_token_id,),
        seed=rollout_seed(cfg.train.seed, step),
    )
    span = session.engine if isinstance(session.engine, SamplingSpan) else None
    if span is not None:  # time slicing: the student servers stay whole until train_step's detection ends
        span.begin_sampling()
    try:
        rollouts = session.engine.generate([encode_prompt(tok, p.prompt) for p in problems], params)
        t_rollout = time.perf_counter() - t0
        batch = build_step_batch(rollouts, pad_id=tok.pad_token_id, micro_batch_size=cfg.train.micro_batch_size)
        metrics = train_step(
            ctx, batch, window_seed=window_seed(cfg.train.seed, step), inject_nan=step + 1 in cfg.train.inject_nan_at
        )
    finally:
        if span is not None:
            span.end_sampling()
    sync = session.engine.sync_weights()
    metrics |= rollout_metrics(tok, task, problems, rollouts)
    metrics["time/rollout_s"] = t_rollout
    metrics["time/step_s"] = time.perf_counter() - t0
    return gather_metrics(metrics | sync)


@dataclass(kw_only=True, slots=True)
class Run:
    """One rank's run once set up (`open_run`): what the loop needs, and where it starts."""

    cfg: RunConfig
    session: RankSession
    task: Task
    ctx: StepContext
    logger: MetricsLogger
    evaluate: Evaluation
    pool: list[Problem]
    start: int = 0
    """Steps done before this start (those of the resumed checkpoint)."""
    bad_steps: int = 0
    eval_pending: bool = False
    """The checkpoint was written by a stop that postponed the evaluation due after step `start`."""

    def save(self, step: int, *, eval_pending: bool = False) -> Path:
        """A training checkpoint after `step` steps (collective)."""
        extra = {
            "bad_steps": self.bad_steps,
            "data_position": step * self.cfg.train.prompts_per_step,
            "eval_pending": eval_pending,
        }
        s, ctx = self.session, self.ctx
        return save_training_state(
            self.cfg.run_dir,
            step,
            s.student,
            ctx.optimizer,
            ctx.scheduler,
            extra,
            optimizer_format=self.cfg.train.checkpoint_optimizer,
        )

    def stop_after(self, step: int, signal_name: str, *, eval_pending: bool) -> None:
        """The stop `signal_name` asked for, after `step` steps: a checkpoint, then RUN_DIR/requeue.json (collective;
        every rank returns once the marker is written)."""
        if not self.cfg.train.save_checkpoints:
            raise StoppedWithoutCheckpoint(
                f"stopped on {signal_name} after step {step}: train.save_checkpoints is false, so there is no"
                " checkpoint to resume from; run it again from the start"
            )
        ckpt = self.save(step, eval_pending=eval_pending)
        if dist.get_rank() == 0:
            write_marker(self.cfg.run_dir, signal_name=signal_name, step=step, checkpoint=ckpt)
        dist.barrier()  # every rank's `topd train` sees the marker before it exits

    def count_bad(self, metrics: dict[str, float], step: int) -> None:
        self.bad_steps += int(metrics["skipped"])
        if self.bad_steps > self.cfg.train.max_bad_steps:
            raise TooManyBadSteps(
                f"step {step}: the loss was not finite in {self.bad_steps} steps (> train.max_bad_steps ="
                f" {self.cfg.train.max_bad_steps}); lower optim.lr or check the data and the teacher"
            )


def check_prompt_lengths(cfg: RunConfig, task: Task, pool: list[Problem]) -> None:
    """Before any model is built: every prompt the run will use, plus the tokens generated after it, must fit the
    sequence length of both models (Megatron would not refuse a longer sequence: it would silently run the model
    beyond its context). A training sequence is prompt + train.max_new_tokens, and where TOPD generates windows
    (K = detection.window tokens after (x, y_<t), t up to the last response token) prompt + max_new_tokens - 1 + K.
    ValueError naming the problem and the fix."""
    tokenizer = load_tokenizer(hf_dir(cfg.student.path))
    limit = min(cfg.student.seq_length, cfg.teacher.seq_length)
    used = pool[: cfg.train.steps * cfg.train.prompts_per_step]
    obj = cfg.objective
    windows = obj.detection.detector == "window_ot" or obj.guidance == "teacher_window"
    window_extra = obj.detection.window - 1 if windows else 0
    for split, problems, new_tokens, extra in (
        ("train", used, cfg.train.max_new_tokens, window_extra),
        ("eval", task.eval_problems(cfg.eval.problems, seed=cfg.eval.problem_seed), cfg.eval.max_new_tokens, 0),
    ):
        for problem in problems:
            n = len(encode_prompt(tokenizer, problem.prompt))
            if n + new_tokens + extra > limit:
                with_windows = f" and windows of objective.detection.window={obj.detection.window}" if extra else ""
                raise ValueError(
                    f"{split} problem {problem.id!r}: its prompt has {n} tokens, and with {split}.max_new_tokens="
                    f"{new_tokens}{with_windows} the sequence would have {n + new_tokens + extra} > {limit}, the"
                    " sequence length of the models (student.seq_length / teacher.seq_length); raise seq_length"
                    f" (within what the models support), lower {split}.max_new_tokens"
                    f"{' or the window' if extra else ''}, or leave such problems out of the task"
                )


def open_run(
    cfg: RunConfig, session: RankSession, task: Task, pool: list[Problem], ckpt: Path | None, layout: TrainingLayout
) -> Run:
    """The optimizer, scheduler, metrics and step context of this rank; resumed from `ckpt` when there is one."""
    optimizer = build_optimizer(cfg.optim, session.student)
    if cfg.rollout == "sglang" and cfg.sglang.colocate == "time_slice":
        # the student servers and Megatron take the GPUs by turns (training/colocation.py)
        states = MegatronStates(session.student, optimizer)
        session.engine = TimeSlicedEngine(session.engine, states, span=cfg.sglang.time_slice_span)
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)
    start, bad_steps, eval_pending = 0, 0, False
    if ckpt is not None:
        meta = load_training_state(ckpt, session.student, optimizer, scheduler, layout)
        start, bad_steps, eval_pending = (
            meta["step"],
            meta["extra"]["bad_steps"],
            meta["extra"].get("eval_pending", False),
        )
        session.engine.sync_weights()  # a rollout server starts from the initial weights: give it the resumed ones
    rank = dist.get_rank()
    logger = MetricsLogger(
        cfg.run_dir,
        enabled=rank == 0,
        resume_step=start + (1 if start else 0),
        wandb=cfg.metrics.wandb,
        config=dataclasses.asdict(cfg),
    )
    if cfg.eval.records_file and rank == 0:
        keep_before(Path(cfg.run_dir) / cfg.eval.records_file, start + (1 if start else 0))
    scoring = scoring_context(
        cfg.objective,
        session.student,
        session.teacher,
        session.engine,
        eos_id=session.tokenizer.eos_token_id,
        pad_id=session.tokenizer.pad_token_id,
        offload_teacher_logits=cfg.train.offload_teacher_logits,
        choices=ChoiceLabeller(task=task, tokenizer=session.tokenizer) if isinstance(task, LabelsChoices) else None,
        pack_guidance=cfg.train.pack_guidance,
    )
    ctx = StepContext(scoring=scoring, optimizer=optimizer, scheduler=scheduler)
    return Run(
        cfg=cfg,
        session=session,
        task=task,
        ctx=ctx,
        logger=logger,
        evaluate=Evaluation(cfg=cfg, session=session, task=task, logger=logger),
        pool=pool,
        start=start,
        bad_steps=bad_steps,
        eval_pending=eval_pending,
    )


def check_served_models(run: Run) -> None:
    """The served-model self-test (rollout/sglang/selftest.py) of a run with SGLang servers, before any rollout
    (collective); its metrics go to the "selftest" split at the step the run starts from. SelfTestError aborts."""
    cfg, s = run.cfg, run.session
    # time-sliced student servers start whole, beside Megatron's states: the self-test runs on them as they are
    engine = s.engine.engine if isinstance(s.engine, TimeSlicedEngine) else s.engine
    if not isinstance(engine, SGLangEngine) or not cfg.sglang.selftest.enabled:
        return
    prompts = [encode_prompt(s.tokenizer, p.prompt) for p in run.pool[: cfg.sglang.selftest.probes]]
    metrics = served_selftest(
        cfg.sglang.selftest,
        engine,
        prompts,
        expected={"student": Path(s.student.tokenizer_dir), "teacher": Path(teacher_hf_dir(cfg.teacher, s.student))},
        colocated={"student": s.student, "teacher": s.teacher},
    )
    run.logger.log(run.start, "selftest", metrics)


def run_loop(run: Run, stop: StopSignals) -> dict[str, Any]:
    """Steps `run.start` .. train.steps - 1 with their periodic evaluations and checkpoints. After a step in which any
    rank received a stop signal: a checkpoint, RUN_DIR/requeue.json, and a summary with `stopped` set."""
    from rich.progress import Progress

    cfg, rank = run.cfg, dist.get_rank()
    check_served_models(run)
    last_eval = run.evaluate(0) if run.start == 0 and cfg.train.eval_at_start else {}
    if run.eval_pending:  # the evaluation a stop postponed, so that the metrics equal an uninterrupted run's
        last_eval = run.evaluate(run.start)
    with Progress(disable=rank != 0, transient=True) as progress:
        bar = progress.add_task("train", total=cfg.train.steps, completed=run.start)
        for step in range(run.start, cfg.train.steps):
            metrics = run_step(run.ctx, run.session, cfg, run.task, run.pool, step)
            done = step + 1
            run.logger.log(done, "train", metrics)
            run.count_bad(metrics, done)
            stopping = stop.requested() if done < cfg.train.steps else None  # collective; the last step just ends
            eval_due = should_run(cfg.train.eval_every, done, cfg.train.steps)
            if eval_due and stopping is None:
                last_eval = run.evaluate(done)
            if stopping is not None:
                run.stop_after(done, stopping, eval_pending=eval_due)
                return {"final_eval": last_eval, "steps": done, "stopped": {"signal": stopping, "step": done}}
            if cfg.train.save_checkpoints and should_run(cfg.train.save_every, done, cfg.train.steps):
                run.save(done)
            progress.update(bar, advance=1, description=f"train loss {metrics['loss']:.4f}")
    return {"final_eval": last_eval, "steps": cfg.train.steps}


def train(rank: int, world: int, cfg: RunConfig) -> dict[str, Any] | None:
    """Run (or resume) `cfg` on this rank; returns the run summary on global rank 0, None elsewhere."""
    task = load_task(cfg.task)
    if cfg.rollout == "sglang" and cfg.sglang.colocate == "time_slice":
        # before anything is read, any model built or any server started
        check_time_slicing(student=cfg.student, span=cfg.sglang.time_slice_span)
    pool = task.train_problems(cfg.train.problem_pool, seed=cfg.train.seed)
    check_prompt_lengths(cfg, task, pool)
    layout = training_layout(cfg, world)
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is not None:
        check_resumable(ckpt, layout)  # a checkpoint this layout cannot resume fails before any model is built
    if rank == 0:
        clear_marker(cfg.run_dir)
        save_run_config(cfg)
    engine = EngineSpec(
        kind=cfg.rollout, micro_batch_size=cfg.train.micro_batch_size * 4, sglang=cfg.sglang, run_dir=cfg.run_dir
    )
    with (
        StopSignals(cfg.train.stop_signals) as stop,
        rank_session(
            cfg.parallel,
            cfg.student,
            teacher=cfg.teacher,
            teacher_source=cfg.teacher_source,
            engine=engine,
            ddp=ddp_config(cfg.optim),
        ) as session,
    ):
        run = open_run(cfg, session, task, pool, ckpt, layout)
        summary = run_loop(run, stop)
        run.logger.close()
    return summary if rank == 0 else None


def train_run(cfg: RunConfig) -> None:
    """What every rank of a launched job executes (nemo-run's entry point; torchrun/srun set RANK and WORLD_SIZE)."""
    report = run_ranks(train, cfg.parallel.model_parallel_size, cfg, timeout=86400.0)
    if report is not None:
        print(f"[topd] finished {cfg.run_dir}: {report}", flush=True)
