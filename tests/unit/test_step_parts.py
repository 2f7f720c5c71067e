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
