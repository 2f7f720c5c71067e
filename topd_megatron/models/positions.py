"""Per-token rotary positions and per-window attention masks for packed rows (the seam packed guidance needs).

Megatron-Core 0.19.2's `GPTModel` computes standard rotary embeddings from the sequence length alone (only mrope
reads `position_ids`), so a row whose tokens do not sit at positions 0..s-1 cannot be expressed through its forward
arguments. `install(module)` (done by `models.build.build_model` for every model chunk) adds a forward hook to the
chunk's `RotaryEmbedding`; inside `positioned(module, position_ids)` the hook replaces the embedding Megatron computed
from the length by the same embedding gathered at each token's own position:

    with positioned(chunk, position_ids):        # [b, s] int64
        logits = chunk(tokens, position_ids, mask)

The gathered values are those `RotaryEmbedding.get_emb` gives for positions 0..max (the same float32 products p *
inv_freq, the same rope scaling), laid out [s, b, 1, d] instead of [s, 1, 1, d]: Megatron's unfused RoPE
(`_apply_rotary_pos_emb_bshd`) broadcasts them over the heads, so a row at positions 0..s-1 gets exactly today's
numbers. Outside `positioned`, or for a model without RoPE, nothing changes.

`WindowMask` is the attention pattern of a packed row in two [b, s] index vectors instead of a [b, 1, s, s] boolean
matrix (built only when a micro-batch runs, so a step's masks are never all alive at once): query column q may see
key column k iff k <= q and (k <= anchor[q] or k >= window_start[q]). Rollout tokens have anchor = their own column
(plain causal attention); the tokens of a window see the rollout up to the window's anchor and their own window.

Which backends can run packed rows (`packing_unsupported_reason`): Megatron-Core's local attention applies any
boolean mask; TransformerEngine's attention backends take causal/padding masks (an arbitrary mask needs TE's unfused
path, not verified on a GPU here), and TE's fused RoPE takes one position per sequence index. Callers fall back to
the per-branch rows (same numbers, more compute) with a warning when a model cannot pack.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_POSITIONS_ATTR = "_topd_positions"


@dataclass(kw_only=True, slots=True)
class WindowMask:
    """The attention pattern of packed rows, two int64 [b, s] tensors (see the module docstring)."""

    anchor: Tensor
    """[b, s]: the last column of the rollout a query may see (its own column for rollout tokens)."""
    window_start: Tensor
    """[b, s]: the first column of the query's own window (column + 1 for rollout tokens: nothing more)."""

    def dense(self) -> Tensor:
        """Megatron's boolean mask [b, 1, s, s], True where attention is NOT allowed."""
        s = self.anchor.shape[1]
        k = torch.arange(s, device=self.anchor.device).view(1, 1, s)
        q = torch.arange(s, device=self.anchor.device).view(1, s, 1)
        future = k > q
        outside = (k > self.anchor.unsqueeze(-1)) & (k < self.window_start.unsqueeze(-1))
        return (future | outside).unsqueeze(1)


def _gpt(module: Any) -> Any:
    """The GPTModel inside a (DDP-wrapped) model chunk."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _rotary(module: Any) -> Any | None:
    """The chunk's RotaryEmbedding when it uses standard RoPE (None otherwise)."""
    gpt = _gpt(module)
    if getattr(gpt, "position_embedding_type", None) != "rope":
        return None
    return getattr(gpt, "rotary_pos_emb", None)


def _positioned_embedding(rotary: Any, _args: tuple, output: Tensor) -> Tensor:
    """Forward hook: inside `positioned`, the embedding [s, 1, 1, d] becomes [s, b, 1, d] at each token's position."""
    positions = getattr(rotary, _POSITIONS_ATTR, None)
    if positions is None:
        return output
    table = rotary.get_emb(int(positions.max()) + 1)[:, 0, 0, :]  # [P, d], positions 0..P-1
    return table[positions.t().to(table.device)].unsqueeze(2)  # [s, b, 1, d]


def install(module: Any) -> bool:
    """Add the position hook to a model chunk's RoPE (once); False when the chunk has no standard RoPE."""
    rotary = _rotary(module)
    if rotary is None:
        return False
    if not getattr(rotary, "_topd_hooked", False):
        rotary.register_forward_hook(_positioned_embedding)
        rotary._topd_hooked = True
        setattr(rotary, _POSITIONS_ATTR, None)
    return True


@contextmanager
def positioned(module: Any, position_ids: Tensor) -> Iterator[None]:
    """Run the chunk's forward with RoPE at `position_ids` [b, s] (a chunk without RoPE ignores them: learned
    position embeddings already read `position_ids`)."""
    rotary = _rotary(module)
    if rotary is None:
        yield
        return
    if not getattr(rotary, "_topd_hooked", False):
        raise RuntimeError("positioned(): the model chunk was built without models.positions.install()")
    setattr(rotary, _POSITIONS_ATTR, position_ids)
    try:
        yield
    finally:
        setattr(rotary, _POSITIONS_ATTR, None)


def width_multiple(modules: list[Any]) -> int:
    """Rows must hold a multiple of this many tokens: TP with sequence parallelism (the sequence is split over the
    tensor-parallel ranks), else 1."""
    config = _gpt(modules[0]).config
    return config.tensor_model_parallel_size if getattr(config, "sequence_parallel", False) else 1


def packing_unsupported_reason(modules: list[Any]) -> str | None:
    """Why these model chunks cannot run packed rows (None: they can). Checks every attention layer's core and the
    RoPE settings; see the module docstring."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for module in modules:
        gpt = _gpt(module)
        config = gpt.config
        if getattr(config, "context_parallel_size", 1) > 1:
            return "context parallelism splits the sequence, and packed windows attend across it"
        if _rotary(module) is not None and getattr(config, "apply_rope_fusion", False):
            return "fused RoPE (apply_rope_fusion) takes one position per sequence index, not per token"
        if _rotary(module) is None and getattr(gpt, "position_embedding_type", "learned_absolute") != (
            "learned_absolute"
        ):
            return f"position embedding {gpt.position_embedding_type!r} cannot take per-token positions"
        for sub in gpt.modules():
            core = getattr(sub, "core_attention", None)
            if core is not None and not isinstance(core, DotProductAttention):
                return (
                    f"{type(core).__name__} takes causal or padding masks, not the per-window mask of packed rows"
                    " (Megatron-Core's local attention, model.transformer_engine=False, does)"
                )
    return None
