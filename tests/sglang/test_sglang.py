"""SGLang as the rollout engine, against a real SGLang server running on CPU (generic torch path).

Parity: the server's log-probs equal the Megatron student's (TP=2, fp32) on the same tokens, before any update and
after every weight-sync mode. Lifecycle: attach to a running server; a server that exits or never becomes healthy
gives a clear error within its timeout. Training: a run with rollout='sglang' whose student server is killed
mid-rollout restarts it, pushes the weights again and finishes every step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from topd_megatron.distributed.launch import spawn
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient, SGLangUnavailable
from topd_megatron.rollout.sglang.server import ServerConfig, ServerStartError, launch_server

PARITY_TOL = 1e-4


def _megatron_logprobs(lm, seqs: list[list[int]], start: list[int]) -> list[torch.Tensor]:
    """log p(seq[i] | seq[:i]) for i >= start, from the Megatron model's vocab-sharded logits."""
    from megatron.core import parallel_state as ps

    from topd_megatron.algorithm.loss import token_logprobs
    from topd_megatron.training.forward import forward_logits, make_microbatch

    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    logits = forward_logits(lm.modules, [make_microbatch(tokens)])[0]
    group = ps.get_tensor_model_parallel_group()
    return [
        token_logprobs(logits[i, : len(s) - 1], tokens[i, 1 : len(s)], vocab_size=lm.vocab_size, group=group)[
            start[i] - 1 :
        ].double()
        for i, s in enumerate(seqs)
    ]


def _parity_body(rank: int, world: int, student: str, url: str, modes: tuple[str, ...], work: str) -> dict | None:
    """TP=world: sample from the server, score the samples with Megatron; then for each sync mode perturb the
    student (identically on every rank), push it and compare again. Returns max abs differences on rank 0."""
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.weight_sync import WeightSync

    init_model_parallel(ParallelConfig(tp=world))
    lm = build_model(ModelConfig(path=student, dtype="float32"), ParallelConfig(tp=world), role="student")
    client = SGLangClient(url) if rank == 0 else None
    prompts = [[1, 5, 7, 9, 11], [1, 5, 8], [3, 4, 6, 2, 9, 12]]
    report: dict = {}

    def compare(tag: str) -> None:
        box = [None]
        if rank == 0:
            params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=len(report))
            box = [client.generate(prompts, params)]
        torch.distributed.broadcast_object_list(box, src=0)
        gens = box[0]
        seqs = [g.prompt_ids + g.output_ids for g in gens]
        start = [len(g.prompt_ids) for g in gens]
        mine = _megatron_logprobs(lm, seqs, start)
        if rank == 0:
            sampled = [torch.tensor(g.output_logprobs, dtype=torch.float64) for g in gens]
            # the model's vocabulary size, as the engine passes it: SGLang reports its last id as 0 in input log-probs
            scores = client.score(seqs, start, vocab_size=lm.vocab_size)
            scored = [torch.tensor(s.logprobs, dtype=torch.float64) for s in scores]
            report[tag] = {
                "generate": max((a - b).abs().max().item() for a, b in zip(mine, sampled, strict=True)),
                "score": max((a - b).abs().max().item() for a, b in zip(mine, scored, strict=True)),
                "tokens": sum(len(g.output_ids) for g in gens),
            }

    compare("initial")
    initial = [p.detach().clone() for p in lm.modules[0].parameters()]
    try:
        for i, mode in enumerate(modes):
            gen = torch.Generator().manual_seed(100 + i)  # the same on every rank: replicated parameters stay equal
            with torch.no_grad():
                for p in lm.modules[0].parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            sync = WeightSync(mode, lm, client, server_ranks=1, work_dir=Path(work))
            stats = sync.sync()
            compare(mode)
            if rank == 0:
                report[mode]["sync"] = stats
            sync.close()
    finally:  # leave the shared server as the checkpoint, also after a failure: other tests compare against it
        with torch.no_grad():
            for p, p0 in zip(lm.modules[0].parameters(), initial, strict=True):
                p.copy_(p0)
        WeightSync("disk", lm, client, server_ranks=1, work_dir=Path(work)).sync()
    return report if rank == 0 else None


