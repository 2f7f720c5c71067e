"""Every seed a run derives, in one place: a run is reproducible from its configured seeds and the layout.

Configured seeds: `train.seed` (prompts order and rollouts), `eval.seed` (evaluation samples), `parallel.seed`
(Megatron's RNG tracker and initialisation), the oracle's and the experiment's own. Everything else is derived here,
so two streams never share a seed by accident:

    rollouts of step s         rollout_seed(train.seed, s)      (even numbers)
    windows of step s          window_seed(train.seed, s)       (the odd number after it)
    task evaluation at step s  task_eval_seed(eval.seed, s, dp_rank)
    benchmarks at step s       benchmark_eval_seed(eval.seed, s)
An engine turns a request's seed into its own generator seeds: `embedded_generator_seed` (per TP/DP rank: each TP
rank perturbs its own vocabulary shard) and `server_request_seeds` (one per prompt of an SGLang request).
"""

from __future__ import annotations

import hashlib

_STRIDE = 1_000_003
"""A prime larger than any step, prompt or rank count: derived streams never overlap."""
_RANK_STRIDE = 7919


def rollout_seed(train_seed: int, step: int) -> int:
    """Sampling seed of the rollouts of (0-based) step `step`."""
    return (train_seed * _STRIDE + step) * 2


def window_seed(train_seed: int, step: int) -> int:
    """Sampling seed of the near-future windows (teacher and fresh student) of step `step`."""
    return rollout_seed(train_seed, step) + 1


def task_eval_seed(eval_seed: int, step: int, dp_rank: int) -> int:
    """Sampling seed of the task evaluation after `step` steps on data-parallel replica `dp_rank`."""
    return eval_seed + _RANK_STRIDE * step + dp_rank


def benchmark_eval_seed(eval_seed: int, step: int) -> int:
    """Base seed of the benchmark evaluation after `step` steps (`benchmark_sample_seed` spreads it per benchmark)."""
    return eval_seed + _RANK_STRIDE * step


def benchmark_sample_seed(seed: int, benchmark: str, dp_rank: int) -> int:
    """The sampling seed of one benchmark on one data-parallel replica (31 bits: engines multiply it further)."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{dp_rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def embedded_generator_seed(seed: int, tp_rank: int, dp_rank: int) -> int:
    """The embedded engine's torch.Generator seed: noise differs across TP ranks (each samples its own vocabulary
    shard) and DP replicas, never across pipeline stages."""
    return int(seed) * _STRIDE + tp_rank * _RANK_STRIDE + dp_rank


def server_request_seeds(seed: int, n: int) -> list[int]:
    """SGLang's per-prompt sampling seeds of a request of `n` prompts."""
    return [int(seed) * _STRIDE + i for i in range(n)]


def arm_parallel_seed(seed: int) -> int:
    """`parallel.seed` of the experiment's runs with seed index `seed` (Megatron's RNG tracker)."""
    return 1234 + seed
