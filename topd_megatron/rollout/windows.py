"""Near-future windows of an in-process Megatron model, sampled per rollout with a KV cache (no prefix re-run).

A window after the prefix (x, y_<=j) of a rollout row is a continuation of that row's first j + 1 tokens, so a
rollout's windows share its keys and values up to their anchors. Here each rollout row is prefilled once into
Megatron-Core's static KV cache (StaticInferenceContext), and its windows then decode side by side in the same cache
slot, one token of every window per forward (`_WindowDecoder`):

    cache columns   0 .. S-1      | S + 0*c .. S + 1*c - 1 | S + 1*c ...     (c: the most windows of a row)
    holds           the rollout   | u_1 of windows 1..c    | u_2 of windows 1..c ...
    RoPE position   0 .. S-1      | j_g + 1                | j_g + 2 ...
    a query sees    causal        | columns 0..j_g and its own window's earlier tokens

The logits of the rollout's own column j_g (from the prefill) give u_1 of window g; those of u_i's column give
u_{i+1}. Masked keys get probability 0 and rotary attention depends on positions, not columns, so every window's
distributions are exactly those of the sequence (x, y_<=j, u_1..u_i) run on its own (per-token RoPE positions through
`models.positions`, the mask through MicroBatch.attention_mask). Finished windows stay in their columns, ignored.

Tokens per call: one prefill of the rows that have windows (S each), then (K - 1) forwards of c tokens per row,
instead of one prefill per window of its whole prefix. Samples follow the same distributions as
`EmbeddedEngine.generate` on the prefixes (exact Gumbel-max sampling on the vocab shards, `rollout.sampling`), not the
same random draws.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from topd_megatron.models.build import MegatronLM
from topd_megatron.models.positions import width_multiple
from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.rollout.sampling import sample_next
from topd_megatron.seeds import embedded_generator_seed
from topd_megatron.training.forward import MicroBatch, forward_logits

if TYPE_CHECKING:
    from megatron.core.inference.contexts import BaseInferenceContext


def next_tokens(
    lm: MegatronLM,
    chunk: MicroBatch,
    pick: Callable[[Tensor], Tensor],
    count: int,
    params: SamplingParams,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """One forward of a decode chunk: the next token [count] and its log-prob [count] of each of the `count` logits
    rows `pick` chooses ([b, s, V_local] -> [count, V_local]), sampled on the last pipeline stage and broadcast to the
    other stages (collective over the model-parallel group)."""
    from megatron.core import parallel_state as ps

    ids, logps = torch.zeros(count, dtype=torch.long), torch.zeros(count, dtype=torch.float32)
    logits = forward_logits(lm.modules, [chunk])
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        tok, lp = sample_next(
            pick(logits[0]),
            temperature=params.temperature,
            top_p=params.top_p,
            generator=gen,
            vocab_size=lm.vocab_size,
            group=ps.get_tensor_model_parallel_group(),
        )
        ids, logps = tok.cpu(), lp.float().cpu()
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        payload = torch.stack([ids.double(), logps.double()]).to(chunk.tokens.device)
        dist.broadcast(payload, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
        ids, logps = payload[0].long().cpu(), payload[1].float().cpu()
    return ids, logps


def cache_chunk(
    tokens: Tensor,
    positions: Tensor,
    mask: Tensor,
    cache: BaseInferenceContext,
    start: int,
    end: int,
    *,
    rope_positions: Tensor | None = None,
) -> MicroBatch:
    """Columns [start, end) of the [b, L] `tokens` as the next forward of KV-cached decoding: their rows of the [b, 1,
    L, L] `mask` over every column up to `end` (the cached ones included)."""
    return MicroBatch(
        tokens=tokens[:, start:end],
        position_ids=positions[:, start:end],
        loss_mask=torch.ones(tokens.shape[0], end - start, device=tokens.device),
        attention_mask=mask[..., start:end, :end],
        inference_context=cache,
        rope_positions=rope_positions,
    )


def _at(rows: Tensor, cols: Tensor) -> Callable[[Tensor], Tensor]:
    """Picks the logits rows [n, V_local] at (rows[i], cols[i]) of a forward's [b, s, V_local]."""
    return lambda logits: logits[rows, cols]


