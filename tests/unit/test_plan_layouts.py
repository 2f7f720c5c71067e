"""The planner's new phases and the layout search: packed guidance, the per-rollout guidance budget, several servers
per role, per-rollout window prefills, weight sync, time-sliced colocation, and `topd plan`'s search of node splits
(the recipes adopt the best feasible one)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from topd_megatron import recipes
from topd_megatron.overrides import apply_overrides
from topd_megatron.plan import plan
from topd_megatron.plan.architecture import resolve
from topd_megatron.plan.layout import layout_of, step_shape
from topd_megatron.plan.memory import GIB, rank_params, server_memory, student_state_bytes
from topd_megatron.plan.search import Candidate, opd_variant, search_layouts, split
from topd_megatron.plan.step_time import (
    DISK_GBPS,
    NETWORK_GBPS,
    PCIE_GBPS,
    in_process_window_seconds,
    weight_sync_seconds,
    window_prefill_tokens,
)

GPU_RECIPES = ("qwen3_4b_from_30b_a3b", "llama3_8b_from_70b", "topd_70b")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPD_OUT", str(tmp_path / "runs"))


def test_packed_shape_widens_rows_instead_of_adding_branch_rows() -> None:
    cfg = recipes.get("qwen3_4b_from_30b_a3b")
    lay = layout_of(cfg)
    packed = step_shape(cfg, lay, "cuda")
    assert packed.packed and packed.branch_rows == 0
    per_rollout = -(-packed.branches // packed.rollouts)
    assert packed.branch_seq == packed.seq + per_rollout * (packed.window - 1)
    assert packed.branch_tokens == packed.rows * (packed.branch_seq - packed.seq)
    assert packed.train_seq == packed.branch_seq and packed.branch_score_tokens == packed.rows * packed.branch_seq
    te = step_shape(apply_overrides(cfg, ["student.transformer_engine=none"]), lay, "cuda")  # TE cannot pack
    assert not te.packed and te.branch_rows >= te.branches and te.branch_seq == te.seq and te.train_seq == te.seq
    assert te.branch_tokens > 30 * packed.branch_tokens


def test_branch_training_tokens_stay_within_one_and_a_half_rollouts_in_every_gpu_recipe() -> None:
    for name in GPU_RECIPES:
        shape = plan(recipes.get(name), run_preflight=False).shape
        assert shape.packed, name
        assert shape.branch_tokens <= 1.5 * shape.tokens, (name, shape.branch_tokens / shape.tokens)


def test_guidance_budget_caps_the_branches_per_rollout() -> None:
    cfg = recipes.get("qwen3_4b_from_30b_a3b")
    lay = layout_of(cfg)
    free = step_shape(cfg, lay)
    capped = step_shape(apply_overrides(cfg, ["objective.guidance_budget=8"]), lay)
    assert free.branches > 8 * free.rollouts and capped.branches == 8 * capped.rollouts
    assert capped.branch_seq == capped.seq + 8 * (capped.window - 1)
    t_free = plan(cfg, run_preflight=False).step_time
    t_capped = plan(apply_overrides(cfg, ["objective.guidance_budget=8"]), run_preflight=False).step_time
    branch = [k for k in t_free.seconds if k.startswith("branch")]
    assert branch and all(t_capped.seconds[k] < t_free.seconds[k] for k in branch)


def test_window_prefill_counts_each_rollout_once() -> None:
    assert window_prefill_tokens(1000, 40, cached_rollouts=False) == 1040
    assert window_prefill_tokens(1000, 40, cached_rollouts=True) == 40


def test_weight_sync_time_by_hand() -> None:
    cfg = recipes.get("topd_70b")
    student = resolve(cfg.student.path)[0]
    nbytes = student.params() * 2
    export = nbytes / (PCIE_GBPS * 1e9)
    assert weight_sync_seconds(cfg, student) == pytest.approx(
        export + nbytes / (PCIE_GBPS * 1e9) + nbytes / (NETWORK_GBPS * 1e9)
    )
    disk = apply_overrides(cfg, ["sglang.sync_mode=disk"])
    assert weight_sync_seconds(disk, student) == pytest.approx(export + 9 * nbytes / (DISK_GBPS * 1e9))  # 8 servers
    tensor = apply_overrides(cfg, ["sglang.sync_mode=tensor"])
    assert weight_sync_seconds(tensor, student) == pytest.approx(export + 8 * nbytes / (PCIE_GBPS * 1e9))
    assert "weight sync (student servers)" in plan(cfg, run_preflight=False).step_time.seconds


def test_more_teacher_servers_score_faster() -> None:
    cfg = recipes.get("topd_70b")
    one = plan(
        apply_overrides(cfg, ["sglang.teacher.servers=5", "cluster.teacher_server_nodes=5"]), run_preflight=False
    )
    two = plan(cfg, run_preflight=False)  # 10 servers on 10 nodes
    name = "teacher scoring (SGLang prefill)"
    assert two.step_time.seconds[name] == pytest.approx(one.step_time.seconds[name] / 2)
    too_many = plan(apply_overrides(cfg, ["sglang.teacher.servers=11"]), run_preflight=False)
    assert any("servers*TP*DP = 11*8*1 = 88 GPUs; 80 are available" in r for r in too_many.reasons())


def test_time_slicing_frees_the_training_gpus_of_the_student_server() -> None:
    cfg = recipes.get("topd_70b")
    sliced = plan(cfg, run_preflight=False)
    training = sliced.roles[0]
    assert not any("SGLang student server share" in k for k in training.components)
    student = resolve(cfg.student.path)[0]
    weights = server_memory(student, cfg.sglang.student, cfg.cluster.gpu_memory_gib).weights
    assert training.phases["sync"] == pytest.approx(weights / GIB)  # the resumed weights next to Megatron's states
    server = next(r for r in sliced.roles if r.role.startswith("student server GPU (time-sliced"))
    assert server.budget_gib == cfg.cluster.gpu_memory_gib and server.fits
    lay = layout_of(cfg)
    states = student_state_bytes(rank_params(student, lay, student.vocab, "first"), cfg.student, lay, True)
    optimizer = next(v for k, v in states.items() if k.startswith("student optimizer"))
    swap = sliced.step_time.seconds["time slicing (Megatron states to host and back)"]
    # the step's span (time_slice_span='step'): one swap of the optimizer state; Megatron's weights and the d_t pass
    # sit beside the whole student servers, whose caches keep the rollouts for the fresh windows
    assert swap == pytest.approx(2 * optimizer / (PCIE_GBPS * 1e9))
    weights_gib = states["student weights"] / GIB  # (the planner pads the vocabulary)
    assert server.components["Megatron's student weights (kept for the d_t pass)"] == pytest.approx(
        weights_gib, rel=1e-4
    )
    beside = max(training.phases.get(p, 0.0) for p in ("score", "d_t", "detect"))
    assert server.components["phases 1-2 beside the servers (largest: d_t)"] == pytest.approx(beside)
    assert not any("teacher weights" in k for k in server.components)  # the teacher is served: none in Megatron
    assert any("student servers' KV caches hold the step's rollouts" in n for n in sliced.step_time.notes)
    # per call: the weights move too (the gradient buffers are freed, not copied), for the rollouts and for the fresh
    # student windows of each part of the step; once with the rollout's own windows
    from topd_megatron.plan.step_time import window_parts

    per_call = apply_overrides(cfg, ["sglang.time_slice_span=call"])
    call = plan(per_call, run_preflight=False)
    parts = window_parts(cfg, sliced.teacher, sliced.shape, sliced.layout.dp)
    moved = states["student weights"] + optimizer
    call_swap = call.step_time.seconds["time slicing (Megatron states to host and back)"]
    assert call_swap == pytest.approx((1 + parts) * 2 * moved / (PCIE_GBPS * 1e9))
    assert not any("student servers' KV caches hold" in n for n in call.step_time.notes)
    windows = "windows (SGLang, per rollout; teacher's and student's servers at once)"
    # the student's windows prefill every rollout again: the slower role now
    assert call.step_time.seconds[windows] > sliced.step_time.seconds[windows] + 15
    assert call.step_time.total_s > sliced.step_time.total_s + 10
    rollout_windows = apply_overrides(per_call, ["objective.detection.student_window=rollout"])
    swap_once = plan(rollout_windows, run_preflight=False).step_time.seconds[
        "time slicing (Megatron states to host and back)"
    ]
    assert swap_once == pytest.approx(call_swap / (1 + parts))
    shared = plan(apply_overrides(cfg, ["sglang.colocate=share"]), run_preflight=False)
    assert not shared.feasible  # a 0.85 share of every training GPU next to training does not fit


def test_a_megatron_teacher_stays_beside_time_sliced_servers() -> None:
    """llama3_8b_from_70b: time slicing offloads the student's states only; the Megatron teacher's weights stay on
    every GPU next to the whole student server, and the search lowers the server's mem_fraction to leave room."""
    from topd_megatron.plan.search import leave_room_for_megatron

    cfg = recipes.get("llama3_8b_from_70b")
    p = plan(cfg, run_preflight=False)
    training = p.roles[0]
    server = next(r for r in p.roles if r.role.startswith("student server GPU (time-sliced"))
    teacher = sum(v for k, v in training.components.items() if k.startswith(("teacher weights", "teacher FP8 weight")))
    assert teacher > 10 and server.components["Megatron's teacher weights (never offloaded)"] == pytest.approx(teacher)
    assert server.fits
    roomy = apply_overrides(cfg, ["sglang.student.mem_fraction=0.67"])  # the share planned before the teacher counted
    assert not plan(roomy, run_preflight=False).feasible
    fitted = leave_room_for_megatron(roomy)
    kept = sum(v for k, v in server.components.items() if k.startswith(("Megatron's", "phases 1-2")))
    assert fitted.sglang.student.mem_fraction == pytest.approx(0.67 - kept / cfg.cluster.gpu_memory_gib, abs=1e-3)
    assert plan(fitted, run_preflight=False).feasible