def test_logprobs_match_megatron_before_and_after_every_sync_mode(synthetic_pair, student_server, tmp_path) -> None:
    modes = ("disk", "tensor", "distributed")
    report = spawn(_parity_body, 2, (str(synthetic_pair[0]), student_server.url, modes, str(tmp_path)), timeout=900)[0]
    for tag in ("initial", *modes):
        assert report[tag]["tokens"] > 0
        assert report[tag]["generate"] <= PARITY_TOL, (tag, report[tag])
        assert report[tag]["score"] <= PARITY_TOL, (tag, report[tag])
    for mode in modes:
        stats = report[mode]["sync"]
        assert stats["sync/bytes"] > 0 and stats["sync/tensors"] > 0 and stats["sync/seconds"] > 0, (mode, stats)


def test_top_k_scores_match_the_models_own_ranking(student_server, synthetic_pair) -> None:
    from transformers import AutoModelForCausalLM

    client = SGLangClient(student_server.url)
    seq = [1, 5, 7, 9, 11, 13, 4]
    (scores,) = client.score([seq], [3], top_k=4)
    model = AutoModelForCausalLM.from_pretrained(str(synthetic_pair[0]), dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    top = logp[2:-1].topk(4, dim=-1)
    assert scores.top_ids == top.indices.tolist()
    assert torch.allclose(torch.tensor(scores.top_logprobs, dtype=torch.float64), top.values, atol=PARITY_TOL)
    want = torch.tensor([logp[i - 1, seq[i]].item() for i in range(3, len(seq))], dtype=torch.float64)
    assert torch.allclose(torch.tensor(scores.logprobs, dtype=torch.float64), want, atol=PARITY_TOL)


def _window_pair_body(rank: int, world: int, pair: tuple[str, str], urls: dict, work: str) -> dict | None:
    """Rollouts from the student server, then the teacher's and the student's windows at the same positions in one
    call (generate_window_pair), from empty prefix caches, the teacher's with its top-4 at every window position;
    each window scored again by both servers (the teacher's with its top-4), and by the teacher once more begun early
    (score_async) while the engine serves another call."""
    from topd_megatron.algorithm.batch import build_step_batch
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.engine import PairedWindowSampler
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), par, role="student")
    cfg = SGLangConfig(
        student=ServerConfig(url=urls["student"]), teacher=ServerConfig(role="teacher", url=urls["teacher"])
    )
    engine = SGLangEngine(cfg, student, None, run_dir=work, teacher_dir=pair[1])
    assert isinstance(engine, PairedWindowSampler)
    prompts = [[1, 5, 7, 9, 11, 3, 4], [1, 5, 8, 6], [3, 4, 6, 2, 9, 12], [7, 7, 8, 9, 10]]
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=16, seed=3))
    step = build_step_batch(gens, pad_id=0, micro_batch_size=4)
    positions = step.token_batch().response_mask.nonzero().flatten()[::3]
    if rank == 0:
        for role in ("student", "teacher"):
            SGLangClient(urls[role]).flush_cache()
    torch.distributed.barrier()
    engine._cache_metrics()  # reads and resets the counters: the next read covers the pair only
    params = SamplingParams(temperature=1.0, max_new_tokens=5)
    both = engine.generate_window_pair(step.tokens, positions, params, teacher_top_k=4)
    metrics = engine._cache_metrics()
    s1 = step.tokens.shape[1] - 1
    report: dict = {"metrics": metrics, "positions": positions.numel()}
    for role, windows in both.items():
        report[role] = {
            "count": len(windows),
            "prefixes_in_order": [g.prompt_ids for g in windows]
            == [step.tokens[p // s1, : p % s1 + 1].tolist() for p in positions.tolist()],
            "lengths": sorted({len(g.output_ids) for g in windows}),
        }
        seqs = [g.prompt_ids + g.output_ids for g in windows]
        starts = [len(g.prompt_ids) for g in windows]
        sampled = torch.tensor([x for g in windows for x in g.output_logprobs], dtype=torch.float64)
        for scorer in ("teacher", "student"):
            scored = engine.score(seqs, starts, model=scorer)
            again = torch.tensor([x for sc in scored for x in sc.logprobs], dtype=torch.float64)
            report[role][f"vs {scorer}"] = (again - sampled).abs().max().item()
        report[role]["has_top"] = [g.output_top_ids is not None for g in windows]
    # the teacher's report from the decode that sampled its windows equals a prefill's scores of the same windows
    teacher = both["teacher"]
    seqs, starts = [g.prompt_ids + g.output_ids for g in teacher], [len(g.prompt_ids) for g in teacher]
    scored = engine.score(seqs, starts, top_k=4, model="teacher")
    report["top_ids_equal"] = [sc.top_ids for sc in scored] == [g.output_top_ids for g in teacher]
    report["top_logprobs"] = max(
        (torch.tensor(sc.top_logprobs, dtype=torch.float64) - torch.tensor(g.output_top_logprobs)).abs().max().item()
        for sc, g in zip(scored, teacher, strict=True)
    )
    # the same scoring begun early (score_async), with another collective call of the engine while the server scores
    pending = engine.score_async(seqs, starts, top_k=4, model="teacher")
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=3, seed=9))
    early = pending.result()
    report["async_ids_equal"] = [sc.top_ids for sc in early] == [sc.top_ids for sc in scored]
    report["async_vs_sync"] = max(
        (torch.tensor(a.logprobs + sum(a.top_logprobs, [])) - torch.tensor(b.logprobs + sum(b.top_logprobs, [])))
        .abs()
        .max()
        .item()
        for a, b in zip(early, scored, strict=True)
    )
    engine.close()
    return None if rank else report


