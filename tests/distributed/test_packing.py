"""Packed guidance windows give exactly the numbers of the per-branch rows they replace (algorithm/packing.py).

One float64 step on gloo ranks, at TP=1, TP=2 and PP=2: the same rollouts, detection and teacher windows go through
phase 3 (`build_branches`: the colocated teacher scores the window tokens) and phase 4 (`backward`) twice, once with
one whole-prefix row per window (two passes) and once with the windows packed after their rollouts (one pass). The
teacher's window rows, the loss (OPD and guidance terms) and the gradient of every student parameter must agree to
float64 rounding. Windows include EOS-cut ones (length 1 and 0) and several per rollout. The guidance knobs that
change which anchors get windows or what the OPD term weighs run the same comparison: a per-rollout budget with the
window replacing the OPD term, and windows at random positions (sampled in the step by the embedded engine's window
sampler) with the policy-gradient OPD term and its discounted advantage.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from topd_megatron.distributed.launch import spawn

K = 5
TOL = 1e-11


def _step_batch(vocab: int):
    from topd_megatron.algorithm.batch import StepBatch

    gen = torch.Generator().manual_seed(11)
    b, s = 4, 14
    tokens = torch.randint(3, vocab, (b, s), generator=gen)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for row, end in enumerate((14, 11, 13, 9)):  # prompt of 3 tokens, responses of different lengths, padding
        mask[row, 3:end] = True
        tokens[row, end:] = 0
    return StepBatch(
        tokens=tokens, response_mask=mask, rollout_logprobs=torch.zeros(b, s), num_rollouts=b, micro_batch_size=2
    )


def _windows(n: int, vocab: int):
    from topd_megatron.algorithm.types import Windows

    gen = torch.Generator().manual_seed(12)
    lengths = torch.tensor([K, 1, 0, 3])[torch.arange(n) % 4]  # full, cut after one token (EOS), empty, partial
    return Windows(tokens=torch.randint(3, vocab, (n, K), generator=gen), lengths=lengths)


def _objective(variant: str):
    from topd_megatron.algorithm import detection, objective

    det = detection.Config(detector="lookahead", window=K, q=0.5, q_d=0.25)
    base = objective.Config(detection=det, guidance="teacher_window")
    if variant == "budget":  # at most 1 window per rollout, the window replacing the OPD term at its anchor
        return dataclasses.replace(base, guidance_budget=1, guidance_replaces_opd=True)
    if variant == "random_pg":  # windows at random positions, sampled in the step; policy-gradient OPD, discounted
        return dataclasses.replace(base, guidance_at="random", opd="pg", pg_discount=0.9)
    return base


def packed_vs_rows(rank: int, world: int, student_dir: str, teacher_dir: str, tp: int, pp: int, variant: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig

    from topd_megatron.algorithm.packing import PackedBatch
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.embedded import EmbeddedEngine
    from topd_megatron.training.scoring import Detected, detect, score, scoring_context
    from topd_megatron.training.step import StepContext, backward, build_branches
    from topd_megatron.training.teacher import build_teacher

    torch.set_num_threads(1)
    par = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(par)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=False, use_distributed_optimizer=False)
    student = build_model(ModelConfig(path=student_dir, dtype="float64"), par, wrap_with_ddp=True, ddp_config=ddp)
    teacher = build_teacher(ModelConfig(path=teacher_dir, dtype="float64"), par, student)
    # Megatron's optimizers take fp32/fp16/bf16 parameters only; backward() needs nothing but zero_grad() of it
    optimizer = torch.optim.SGD([p for m in student.modules for p in m.parameters()], lr=0.0)
    cfg = _objective(variant)
    engine = EmbeddedEngine(student, teacher, micro_batch_size=2)
    step = _step_batch(student.vocab_size)
    results: dict[str, object] = {}
    kept: dict[bool, dict] = {}
    for pack in (False, True):
        ctx = scoring_context(cfg, student, teacher, engine, eos_id=1, pad_id=0, pack_guidance=pack)
        scores = score(ctx, step)
        found = detect(ctx, step, scores, window_seed=0)
        assert found.detection is not None
        if cfg.guidance_at == "divergent":  # the detector's windows, given: the same in both runs
            windows = _windows(found.detection.candidates.positions.numel(), student.vocab_size)
            found = Detected(detection=found.detection, teacher_windows=windows)
        branches = build_branches(ctx, step, found, seed=0)
        assert branches is not None and isinstance(branches.batch, PackedBatch) == pack
        grads = backward(
            StepContext(scoring=ctx, optimizer=optimizer, scheduler=None),
            step,
            scores,
            found,
            branches,
            inject_nan=False,
        )
        kept[pack] = {
            "opd": float(grads.opd_value),
            "guidance": float(grads.guidance_value),
            "teacher_rows": [t.clone() for t in branches.teacher] if isinstance(branches.teacher, list) else [],
            "grads": {n: p.main_grad.detach().clone() for m in student.modules for n, p in m.named_parameters()},
            "lengths": branches.windows.lengths.tolist(),
            "positions": branches.positions.tolist(),
            "divergent": found.detection.candidates.positions[found.detection.divergent].tolist(),
            "seq_ids": step.token_batch().seq_ids.tolist(),
        }
    if variant == "budget":  # the same step with the OPD term kept at the windows' anchors: a larger OPD term
        ctx = scoring_context(dataclasses.replace(cfg, guidance_replaces_opd=False), student, teacher, engine,
                              eos_id=1, pad_id=0, pack_guidance=True)  # fmt: skip
        scores = score(ctx, step)
        found = detect(ctx, step, scores, window_seed=0)
        found = Detected(detection=found.detection, teacher_windows=windows)
        branches = build_branches(ctx, step, found, seed=0)
        step_ctx = StepContext(scoring=ctx, optimizer=optimizer, scheduler=None)
        results["opd_kept"] = float(backward(step_ctx, step, scores, found, branches, inject_nan=False).opd_value)
    rows, packed = kept[False], kept[True]
    results["last_stage"] = ps.is_pipeline_last_stage(ignore_virtual=True)
    results["loss"] = (rows["opd"], rows["guidance"], packed["opd"], packed["guidance"])
    t_rows, t_packed = (
        torch.cat(rows["teacher_rows"] or [torch.zeros(0)]),
        torch.cat(packed["teacher_rows"] or [torch.zeros(0)]),
    )
    results["teacher_rows_diff"] = (t_rows - t_packed).abs().max().item() if t_rows.numel() else 0.0
    results["teacher_rows"] = t_rows.shape[0]
    results["grad_diff"] = max((rows["grads"][n] - g).abs().max().item() for n, g in packed["grads"].items())
    results["grad_scale"] = max(g.abs().max().item() for g in rows["grads"].values())
    results["params"] = len(packed["grads"])
    results["lengths"] = packed["lengths"]
    results["positions"] = (rows["positions"], packed["positions"])
    results["divergent"], results["seq_ids"] = packed["divergent"], packed["seq_ids"]
    return results


@pytest.mark.parametrize(
    ("tp", "pp", "variant"),
    [(1, 1, "default"), (2, 1, "default"), (1, 2, "default"), (2, 1, "budget"), (1, 2, "random_pg")],
    ids=["TP1", "TP2", "PP2", "TP2-budget-replaces-opd", "PP2-random-pg-discount"],
)
def test_packed_windows_equal_per_branch_rows(synthetic_pair, tp: int, pp: int, variant: str) -> None:
    student, teacher = (str(p) for p in synthetic_pair)
    results = spawn(packed_vs_rows, tp * pp, (student, teacher, tp, pp, variant), timeout=600)
    for r in results:
        assert r["params"] > 0 and r["grad_scale"] > 1e-6, r  # every rank holds parameters with real gradients
        assert r["grad_diff"] <= TOL * max(1.0, r["grad_scale"]), r
        rows_at, packed_at = r["positions"]
        assert rows_at == packed_at and len(packed_at) > 1, r  # both paths guided the same anchors
        if variant == "default":
            assert 0 in r["lengths"] and 1 in r["lengths"] and K in r["lengths"], r  # the edge cases were exercised
        if variant == "budget":  # one window per rollout that has a divergent candidate, fewer than the candidates
            per_rollout = [r["seq_ids"][p] for p in packed_at]
            assert len(set(per_rollout)) == len(per_rollout) < len(r["divergent"]), r
            if r["last_stage"]:  # the windows replaced the OPD term at their anchors (guidance_replaces_opd)
                assert r["loss"][2] < r["opd_kept"] - 1e-6, r
        if variant == "random_pg":
            assert packed_at != r["divergent"] and len(packed_at) == len(r["divergent"]), r
        if r["last_stage"]:
            opd_rows, g_rows, opd_packed, g_packed = r["loss"]
            assert g_rows > 0 and (opd_rows != 0 if variant == "random_pg" else opd_rows > 0), r  # pg: either sign
            assert abs(opd_rows - opd_packed) <= TOL and abs(g_rows - g_packed) <= TOL, r
            assert r["teacher_rows"] == sum(r["lengths"]) and r["teacher_rows_diff"] <= TOL, r


def fallback_reasons(rank: int, world: int, student_dir: str) -> dict:
    import logging

    from topd_megatron.algorithm import detection, objective
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.models.positions import packing_unsupported_reason
    from topd_megatron.training.scoring import scoring_context

    par = ParallelConfig(tp=1, pp=1)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=student_dir, dtype="float32"), par)
    cfg = objective.Config(detection=detection.Config(detector="lookahead"), guidance="teacher_window")
    out = {"local": packing_unsupported_reason(student.modules)}
    config = student.modules[0].config
    config.apply_rope_fusion = True
    out["fused_rope"] = packing_unsupported_reason(student.modules)
    config.apply_rope_fusion = False

    class TEDotProductAttention(torch.nn.Module):  # stands in for TransformerEngine's attention (GPU only)
        pass

    layer = student.modules[0].decoder.layers[0].self_attention
    local = layer.core_attention
    layer.core_attention = TEDotProductAttention()
    out["te"] = packing_unsupported_reason(student.modules)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("topd_megatron.training.scoring").addHandler(handler)
    ctx = scoring_context(cfg, student, student, None, eos_id=1, pad_id=0, pack_guidance=True)
    out["te_ctx_packs"], out["warnings"] = ctx.pack_guidance, records
    layer.core_attention = local
    out["local_ctx_packs"] = scoring_context(cfg, student, student, None, eos_id=1, pad_id=0).pack_guidance
    if os.environ.get("TOPD_PACKING_TE") == "1":  # tools/gpu_check.sh on a GPU with TransformerEngine
        te = build_model(ModelConfig(path=student_dir, dtype="bfloat16", transformer_engine=True), par)
        out["real_te"] = packing_unsupported_reason(te.modules)
    return out


def test_models_that_cannot_pack_fall_back_with_a_warning(synthetic_pair) -> None:
    (out,) = spawn(fallback_reasons, 1, (str(synthetic_pair[0]),), timeout=300)
    assert out["local"] is None and out["local_ctx_packs"] is True
    assert "fused RoPE" in out["fused_rope"]
    assert "TEDotProductAttention" in out["te"] and out["te_ctx_packs"] is False
    assert any("packed guidance windows are off" in w and "TEDotProductAttention" in w for w in out["warnings"])
    if "real_te" in out:  # only where TransformerEngine runs (tools/gpu_check.sh)
        assert out["real_te"] is not None  # TE attention or its fused RoPE: the per-branch rows run instead
