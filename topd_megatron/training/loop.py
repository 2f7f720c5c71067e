"""The on-policy distillation loop, top to bottom. One call of `train` is one rank of the job.

    prompts -> student rollouts -> teacher scoring -> detection (+ teacher windows) -> loss and backward through
    get_forward_backward_func -> Megatron optimizer step -> weight sync to the rollout engine -> eval / checkpoint

Single machine: `topd train` / `topd run tiny` start the ranks; clusters: torchrun/srun start them and every rank
calls `train(rank, world, cfg)`. A run directory that holds a checkpoint is resumed from it.
"""

from __future__ import annotations

import time
from typing import Any

import torch.distributed as dist

from topd_megatron.algorithm.batch import build_step_batch
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import init_model_parallel
from topd_megatron.evaluation.runner import evaluate_benchmarks_in_training
from topd_megatron.evaluation.task_eval import evaluate_task
from topd_megatron.models.build import build_model
from topd_megatron.models.checkpoint import latest_checkpoint, load_training_state, save_training_state
from topd_megatron.models.tokenizer import encode_prompt, load_tokenizer
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.factory import rollout_engine
from topd_megatron.tasks import Problem, load_task
from topd_megatron.training.metrics import MetricsLogger
from topd_megatron.training.optim import build_optimizer, build_scheduler, ddp_config
from topd_megatron.training.step import StepContext, train_step
from topd_megatron.training.teacher import build_teacher, teacher_hf_dir


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


def train(rank: int, world: int, cfg: RunConfig) -> dict[str, Any] | None:
    """Run (or resume) `cfg` on this rank; returns the run summary on global rank 0, None elsewhere."""
    from megatron.core import parallel_state as ps
    from rich.progress import Progress

    init_model_parallel(cfg.parallel)
    task = load_task(cfg.task)
    student = build_model(
        cfg.student, cfg.parallel, role="student", wrap_with_ddp=True, ddp_config=ddp_config(cfg.optim)
    )
    teacher, teacher_dir = None, None
    if cfg.teacher_source == "megatron":
        teacher = build_teacher(cfg.teacher, cfg.parallel, student)
    else:  # served only: nothing is built; its server is started from (or attached for) teacher.path
        teacher_dir = teacher_hf_dir(cfg.teacher, student)
    optimizer = build_optimizer(cfg.optim, student)
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)
    engine = rollout_engine(
        cfg.rollout,
        student,
        teacher,
        micro_batch_size=cfg.train.micro_batch_size * 4,
        sglang=cfg.sglang,
        run_dir=cfg.run_dir,
        teacher_dir=teacher_dir,
    )
    try:
        tokenizer = load_tokenizer(student.tokenizer_dir)
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

        start, bad_steps = 0, 0
        ckpt = latest_checkpoint(cfg.run_dir)
        if ckpt is not None:
            meta = load_training_state(ckpt, student, optimizer, scheduler)
            start, bad_steps = meta["step"], meta["extra"]["bad_steps"]
            engine.sync_weights()  # a rollout server starts from the initial weights: give it the resumed ones
        logger = MetricsLogger(cfg.run_dir, enabled=rank == 0, resume_step=start + (1 if start else 0))
        pool = task.train_problems(cfg.train.problem_pool, seed=cfg.train.seed)
        ctx = StepContext(
            cfg=cfg.objective,
            student=student,
            teacher=teacher,
            optimizer=optimizer,
            scheduler=scheduler,
            engine=engine,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            window_seed=0,
            offload_teacher_logits=cfg.train.offload_teacher_logits,
        )

        def run_eval(step: int) -> dict[str, float]:
            summary, _ = evaluate_task(cfg.eval, engine, tokenizer, task, encode_prompt, step_seed=step)
            if cfg.eval.benchmarks:  # the recipe's math benchmarks, graded like `topd eval`
                summary.update(
                    evaluate_benchmarks_in_training(
                        cfg.eval.benchmarks,
                        model_dir=student.tokenizer_dir,
                        engine=engine,
                        tokenizer=tokenizer,
                        k=cfg.eval.k,
                        temperature=cfg.eval.temperature,
                        top_p=cfg.eval.top_p,
                        max_new_tokens=cfg.eval.max_new_tokens,
                        seed=cfg.eval.seed + 7919 * step,
                        limit=cfg.eval.benchmark_limit,
                    )
                )
            logger.log(step, "eval", summary)
            return summary

        last_eval = run_eval(0) if start == 0 and cfg.train.eval_at_start else {}
        with Progress(disable=rank != 0, transient=True) as progress:
            bar = progress.add_task("train", total=cfg.train.steps, completed=start)
            for step in range(start, cfg.train.steps):
                t0 = time.perf_counter()
                problems = prompts_for_step(pool, step, cfg.train, dp_rank, dp_size)
                params = SamplingParams(
                    temperature=cfg.train.temperature,
                    top_p=cfg.train.top_p,
                    max_new_tokens=cfg.train.max_new_tokens,
                    stop_token_ids=(tokenizer.eos_token_id,),
                    seed=(cfg.train.seed * 1_000_003 + step) * 2,
                )
                rollouts = engine.generate([encode_prompt(tokenizer, p.prompt) for p in problems], params)
                t_rollout = time.perf_counter() - t0
                batch = build_step_batch(
                    rollouts, pad_id=tokenizer.pad_token_id, micro_batch_size=cfg.train.micro_batch_size
                )
                ctx.window_seed = params.seed + 1
                ctx.inject_nan = step + 1 in cfg.train.inject_nan_at
                metrics = train_step(ctx, batch)
                sync = engine.sync_weights()
                texts = [tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in rollouts]
                metrics["rollout/accuracy"] = sum(
                    task.is_correct(t, p) for t, p in zip(texts, problems, strict=True)
                ) / len(texts)
                metrics["rollout/response_tokens"] = sum(len(g.output_ids) for g in rollouts) / len(rollouts)
                metrics["time/rollout_s"] = t_rollout
                metrics["time/step_s"] = time.perf_counter() - t0
                metrics.update(sync)
                metrics = gather_metrics(metrics)
                logger.log(step + 1, "train", metrics)
                bad_steps += int(metrics["skipped"])
                if bad_steps > cfg.train.max_bad_steps:
                    raise TooManyBadSteps(
                        f"step {step + 1}: the loss was not finite in {bad_steps} steps (> train.max_bad_steps ="
                        f" {cfg.train.max_bad_steps}); lower optim.lr or check the data and the teacher"
                    )
                if should_run(cfg.train.eval_every, step + 1, cfg.train.steps):
                    last_eval = run_eval(step + 1)
                if should_run(cfg.train.save_every, step + 1, cfg.train.steps):
                    save_training_state(
                        cfg.run_dir,
                        step + 1,
                        student,
                        optimizer,
                        scheduler,
                        {"bad_steps": bad_steps, "data_position": (step + 1) * cfg.train.prompts_per_step},
                    )
                progress.update(bar, advance=1, description=f"train loss {metrics['loss']:.4f}")
        logger.close()
    finally:
        engine.close()
    return {"final_eval": last_eval, "steps": cfg.train.steps} if rank == 0 else None
