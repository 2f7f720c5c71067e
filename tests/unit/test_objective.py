"""The TOPD objective on one rank: every preset (and variants of the other knobs) against the float64 reference,
value and gradients, plus the objective's contracts (layouts, masking, errors, metrics)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests import _reference_topd as ref
from tests import _topd_cases as cases
from topd_megatron.algorithm import detection, objective, types

VARIANTS = cases.variants()


def reference(cfg, case):
    c = dict(case)
    c["student"] = case["student"].clone().requires_grad_()
    c["branch_student"] = case["branch_student"].clone().requires_grad_()
    out = ref.topd_loss(cfg, c)
    out["loss"].backward()
    out["grad"] = c["student"].grad
    g = c["branch_student"].grad
    out["branch_grad"] = torch.zeros_like(c["branch_student"]) if g is None else g
    return out


def assert_matches_reference(got: dict, exp: dict, *, tol: float = 1e-10) -> None:
    assert got["candidates"] == exp["candidates"]
    assert got["divergent"] == exp["divergent"]
    if exp["candidates"]:
        assert got["guided"] == exp["guided"]
    if exp["candidates"] and not math.isnan(exp["tau"]):
        assert got["tau"] == pytest.approx(exp["tau"], rel=1e-6, abs=1e-9)
    assert got["loss"] == pytest.approx(float(exp["loss"].detach()), rel=tol, abs=tol)
    torch.testing.assert_close(got["grad"].double(), exp["grad"], rtol=tol, atol=tol)
    torch.testing.assert_close(got["branch_grad"].double(), exp["branch_grad"], rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_preset_matches_reference(name, seed):
    cfg = VARIANTS[name]
    case = cases.make_case(seed)
    got = cases.run_pipeline(cfg, case)
    exp = reference(cfg, case)
    assert_matches_reference(got, exp)
    if cfg.detection.detector != "none":
        assert 0 < len(exp["divergent"]) < len(exp["candidates"])  # the case exercises both decisions
    if cfg.guidance == "teacher_window":
        assert got["branch_grad"].abs().sum() > 0


def test_presets_are_the_documented_algorithms():
    assert objective.Config() == objective.preset("topd")
    p = {name: objective.preset(name) for name in objective.PRESETS}
    assert (p["opd"].detection.detector, p["opd"].guidance, p["opd"].opd) == ("none", "none", "dense")
    assert p["opd_pg"].opd == "pg"
    assert (p["opd_suppress"].detection.detector, p["opd_suppress"].guidance) == ("window_ot", "none")
    assert (p["topd"].detection.detector, p["topd"].guidance) == ("window_ot", "teacher_window")
    assert (p["topd_lookahead"].detection.detector, p["topd_lookahead"].guidance) == ("lookahead", "on_path")
    budget = p["topd_budget"]  # topd with at most TINY_GUIDANCE_BUDGET windows per rollout, nothing else changed
    assert budget.guidance_budget == objective.TINY_GUIDANCE_BUDGET == 1
    assert dataclasses.replace(budget, guidance_budget=None) == p["topd"]
    d = p["topd"].detection
    assert (d.q, d.window, d.q_d, p["topd"].suppress_weight) == (0.2, 50, 0.3, 0.0)
    with pytest.raises(ValueError, match="unknown preset"):
        objective.preset("grpo")


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"guidance": "on_path", "detection": detection.Config(detector="none")}, "needs a detector"),
        ({"suppress_weight": 1.5}, "beta_s"),
        ({"normalization": "constant"}, "normalization_constant"),
        ({"rho_clip": 0.0}, "rho_clip"),
        ({"jsd_beta": 1.0}, "jsd_beta"),
        ({"guidance_gamma": 0.0}, "guidance_gamma"),
        ({"guidance_coef": -1.0}, "lambda"),
        ({"divergence": "log_ratio"}, "divergence"),
    ],
)
def test_config_checks(kw, msg):
    with pytest.raises(ValueError, match=msg):
        objective.Config(**kw)


def test_padded_layout_equals_packed_layout():
    """[B, T, V] logits with a [B, T] mask give the loss of the same tokens packed."""
    cfg = VARIANTS["opd"]
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    tok = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    padded = types.TokenBatch.from_padded(tok, mask)
    a, _ = objective.loss(cfg, padded, objective.token_terms(cfg, padded, s, t))
    keep = mask.reshape(-1)
    packed = types.TokenBatch(
        tokens=tok.reshape(-1)[keep],
        seq_ids=torch.tensor([0, 0, 0, 1, 1]),
        response_mask=torch.ones(5, dtype=torch.bool),
    )
    terms = objective.token_terms(cfg, packed, s.reshape(-1, 11)[keep], t.reshape(-1, 11)[keep])
    b, _ = objective.loss(cfg, packed, terms)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-12)
    (ga,) = torch.autograd.grad(a, s)
    assert ga.reshape(-1, 11)[~keep].abs().max() == 0  # masked positions get no gradient


def test_masked_positions_never_leak_nan():
    """Prompt/padding rows may hold any token id and any rollout log-prob (NaN here): they are never read."""
    cfg = VARIANTS["opd_pg"]
    case = cases.make_case(5)
    assert torch.isnan(case["rollout_logprobs"][~case["mask"]]).all() and (case["tokens"][~case["mask"]] < 0).all()
    got = cases.run_pipeline(cfg, case)
    assert math.isfinite(got["loss"]) and torch.isfinite(got["grad"]).all()
    assert got["grad"][~case["mask"]].abs().max() == 0


def test_bf16_logits_follow_the_fp64_reference():
    cfg = VARIANTS["opd"]
    case = cases.make_case(0)
    case["student"] = case["student"].bfloat16().double()  # the reference sees the rounded inputs
    case["teacher"] = case["teacher"].bfloat16().double()
    got = cases.run_pipeline(cfg, case, dtype=torch.bfloat16)
    exp = reference(cfg, case)
    assert got["grad"].dtype == torch.bfloat16
    assert got["loss"] == pytest.approx(float(exp["loss"].detach()), rel=1e-5)
    torch.testing.assert_close(got["grad"].double(), exp["grad"], rtol=2e-2, atol=1e-4)


def test_rho_is_truncated_in_value_and_gradient_weight():
    cfg = objective.preset("opd_pg")
    batch = types.TokenBatch(
        tokens=torch.tensor([1, 2]),
        seq_ids=torch.tensor([0, 0]),
        response_mask=torch.ones(2, dtype=torch.bool),
        rollout_logprobs=torch.tensor([-10.0, 0.0], dtype=torch.float64),
    )
    s = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, 4, dtype=torch.float64)
    t[:, 1] = 2.0
    terms = objective.token_terms(cfg, batch, s, t)
    value, metrics = objective.loss(cfg, batch, terms)
    r = (terms.student_logprobs - terms.teacher_logprobs).detach()
    # token 0: ratio e^(log 1/4 + 10) >> 2 -> 2; token 1: ratio 1/4
    assert float(value.detach()) == pytest.approx(float((r[0] * 2.0 + r[1] * 0.25) / 2))
    assert metrics["opd/rho_clipped_share"] == 0.5
    # gradient: min(rho, c) * A-weighted score function, the clipped token keeps its (capped) learning signal
    (grad,) = torch.autograd.grad(value, s)
    x = s.detach().clone().requires_grad_()
    lp = torch.log_softmax(x, -1)
    (expect,) = torch.autograd.grad((r[0] * 2.0 * lp[0, 1] + r[1] * 0.25 * lp[1, 2]) / 2, x)
    torch.testing.assert_close(grad, expect)


def test_metrics_hold_the_diagnostics_of_the_spec():
    got = cases.run_pipeline(VARIANTS["topd"], cases.make_case(0))
    m = got["metrics"]
    for key in (
        "loss",
        "loss/opd",
        "loss/guidance",
        "detect/non_divergent_share",
        "detect/D_mean",
        "detect/D_p90",
        "detect/loss_D_spearman",
        "detect/windows",
        "guidance/windows",
        "time/detect_s",
        "time/opd_s",
        "time/guidance_s",
        "time/detect_guidance_over_opd",
    ):
        assert key in m or key.replace("time/detect_s", "detect/time_s") in m, key
    assert all(isinstance(v, float) for v in m.values())
    assert m["guidance/windows"] == len(got["divergent"])
    assert m["detect/non_divergent_share"] == pytest.approx(1 - len(got["divergent"]) / len(got["candidates"]))


def test_loss_errors_are_clear():
    cfg = VARIANTS["topd"]
    case = cases.make_case(0)
    batch = types.TokenBatch(tokens=case["tokens"], seq_ids=case["seq_ids"], response_mask=case["mask"])
    terms = objective.token_terms(cfg, batch, case["student"], case["teacher"], vocab_size=cases.VOCAB)
    with pytest.raises(ValueError, match="no detection was passed"):
        objective.loss(cfg, batch, terms)
    det = detection.detect(
        dataclasses.replace(cfg.detection, detector="lookahead"),
        batch,
        detection.select_candidates(cfg.detection, batch, terms.divergence.detach()),
        terms.divergence.detach(),
    )
    with pytest.raises(ValueError, match="needs branch"):
        objective.loss(cfg, batch, terms, det)
    bad = det.suppressed_mask().nonzero().flatten()[:1]
    win = types.Windows(tokens=torch.zeros(1, 2, dtype=torch.long), lengths=torch.tensor([2]))
    logits = torch.zeros(2, cases.V_PAD, dtype=torch.float64)
    branch = objective.branch_terms(cfg, bad, win, logits, logits, vocab_size=cases.VOCAB)
    with pytest.raises(ValueError, match="must be guided positions"):
        objective.loss(cfg, batch, terms, det, branch)
    with pytest.raises(ValueError, match="packed"):
        objective.branch_terms(cfg, bad, win, logits[:1], logits[:1])
    with pytest.raises(ValueError, match=r"expected \[N, V_local\]"):
        objective.token_terms(cfg, batch, case["student"][:3], case["teacher"][:3])


def test_discounted_future_sum_restarts_at_every_sequence():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0], dtype=torch.float64)
    seq = torch.tensor([0, 0, 0, 1, 1, 2])
    got = objective.discounted_future_sum(values, seq, 0.5)
    expected = [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 10 + 0.5 * 20, 20.0, 5.0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert objective.discounted_future_sum(values[:0], seq[:0], 0.5).numel() == 0


def test_random_anchors_match_the_counts_and_stay_in_each_response():
    from topd_megatron.training.scoring import random_anchors

    batch = types.TokenBatch.from_padded(
        torch.zeros(3, 6, dtype=torch.long),
        torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool),
    )
    anchors = random_anchors(batch, torch.tensor([2, 4, 5]), seed=7)
    assert anchors.tolist() == sorted(anchors.tolist())
    rows = (anchors // 6).tolist()
    assert [rows.count(b) for b in range(3)] == [2, 4, 2]  # capped at the response length
    assert bool(batch.response_mask[anchors].all())
    assert anchors.tolist() == random_anchors(batch, torch.tensor([2, 4, 5]), seed=7).tolist()
    assert anchors.tolist() != random_anchors(batch, torch.tensor([2, 4, 5]), seed=8).tolist()


@pytest.mark.parametrize("name", [n for n, c in VARIANTS.items() if c.guidance == "teacher_window"])
def test_the_training_steps_two_passes_match_the_reference(name):
    """The training step splits teacher_window guidance into pass 1 (the OPD term over the rollouts, weight 0 at the
    anchors a window replaces) and pass 2 (lambda * the windows' loss): together they are the reference objective,
    value and gradients, for every teacher_window variant (guidance_replaces_opd included)."""
    cfg = VARIANTS[name]
    case = cases.make_case(0)
    assert_matches_reference(cases.run_pipeline(cfg, case, two_pass=True), reference(cfg, case))