def test_search_finds_splits_and_the_recipes_adopt_the_best() -> None:
    for name in GPU_RECIPES:
        cfg = recipes.get(name)
        found = search_layouts(cfg)
        assert found and all(c.plan.feasible for c in found)
        assert [c.step_s for c in found] == sorted(c.step_s for c in found)
        best, mine = next(c for c in found if not c.tight), plan(cfg, run_preflight=False)  # the fastest with room
        assert mine.feasible and mine.step_time.total_s <= 1.05 * best.step_s, (name, mine.step_time.total_s)
        assert not Candidate(name, cfg, mine, 0.0).tight, name  # at least SAFE_HEADROOM_GIB on every whole GPU
        assert all(c.cfg.cluster.total_nodes == cfg.cluster.total_nodes for c in found)
        opd = plan(opd_variant(cfg), run_preflight=False).step_time.total_s
        assert opd < mine.step_time.total_s and math.isfinite(best.ratio)


def test_the_opd_step_of_a_capped_recipe_turns_the_budget_off() -> None:
    """topd_70b states a guidance budget; its OPD step (detector and guidance off) must drop it, or the objective
    refuses a budget without teacher-window guidance."""
    cfg = recipes.get("topd_70b")
    assert cfg.objective.guidance_budget == 16
    opd = opd_variant(cfg)
    assert (opd.objective.guidance, opd.objective.guidance_budget, opd.objective.detection.detector) == (
        "none",
        None,
        "none",
    )
    uncapped = plan(
        apply_overrides(cfg, ["objective.guidance_budget=None", "student.recompute=full"]), run_preflight=False
    )
    capped = plan(cfg, run_preflight=False)
    assert capped.shape.branch_tokens < uncapped.shape.branch_tokens
    assert plan(opd, run_preflight=False).step_time.total_s < capped.step_time.total_s


