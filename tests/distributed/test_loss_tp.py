"""The vocab-parallel loss at TP = 1, 2 and 4 over gloo against the full-vocabulary float64 reference.

One spawn of 4 ranks (spawning is the expensive part) builds three tensor-parallel layouts side by side: four
single-rank groups (TP=1), two pairs [0, 1] and [2, 3] (TP=2) and the whole world (TP=4). Every rank generates the
same full-vocabulary inputs from a fixed seed, keeps its shard of the vocabulary (Megatron's VocabUtility layout:
equal shards in rank order, the padded tail in the last shard(s)), runs the implementation and returns its values
and gradient shards; the test process concatenates the shards and compares them with tests/_reference_topd.py.

Tolerances: fp64 inputs agree with the reference to ~1e-10 (the reduction order over shards differs from a full
log_softmax, nothing else); bf16 inputs are compared with the reference on the same rounded values, fp32
accumulation gives ~1e-5 on values and bf16 rounding of the returned gradient ~1e-2 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import _reference_topd as ref
from tests import _topd_cases as cases
from topd_megatron.distributed.launch import spawn

WORLD = 4
TPS = (1, 2, 4)
OPS = ("reverse_kl", "forward_kl", "jsd", "log_ratio", "logprob", "entropy", "topk_kl")
TOP_K = 5
# name: (T, padded V, true vocab or None, dtype, chunk_size or None, extreme logits)
DIV_CASES = {
    "plain": (19, 48, None, torch.float64, None, False),
    "padded_last_shard": (23, 52, 45, torch.float64, 4, False),
    "padding_only_shard": (9, 52, 30, torch.float64, 2, False),  # TP=4: rank 3 holds padding only
    "extreme": (16, 48, 47, torch.float64, 5, True),
    "bf16": (21, 64, 61, torch.bfloat16, 3, False),
    "uneven_chunk": (37, 48, None, torch.float64, 36, False),
}
PRESETS = cases.variants()


def div_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    t, v, vocab, dtype, _, extreme = DIV_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    s = torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    te = 0.5 * s + torch.randn(t, v, generator=g, dtype=torch.float64) * 3
    if extreme:
        s[0, :], te[0, :] = 0.0, 0.0
        s[0, 40], te[0, 2] = 1e4, 1e4  # the two argmaxes on different shards
        s[1] += 1e4
        te[2] -= 1e4
        s[3, ::3] = -1e4
        te[4, 20:30] = 1e4
    s, te = s.to(dtype).double(), te.to(dtype).double()  # exactly representable in the tested dtype
    tokens = torch.randint(0, vocab or v, (t,), generator=g)
    w = torch.randn(t, generator=g, dtype=torch.float64)
    return s, te, tokens, w


def teacher_top_k(t_full: torch.Tensor, vocab: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, TOP_K] ids and log-probs of the teacher's most likely true-vocabulary tokens (what a server reports)."""
    lq = ref.log_probs(t_full, vocab)
    top = lq.topk(TOP_K, dim=-1)
    return top.indices, top.values