def test_both_roles_windows_at_once_come_from_their_own_servers(
    synthetic_pair, student_server, teacher_server, tmp_path
) -> None:
    urls = {"student": student_server.url, "teacher": teacher_server.url}
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    r = spawn(_window_pair_body, 2, (pair, urls, str(tmp_path)), timeout=900)[0]
    assert r["positions"] >= 8
    other = {"teacher": "student", "student": "teacher"}
    for role in ("teacher", "student"):
        assert r[role]["count"] == r["positions"] and r[role]["prefixes_in_order"], r[role]
        assert r[role]["lengths"][-1] == 5, r[role]
        # each window's log-probs are its own model's (scored again by that server), not the other model's
        assert r[role][f"vs {role}"] <= PARITY_TOL, r[role]
        assert r[role][f"vs {other[role]}"] > 0.1, r[role]
    assert all(r["teacher"]["has_top"]) and not any(r["student"]["has_top"])  # top-k asked of the teacher only
    assert r["top_ids_equal"] and r["top_logprobs"] <= PARITY_TOL, r
    assert r["async_ids_equal"] and r["async_vs_sync"] <= PARITY_TOL, r
    m = r["metrics"]  # each role's windows found their rollout's prefix in that server's cache (prefilled first)
    assert m["sglang/window_cached_token_share"] > 0.5 and m["sglang/window_prefix_prompt_tokens"] > 0, m


def test_attaching_leaves_the_server_running(student_server, tmp_path) -> None:
    attached = launch_server(ServerConfig(url=student_server.url), log_dir=tmp_path)
    assert attached.pid is None and attached.url == student_server.url
    attached.stop()
    assert student_server.alive() and SGLangClient(student_server.url).healthy()


