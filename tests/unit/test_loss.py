"""token_divergence / token_logprobs / token_entropy on one rank (group=None) against the float64 reference.

The sharded cases (TP = 2 and 4 over gloo) are in tests/distributed/test_loss_tp.py; here the vocabulary is whole,
which still exercises padding (vocab_size < V), chunking, extreme logits, low precision and every error path.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests import _reference_topd as ref
from topd_megatron.algorithm.loss import (
    default_chunk_size,
    token_divergence,
    token_entropy,
    token_logprobs,
    vocab_parallel_embedding,
)

OPS = ("reverse_kl", "forward_kl", "jsd", "log_ratio", "logprob", "entropy")


def make_logits(case: str, seed: int = 0, t: int = 23, v: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    te = 0.5 * s + torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    if case == "extreme":
        # +-1e4 logits: one-hot-like rows, rows where student and teacher disagree violently, huge offsets
        s[0], te[0] = 0.0, 0.0
        s[0, 3], te[0, 7] = 1e4, 1e4
        s[1] += 1e4
        te[2] -= 1e4
        s[3, ::2] = -1e4
        te[4, 1::3] = 1e4
    tokens = torch.randint(0, v, (t,), generator=g)
    return s, te, tokens


def run_op(op: str, s, te, tokens, **kw) -> torch.Tensor:
    if op == "logprob":
        return token_logprobs(s, tokens, **kw)
    if op == "entropy":
        return token_entropy(s, **kw)
    beta = kw.pop("beta", 0.3)
    return token_divergence(s, te, op, tokens=tokens, beta=beta, **kw)


def ref_op(op: str, s, te, tokens, vocab_size=None) -> torch.Tensor:
    if op == "logprob":
        return ref.logprobs(s, tokens, vocab_size)
    if op == "entropy":
        return ref.entropy(s, vocab_size)
    return ref.divergence(s, te, op, tokens=tokens, beta=0.3, vocab_size=vocab_size)


def value_and_grad(fn, s, w):
    s = s.detach().clone().requires_grad_()
    out = fn(s)
    (grad,) = torch.autograd.grad((out * w).sum(), s)
    return out.detach(), grad


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "case,vocab_size,chunk", [("plain", None, None), ("padded", 33, 4), ("extreme", None, 5), ("extreme", 37, 1)]
)
def test_matches_reference_fp64(op, case, vocab_size, chunk):
    s, te, tokens = make_logits(case)
    if vocab_size is not None:
        tokens = tokens % vocab_size
    w = torch.randn(s.shape[0], dtype=torch.float64)
    got, g_got = value_and_grad(lambda x: run_op(op, x, te, tokens, vocab_size=vocab_size, chunk_size=chunk), s, w)
    exp, g_exp = value_and_grad(lambda x: ref_op(op, x, te, tokens, vocab_size), s, w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-10, atol=1e-12)
    if vocab_size is not None:
        assert g_got[:, vocab_size:].abs().max() == 0  # padded entries take no part


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_inputs_accumulate_in_fp32(op, dtype):
    s, te, tokens = make_logits("plain", seed=1, t=17, v=64)
    s, te, tokens = s.to(dtype), te.to(dtype), tokens % 61
    w = torch.randn(s.shape[0], dtype=torch.float64)
    w32 = w.to(torch.float32)
    got, g_got = value_and_grad(lambda x: run_op(op, x, te, tokens, vocab_size=61, chunk_size=3), s, w32)
    # the reference sees exactly the rounded inputs, so only the fp32 arithmetic differs
    exp, g_exp = value_and_grad(lambda x: ref_op(op, x, te.double(), tokens, 61), s.double(), w)
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(g_got.double(), g_exp, rtol=tol, atol=tol * 0.1)


def test_uneven_lengths_and_chunk_sizes_agree():
    s, te, tokens = make_logits("plain", seed=2, t=37, v=29)
    base = token_divergence(s, te, "jsd", beta=0.5)
    for chunk in (1, 2, 5, 36, 37, 1000):
        torch.testing.assert_close(token_divergence(s, te, "jsd", beta=0.5, chunk_size=chunk), base, rtol=0, atol=1e-12)


def test_empty_and_single_token():
    s, te, tokens = make_logits("plain", t=1, v=5)
    assert token_divergence(s[:0], te[:0], "reverse_kl").shape == (0,)
    torch.testing.assert_close(token_divergence(s, te, "reverse_kl"), ref.divergence(s, te, "reverse_kl"))


def test_teacher_gets_no_gradient_and_result_is_per_token():
    s, te, tokens = make_logits("plain", t=6, v=11)
    s.requires_grad_()
    te.requires_grad_()
    out = token_divergence(s, te, "reverse_kl")
    assert out.shape == (6,)
    out.sum().backward()
    assert te.grad is None and s.grad is not None


def test_masked_rows_get_zero_gradient():
    s, te, tokens = make_logits("extreme", t=8, v=12)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    s.requires_grad_()
    (token_divergence(s, te, "reverse_kl", chunk_size=3) * mask).sum().backward()
    assert s.grad[~mask].abs().max() == 0 and s.grad[mask].abs().max() > 0


def test_default_chunk_size_bounds_the_chunk():
    assert default_chunk_size(151936, "cpu") * 151936 <= 1 << 20
    assert default_chunk_size(10**9) == 1
    assert default_chunk_size(1000, "cuda") * 1000 <= 1 << 24
    assert default_chunk_size(16384, "cpu", world=2) * 16384 <= 1 << 22


def _peak_allocated(fn) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs, from the profiler's allocation records (each op's
    allocations net of its frees, accumulated in time order): deterministic, unlike resident-set sizes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_peak_memory_is_bounded_by_the_chunk_not_t():
    """Forward + backward add the [T, V] bf16 gradient plus O(chunk) buffers, never [T, V] fp32 intermediates."""
    t, v = 2048, 8192
    s = torch.randn(t, v, dtype=torch.bfloat16, requires_grad=True)
    te = torch.randn(t, v, dtype=torch.bfloat16)
    grad_bytes, fp32_tv = t * v * 2, t * v * 4

    def ours() -> None:
        token_divergence(s, te, "reverse_kl", chunk_size=64).sum().backward()  # 2 MiB fp32 chunk buffers

    def naive() -> None:
        logp, logq = torch.log_softmax(s.float(), -1), torch.log_softmax(te.float(), -1)
        (logp.exp() * (logp - logq)).sum().backward()

    added = _peak_allocated(ours)
    s.grad = None
    naive_added = _peak_allocated(naive)
    assert grad_bytes <= added < grad_bytes + fp32_tv // 4, (added / 2**20, grad_bytes / 2**20)
    assert naive_added > 2 * fp32_tv, "the measurement must see the naive method's [T, V] fp32 buffers"


def test_embedding_lookup_single_rank():
    w = torch.randn(10, 4)
    ids = torch.tensor([[0, 9, 3], [3, 3, 1]])
    torch.testing.assert_close(vocab_parallel_embedding(w, ids), w[ids])
    with pytest.raises(ValueError, match=r"ids must be in \[0, 8\)"):
        vocab_parallel_embedding(w, ids, vocab_size=8)
    with pytest.raises(ValueError, match="larger than the group's total"):
        vocab_parallel_embedding(w, ids, vocab_size=11)


# ------------------------------------------------------------------ errors


def test_error_mismatched_shapes():
    s, te, _ = make_logits("plain", t=5, v=8)
    msg = r"mismatched student/teacher shard shapes: student \(5, 8\) vs teacher \(5, 7\)"
    with pytest.raises(ValueError, match=msg):
        token_divergence(s, te[:, :7], "reverse_kl")
    with pytest.raises(ValueError, match=r"expected logits of shape \[T, V_local\]"):
        token_divergence(s[0], te[0], "reverse_kl")


def test_error_vocab_size_larger_than_group_total():
    s, te, _ = make_logits("plain", t=5, v=8)
    with pytest.raises(ValueError, match=r"vocab_size=9 is larger than the group's total vocabulary 8 = 1 ranks x 8"):
        token_divergence(s, te, "reverse_kl", vocab_size=9)


def test_error_log_ratio_needs_tokens():
    s, te, _ = make_logits("plain", t=5, v=8)
    with pytest.raises(ValueError, match="kind='log_ratio' needs tokens"):
        token_divergence(s, te, "log_ratio")
    with pytest.raises(ValueError, match=r"tokens must be global ids in \[0, vocab_size=6\)"):
        token_divergence(s, te, "log_ratio", tokens=torch.tensor([0, 1, 2, 3, 7]), vocab_size=6)
    with pytest.raises(ValueError, match=r"tokens must have shape \[T\]"):
        token_divergence(s, te, "log_ratio", tokens=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("who", ["student", "teacher"])
def test_error_nonfinite_logits_report_the_position(bad, who):
    s, te, _ = make_logits("plain", t=12, v=8)
    (s if who == "student" else te)[9, 5] = bad
    with pytest.raises(
        ValueError, match=re.escape(f"{who} logits contain NaN or Inf at token position 9") + r".*vocabulary id 5"
    ):
        token_divergence(s, te, "reverse_kl", chunk_size=4)


def test_nonfinite_padding_is_ignored():
    s, te, _ = make_logits("plain", t=4, v=8)
    s[:, 6:] = float("nan")  # Megatron's padded columns carry no meaning
    assert torch.isfinite(token_divergence(s, te, "forward_kl", vocab_size=6)).all()


def test_error_bad_kind_and_beta():
    s, te, _ = make_logits("plain", t=3, v=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        token_divergence(s, te, "kl")
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        token_divergence(s, te, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_divergence(s, te, "jsd", chunk_size=0)


def test_topk_divergence_refuses_bad_inputs_and_is_zero_for_the_same_ranking() -> None:
    from topd_megatron.algorithm.loss import topk_divergence

    logits = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = logits.topk(3, dim=-1).indices
    own = torch.log_softmax(logits, -1).gather(1, ids)
    assert topk_divergence(logits, ids, own).abs().max() < 1e-12  # the student's own top-k: no divergence
    assert (topk_divergence(logits, ids, own.flip(-1)) > 0).all()
    with pytest.raises(ValueError, match=r"must both be \[T, k\]"):
        topk_divergence(logits, ids[:, :2], own)
    outside = ids.clone()
    outside[0, 0] = 9
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        topk_divergence(logits, outside, own, vocab_size=8)
