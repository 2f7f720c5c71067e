"""Phases 1-2 in parts that fit a served teacher's KV cache (training/scoring.py `score_and_detect`), against a real
SGLang teacher server on CPU whose KV pool cannot hold a step's rollouts with their windows.

Scored as one step, the teacher's cache has evicted most rollouts by the time their windows are sampled, so each
rollout's prefix is computed again; in parts, each part's windows follow its own scoring and find their prefixes
cached. Both ways give the same teacher report, d_t and candidates, and as many windows; two data-parallel ranks
agree on the number of parts. The parts are pipelined: the teacher's scoring of part i + 1 goes out before part i's
d_t pass and windows, each part taking half the budget.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from topd_megatron.distributed.launch import spawn
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient
from topd_megatron.rollout.sglang.server import ServerConfig, launch_server

POOL_TOKENS = 768
"""The small teacher server's KV pool: a step here (two ranks) has about 1,000 rollout tokens and 700 window tokens;
half the pool is the window-cache budget, a quarter of that a pipelined part's share on each rank."""


@pytest.fixture(scope="module")
def small_teacher_server(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    server = launch_server(
        ServerConfig(
            role="teacher", model_path=str(synthetic_pair[1]), max_total_tokens=POOL_TOKENS, startup_timeout_s=600
        ),
        log_dir=tmp_path_factory.mktemp("sglang-small-teacher-logs"),
    )
    yield server
    server.stop()


def _parts_body(rank: int, world: int, pair: tuple[str, str], urls: dict, work: str) -> dict:
    """DP=world (TP=1): rollouts from the student server, then phases 1-2 of one step scored whole (score, detect)
    and in parts (score_and_detect), each from an empty teacher cache; SGLang's counts of the window requests."""
    from topd_megatron.algorithm import objective
    from topd_megatron.algorithm.batch import build_step_batch
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine
    from topd_megatron.training.scoring import detect, part_plan, score, score_and_detect, scoring_context
    from topd_megatron.training.teacher import served_branch_scores

    par = ParallelConfig(tp=1)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), par, role="student")
    cfg = SGLangConfig(
        student=ServerConfig(url=urls["student"]), teacher=ServerConfig(role="teacher", url=urls["teacher"])
    )
    engine = SGLangEngine(cfg, student, None, run_dir=work, teacher_dir=pair[1])
    topd = objective.preset("topd")
    obj = dataclasses.replace(
        topd,
        teacher_signal="top_k",
        teacher_top_k=4,
        detection=dataclasses.replace(topd.detection, window=4, tau=None),
    )
    ctx = scoring_context(obj, student, None, engine, eos_id=2, pad_id=0)
    prompts = [[1, 5, 7, 9, 11, 3], [1, 5, 8, 6], [3, 4, 6, 2, 9, 12], [7, 7, 8, 9, 10]] * 3
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=40, seed=3 + rank))
    step = build_step_batch(gens, pad_id=0, micro_batch_size=1)

    def flush() -> None:
        if rank == 0:
            SGLangClient(urls["teacher"]).flush_cache()
        torch.distributed.barrier()

    calls: list[tuple] = []  # what this rank's leader asked the servers for windows: seeds, prefill token counts
    request, prefill = engine._request, engine._prefill_requests

    def record_request(model, prompts, params, seeds=None, *, top_k=0):
        calls.append(("seeds", model, list(seeds or ())))
        return request(model, prompts, params, seeds, top_k=top_k)

    def record_prefill(model, sequences):
        counts = prefill(model, sequences)
        calls.append(("prefill", model, counts))
        return counts

    engine._request, engine._prefill_requests = record_request, record_prefill
    order: list[str] = []  # the leaders' engine calls, in order: pipelined parts begin the next scoring early
    score_async, pair = engine.score_async, engine.generate_window_pair

    def record_score_async(*a, **k):
        order.append("score")
        return score_async(*a, **k)

    def record_pair(*a, **k):
        order.append("windows")
        return pair(*a, **k)

    engine.score_async, engine.generate_window_pair = record_score_async, record_pair

    n_parts, pipelined = part_plan(ctx, step)
    out: dict = {"n_parts": n_parts, "pipelined": pipelined, "budget": engine.window_cache_budget("teacher")}
    for how in ("whole", "parts"):
        flush()
        engine._cache_metrics()  # reads and resets the counters: the next read covers this flow only
        order.clear()
        if how == "whole":
            scores = score(ctx, step)
            found = detect(ctx, step, scores, window_seed=7)
        else:
            scores, found, _ = score_and_detect(ctx, step, window_seed=7)
        assert found.detection is not None and found.teacher_windows is not None
        det, u = found.detection, found.teacher_windows
        seeds = {
            m: [s for kind, mm, ss in calls if kind == "seeds" and mm == m for s in ss] for m in ("teacher", "student")
        }
        computed = sum(p - c for kind, m, counts in calls if kind == "prefill" and m == "teacher" for p, c in counts)
        calls.clear()
        flow = list(order)  # the engine calls of this flow (the checks below score again)
        order.clear()
        guided = None  # the report sampled with the guided windows, and the teacher scoring them again now
        if found.teacher_window_scores is not None:
            mine = found.teacher_window_scores.select_windows(u.lengths, det.guidance_rows())
            again = served_branch_scores(engine, step, det.guidance_positions(), det.guidance_windows(u), 4)
            guided = (mine.token_logprobs, again.token_logprobs, mine.top_logprobs, again.top_logprobs)
        out[how] = {
            "seeds": seeds,
            "teacher_prefill_computed": computed,
            "guided": guided,
            "logprobs": scores.teacher.token_logprobs,
            "top": scores.teacher.top_logprobs,
            "divergence": scores.divergence,
            "candidates": found.detection.candidates.positions,
            "windows": found.teacher_windows.tokens.shape[0],
            "metrics": engine._cache_metrics(),
            "order": flow,
        }
    engine.close()
    return out


