"""A step split into parts of whole micro-batches (training/scoring.py `score_and_detect`): each part's positions,
served-teacher report and candidates put together are exactly the whole step's."""

from __future__ import annotations

import torch

from topd_megatron.algorithm import detection
from topd_megatron.algorithm.batch import build_step_batch
from topd_megatron.algorithm.objective import ServedTeacher
from topd_megatron.rollout.engine import Generation


def _step(rows: int = 7, mb: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gens = []
    for _ in range(rows):
        prompt = torch.randint(3, 50, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        out = torch.randint(3, 50, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
        gens.append(Generation(prompt_ids=prompt, output_ids=out, output_logprobs=[-1.0] * len(out), finished=True))
    return build_step_batch(gens, pad_id=0, micro_batch_size=mb)


def test_parts_of_a_step_have_its_positions_and_candidates() -> None:
    step = _step()
    whole = step.token_batch()
    d = torch.rand(whole.num_positions, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = ServedTeacher(token_logprobs=-d.float(), top_ids=torch.zeros(d.numel(), 2, dtype=torch.long),
                           top_logprobs=torch.stack([-d.float(), -2 * d.float()], 1))  # fmt: skip
    cfg = detection.Config(q=0.3, max_candidates=3)
    expected = detection.select_candidates(cfg, whole, d).positions
    per = step.micro_batch_size * step.targets_per_row
    for bounds in ([0, 4], [0, 1, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]):
        positions, reports, rollouts = [], [], 0
        for first, stop in zip(bounds[:-1], bounds[1:], strict=True):
            part = step.part(first, stop)
            a, b = first * per, stop * per
            tokens = part.token_batch()
            assert torch.equal(tokens.tokens, whole.tokens[a:b]) and torch.equal(
                tokens.response_mask, whole.response_mask[a:b]
            )
            rollouts += part.num_rollouts
            reports.append(report.slice(a, b))
            positions.append(detection.select_candidates(cfg, tokens, d[a:b]).positions + a)
        assert rollouts == step.num_rollouts == 7
        assert torch.equal(torch.cat(positions), expected), bounds
        joined = ServedTeacher.concat(reports)
        assert torch.equal(joined.token_logprobs, report.token_logprobs)
        assert torch.equal(joined.top_logprobs, report.top_logprobs) and torch.equal(joined.top_ids, report.top_ids)


class _Servers:
    """The served engine's side part_plan reads: the teacher's window-cache budget, and (optionally) early scoring."""

    def __init__(self, budget: int, early: bool) -> None:
        self.budget = budget
        if early:
            self.score_async = lambda *a, **k: None

    def window_cache_budget(self, model):
        return self.budget

    def generate_window_pair(self, *a, **k): ...

    def generate_windows(self, *a, **k): ...


def _part_plans(rank: int, world: int) -> list[tuple[int, bool]]:
    import dataclasses

    import torch.distributed as dist

    from topd_megatron.algorithm import objective
    from topd_megatron.training.scoring import ScoringContext, part_plan

    step = _step(rows=8, mb=1)
    obj = objective.preset("topd")
    obj = dataclasses.replace(obj, detection=dataclasses.replace(obj.detection, window=4))
    out = []
    for budget, early in ((100_000, True), (100, True), (100, False), (20, True)):
        servers = _Servers(budget, early)
        ctx = ScoringContext(objective=obj, student=None, teacher=None, engine=servers, scorer=servers, eos_id=2,
                             pad_id=0, tp_group=dist.group.WORLD, dp_group=dist.group.WORLD)  # fmt: skip
        out.append(part_plan(ctx, step))
    return out


def test_parts_are_pipelined_when_two_fit_the_teachers_cache() -> None:
    """part_plan: one part when the step fits; pipelined parts of half the budget when the step has the micro-batches
    for them and the engine can score early; else parts in sequence (capped at one micro-batch each)."""
    from topd_megatron.distributed.launch import spawn

    fits, pipelined, in_sequence, tiny = spawn(_part_plans, 1, timeout=300)[0]
    assert fits == (1, False)
    assert pipelined[1] and 1 < pipelined[0] <= 8, (pipelined, in_sequence, tiny)
    assert not in_sequence[1] and 1 < in_sequence[0] < pipelined[0]  # the whole budget per part: fewer parts
    assert tiny == (8, False)  # half the budget would need more parts than micro-batches
