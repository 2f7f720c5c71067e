"""`rotary_embedding` with the signature and in-place semantics SGLang expects from vLLM's custom op, in PyTorch."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [T, H, R] float32, cos/sin [T, 1, R/2] -> x rotated by the per-position angles."""
    if is_neox:  # halves: (x1, x2) = (x[:R/2], x[R/2:])
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # GPT-J style: interleaved pairs
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    """Rotate the first R = cos_sin_cache.shape[-1] dims of every head of `query` and `key` in place.

    positions [T] (any shape with T elements); query/key [T, H * head_size] or [T, H, head_size];
    cos_sin_cache [max_position, R]: cos in the first R/2 columns, sin in the last R/2. Computed in float32.
    """
    pos = positions.flatten()
    cos, sin = cos_sin_cache.index_select(0, pos).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot_dim = cos_sin_cache.shape[-1]
    for x in (query, key):
        if x is None:
            continue
        heads = x.view(pos.numel(), -1, head_size)
        heads[..., :rot_dim] = _rotate(heads[..., :rot_dim].float(), cos, sin, is_neox).to(x.dtype)
