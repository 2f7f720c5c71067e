"""Near-future windows of an in-process Megatron model, sampled per rollout in packed rows (no prefix re-run).

Without a KV cache, sampling K tokens after each of C prefixes of one rollout as C separate sequences runs the
rollout's prefix C times at each of the K steps. Here every decode step runs each rollout row once, with its active
windows' tokens so far packed after it (`algorithm.packing`: per-window attention mask, RoPE positions continuing
from the anchor); the logits of window g's newest column (or, before its first token, the rollout's own column at its
anchor) give the distribution of its next token, exactly those of the sequence (x, y_<=j, u_1..u_i). Finished windows
drop out; rows without an active window are not run.

Tokens per decode step: sum over rows with active windows of S + i * (active windows of the row), instead of
(active windows) x (prefix + i). Samples follow the same distributions as `EmbeddedEngine.generate` on the prefixes
(exact Gumbel-max sampling on the vocab shards, `rollout.sampling`), not the same random draws.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from topd_megatron.algorithm.packing import pack_rows
from topd_megatron.algorithm.types import Windows
from topd_megatron.models.build import MegatronLM
from topd_megatron.models.positions import width_multiple
from topd_megatron.rollout.engine import Generation, SamplingParams
from topd_megatron.rollout.sampling import sample_next
from topd_megatron.seeds import embedded_generator_seed
from topd_megatron.training.forward import MicroBatch, forward_logits


def _step_logits(lm: MegatronLM, rows: Tensor, positions: Tensor, made: Tensor, n: int, mb: int) -> Tensor | None:
    """Last-stage logits [C, V_local] of the next token of every window (positions flat over `rows`), each window
    holding its `n` tokens so far (`made` [C, >= n]); None on other pipeline stages."""
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    b = -(-rows.shape[0] // mb) * mb
    padded = torch.zeros(b, rows.shape[1], dtype=torch.long)
    padded[: rows.shape[0]] = rows
    lengths = torch.full((positions.numel(),), n + 1, dtype=torch.long)  # + the token being sampled (not an input)
    tokens = torch.zeros(positions.numel(), n + 1, dtype=torch.long)
    tokens[:, :n] = made[:, :n]
    packed = pack_rows(
        padded, torch.zeros_like(padded, dtype=torch.bool), positions, Windows(tokens=tokens, lengths=lengths),
        pad_id=0, micro_batch_size=mb, width_multiple=width_multiple(lm.modules),
    )  # fmt: skip

    def newest(batch: MicroBatch, logits: Tensor) -> Tensor:
        return packed.window_logits(batch.index, logits)[n :: n + 1]  # the last of each window's n + 1 rows

    mbs = [
        MicroBatch(
            tokens=m.tokens.to(device),
            position_ids=m.position_ids.to(device),
            loss_mask=m.loss_mask,
            index=m.index,
            window_mask=m.window_mask,
        )
        for m in packed.microbatches()
    ]
    parts = forward_logits(lm.modules, mbs, newest)
    return torch.cat(parts) if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def sample_windows_packed(
    lm: MegatronLM, rows: Tensor, positions: Tensor, params: SamplingParams, *, micro_batch_size: int
) -> list[Generation]:
    """`WindowSampler.generate_windows` for an in-process model (collective over the model-parallel group)."""
    from megatron.core import parallel_state as ps

    s1 = rows.shape[1] - 1
    c, k = positions.numel(), params.max_new_tokens
    made = torch.zeros(c, k, dtype=torch.long)
    logps = torch.zeros(c, k, dtype=torch.float32)
    lengths = torch.zeros(c, dtype=torch.long)
    active = torch.ones(c, dtype=torch.bool)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(
        embedded_generator_seed(params.seed, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    )
    pp_group, stop = ps.get_pipeline_model_parallel_group(), set(params.stop_token_ids)
    for n in range(k):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        used = sorted({int(positions[i]) // s1 for i in idx})  # rows with an active window, renumbered
        renum = {r: i for i, r in enumerate(used)}
        local = torch.tensor([renum[int(positions[i]) // s1] * s1 + int(positions[i]) % s1 for i in idx])
        logits = _step_logits(lm, rows[used], local, made[idx], n, micro_batch_size)
        ids = torch.zeros(idx.numel(), dtype=torch.long)
        lp = torch.zeros(idx.numel(), dtype=torch.float32)
        if logits is not None:
            tok, logp = sample_next(
                logits, temperature=params.temperature, top_p=params.top_p, generator=gen,
                vocab_size=lm.vocab_size, group=ps.get_tensor_model_parallel_group(),
            )  # fmt: skip
            ids, lp = tok.cpu(), logp.float().cpu()
        if dist.get_world_size(pp_group) > 1:
            payload = torch.stack([ids.double(), lp.double()])
            payload = payload.cuda() if torch.cuda.is_available() else payload
            dist.broadcast(payload, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
            ids, lp = payload[0].long().cpu(), payload[1].float().cpu()
        made[idx, n], logps[idx, n] = ids, lp
        lengths[idx] = n + 1
        active[idx] = torch.tensor([int(t) not in stop for t in ids], dtype=torch.bool)
    return [
        Generation(
            prompt_ids=rows[int(p) // s1, : int(p) % s1 + 1].tolist(),
            output_ids=made[i, : lengths[i]].tolist(),
            output_logprobs=logps[i, : lengths[i]].tolist(),
            finished=bool(lengths[i]) and int(made[i, lengths[i] - 1]) in stop,
        )
        for i, p in enumerate(positions.tolist())
    ]