def sample_windows_packed(
    lm: MegatronLM, rows: Tensor, positions: Tensor, params: SamplingParams, *, micro_batch_size: int
) -> list[Generation]:
    """`WindowSampler.generate_windows` for an in-process model (collective over the model-parallel group): the rows
    that have windows, `micro_batch_size` rows per KV cache."""
    from megatron.core import parallel_state as ps

    s1 = rows.shape[1] - 1
    gen = torch.Generator(device="cpu")
    gen.manual_seed(
        embedded_generator_seed(params.seed, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    )
    if params.max_new_tokens < 1:
        raise ValueError(f"generate_windows: max_new_tokens must be >= 1, got {params.max_new_tokens}")
    flat = positions.tolist()
    used = sorted({p // s1 for p in flat})
    out: list[Generation | None] = [None] * len(flat)
    for start in range(0, len(used), micro_batch_size):
        chunk_rows = used[start : start + micro_batch_size]
        local = {r: i for i, r in enumerate(chunk_rows)}
        members = [i for i, p in enumerate(flat) if p // s1 in local]
        anchors = [(local[flat[i] // s1], flat[i] % s1) for i in members]
        decoded = _WindowDecoder(lm, rows[chunk_rows], anchors, params, gen).run()
        for i, g in zip(members, decoded, strict=True):
            out[i] = g
    assert all(g is not None for g in out)
    return [g for g in out if g is not None]


@dataclass(slots=True)
class _WindowDecoder:
    """KV-cached decoding of the windows of a chunk of rollout rows (module docstring)."""

    lm: MegatronLM
    rows: Tensor
    """[b, S] the rollout rows (right-padded)."""
    anchors: list[tuple[int, int]]
    """(row in the chunk, anchor column j) of each window: it continues rows[row, : j + 1]."""
    params: SamplingParams
    gen: torch.Generator
    slot: list[int] = field(init=False)
    """The window's index among its row's windows (its column within every decode block)."""
    outs: list[list[int]] = field(init=False)
    lps: list[list[float]] = field(init=False)
    done: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        seen: dict[int, int] = {}
        self.slot = []
        for r, _ in self.anchors:
            self.slot.append(seen.get(r, 0))
            seen[r] = self.slot[-1] + 1
        self.outs = [[] for _ in self.anchors]
        self.lps = [[] for _ in self.anchors]
        self.done = [False for _ in self.anchors]

    def _layout(self, s: int, c: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE positions [b, total] of every cache column and the boolean mask [b, 1, total, total] (True = masked)
        for a prefill of `s` columns and K - 1 decode blocks of `c` columns."""
        b, k = self.rows.shape[0], self.params.max_new_tokens
        total = s + (k - 1) * c
        pos = torch.arange(total).repeat(b, 1)
        anchor = torch.arange(total).repeat(b, 1)  # the last rollout column a query sees (its own for the rollout)
        window = torch.full((b, total), -1, dtype=torch.long)  # the window a column belongs to (-1: the rollout)
        blocks = torch.arange(k - 1)
        for (r, j), g in zip(self.anchors, self.slot, strict=True):
            cols = s + blocks * c + g
            pos[r, cols], anchor[r, cols], window[r, cols] = j + 1 + blocks, j, g
        free = window[:, s:] < 0  # columns of no window (a row with fewer than c windows): they see column 0 only
        anchor[:, s:][free], pos[:, s:][free] = 0, 0
        # the [b, total, total] comparisons on the device: on the host they took about 1 s per call at 4 rows of
        # 7,232 columns on one CPU thread (the shape of bench/window_decode.py in tools/gpu_check.sh)
        window, anchor = window.to(device), anchor.to(device)
        q = torch.arange(total, device=device).view(1, total, 1)
        key = torch.arange(total, device=device).view(1, 1, total)
        same = (window.unsqueeze(2) == window.unsqueeze(1)) & (window.unsqueeze(2) >= 0) & (key <= q)
        allowed = (key <= anchor.unsqueeze(2)) | same
        return pos.to(device), (~allowed).unsqueeze(1)

    def run(self) -> list[Generation]:
        from megatron.core.inference.contexts import StaticInferenceContext

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        multiple = width_multiple(self.lm.modules)
        b, k = self.rows.shape[0], self.params.max_new_tokens
        s = -(-self.rows.shape[1] // multiple) * multiple  # sequence parallelism splits every chunk over TP ranks
        c = -(-(max(self.slot) + 1) // multiple) * multiple
        pos, mask = self._layout(s, c, device)
        tokens = torch.zeros(b, pos.shape[1], dtype=torch.long)
        tokens[:, : self.rows.shape[1]] = self.rows
        tokens = tokens.to(device)
        cache = StaticInferenceContext(max_batch_size=b, max_sequence_length=pos.shape[1])
        rows = torch.tensor([r for r, _ in self.anchors], device=device)
        cols = torch.tensor([j for _, j in self.anchors], device=device)
        start, end = 0, s
        for n in range(k):
            chunk = cache_chunk(tokens, pos, mask, cache, start, end, rope_positions=pos)
            # the prefill's anchor columns give u_1, then each window's own column of the block the next token
            ids, logps = next_tokens(self.lm, chunk, _at(rows, cols), len(self.anchors), self.params, self.gen)
            cache.increment_sequence_len_offset(end - start)
            self._record(ids, logps)
            if all(self.done) or n == k - 1:
                break
            cols = torch.tensor(self.slot, device=device)
            last = [o[-1] if not d else 0 for o, d in zip(self.outs, self.done, strict=True)]
            tokens[rows, end + cols] = torch.tensor(last, device=device)
            start, end = end, end + c
        return [
            Generation(
                prompt_ids=self.rows[r, : j + 1].tolist(), output_ids=o, output_logprobs=lp, finished=self._stopped(o)
            )
            for (r, j), o, lp in zip(self.anchors, self.outs, self.lps, strict=True)
        ]

    def _record(self, ids: Tensor, logps: Tensor) -> None:
        for i in range(len(self.anchors)):
            if self.done[i]:
                continue
            self.outs[i].append(int(ids[i]))
            self.lps[i].append(float(logps[i]))
            self.done[i] = self._stopped(self.outs[i]) or len(self.outs[i]) >= self.params.max_new_tokens

    def _stopped(self, out: list[int]) -> bool:
        return bool(out) and out[-1] in self.params.stop_token_ids