def test_topd_70b_plans_within_600_s_on_its_18_nodes() -> None:
    cfg = recipes.get("topd_70b")
    p = plan(cfg, run_preflight=False)
    assert cfg.cluster.total_nodes == 18 and p.feasible and p.step_time.total_s <= 600


def test_split_refuses_what_does_not_tile() -> None:
    cfg = recipes.get("topd_70b")
    assert split(cfg, 18, 1) is None  # no training node left
    odd = dataclasses.replace(cfg, sglang=dataclasses.replace(cfg.sglang, student=dataclasses.replace(
        cfg.sglang.student, tp=3)))  # fmt: skip
    assert split(odd, 1, 1) is None  # 8 GPUs do not hold whole servers of 3
    variant = split(cfg, 2, 4, "full", "share")
    assert variant is not None and variant.cluster.nodes == 12 and variant.sglang.teacher.servers == 4
    assert variant.sglang.student.servers == 2 and variant.student.transformer_engine is False


def test_the_fresh_student_windows_are_planned_beside_the_teachers() -> None:
    """window_ot samples the student's own windows too (student_window='fresh'): on the student servers at the same
    time as the teacher's on theirs, so the windows phase is the slower of the two when the teacher's servers have
    nodes of their own (topd_70b), and the sum of the two when both roles' servers share the training GPUs (qwen3:
    their decodes share the GPUs' HBM bandwidth); without them, the teacher's only."""
    both_name = "windows (SGLang, per rollout; teacher's and student's servers at once)"
    for name, combine in (("topd_70b", max), ("qwen3_4b_from_30b_a3b", lambda a, b: a + b)):
        cfg = recipes.get(name)
        fresh = plan(cfg, run_preflight=False).step_time
        rollout = plan(apply_overrides(cfg, ["objective.detection.student_window=rollout"]), run_preflight=False)
        teacher_only = rollout.step_time.seconds["teacher windows (SGLang, per rollout)"]
        assert both_name not in rollout.step_time.seconds
        note = next(n for n in fresh.notes if n.startswith("windows: the teacher's servers"))
        student_s = float(note.split("the student's ")[1].split(" s")[0])
        assert ("on the same GPUs" in note) == (combine is not max)
        assert student_s > 0 and fresh.seconds[both_name] == pytest.approx(combine(teacher_only, student_s), abs=0.1)
    # rollouts in-process (no servers): the student's windows are its own forward passes on the training GPUs
    tiny = plan(recipes.get("tiny"), run_preflight=False, device="cpu").step_time.seconds
    assert tiny["student windows (in-process, per rollout, KV cache)"] > 0
    assert tiny["teacher windows (in-process, per rollout, KV cache)"] > 0


