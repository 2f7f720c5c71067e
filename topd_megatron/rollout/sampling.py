"""Sampling the next token from vocab-sharded logits without gathering the vocabulary.

Input: this rank's `[B, V_local]` shard of the last-position logits (Megatron's layout: rank r of `group` holds ids
`[r * V_local, (r + 1) * V_local)`, ids >= `vocab_size` are padding). Every rank of the group returns the same ids.

- greedy: the global argmax (ties -> the smallest id, as `torch.argmax` over the full vocabulary);
- temperature / top-p: exact sampling by the Gumbel-max trick, each rank perturbing its own shard with its own noise:
  argmax_v (log p'(v) + G_v) over the whole vocabulary is a sample of p' (the tempered, nucleus-truncated, renormalised
  distribution). The nucleus threshold is found by bisection on the probability, one [B] all-reduce per step:
  HF/SGLang's "smallest prefix of the sorted distribution with mass >= top_p" is exactly {v: p(v) >= theta*} with
  theta* the largest theta whose kept mass is >= top_p.
Returned log-probs are those of the untempered model distribution (log softmax of the raw logits) at the chosen ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

_NO_ID = 2**62
_BISECTION_STEPS = 50


def _rank_world(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: ProcessGroup | None, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _masked_fp32(logits: Tensor, vocab_size: int | None, rank: int) -> Tensor:
    v_local = logits.shape[-1]
    x = logits.float()
    if vocab_size is not None:
        ids = torch.arange(rank * v_local, (rank + 1) * v_local, device=logits.device)
        x = x.masked_fill(ids >= vocab_size, float("-inf"))
    return x


def _log_softmax(x: Tensor, group: ProcessGroup | None, world: int) -> Tensor:
    """Vocab-parallel log-softmax of [B, V_local] (one MAX and one SUM all-reduce of [B])."""
    m = _all_reduce(x.max(dim=-1).values.clone(), dist.ReduceOp.MAX, group, world)  # global max per row
    z = _all_reduce((x - m.unsqueeze(-1)).exp().sum(dim=-1), dist.ReduceOp.SUM, group, world)  # partition function
    return x - m.unsqueeze(-1) - z.log().unsqueeze(-1)


def vocab_parallel_argmax(
    scores: Tensor, group: ProcessGroup | None = None, *, vocab_size: int | None = None
) -> Tensor:
    """Global argmax ids [...] of sharded scores [..., V_local] (-inf entries never win unless a row is all -inf; with
    `vocab_size`, padded ids >= vocab_size never win)."""
    rank, world = _rank_world(group)
    if vocab_size is not None:
        scores = _masked_fp32(scores, vocab_size, rank)
    v_local = scores.shape[-1]
    local_max, local_idx = scores.max(dim=-1)
    best = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group, world)  # winning value per row
    cand = torch.where(local_max == best, local_idx + rank * v_local, torch.full_like(local_idx, _NO_ID))
    return _all_reduce(cand, dist.ReduceOp.MIN, group, world)  # smallest id among the ranks holding the max


def _gather_local(values: Tensor, ids: Tensor, rank: int) -> Tensor:
    """values[b, ids[b]] summed over the group (the owner contributes the value, the others 0)."""
    v_local = values.shape[-1]
    local = ids - rank * v_local
    owned = (local >= 0) & (local < v_local)
    picked = values.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked, torch.zeros_like(picked))


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one id per row from sharded logits [B, V_local]; returns (ids [B] int64, raw log-probs [B] fp32).

    `generator` must differ across the ranks of `group` (each rank draws the noise of its own shard) and be seeded
    identically on every replay for reproducible samples.
    """
    rank, world = _rank_world(group)
    x = _masked_fp32(logits, vocab_size, rank)
    logp = _log_softmax(x, group, world)
    if temperature == 0.0:
        ids = vocab_parallel_argmax(x, group)
    else:
        logp_t = _log_softmax(x / temperature, group, world) if temperature != 1.0 else logp
        if top_p < 1.0:
            probs = logp_t.exp()
            lo = torch.zeros(x.shape[0], dtype=probs.dtype, device=x.device)
            hi = _all_reduce(probs.max(dim=-1).values.clone(), dist.ReduceOp.MAX, group, world)
            for _ in range(_BISECTION_STEPS):
                mid = (lo + hi) / 2
                kept = torch.where(probs >= mid.unsqueeze(-1), probs, torch.zeros_like(probs)).sum(dim=-1)
                kept = _all_reduce(kept, dist.ReduceOp.SUM, group, world)  # nucleus mass at threshold mid
                enough = kept >= top_p
                lo = torch.where(enough, mid, lo)
                hi = torch.where(enough, hi, mid)
            logp_t = logp_t.masked_fill(probs < lo.unsqueeze(-1), float("-inf"))
        u = torch.rand(logp_t.shape, generator=generator, device=x.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        ids = vocab_parallel_argmax(logp_t.double() + gumbel, group)
    chosen = _all_reduce(_gather_local(logp, ids, rank), dist.ReduceOp.SUM, group, world)  # log p(id) from its owner
    return ids, chosen
