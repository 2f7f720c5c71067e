"""The loss with a teacher served by an inference engine (no teacher logits): the top-k and sampled-token forms
against float64 references computed from the full distributions, values and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from topd_megatron.algorithm import objective
from topd_megatron.algorithm.types import TokenBatch, Windows

V, N = 11, 9


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    mask = torch.tensor([False, True, True, True, True, False, True, True, True])
    batch = TokenBatch(tokens=tokens, seq_ids=torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1]), response_mask=mask)
    return s, t, batch


def _served(t: torch.Tensor, tokens: torch.Tensor, k: int) -> objective.ServedTeacher:
    logq = torch.log_softmax(t, -1)
    top = logq.topk(k, dim=-1)
    return objective.ServedTeacher(
        token_logprobs=logq.gather(1, tokens[:, None]).squeeze(1), top_ids=top.indices, top_logprobs=top.values
    )


def _cfg(signal: str, **kw) -> objective.Config:
    return dataclasses.replace(objective.preset("opd"), teacher_signal=signal, teacher_top_k=kw.pop("k", 4), **kw)


@pytest.mark.parametrize("k", [1, 3, V])
def test_top_k_form_is_the_renormalised_reverse_kl_and_equals_the_exact_kl_at_k_equals_v(k):
    s, t, batch = _case()
    served = _served(t, batch.tokens, k)
    student = s.clone().requires_grad_()
    d = objective.token_terms(_cfg("top_k", k=k), batch, student, served).divergence
    # float64 reference on the top-k support, both distributions renormalised there
    ref_s = s.clone().requires_grad_()
    logp = torch.log_softmax(ref_s.gather(1, served.top_ids), -1)
    logq = torch.log_softmax(served.top_logprobs, -1)
    ref = (logp.exp() * (logp - logq)).sum(-1)
    torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-12)
    w = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    (d * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(student.grad, ref_s.grad, rtol=1e-12, atol=1e-12)
    if k == V:  # the whole support: exactly the logits form's reverse KL
        exact = objective.token_terms(objective.preset("opd"), batch, s, t).divergence
        torch.testing.assert_close(d.detach(), exact, rtol=1e-10, atol=1e-12)


def test_sampled_token_form_has_the_log_ratio_value_and_the_score_function_gradient():
    s, t, batch = _case(1)
    served = _served(t, batch.tokens, 1)
    student = s.clone().requires_grad_()
    d = objective.token_terms(_cfg("sampled_token"), batch, student, served).divergence
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    y = batch.tokens
    r = logp.gather(1, y[:, None]).squeeze(1) - logq.gather(1, y[:, None]).squeeze(1)
    m = batch.response_mask  # masked positions score a placeholder id; the loss gives them weight 0
    torch.testing.assert_close(d.detach()[m], r[m], rtol=1e-12, atol=1e-12)
    (d * m).sum().backward()
    grad_logp_y = torch.nn.functional.one_hot(y, V).double() - logp.exp()
    torch.testing.assert_close(student.grad[m], r[m, None] * grad_logp_y[m], rtol=1e-12, atol=1e-12)
    assert student.grad[~m].abs().max() == 0


def test_sampled_token_gradient_is_unbiased_for_the_reverse_kl():
    """Averaged over the student's own samples (every token y, weight p(y)), the sampled-token surrogate's gradient
    is exactly the gradient of KL(p || q): the form trains the same objective as the logits form, in expectation."""
    g = torch.Generator().manual_seed(3)
    s_row, t_row = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    student = s_row.expand(V, V).clone().requires_grad_()  # row y: the same distribution, token y sampled
    tokens = torch.arange(V)
    batch = TokenBatch(
        tokens=tokens, seq_ids=torch.zeros(V, dtype=torch.long), response_mask=torch.ones(V, dtype=torch.bool)
    )
    served = _served(t_row.expand(V, V), tokens, 1)
    d = objective.token_terms(_cfg("sampled_token"), batch, student, served).divergence
    p = torch.softmax(s_row, -1)
    (d * p).sum().backward()  # expectation over y ~ p (weights detached)
    expected_s = s_row.clone().requires_grad_()
    lp, lq = torch.log_softmax(expected_s, -1), torch.log_softmax(t_row, -1)
    (lp.exp() * (lp - lq)).sum().backward()
    torch.testing.assert_close(student.grad.sum(0), expected_s.grad, rtol=1e-10, atol=1e-12)


def test_policy_gradient_opd_takes_the_served_log_probs():
    s, t, batch = _case(2)
    served = _served(t, batch.tokens, 2)
    cfg_pg = dataclasses.replace(objective.preset("opd_pg"), teacher_signal="sampled_token")
    got = objective.token_terms(cfg_pg, batch, s, served)
    exp = objective.token_terms(objective.preset("opd_pg"), batch, s, t)
    m = batch.response_mask
    torch.testing.assert_close(got.teacher_logprobs[m], exp.teacher_logprobs[m], rtol=1e-12, atol=1e-12)
    v_got, _ = objective.loss(cfg_pg, batch, got)
    v_exp, _ = objective.loss(objective.preset("opd_pg"), batch, exp)
    assert float(v_got) == pytest.approx(float(v_exp), rel=1e-12)


def test_teacher_window_guidance_from_a_served_teacher():
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([3, 2])
    w = int(lengths.sum())
    s_b = torch.randn(w, V, generator=g, dtype=torch.float64)
    t_b = torch.randn(w, V, generator=g, dtype=torch.float64)
    u = torch.randint(0, V, (2, 3), generator=g)
    windows = Windows(tokens=u, lengths=lengths)
    packed = windows.packed()
    pos = torch.tensor([1, 6])
    # top-k over the whole vocabulary: the logits form's reverse KL
    topk = dataclasses.replace(objective.preset("topd"), teacher_signal="top_k", teacher_top_k=V)
    got = objective.branch_terms(topk, pos, windows, s_b, _served(t_b, packed, V)).values
    exp = objective.branch_terms(objective.preset("topd"), pos, windows, s_b, t_b).values
    torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    # sampled tokens: the forward-KL sample log q(u_j) - log p(u_j), gradient of the cross-entropy on u_j
    sampled = dataclasses.replace(
        objective.preset("topd"), teacher_signal="sampled_token", guidance_divergence="forward_kl"
    )
    student = s_b.clone().requires_grad_()
    vals = objective.branch_terms(sampled, pos, windows, student, _served(t_b, packed, 1)).values
    lp, lq = torch.log_softmax(s_b, -1), torch.log_softmax(t_b, -1)
    ref = lq.gather(1, packed[:, None]).squeeze(1) - lp.gather(1, packed[:, None]).squeeze(1)
    torch.testing.assert_close(vals.detach(), ref, rtol=1e-12, atol=1e-12)
    vals.sum().backward()
    ce = s_b.clone().requires_grad_()
    torch.nn.functional.cross_entropy(ce, packed, reduction="sum").backward()
    torch.testing.assert_close(student.grad, ce.grad, rtol=1e-12, atol=1e-12)


def test_the_loss_names_the_teacher_form_in_its_metrics():
    s, t, batch = _case()
    for signal, teacher, k in (("logits", t, 0), ("top_k", _served(t, batch.tokens, 4), 4)):
        cfg = _cfg(signal, k=4)
        _, metrics = objective.loss(cfg, batch, objective.token_terms(cfg, batch, s, teacher))
        assert metrics[f"teacher/form_{signal}"] == 1.0 and metrics["teacher/top_k"] == k
        assert not any(key.startswith("teacher/form_") and key != f"teacher/form_{signal}" for key in metrics)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"teacher_signal": "all"}, "objective.teacher_signal must be one of"),
        ({"teacher_signal": "top_k", "teacher_top_k": 0}, "teacher_top_k must be >= 1"),
        ({"teacher_signal": "top_k", "divergence": "jsd"}, "gives the reverse KL only"),
        ({"teacher_signal": "sampled_token"}, "guidance_divergence='reverse_kl' is not available"),
        ({"teacher_signal": "top_k", "guidance_divergence": "forward_kl"}, "choose one of ('reverse_kl'"),
    ],
)
def test_unsupported_combinations_are_refused_with_the_fix(kw, message):
    with pytest.raises(ValueError) as err:
        dataclasses.replace(objective.preset("topd"), **kw)
    assert message in str(err.value)


def test_logits_and_served_inputs_cannot_be_mixed_up():
    s, t, batch = _case()
    with pytest.raises(ValueError, match="a ServedTeacher needs objective.teacher_signal"):
        objective.token_terms(objective.preset("opd"), batch, s, _served(t, batch.tokens, 2))
    with pytest.raises(ValueError, match="takes a ServedTeacher, not teacher logits"):
        objective.token_terms(_cfg("top_k"), batch, s, t)