def test_in_process_windows_are_the_formula_bench_window_decode_measures() -> None:
    """qwen3 with its teacher's windows in-process (sglang.teacher=None): the phase is `in_process_window_seconds` of
    the step's rollout rows and candidates at the training GPUs' rate, the function bench/window_decode.py evaluates
    against a measured call, with the shape (rows, windows, sequence, K) and rate the plan uses."""
    cfg = apply_overrides(recipes.get("qwen3_4b_from_30b_a3b"), ["sglang.teacher=None"])
    p = plan(cfg, run_preflight=False)
    assert p.step_time is not None and p.teacher is not None
    dp, c = p.layout.dp, cfg.cluster
    rate = c.training_gpus * c.gpu_peak_tflops * 1e12 * c.mfu
    rows, windows, k = p.shape.rollouts * dp, p.shape.candidates * dp, cfg.objective.detection.window
    expected = in_process_window_seconds(p.teacher, rows, windows, p.shape.seq, k, rate, False)
    assert p.step_time.seconds["teacher windows (in-process, per rollout, KV cache)"] == pytest.approx(expected)


def test_a_served_teacher_whose_caches_cannot_hold_the_step_scores_and_samples_in_parts() -> None:
    """topd_70b: the step's 4.2M rollout tokens and their windows exceed half the 10 teacher servers' pools, so
    phases 1-2 run in parts (training/scoring.py `part_plan`): the teacher's windows find their prefixes cached,
    and, swapping per call under time slicing, the student's windows of every part cost one more state swap."""
    from topd_megatron.plan.step_time import window_parts

    cfg = recipes.get("topd_70b")
    p = plan(cfg, run_preflight=False)
    teacher = p.teacher
    mem = server_memory(teacher, cfg.sglang.teacher, cfg.cluster.gpu_memory_gib)
    share = mem.kv_tokens * cfg.sglang.teacher.servers * cfg.sglang.window_cache_share / p.layout.dp
    need = p.shape.rollouts * p.shape.seq + cfg.objective.detection.window * p.shape.candidates
    parts = window_parts(cfg, teacher, p.shape, p.layout.dp)
    assert need > share and parts == math.ceil(need / int(share / 2))  # pipelined: two parts in the caches at once
    assert any(f"in {parts} parts of the step" in n for n in p.step_time.notes)
    note = next(n for n in p.step_time.notes if n.startswith("windows: the teacher's servers"))
    teacher_s = float(note.split("servers ")[1].split(" s")[0])
    student_s = float(note.split("the student's ")[1].split(" s")[0])
    # pipelined: the teacher scores part i + 1 during part i's d_t pass and windows (per part: a P-th of each phase)
    from topd_megatron.plan.step_time import PIPELINE_OVERLAP

    sec = p.step_time.seconds
    t, d = sec["teacher scoring (SGLang prefill)"] / parts, sec["student scoring forward"] / parts
    w_t, w = teacher_s / parts, max(teacher_s, student_s) / parts
    pipelined = t + (parts - 1) * max(d + w, t + w_t) + d + w
    assert -sec[PIPELINE_OVERLAP] == pytest.approx(parts * (t + d + w) - pipelined, rel=1e-2)  # notes round to 0.1 s
    assert -sec[PIPELINE_OVERLAP] > 0.6 * sec["student scoring forward"]  # most of the d_t pass is hidden
    # the same windows without parts, prefilling every rollout again: what the parts save
    from topd_megatron.plan.step_time import _decode_seconds, window_prefill_tokens

    dp, s, k = p.layout.dp, p.shape.seq, cfg.objective.detection.window
    candidates = p.shape.candidates * dp
    prefill = window_prefill_tokens(p.shape.rollouts * dp * s, candidates, cached_rollouts=False)
    per_rollout = p.shape.candidates // p.shape.rollouts
    args = (candidates, s // 2, k, int(prefill), k + s / per_rollout)
    assert _decode_seconds(teacher, cfg, "teacher", *args) > 2 * teacher_s
    # the teacher's windows come with its report on their tokens: no branch scoring on its servers
    assert not any(name.startswith("branch scoring") for name in p.step_time.seconds)
    assert any(n.startswith("branch scoring: none on the teacher servers") for n in p.step_time.notes)
    # with guidance at random positions phase 3 samples the teacher's windows there, each prefix prefilled again
    at_random = plan(apply_overrides(cfg, ["objective.guidance_at=random"]), run_preflight=False).step_time
    branches = p.shape.branches * dp
    prefill = window_prefill_tokens(p.shape.rollouts * dp * s, branches, cached_rollouts=False)
    args = (branches, s // 2, k, int(prefill), k + s / max(p.shape.branches // p.shape.rollouts, 1))
    guidance = at_random.seconds["guidance windows (SGLang teacher, per rollout)"]
    assert guidance == pytest.approx(_decode_seconds(teacher, cfg, "teacher", *args))
    # swapping per call, the fresh student windows of every part swap once more; in the step's span, never
    swap = "time slicing (Megatron states to host and back)"
    per_call = apply_overrides(cfg, ["sglang.time_slice_span=call"])
    states = plan(per_call, run_preflight=False).step_time.seconds[swap]
    rollout_windows = plan(
        apply_overrides(per_call, ["objective.detection.student_window=rollout"]), run_preflight=False
    )
    assert states == pytest.approx((1 + parts) * rollout_windows.step_time.seconds[swap])
    spanned = plan(apply_overrides(cfg, ["objective.detection.student_window=rollout"]), run_preflight=False)
    assert p.step_time.seconds[swap] == pytest.approx(spanned.step_time.seconds[swap])
