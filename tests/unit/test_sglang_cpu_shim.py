"""The rotary-embedding shim SGLang's generic torch path imports on CPU must equal SGLang's own native rotary."""

from __future__ import annotations

import sys

import pytest
import torch

from topd_megatron.rollout.sglang.cpu_shim import SHIM_DIR


@pytest.fixture(scope="module")
def shim_rotary():
    sys.path.insert(0, str(SHIM_DIR))
    try:
        from vllm._custom_ops import rotary_embedding

        yield rotary_embedding
    finally:
        sys.path.remove(str(SHIM_DIR))
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shim_equals_sglang_native_rotary(shim_rotary, neox: bool, rotary_dim: int, dtype: torch.dtype) -> None:
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    rope = RotaryEmbedding(
        head_size=64,
        rotary_dim=rotary_dim,
        max_position_embeddings=256,
        base=10000,
        is_neox_style=neox,
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(rotary_dim + neox)
    positions = torch.randint(0, 256, (9,), generator=g)
    query = torch.randn(9, 4 * 64, generator=g).to(dtype)
    key = torch.randn(9, 2 * 64, generator=g).to(dtype)
    want_q, want_k = rope.forward_native(positions, query.clone(), key.clone())
    got_q, got_k = query.clone(), key.clone()
    shim_rotary(positions, got_q, got_k, 64, rope.cos_sin_cache, neox)
    tol = 0.0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got_k, want_k, atol=tol, rtol=tol)
    assert not torch.equal(got_q, query), "the shim must rotate in place"