def test_a_server_that_exits_at_startup_is_reported_with_its_log(tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with code") as err:
        launch_server(ServerConfig(model_path=str(broken), startup_timeout_s=300), log_dir=tmp_path)
    assert time.monotonic() - t0 < 300
    assert "sglang-student-" in str(err.value)  # names the log file


def test_a_server_that_is_not_healthy_in_time_fails_within_its_timeout(synthetic_pair, tmp_path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="not healthy within 3 s"):
        launch_server(ServerConfig(model_path=str(synthetic_pair[0]), startup_timeout_s=3), log_dir=tmp_path)
    assert time.monotonic() - t0 < 3 + 40  # the timeout, then stopping what was started
    logs = list(tmp_path.glob("sglang-student-*.log"))
    assert len(logs) == 1


def test_an_unreachable_server_exhausts_a_bounded_retry_budget() -> None:
    from topd_megatron.distributed.env import free_port

    client = SGLangClient(f"http://127.0.0.1:{free_port()}", max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(SGLangUnavailable, match="after 3 attempt"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert time.monotonic() - t0 < 10


def test_a_server_command_never_holds_the_api_key() -> None:
    """The key goes to the server's stdin (rollout/sglang/launch.py); the command line only says it will."""
    from topd_megatron.rollout.sglang.launch import KEY_FLAG
    from topd_megatron.rollout.sglang.server import server_command

    cmd = server_command(ServerConfig(model_path="m", host="0.0.0.0"), 30000, with_key=True, cuda=False)
    assert KEY_FLAG in cmd and "--api-key" not in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    local = server_command(ServerConfig(model_path="m"), 30000, with_key=False, cuda=False)
    assert KEY_FLAG not in local and local[local.index("--host") + 1] == "127.0.0.1"


def test_training_survives_a_killed_student_server(synthetic_pair, tmp_path) -> None:
    """rollout='sglang' with a student server (distributed weight sync) and a teacher server (TOPD's near-future
    windows): the student server is SIGKILLed as the second step's rollout goes out; the run restarts it, pushes the
    weights again, retries the same rollout and finishes every step. Both servers require an API key, read from an
    environment variable of the ranks: no process ever has it on its command line, no server process in its
    environment (checked every 0.2 s while the run lasts; the server gets it on stdin), and
    no file of the run holds it (metrics, logs, the saved run config, checkpoints)."""
    import secrets
    import threading

    from tests.distributed.test_train import make_config
    from tests.sglang.test_secrets import files_holding, processes_holding
    from topd_megatron.rollout.sglang.engine import SGLangConfig
    from topd_megatron.training.loop import train
    from topd_megatron.training.metrics import read_metrics

    key = secrets.token_urlsafe(24)
    keyed = {"startup_timeout_s": 600, "api_key_env": "TOPD_TEST_SGLANG_KEY"}
    cfg = make_config(synthetic_pair, tmp_path / "run", "topd", steps=3)
    cfg = dataclasses.replace(
        cfg,
        rollout="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(model_path="<student>", **keyed),
            teacher=ServerConfig(role="teacher", model_path="<teacher>", **keyed),
            sync_mode="distributed",
            # call 1: step-0 evaluation; 2: step 1's rollouts; 3: its teacher and fresh student windows (one call
            # for both roles, each prefilling its rollouts' prefixes, then sampling the windows); 4: step 2's rollouts
            kill_student_at_call=4,
        ),
    )
    leaks: list[str] = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            # command lines of every process; environments of the servers' processes (the ranks hold the key in
            # theirs by design, and so do the workers they start themselves, e.g. Megatron's checkpoint writers)
            leaks.extend(h for h in processes_holding(key) if " cmdline " in h or h == "ps" or "sglang" in h)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = spawn(train, 2, (cfg,), timeout=1500, env={"TOPD_TEST_SGLANG_KEY": key})[0]
    finally:
        running.clear()
        watcher.join()
    assert leaks == [], f"the API key was on a command line or in an environment: {sorted(set(leaks))}"
    assert files_holding(tmp_path, key) == []
    assert summary["steps"] == 3
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["sglang/restarts"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["sync/bytes"] > 0 and r["skipped"] == 0.0 for r in rows)
    assert all(r["detect/windows_generated"] > 0 and r["guidance/windows"] > 0 for r in rows)
    for role in ("student", "teacher"):
        logs = sorted((tmp_path / "run" / "sglang").glob(f"sglang-{role}-*.log"))
        assert len(logs) == 1, "one log per server, kept in the run directory (a restart appends to it)"
        port = logs[0].stem.rsplit("-", 1)[1]
        ps = os.popen("ps -eo args").read().splitlines()
        survivors = [a for a in ps if "sglang" in a and f"--port {port}" in a]
        assert not survivors, f"a {role} server outlived the run: {survivors}"


def _teacher_killed_while_scoring_body(rank: int, world: int, pair: tuple[str, str], url: str, work: str) -> dict:
    """An engine with a teacher server it launched: score, SIGKILL the server, score again, begun in the background
    (score_async, as pipelined parts do); the student's weights are not pushed again for a teacher's failure."""
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine

    init_model_parallel(ParallelConfig(tp=world))
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), ParallelConfig(tp=world), role="student")
    cfg = SGLangConfig(
        student=ServerConfig(url=url),
        teacher=ServerConfig(role="teacher", model_path="<teacher>", startup_timeout_s=600, max_retries=1),
        sync_mode="disk",
    )
    engine = SGLangEngine(cfg, student, None, run_dir=work, teacher_dir=pair[1])
    try:
        seqs = [[1, 5, 7, 9, 11, 13, 4], [3, 4, 6, 2, 9]]
        before = [s.logprobs for s in engine.score(seqs, [2, 3], model="teacher")]
        pushes: list[int] = []
        push = engine.sync.sync
        engine.sync.sync = lambda: pushes.append(1) or push()
        pid = engine.pools["teacher"].servers[0].pid if rank == 0 else None
        if rank == 0:  # the teacher server dies between two scoring calls of a step, as in a crash
            os.killpg(pid, signal.SIGKILL)
            engine.pools["teacher"].servers[0].process.wait()
        pending = engine.score_async(seqs, [2, 3], model="teacher")  # its requests fail in the background
        after = [s.logprobs for s in pending.result()]
        new_pid = engine.pools["teacher"].servers[0].pid if rank == 0 else None
        return {"before": before, "after": after, "restarts": engine.restarts, "pids": (pid, new_pid), "pushes": pushes}
    finally:
        engine.close()


