"""Forward (and backward) passes through Megatron's pipeline schedules.

Every model call in topd goes through `megatron.core.pipeline_parallel.get_forward_backward_func`, so the same code
runs with PP=1, PP>1 and interleaved (virtual) PP. The caller supplies micro-batches and a `loss_fn` that runs on
the last pipeline stage with this rank's vocabulary shard of the logits:

    def loss_fn(mb: MicroBatch, logits: Tensor) -> tuple[Tensor, dict]:   # logits [b, s, V_padded / TP]
        ...
    outputs = run_pipeline(lm.modules, microbatches, loss_fn, forward_only=False)

On stages other than the last, `loss_fn` is never called and `run_pipeline` returns an empty list.
Loss scaling follows Megatron's convention for 2-tuples: the returned loss is divided by the number of
micro-batches before backward, so return the per-micro-batch mean you want averaged. Megatron divides the loss
tensor in place: metrics must hold a copy (`loss.detach().clone()`), not a view of it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.inference.contexts import BaseInferenceContext
from topd_megatron.models.positions import WindowMask, positioned


@dataclass(slots=True)
class MicroBatch:
    """One micro-batch of right-padded sequences. All tensors are [b, s] on the compute device."""

    tokens: torch.Tensor
    """Token ids (long)."""
    position_ids: torch.Tensor
    """0..len-1 per sequence (long)."""
    loss_mask: torch.Tensor
    """1.0 where a position contributes to the loss (float)."""
    index: int = 0
    """Position of this micro-batch in the step, for loss functions that look up per-micro-batch data."""
    attention_mask: torch.Tensor | None = None
    """Megatron boolean mask [b, 1, s, s], True = masked out; None = causal (right padding needs nothing more)."""
    inference_context: BaseInferenceContext | None = None
    """Megatron's KV cache for incremental decoding (`tokens` are then the next chunk of every sequence, the mask
    [1, 1, s, offset + s] covers the cached positions too); None for a plain forward."""
    window_mask: WindowMask | None = None
    """Packed rows (algorithm.packing): the mask is built from this when the micro-batch runs, and RoPE is applied at
    `position_ids` instead of 0..s-1 (models.positions)."""
    rope_positions: torch.Tensor | None = None
    """[b, L] RoPE position of every column of the KV cache (`inference_context`, L its max_sequence_length) when the
    cached tokens do not sit at positions 0..L-1 (windows decoded after their rollout, rollout.windows); Megatron
    slices it per forward. None: 0..L-1."""


def causal_mask(seq_len: int, device: torch.device | str) -> torch.Tensor:
    """Megatron's mask convention: [1, 1, s, s] bool, True where attention is NOT allowed (the future)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def make_microbatch(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None, index: int = 0) -> MicroBatch:
    """A MicroBatch for right-padded `tokens` [b, s] with an explicit causal mask."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s).contiguous()
    if loss_mask is None:
        loss_mask = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
    return MicroBatch(
        tokens=tokens,
        position_ids=position_ids,
        loss_mask=loss_mask.float(),
        index=index,
        attention_mask=causal_mask(s, tokens.device),
    )


LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def run_pipeline(
    modules: list[Any],
    microbatches: list[MicroBatch],
    loss_fn: LossFn,
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    """Run all micro-batches through `modules` (this rank's virtual stages) with Megatron's schedule.

    Returns the per-micro-batch metrics dicts produced by `loss_fn` on the last pipeline stage ([] elsewhere).
    With `forward_only=False`, gradients are accumulated into the modules' parameters (main_grad under DDP).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("run_pipeline needs at least one micro-batch")
    b, s = microbatches[0].tokens.shape
    for mb in microbatches:
        if mb.tokens.shape != (b, s):
            raise ValueError(
                "all micro-batches must share one shape for the pipeline's fixed-size transfers: got"
                f" {tuple(mb.tokens.shape)} and {(b, s)}; pad them to a common length"
            )

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        mask, placed = mb.attention_mask, nullcontext()
        if mb.window_mask is not None:
            mask, placed = mb.window_mask.dense(), positioned(model, mb.position_ids)
        elif mb.rope_positions is not None:
            placed = positioned(model, mb.rope_positions)
        cache = {} if mb.inference_context is None else {"inference_context": mb.inference_context}
        with placed:
            logits = model(mb.tokens, mb.position_ids, mask, **cache)

        def reduce(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            return loss_fn(mb, output)

        return logits, reduce

    iterators = [iter(microbatches) for _ in modules]
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if len(modules) > 1 else iterators[0],
        model=modules if len(modules) > 1 else modules[0],
        num_microbatches=len(microbatches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_logits(
    modules: list[Any], microbatches: list[MicroBatch], reduce: Callable[[MicroBatch, torch.Tensor], Any] | None = None
) -> list[Any]:
    """No-grad forward of every micro-batch: this rank's vocab-sharded logits [b, s, V_padded / TP] per micro-batch
    on the last pipeline stage, an empty list on other stages. With `reduce`, `reduce(mb, logits)` is kept instead,
    computed as each micro-batch's logits arrive, so only one micro-batch's logits are alive at a time."""
    out: list[Any] = []

    def keep(mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out.append(logits.detach() if reduce is None else reduce(mb, logits.detach()))
        return logits.new_zeros(()), {}

    run_pipeline(modules, microbatches, keep, forward_only=True)
    return out


def broadcast_from_last_stage(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The last pipeline stage's tensor `t` on every stage of this pipeline (other stages pass None; `shape` and
    `dtype` describe what they receive)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        assert t is not None
        return t
    buf = t.to(dtype).contiguous() if t is not None else torch.empty(shape, dtype=dtype)
    dist.broadcast(buf, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return buf