@pytest.mark.slow  # about 2.5 minutes: it starts its own small-pool teacher server
def test_scoring_in_parts_that_fit_the_teachers_cache_reuses_every_prefix(
    synthetic_pair, student_server, small_teacher_server, tmp_path
) -> None:
    urls = {"student": student_server.url, "teacher": small_teacher_server.url}
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    results = spawn(_parts_body, 2, (pair, urls, str(tmp_path)), timeout=900)
    assert results[0]["budget"] == POOL_TOKENS // 2  # window_cache_share 0.5 of the one server's pool
    assert results[0]["n_parts"] == results[1]["n_parts"] > 1, "both data-parallel ranks split the step alike"
    assert results[0]["pipelined"] and results[1]["pipelined"]
    for r in results:
        whole, parts = r["whole"], r["parts"]
        torch.testing.assert_close(parts["logprobs"], whole["logprobs"], atol=1e-4, rtol=0)
        torch.testing.assert_close(parts["top"], whole["top"], atol=1e-4, rtol=0)
        torch.testing.assert_close(parts["divergence"], whole["divergence"], atol=1e-4, rtol=0)
        assert torch.equal(parts["candidates"], whole["candidates"]) and parts["windows"] == whole["windows"] > 0
        # each window was requested with the seed one call for the whole step gives it, for both models
        assert parts["seeds"] == whole["seeds"] and len(parts["seeds"]["teacher"]) == parts["windows"]
        # the teacher's report on the guided windows, from the decode that sampled them (whole or in parts), is what
        # scoring them afterwards gives
        for how in (whole, parts):
            mine, again, mine_top, again_top = how["guided"]
            assert mine.numel() > 0
            torch.testing.assert_close(mine, again, atol=1e-4, rtol=0)
            torch.testing.assert_close(mine_top, again_top, atol=1e-4, rtol=0)
        # the teacher's window prefixes: computed again when scored whole, found in its cache in parts
        computed = (parts["teacher_prefill_computed"], whole["teacher_prefill_computed"])
        assert computed[0] < 0.3 * computed[1], computed
    # pipelined: the teacher's scoring of part i + 1 went out before part i's windows (and its d_t pass)
    n = results[0]["n_parts"]
    assert results[0]["parts"]["order"] == ["score", "score"] + ["windows", "score"] * (n - 2) + ["windows"] * 2
    m = results[0]["parts"]["metrics"]  # SGLang's own counts (both roles' window prefixes)
    assert m["sglang/window_prefix_cached_token_share"] > 0.8, m
