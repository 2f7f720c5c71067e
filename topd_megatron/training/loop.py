"""The on-policy distillation loop, top to bottom. One call of `train` is one rank of the job.

    prompts -> student rollouts -> teacher scoring -> detection (+ teacher windows) -> loss and backward through
    get_forward_backward_func -> Megatron optimizer step -> weight sync to the rollout engine -> eval / checkpoint

Single machine: `topd train` / `topd run tiny` start the ranks; clusters: torchrun/srun start them and every rank
calls `train(rank, world, cfg)` (nemo-run: `train_run(cfg)`). A run directory that holds a checkpoint is resumed
from it.
"""

from __future__ import annotations

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
from topd_megatron.models.checkpoint import latest_checkpoint, load_training_state, save_training_state
from topd_megatron.models.tokenizer import encode_prompt
from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.seeds import benchmark_eval_seed, rollout_seed, window_seed
from topd_megatron.tasks import LabelsChoices, Problem, Task, load_task
from topd_megatron.training.colocation import MegatronStates, TimeSlicedEngine, check_time_slicing
from topd_megatron.training.metrics import MetricsLogger, keep_before
from topd_megatron.training.optim import build_optimizer, build_scheduler, ddp_config
from topd_megatron.training.scoring import ChoiceLabeller, scoring_context
from topd_megatron.training.session import EngineSpec, RankSession, rank_session
from topd_megatron.training.step import StepContext, train_step


class TooManyBadSteps(RuntimeError):
    """The loss was not finite in more steps than train.max_bad_steps allows."""


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
    rollouts = session.engine.generate([encode_prompt(tok, p.prompt) for p in problems], params)
    t_rollout = time.perf_counter() - t0
    batch = build_step_batch(rollouts, pad_id=tok.pad_token_id, micro_batch_size=cfg.train.micro_batch_size)
    metrics = train_step(
        ctx, batch, window_seed=window_seed(cfg.train.seed, step), inject_nan=step + 1 in cfg.train.inject_nan_at
    )
    sync = session.engine.sync_weights()
    metrics |= rollout_metrics(tok, task, problems, rollouts)
    metrics["time/rollout_s"] = t_rollout
    metrics["time/step_s"] = time.perf_counter() - t0
    return gather_metrics(metrics | sync)


def train(rank: int, world: int, cfg: RunConfig) -> dict[str, Any] | None:
    """Run (or resume) `cfg` on this rank; returns the run summary on global rank 0, None elsewhere."""
    from rich.progress import Progress

    task = load_task(cfg.task)
    time_slice = cfg.rollout == "sglang" and cfg.sglang.colocate == "time_slice"
    if time_slice:
        check_time_slicing()  # before any model or server exists
    engine = EngineSpec(
        kind=cfg.rollout, micro_batch_size=cfg.train.micro_batch_size * 4, sglang=cfg.sglang, run_dir=cfg.run_dir
    )
    with rank_session(
        cfg.parallel,
        cfg.student,
        teacher=cfg.teacher,
        teacher_source=cfg.teacher_source,
        engine=engine,
        ddp=ddp_config(cfg.optim),
    ) as session:
        optimizer = build_optimizer(cfg.optim, session.student)
        if time_slice:  # the student servers and Megatron take the GPUs by turns (training/colocation.py)
            session.engine = TimeSlicedEngine(session.engine, MegatronStates(session.student, optimizer))
        scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)
        start, bad_steps = 0, 0
        ckpt = latest_checkpoint(cfg.run_dir)
        if ckpt is not None:
            meta = load_training_state(ckpt, session.student, optimizer, scheduler)
            start, bad_steps = meta["step"], meta["extra"]["bad_steps"]
            session.engine.sync_weights()  # a rollout server starts from the initial weights: give it the resumed ones
        logger = MetricsLogger(cfg.run_dir, enabled=rank == 0, resume_step=start + (1 if start else 0))
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
        evaluate = Evaluation(cfg=cfg, session=session, task=task, logger=logger)
        pool = task.train_problems(cfg.train.problem_pool, seed=cfg.train.seed)
        last_eval = evaluate(0) if start == 0 and cfg.train.eval_at_start else {}
        with Progress(disable=rank != 0, transient=True) as progress:
            bar = progress.add_task("train", total=cfg.train.steps, completed=start)
            for step in range(start, cfg.train.steps):
                metrics = run_step(ctx, session, cfg, task, pool, step)
                logger.log(step + 1, "train", metrics)
                bad_steps += int(metrics["skipped"])
                if bad_steps > cfg.train.max_bad_steps:
                    raise TooManyBadSteps(
                        f"step {step + 1}: the loss was not finite in {bad_steps} steps (> train.max_bad_steps ="
                        f" {cfg.train.max_bad_steps}); lower optim.lr or check the data and the teacher"
                    )
                if should_run(cfg.train.eval_every, step + 1, cfg.train.steps):
                    last_eval = evaluate(step + 1)
                if cfg.train.save_checkpoints and should_run(cfg.train.save_every, step + 1, cfg.train.steps):
                    extra = {"bad_steps": bad_steps, "data_position": (step + 1) * cfg.train.prompts_per_step}
                    save_training_state(cfg.run_dir, step + 1, session.student, optimizer, scheduler, extra)
                progress.update(bar, advance=1, description=f"train loss {metrics['loss']:.4f}")
        logger.close()
    return {"final_eval": last_eval, "steps": cfg.train.steps} if rank == 0 else None


def train_run(cfg: RunConfig) -> None:
    """What every rank of a launched job executes (nemo-run's entry point; torchrun/srun set RANK and WORLD_SIZE)."""
    report = run_ranks(train, cfg.parallel.model_parallel_size, cfg, timeout=86400.0)
    if report is not None:
        print(f"[topd] finished {cfg.run_dir}: {report}", flush=True)
