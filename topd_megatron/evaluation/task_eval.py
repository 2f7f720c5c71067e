"""Stage 8: evaluation of a task's held-out problems through the rollout engine (avg@k, pass@k and standard errors as
`evaluation.statistics` computes them).

Problems are split over data-parallel replicas (each generates its share with the student), results are gathered,
and every rank returns the same report. Sampling parameters and the seed are recorded with the results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

from topd_megatron.evaluation.statistics import mean_stderr, summarize
from topd_megatron.models.tokenizer import encode_prompt
from topd_megatron.rollout.engine import RolloutEngine, SamplingParams
from topd_megatron.seeds import task_eval_seed
from topd_megatron.tasks import Problem, Task


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Evaluation on a task's held-out problems."""

    problems: int = 100
    """Held-out problems (Task.eval_problems(problems, seed=problem_seed): the same set for every run)."""
    problem_seed: int = 0
    """Which draw of held-out problems (a tuning study validates on another draw than the reported one)."""
    k: int = 4
    """Samples per problem."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 1234
    benchmarks: tuple[str, ...] = ()
    """Math benchmarks also evaluated at every evaluation (aime24, aime25, math500, gsm8k or JSONL paths, as in
    `topd eval`), through the run's engine with the model's chat template; logged as `bench/<name>/avg@k`, ..."""
    benchmark_limit: int | None = None
    """Only the first this many problems of every benchmark (None: all)."""
    greedy: bool = False
    """Also decode every problem greedily (temperature 0): 'greedy' (accuracy) and 'greedy_stderr' in the summary."""
    records_file: str | None = None
    """Append every evaluation's per-problem records (step, id, correct samples, greedy) to this JSONL file in the
    run directory (the experiment's paired statistics read them); None: not written."""

    def __post_init__(self) -> None:
        if isinstance(self.benchmarks, str):
            raise ValueError(f"eval.benchmarks must be a tuple of names, got the string {self.benchmarks!r}")
        if self.problems < 1 or self.k < 1:
            raise ValueError(f"eval.problems and eval.k must be >= 1, got {self.problems}, {self.k}")


def _sample(
    engine: RolloutEngine, tokenizer: Any, task: Task, problems: list[Problem], params: SamplingParams, k: int
) -> list[list[bool]]:
    """k completions per problem (collective: called even without problems, as a server-backed engine's calls are
    collective over every rank of the job); whether each is correct."""
    prompts = [encode_prompt(tokenizer, p.prompt) for p in problems for _ in range(k)]
    gens = engine.generate(prompts, params, model="student")
    texts = [tokenizer.decode(g.output_ids, skip_special_tokens=True) for g in gens]
    return [[bool(task.is_correct(t, p)) for t in texts[i * k : (i + 1) * k]] for i, p in enumerate(problems)]


def evaluate_task(
    cfg: EvalConfig, engine: RolloutEngine, tokenizer: Any, task: Task, step_seed: int = 0
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample k completions per held-out problem with the student (and a greedy one with `cfg.greedy`); returns
    (summary, per-problem records), the same on every rank."""
    from megatron.core import parallel_state as ps

    problems: list[Problem] = task.eval_problems(cfg.problems, seed=cfg.problem_seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = problems[dp_rank::dp_size]
    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=(tokenizer.eos_token_id,),
        seed=task_eval_seed(cfg.seed, step_seed, dp_rank),
    )
    sampled = _sample(engine, tokenizer, task, mine, params, cfg.k)
    records = [{"id": p.id, "answer": p.answer, "correct": c} for p, c in zip(mine, sampled, strict=True)]
    if cfg.greedy:
        greedy = _sample(engine, tokenizer, task, mine, dataclasses.replace(params, temperature=0.0), 1)
        for r, g in zip(records, greedy, strict=True):
            r["greedy_correct"] = g[0]
    if dp_size > 1:
        gathered: list[Any] = [None] * dp_size
        dist.all_gather_object(gathered, records, group=ps.get_data_parallel_group())
        records = [r for part in gathered for r in part]
        order = {p.id: i for i, p in enumerate(problems)}
        records.sort(key=lambda r: order[r["id"]])
    summary = summarize(records, cfg.k)
    if cfg.greedy:
        summary["greedy"], summary["greedy_stderr"] = mean_stderr([float(r["greedy_correct"]) for r in records])
    summary.update({f"sampling/{k}": v for k, v in asdict(params).items() if isinstance(v, (int, float))})
    return summary, records
