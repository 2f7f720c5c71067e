"""The packed-row layout (algorithm/packing.py): every logits row that scores a window token sees exactly the tokens, at
exactly the positions, that the same row of the whole-prefix branch sees; rollout rows see what they saw before.

Attention with RoPE is a function of the query (token, position) and the multiset of visible (token, position) keys, so
equal sets mean equal logits; tests/distributed/test_packing.py checks the numbers themselves through Megatron.
"""

from __future__ import annotations

import torch

from topd_megatron.algorithm.batch import StepBatch, build_branch_batch
from topd_megatron.algorithm.packing import pack_windows
from topd_megatron.algorithm.types import Windows
from topd_megatron.models.positions import WindowMask

PAD = 0


def _step(b: int = 3, s: int = 12, mb: int = 2) -> StepBatch:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 50, (b, s), generator=gen)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for row, end in enumerate((12, 8, 10)[:b]):
        mask[row, 2:end] = True
        tokens[row, end:] = PAD
    rows = -(-b // mb) * mb
    full = torch.full((rows, s), PAD, dtype=torch.long)
    full[:b] = tokens
    m = torch.zeros(rows, s, dtype=torch.bool)
    m[:b] = mask
    return StepBatch(
        tokens=full, response_mask=m, rollout_logprobs=torch.zeros(rows, s), num_rollouts=b, micro_batch_size=mb
    )


def _visible(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, q: int) -> list[tuple[int, int]]:
    keys = (~mask[q]).nonzero().flatten().tolist()
    return sorted((int(tokens[k]), int(positions[k])) for k in keys)


def test_window_rows_see_exactly_their_branch_prefix() -> None:
    step = _step()
    s1 = step.targets_per_row
    positions = torch.tensor([2, 5, 6, 1 * s1 + 3, 1 * s1 + 4, 2 * s1 + 2])  # flat, ascending; several per row
    k = 4
    lengths = torch.tensor([4, 1, 3, 0, 4, 2])
    windows = Windows(tokens=torch.randint(60, 90, (6, k), generator=torch.Generator().manual_seed(1)), lengths=lengths)
    packed = pack_windows(step, positions, windows, pad_id=PAD)
    branch = build_branch_batch(step, positions, windows, pad_id=PAD, micro_batch_size=1)
    dense = packed.mask.dense()[:, 0]
    w = packed.width
    assert w == step.tokens.shape[1] + max(3 + 0 + 2, 0 + 3, 1)  # row 0 appends 3+0+2 window tokens
    assert packed.window_tokens == int((lengths - 1).clamp(min=0).sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    for g in range(len(positions)):
        row, j = int(positions[g]) // s1, int(positions[g]) % s1
        b_tokens = branch.tokens[g]
        for i in range(int(lengths[g])):  # logits row scoring u_{i+1}
            flat = int(packed.window_rows[int(offsets[g]) + i])
            r, q = divmod(flat, w)
            assert r == row
            got = _visible(packed.tokens[r], packed.positions[r], dense[r], q)
            want = sorted((int(b_tokens[c]), c) for c in range(j + i + 1))  # branch column j + i sees 0..j + i
            assert got == want, (g, i)
            assert (int(packed.tokens[r, q]), int(packed.positions[r, q])) == (int(b_tokens[j + i]), j + i)


def test_rollout_columns_keep_causal_attention_and_the_step_layout() -> None:
    step = _step()
    positions = torch.tensor([3, 7])
    windows = Windows(tokens=torch.full((2, 3), 70), lengths=torch.tensor([3, 3]))
    packed = pack_windows(step, positions, windows, pad_id=PAD)
    s = step.tokens.shape[1]
    assert torch.equal(packed.tokens[:, :s], step.tokens)
    assert torch.equal(packed.loss_mask[:, :s], step.response_mask.float())
    assert float(packed.loss_mask[:, s:].abs().sum()) == 0.0
    dense = packed.mask.dense()[:, 0]
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    assert torch.equal(dense[:, :s, :s], causal.expand(dense.shape[0], s, s))
    assert bool(dense[:, :s, s:].all())  # no rollout token sees a window token
    mbs = packed.microbatches()
    assert len(mbs) == step.num_microbatches and all(mb.tokens.shape == (2, packed.width) for mb in mbs)
    assert packed.rows_of(0) == range(0, 2) and packed.rows_of(1) == range(2, 2)


def test_window_logits_pick_rows_window_after_window() -> None:
    step = _step()
    s1 = step.targets_per_row
    positions = torch.tensor([4, s1 + 2, 2 * s1 + 5])
    windows = Windows(tokens=torch.full((3, 3), 70), lengths=torch.tensor([2, 3, 1]))
    packed = pack_windows(step, positions, windows, pad_id=PAD)
    w = packed.width
    logits = torch.arange(step.tokens.shape[0] * w, dtype=torch.float64).view(-1, w, 1)  # value = flat row index
    first = packed.window_logits(0, logits[:2]).flatten().tolist()
    assert first == [
        4.0,
        float(step.tokens.shape[1]),
        float(w + 2),
        float(w + step.tokens.shape[1]),
        float(w + step.tokens.shape[1] + 1),
    ]
    second = packed.window_logits(1, logits[2:]).flatten().tolist()
    assert second == [float(2 * w + 5)]  # row 2's own logits row 5 scores the single token of its window


def test_window_mask_dense_matches_its_definition() -> None:
    anchor = torch.tensor([[0, 1, 2, 1, 1, 5]])
    start = torch.tensor([[1, 2, 3, 3, 3, 6]])
    dense = WindowMask(anchor=anchor, window_start=start).dense()[0, 0]
    for q in range(6):
        for k in range(6):
            allowed = k <= q and (k <= int(anchor[0, q]) or k >= int(start[0, q]))
            assert bool(dense[q, k]) == (not allowed)