def test_a_teacher_server_that_dies_during_scoring_is_restarted_and_the_call_retried(
    synthetic_pair, student_server, tmp_path
) -> None:
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    (r,) = spawn(_teacher_killed_while_scoring_body, 1, (pair, student_server.url, str(tmp_path)), timeout=900)
    assert r["restarts"] == 1 and r["pids"][0] != r["pids"][1]
    assert r["after"] == r["before"]  # the same scores from the restarted server
    assert r["pushes"] == []  # the teacher's servers receive no weights: the student's were not pushed again
    assert not Path(f"/proc/{r['pids'][1]}").exists(), "the restarted teacher server outlived the engine"


# -- a teacher served only by SGLang -----------------------------------------------------------------------------------


def _served_parity_body(rank: int, world: int, pair: tuple[str, str], urls: tuple[str, str], work: str) -> dict | None:
    """TP=world. Rollouts from the student server; the teacher server's report on them (served_rollout_scores) and
    on branch windows (served_branch_scores) against the Megatron teacher built here only as the reference: token
    log-probs, and the loss's top-k form at k = V against its logits form (the same reverse KL)."""
    from megatron.core import parallel_state as ps

    from topd_megatron.algorithm import objective
    from topd_megatron.algorithm.batch import build_branch_batch, build_step_batch
    from topd_megatron.algorithm.types import Windows
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine
    from topd_megatron.training.teacher import (
        build_teacher,
        served_branch_scores,
        served_rollout_scores,
        teacher_logits,
    )

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), par, role="student")
    teacher = build_teacher(ModelConfig(path=pair[1], dtype="float32"), par, student)
    cfg = SGLangConfig(
        student=ServerConfig(url=urls[0]), teacher=ServerConfig(role="teacher", url=urls[1]), sync_mode="disk"
    )
    engine = SGLangEngine(cfg, student, None, run_dir=work, teacher_dir=pair[1])  # attaching pushes the student
    v = teacher.vocab_size
    kw = {"vocab_size": v, "group": ps.get_tensor_model_parallel_group()}
    gens = engine.generate([[1, 5, 7, 9, 11], [1, 5, 8], [3, 4, 6, 2, 9, 12]], SamplingParams(max_new_tokens=8, seed=3))
    step = build_step_batch(gens, pad_id=0, micro_batch_size=4)
    tb = step.token_batch()
    m = tb.response_mask
    served = served_rollout_scores(engine, step, top_k=v)
    t_logits = teacher_logits(teacher, step.microbatches())[0][:, :-1].reshape(tb.num_positions, -1)
    s_logits = t_logits.clone()  # any student works for the form check; use distinct logits
    s_logits = s_logits.roll(1, dims=0)
    tok = torch.where(m, tb.tokens, torch.zeros_like(tb.tokens))
    from topd_megatron.algorithm.loss import token_logprobs

    ref_lp = token_logprobs(t_logits, tok, **kw)
    seqs = [g.prompt_ids + g.output_ids for g in gens]
    starts = [len(g.prompt_ids) for g in gens]
    student_served = engine.score(seqs, starts, model="student")
    student_ref = _megatron_logprobs(student, seqs, starts)
    topk_cfg = dataclasses.replace(objective.preset("opd"), teacher_signal="top_k", teacher_top_k=v)
    d_topk = objective.token_terms(topk_cfg, tb, s_logits, served, **kw).divergence
    d_exact = objective.token_terms(objective.preset("opd"), tb, s_logits, t_logits, **kw).divergence
    # branches: windows of 3 teacher tokens after two response positions
    pos = m.nonzero().flatten()[[0, 5]]
    win_gens = engine.generate(
        [step.tokens[int(p) // step.targets_per_row, : int(p) % step.targets_per_row + 1].tolist() for p in pos],
        SamplingParams(max_new_tokens=3, seed=4),
        model="teacher",
    )
    windows = Windows(
        tokens=torch.tensor([(g.output_ids + [0, 0, 0])[:3] for g in win_gens]),
        lengths=torch.tensor([min(len(g.output_ids), 3) for g in win_gens]),
    )
    branch_served = served_branch_scores(engine, step, pos, windows, top_k=0)
    branch = build_branch_batch(step, pos, windows, pad_id=0, micro_batch_size=4)
    t_b = branch.window_logits(0, teacher_logits(teacher, branch.microbatches())[0])
    ref_branch = token_logprobs(t_b, windows.packed(), **kw)
    engine.close()
    if rank != 0:
        return None
    return {
        "student_after_attach": max(
            (torch.tensor(a.logprobs, dtype=torch.float64) - b).abs().max().item()
            for a, b in zip(student_served, student_ref, strict=True)
        ),
        "token_logprobs": (served.token_logprobs[m].double() - ref_lp[m].double()).abs().max().item(),
        "topk_vs_exact": (d_topk[m].double() - d_exact[m].double()).abs().max().item(),
        "branch_logprobs": (branch_served.token_logprobs.double() - ref_branch.double()).abs().max().item(),
        "positions": int(m.sum()),
        "window_tokens": int(windows.lengths.sum()),
        "top_ids_valid": bool((served.top_ids[m] < v).all()),
    }


def test_served_teacher_report_matches_the_megatron_teacher(
    synthetic_pair, dummy_student_server, teacher_server, tmp_path
):
    """Also: attaching to a student server that holds other weights (here random) pushes the student's first."""
    pair = (str(synthetic_pair[0]), str(synthetic_pair[1]))
    urls = (dummy_student_server.url, teacher_server.url)
    report = spawn(_served_parity_body, 2, (pair, urls, str(tmp_path)), timeout=900)
    r = report[0]
    assert r["student_after_attach"] <= PARITY_TOL, r
    assert r["positions"] > 10 and r["window_tokens"] >= 4 and r["top_ids_valid"]
    assert r["token_logprobs"] <= PARITY_TOL, r
    assert r["branch_logprobs"] <= PARITY_TOL, r
    assert r["topk_vs_exact"] <= PARITY_TOL, r


@pytest.mark.parametrize(("signal", "guidance"), [("top_k", "reverse_kl"), ("sampled_token", "forward_kl")])
def test_training_with_a_teacher_served_only_by_sglang(
    synthetic_pair, dummy_student_server, teacher_server, tmp_path, signal, guidance
):
    """teacher_source='sglang': no Megatron teacher is built; TOPD (window-OT detection, teacher-window guidance)
    takes every teacher quantity from the teacher server, in the top-k or the sampled-token form. The run starts with
    the served-model self-test and logs it."""
    from tests.distributed.test_train import make_config
    from topd_megatron.rollout.sglang.engine import SGLangConfig
    from topd_megatron.training.loop import train
    from topd_megatron.training.metrics import read_metrics

    cfg = make_config(synthetic_pair, tmp_path / "run", "topd", steps=2, eval_at_start=False)
    cfg = dataclasses.replace(
        cfg,
        rollout="sglang",
        teacher_source="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(url=dummy_student_server.url),  # attached: the run pushes its student first
            teacher=ServerConfig(role="teacher", url=teacher_server.url),
            sync_mode="distributed",
        ),
        objective=dataclasses.replace(
            cfg.objective, teacher_signal=signal, teacher_top_k=8, guidance_divergence=guidance
        ),
    )
    summary = spawn(train, 2, (cfg,), timeout=1200)[0]
    assert summary["steps"] == 2
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["teacher/colocated"] == 0.0 and r[f"teacher/form_{signal}"] == 1.0
        assert r["teacher/top_k"] == (8.0 if signal == "top_k" else 0.0)
        assert r["skipped"] == 0.0 and r["grad_norm"] > 0 and math.isfinite(r["loss"])
        assert r["detect/windows_generated"] > 0 and r["guidance/windows"] > 0
    # per step: the rollouts' scores and the teacher's windows (one call, with the student's windows beside it; they
    # carry the teacher's report on their tokens, so no third call scores the branches) went to the teacher server
    assert rows[1]["sglang/teacher_calls"] - rows[0]["sglang/teacher_calls"] == 2
    assert all(r["sglang/window_cached_token_share"] > 0.5 for r in rows)  # the windows found their prefixes cached
    (check,) = read_metrics(tmp_path / "run", "selftest")  # the served-model self-test ran before step 1
    assert check["step"] == 0 and check["teacher/selftest_repeat_max"] <= 1e-5, check
    assert check["student/selftest_colocated_max"] <= PARITY_TOL, check
    assert "teacher/selftest_colocated_mean" not in check  # the teacher is only served: nothing to compare with
    assert teacher_server.alive() and dummy_student_server.alive(), "attached servers are left running"
