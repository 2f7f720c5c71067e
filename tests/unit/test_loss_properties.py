"""Properties of the per-token divergences that hold for every input (hypothesis): KL >= 0, KL(p, p) = 0,
0 <= JSD(beta) <= H(beta) (<= log 2 at beta = 0.5), JSD symmetric at beta = 0.5, log-ratio = difference of log-probs.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from topd_megatron.algorithm.loss import token_divergence, token_entropy, token_logprobs

SETTINGS = settings(max_examples=40, deadline=None)
# logits from ordinary to extreme (+-1e4), with a padded tail of random width
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=64)
moderate = st.floats(min_value=-30, max_value=30, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def logit_pairs(draw):
    t = draw(st.integers(1, 4))
    v = draw(st.integers(2, 24))
    elems = draw(st.sampled_from([finite, moderate]))
    s = torch.from_numpy(draw(arrays("float64", (t, v), elements=elems)))
    te = torch.from_numpy(draw(arrays("float64", (t, v), elements=elems)))
    vocab = draw(st.integers(1, v))
    chunk = draw(st.integers(1, t))
    return s, te, vocab, chunk


def binary_entropy(beta: float) -> float:
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


@SETTINGS
@given(logit_pairs(), st.sampled_from(["reverse_kl", "forward_kl"]))
def test_kl_is_nonnegative(pair, kind):
    s, te, vocab, chunk = pair
    kl = token_divergence(s, te, kind, vocab_size=vocab, chunk_size=chunk)
    # exact in real arithmetic; fp64 rounding of terms of size |logit| ~ 1e4 leaves ~1e-12 * scale
    assert (kl >= -1e-9 * (1 + s.abs().max() + te.abs().max())).all(), kl


@SETTINGS
@given(logit_pairs(), st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
def test_divergence_of_a_distribution_with_itself_is_zero(pair, kind):
    s, _, vocab, chunk = pair
    d = token_divergence(s, s.clone(), kind, vocab_size=vocab, chunk_size=chunk)
    assert d.abs().max() <= 1e-12, d
    # a constant shift of the logits is the same distribution
    d = token_divergence(s, s + 3.0, kind, vocab_size=vocab, chunk_size=chunk)
    assert d.abs().max() <= 1e-9 * (1 + s.abs().max()), d


@SETTINGS
@given(logit_pairs(), st.floats(0.05, 0.95))
def test_jsd_is_bounded_by_the_entropy_of_beta(pair, beta):
    s, te, vocab, chunk = pair
    j = token_divergence(s, te, "jsd", beta=beta, vocab_size=vocab, chunk_size=chunk)
    assert (j >= -1e-12).all() and (j <= binary_entropy(beta) + 1e-9).all(), (j, beta)


@SETTINGS
@given(logit_pairs())
def test_jsd_is_symmetric_at_one_half(pair):
    s, te, vocab, chunk = pair
    a = token_divergence(s, te, "jsd", beta=0.5, vocab_size=vocab, chunk_size=chunk)
    b = token_divergence(te, s, "jsd", beta=0.5, vocab_size=vocab, chunk_size=chunk)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert (a <= math.log(2) + 1e-12).all()


@SETTINGS
@given(logit_pairs(), st.data())
def test_log_ratio_is_the_difference_of_log_probs_and_entropy_is_bounded(pair, data):
    s, te, vocab, chunk = pair
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=s.shape[0], max_size=s.shape[0])))
    r = token_divergence(s, te, "log_ratio", tokens=tokens, vocab_size=vocab, chunk_size=chunk)
    lp = token_logprobs(s, tokens, vocab_size=vocab, chunk_size=chunk)
    lq = token_logprobs(te, tokens, vocab_size=vocab, chunk_size=chunk)
    torch.testing.assert_close(r, lp - lq, rtol=1e-12, atol=1e-9)
    assert (lp <= 1e-12).all()
    h = token_entropy(s, vocab_size=vocab, chunk_size=chunk)
    assert (h >= -1e-9).all() and (h <= math.log(vocab) + 1e-9).all()