def _run_op(op, s, te, tokens, *, t_full=None, **kw):
    from topd_megatron.algorithm.loss import token_divergence, token_entropy, token_logprobs, topk_divergence

    if op == "topk_kl":
        ids, lq = teacher_top_k(t_full, kw.get("vocab_size"))
        return topk_divergence(s, ids, lq, **kw)
    if op == "logprob":
        return token_logprobs(s, tokens, **kw)
    if op == "entropy":
        return token_entropy(s, **kw)
    return token_divergence(s, te, op, tokens=tokens, beta=0.3, **kw)


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from topd_megatron.algorithm.loss import token_divergence, vocab_parallel_embedding

    torch.set_num_threads(1)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank takes part in creating every group
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {1: singles[rank], 2: pairs[rank // 2], 4: dist.group.WORLD}
    out: dict = {"div": {}, "presets": {}, "emb": {}, "errors": {}}
    for tp, grp in groups.items():
        trank = dist.get_rank(grp)
        for name, (_, _, vocab, dtype, chunk, _) in DIV_CASES.items():
            s_full, t_full, tokens, w = div_inputs(name)
            for op in OPS:
                s = cases.shard(s_full, trank, tp).to(dtype).clone().requires_grad_()
                te = cases.shard(t_full, trank, tp).to(dtype)
                val = _run_op(op, s, te, tokens, t_full=t_full, vocab_size=vocab, group=grp, chunk_size=chunk)
                (val * w.to(val.dtype)).sum().backward()
                out["div"][(tp, name, op)] = (val.detach(), s.grad)
        for name, cfg in PRESETS.items():
            r = cases.run_pipeline(cfg, cases.make_case(0), rank=trank, world=tp, group=grp)
            r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.startswith("time/") and "time_s" not in k}
            out["presets"][(tp, name)] = r
        table = torch.randn(52, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ids = torch.tensor([[0, 51, 13, 26], [39, 44, 12, 25]])
        out["emb"][tp] = vocab_parallel_embedding(cases.shard(table.T, trank, tp).T, ids, vocab_size=52, group=grp)

    # Errors at TP=4: every rank must raise the same clear error, none may hang.
    s_full, t_full, tokens, _ = div_inputs("plain")
    s, te = cases.shard(s_full, rank, world).clone(), cases.shard(t_full, rank, world).clone()

    def catch(key, fn):
        try:
            fn()
            out["errors"][key] = None
        except ValueError as e:
            out["errors"][key] = str(e)

    bad_s = s.clone()
    if rank == 2:
        bad_s[5, 3] = float("nan")  # global vocabulary id 2 * 12 + 3 = 27
    catch("nan", lambda: token_divergence(bad_s, te, "reverse_kl", group=dist.group.WORLD, chunk_size=4))
    bad_t = te.clone()
    if rank == 3:
        bad_t[17, 0] = float("inf")
    catch("inf", lambda: token_divergence(s, bad_t, "jsd", group=dist.group.WORLD))
    n = s.shape[0] - (1 if rank == 1 else 0)
    catch("t_mismatch", lambda: token_divergence(s[:n], te[:n], "reverse_kl", group=dist.group.WORLD))
    catch("vocab", lambda: token_divergence(s, te, "reverse_kl", vocab_size=49, group=dist.group.WORLD))
    catch("shapes", lambda: token_divergence(s, te[:, :-1], "forward_kl", group=dist.group.WORLD))
    # after the errors the group still works (no rank is left inside a collective)
    out["after_errors"] = token_divergence(s, te, "reverse_kl", group=dist.group.WORLD)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(_worker, WORLD, timeout=600)


def _group_ranks(tp: int) -> list[list[int]]:
    return [[r] for r in range(WORLD)] if tp == 1 else [[0, 1], [2, 3]] if tp == 2 else [[0, 1, 2, 3]]


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("case", list(DIV_CASES))
def test_token_quantities_match_reference(results, tp, case):
    _, _, vocab, dtype, _, _ = DIV_CASES[case]
    s_full, t_full, tokens, w = div_inputs(case)
    low = dtype != torch.float64
    for op in OPS:
        s = s_full.clone().requires_grad_()
        if op == "logprob":
            exp = ref.logprobs(s, tokens, vocab)
        elif op == "entropy":
            exp = ref.entropy(s, vocab)
        elif op == "topk_kl":
            exp = ref.topk_divergence(s, *teacher_top_k(t_full, vocab))
        else:
            exp = ref.divergence(s, t_full, op, tokens=tokens, beta=0.3, vocab_size=vocab)
        (g_exp,) = torch.autograd.grad((exp * w).sum(), s)
        for ranks in _group_ranks(tp):
            vals = [results[r]["div"][(tp, case, op)][0] for r in ranks]
            assert all(torch.equal(vals[0], v) for v in vals), f"{op}: ranks of one group disagree"
            grad = torch.cat([results[r]["div"][(tp, case, op)][1] for r in ranks], dim=-1)
            assert vals[0].dtype == (torch.float32 if low else torch.float64) and grad.dtype == dtype
            vtol, gtol = (1e-5, 2e-2) if low else (1e-10, 1e-10)
            torch.testing.assert_close(vals[0].double(), exp.detach(), rtol=vtol, atol=vtol, msg=f"{op} value")
            torch.testing.assert_close(grad.double(), g_exp, rtol=gtol, atol=gtol * 1e-2, msg=f"{op} gradient")
            if vocab is not None:
                assert grad[:, vocab:].abs().max() == 0


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_reference(results, tp, name):
    cfg = PRESETS[name]
    case = cases.make_case(0)
    c = dict(case)
    c["student"] = case["student"].clone().requires_grad_()
    c["branch_student"] = case["branch_student"].clone().requires_grad_()
    exp = ref.topd_loss(cfg, c)
    exp["loss"].backward()
    g_branch = c["branch_student"].grad
    for ranks in _group_ranks(tp):
        got = [results[r]["presets"][(tp, name)] for r in ranks]
        assert all(g["loss"] == got[0]["loss"] and g["metrics"] == got[0]["metrics"] for g in got)
        assert got[0]["candidates"] == exp["candidates"] and got[0]["divergent"] == exp["divergent"]
        assert got[0]["loss"] == pytest.approx(float(exp["loss"].detach()), rel=1e-10, abs=1e-12)
        grad = torch.cat([g["grad"] for g in got], dim=-1)
        torch.testing.assert_close(grad, c["student"].grad, rtol=1e-10, atol=1e-12)
        if g_branch is not None:
            torch.testing.assert_close(
                torch.cat([g["branch_grad"] for g in got], dim=-1), g_branch, rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("tp", TPS)
def test_embedding_lookup_without_gathering(results, tp):
    table = torch.randn(52, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ids = torch.tensor([[0, 51, 13, 26], [39, 44, 12, 25]])
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["emb"][tp], table[ids], rtol=0, atol=0)


def test_errors_are_raised_on_every_rank_with_the_position(results):
    errs = [r["errors"] for r in results]
    for e in errs:
        assert "student logits contain NaN or Inf at token position 5" in e["nan"]
        assert "teacher logits contain NaN or Inf at token position 17" in e["inf"]
        assert "ranks of the group disagree on T (tokens): min 18 max 19" in e["t_mismatch"]
        assert "vocab_size=49 is larger than the group's total vocabulary 48 = 4 ranks x 12" in e["vocab"]
        assert "mismatched student/teacher shard shapes" in e["shapes"]
    assert "vocabulary id 27 (seen on group rank 2)" in errs[2]["nan"]
    assert "vocabulary id 36 (seen on group rank 3)" in errs[3]["inf"]
    s_full, t_full, _, _ = div_inputs("plain")
    exp = ref.divergence(s_full, t_full, "reverse_kl")
    for r in results:
        torch.testing.assert_close(r["after_errors"], exp, rtol=1e-10, atol=1e-10)
    assert not any(math.isnan(float(v)) for v in results[0]["after_errors"])
