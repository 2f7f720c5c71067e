"""Vocab-parallel sampling: greedy is the global argmax, samples follow the tempered/nucleus distribution, and the
returned log-probs are the raw model's, with the vocabulary sharded over 1 or 2 gloo ranks."""

from __future__ import annotations

import torch

from topd_megatron.distributed.launch import spawn
from topd_megatron.rollout.sampling import sample_next

V, PADDED = 10, 12  # true vocabulary 10, two padded ids (whose logits are huge: they must never be drawn)


def _logits(rows: int) -> torch.Tensor:
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, 0.2, -2.0, 50.0, 50.0])
    return base.repeat(rows, 1)


def _reference(temperature: float, top_p: float) -> torch.Tensor:
    """The distribution HF/SGLang sample from: tempered softmax over the true vocabulary, nucleus, renormalised."""
    p = torch.softmax(_logits(1)[0, :V].double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    cum = torch.cumsum(p[order], 0)
    keep_sorted = (cum - p[order]) < top_p  # a token is kept while the mass before it is below top_p
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[keep_sorted]] = True
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


def sample_body(rank: int, world: int, temperature: float, top_p: float, rows: int):
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    shard = _logits(rows).chunk(world, dim=-1)[rank]
    gen = torch.Generator().manual_seed(1234 + rank)
    ids, lp = sample_next(shard, temperature=temperature, top_p=top_p, generator=gen, vocab_size=V, group=group)
    return ids, lp


def _check(world: int, temperature: float, top_p: float) -> None:
    rows = 40_000
    results = spawn(sample_body, world, (temperature, top_p, rows), timeout=300)
    ids, lp = results[0]
    for other_ids, other_lp in results[1:]:
        assert torch.equal(ids, other_ids) and torch.equal(lp, other_lp), "ranks disagree"
    assert int(ids.max()) < V, "a padded id was sampled"
    raw = torch.log_softmax(_logits(1)[0, :V].double(), -1)
    assert torch.allclose(lp.double(), raw[ids], atol=1e-5), "log-probs must be the raw model's"
    freq = torch.bincount(ids, minlength=V).double() / rows
    ref = _reference(temperature, top_p)
    assert bool((freq[ref == 0] == 0).all()), f"tokens outside the nucleus were sampled: {freq}"
    # 40k draws: the standard error of any frequency is <= 0.0025; 5 sigma.
    assert (freq - ref).abs().max() < 0.0125, f"T={temperature} top_p={top_p} world={world}: {freq} vs {ref}"


def test_sampling_matches_the_reference_distribution_on_one_rank() -> None:
    _check(1, 1.0, 1.0)
    _check(1, 0.7, 0.9)


def test_sampling_matches_the_reference_distribution_on_two_shards() -> None:
    _check(2, 1.0, 1.0)
    _check(2, 1.3, 0.8)
    _check(2, 1.0, 0.3)  # nucleus holds only the top token (id 7, p = 0.41 > 0.3): deterministic


def test_greedy_is_the_global_argmax_with_ties_to_the_smallest_id() -> None:
    for world in (1, 2):
        ids, lp = spawn(sample_body, world, (0.0, 1.0, 3), timeout=300)[0]
        assert ids.tolist() == [7, 7, 7]
    tied = torch.tensor([[0.0, 5.0, 1.0, 5.0]])
    ids, _ = sample_next(tied, temperature=0.0, top_p=1.0, generator=torch.Generator(), vocab_size=4)
    assert ids.tolist() == [1]
