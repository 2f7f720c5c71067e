"""Several real SGLang servers of a role on CPU behind sglang-router (rollout/sglang/pool.py, router.py).

Default suite, two servers of the student's model behind a router:
- Weight sync reaches every student server: after each sync mode both servers give the Megatron student's log-probs.
- Restarts work per server: one of two killed servers is restarted (same port), the other keeps running, and the
  router serves requests again.
- The student servers require an API key (read from a 0600 file): the router presents it to them and requires it of
  its clients (it gets it on its stdin), and no process holds it on its command line or in its environment, before
  or after a restart.
- A router for a trainer on several nodes (sglang.sync_address) listens on that address and requires the key.
- The served-model self-test checks each server of the role (identity, and the probe batch scored on each).
- Windows go out per rollout (first each rollout's prefix, then its windows): SGLang's own cached-token counts show
  the prefixes reused, as much as the planner's prefix-reuse model says (plan/step_time.py `window_prefill_tokens`).
Slow (`-m slow`; four servers start, about 6 minutes): a TOPD run attached to two student and two teacher servers
trains, pushing its weights to both student servers every step, and logs the prefix-cache shares
(sglang/cached_token_share).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import signal
import socket
from pathlib import Path

import pytest
import requests
import torch

from topd_megatron.distributed.launch import spawn
from topd_megatron.rollout.engine import SamplingParams
from topd_megatron.rollout.sglang.client import SGLangClient
from topd_megatron.rollout.sglang.pool import start_pool
from topd_megatron.rollout.sglang.router import launch_router
from topd_megatron.rollout.sglang.server import ServerConfig

PARITY_TOL = 1e-4
KV_TOKENS = 4096
"""Each server's KV cache (tokens): small, four servers share this machine's memory."""


def _pools(pair: tuple[Path, Path], roles: tuple[str, ...], logs: Path, key_file: Path | None = None):
    started = {}
    try:
        for role in roles:
            path = pair[0] if role == "student" else pair[1]
            cfg = ServerConfig(
                role=role,
                model_path=str(path),
                servers=2,
                max_total_tokens=KV_TOKENS,
                startup_timeout_s=900,
                api_key_file=str(key_file) if key_file else None,
            )
            started[role] = start_pool(cfg, log_dir=logs)
        yield started
    finally:
        for pool in started.values():
            pool.stop()
        for pool in started.values():
            assert all(not s.alive() for s in pool.servers) and not pool.router.alive()


@pytest.fixture(scope="module")
def student_pool(synthetic_pair, pool_key_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two servers of the student's model behind a router, both requiring the key in `pool_key_file`."""
    logs = tmp_path_factory.mktemp("router-logs")
    yield from (p["student"] for p in _pools(synthetic_pair, ("student",), logs, key_file=pool_key_file))


@pytest.fixture(scope="module")
def pool_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("router-key") / "sglang.key"
    path.write_text(secrets.token_urlsafe(24) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pools(synthetic_pair, tmp_path_factory: pytest.TempPathFactory):
    """Two student and two teacher servers, each pair behind a router."""
    yield from _pools(synthetic_pair, ("student", "teacher"), tmp_path_factory.mktemp("router-logs"))


def _sync_body(rank: int, world: int, student: str, urls: list[tuple[str, str]], work: str) -> dict | None:
    """TP=world: perturb the student (identically on every rank), push it with each mode to both servers, compare
    each server's log-probs on the same tokens with Megatron's."""
    from tests.sglang.test_sglang import _megatron_logprobs
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.weight_sync import WeightSync

    init_model_parallel(ParallelConfig(tp=world))
    lm = build_model(ModelConfig(path=student, dtype="float32"), ParallelConfig(tp=world), role="student")
    clients = [SGLangClient(u, api_key=key) for u, key in urls] if rank == 0 else []
    seqs, start = [[1, 5, 7, 9, 11, 13, 4, 8], [3, 4, 6, 2, 9, 12]], [3, 2]
    report: dict = {}
    initial = [p.detach().clone() for p in lm.modules[0].parameters()]
    for i, mode in enumerate(("disk", "tensor", "distributed")):
        gen = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in lm.modules[0].parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        sync = WeightSync(mode, lm, clients, server_ranks=1, work_dir=Path(work))
        stats = sync.sync()
        mine = _megatron_logprobs(lm, seqs, start)
        if rank == 0:
            report[mode] = {"bytes": stats["sync/bytes"], "diff": []}
            for c in clients:
                served = [torch.tensor(s.logprobs, dtype=torch.float64) for s in c.score(seqs, start)]
                report[mode]["diff"].append(max((a - b).abs().max().item() for a, b in zip(mine, served, strict=True)))
        sync.close()
    with torch.no_grad():
        for p, p0 in zip(lm.modules[0].parameters(), initial, strict=True):
            p.copy_(p0)
    WeightSync("disk", lm, clients, server_ranks=1, work_dir=Path(work)).sync()
    return report if rank == 0 else None


def test_weight_sync_reaches_every_student_server(synthetic_pair, student_pool, tmp_path) -> None:
    urls = [(s.url, s.api_key) for s in student_pool.servers]
    report = spawn(_sync_body, 2, (str(synthetic_pair[0]), urls, str(tmp_path)), timeout=900)[0]
    for mode, r in report.items():
        assert r["bytes"] > 0 and len(r["diff"]) == 2, (mode, r)
        assert max(r["diff"]) <= PARITY_TOL, (mode, r)


def test_one_server_restarts_while_the_other_keeps_serving(student_pool, pool_key_file: Path) -> None:
    from tests.sglang.test_secrets import processes_holding

    pool = student_pool
    key = pool_key_file.read_text().strip()
    assert processes_holding(key) == []
    first, second = pool.servers
    pid_second = second.pid
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    assert pool.restart_dead() == 1
    assert pool.servers[1].pid == pid_second and pool.servers[0].url == first.url and pool.servers[0].alive()
    assert requests.get(f"{pool.router.url}/workers", timeout=60).status_code == 401  # the router wants the key too
    router = SGLangClient(pool.router.url, api_key=key)
    for i in range(4):  # round the router's workers: every request is answered
        (g,) = router.generate([[1, 5, 7, 9 + i]], SamplingParams(max_new_tokens=3, seed=i))
        assert len(g.output_ids) == 3
    body = {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 1}}
    assert requests.post(f"{second.url}/generate", json=body, timeout=60).status_code == 401  # keyed, the router not
    assert processes_holding(key) == [], "the restarted server, or the router, holds the key in argv or environ"


def _selftest_body(rank: int, world: int, student_dir: str, urls: list[str], work: str, key_file: str) -> dict:
    """TP=world: an engine attached to the role's servers (behind its router), then the served-model self-test."""
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine
    from topd_megatron.rollout.sglang.selftest import SelfTestConfig
    from topd_megatron.training.served_selftest import served_selftest

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=student_dir, dtype="float32"), par, role="student")
    cfg = SGLangConfig(student=ServerConfig(urls=tuple(urls), api_key_file=key_file), teacher=None, sync_mode="disk")
    engine = SGLangEngine(cfg, student, None, run_dir=work)  # attaching pushes the student's weights to both
    try:
        prompts = [[1, 5, 7, 9, 11], [1, 5, 8], [3, 4, 6, 2, 9, 12], [2, 2, 7]]
        return served_selftest(
            SelfTestConfig(), engine, prompts, expected={"student": Path(student_dir)}, colocated={"student": student}
        )
    finally:
        engine.close()


def test_the_self_test_checks_every_server_of_a_role(synthetic_pair, student_pool, pool_key_file: Path, tmp_path):
    urls = [s.url for s in student_pool.servers]
    args = (str(synthetic_pair[0]), urls, str(tmp_path), str(pool_key_file))
    metrics = spawn(_selftest_body, 2, args, timeout=900)[0]
    assert metrics["student/selftest_server1_max"] <= 1e-5, metrics  # the second server, scored directly
    assert metrics["student/selftest_repeat_max"] <= 1e-5 and metrics["student/selftest_colocated_max"] <= PARITY_TOL


def _node_address() -> str:
    """This machine's address on its default route (not loopback): what another node would connect to."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    assert not address.startswith("127."), "this test needs a non-loopback IPv4 address"
    return address


def test_a_router_for_a_trainer_on_several_nodes_listens_on_its_address_and_requires_the_key(
    student_pool, pool_key_file: Path, tmp_path
) -> None:
    """With sglang.sync_address set (rank 0's node address), a role's router listens there, where the data-parallel
    leaders on other nodes reach it, and never without a key."""
    address = _node_address()
    urls = tuple(s.url for s in student_pool.servers)
    attached = start_pool(
        ServerConfig(urls=urls, api_key_file=str(pool_key_file)), log_dir=tmp_path, router_host=address
    )
    try:
        endpoint = attached.endpoint()
        assert endpoint.url.startswith(f"http://{address}:") and endpoint.api_key == pool_key_file.read_text().strip()
        assert "api_key" not in repr(endpoint)
        assert requests.get(f"{endpoint.url}/workers", timeout=60).status_code == 401
        (g,) = SGLangClient(endpoint.url, api_key=endpoint.api_key).generate(
            [[1, 5, 7]], SamplingParams(max_new_tokens=2)
        )
        assert len(g.output_ids) == 2
    finally:
        attached.stop()
    assert all(s.alive() for s in student_pool.servers), "attached servers are left running"
    with pytest.raises(ValueError, match="needs an API key"):
        launch_router(list(urls), role="student", log_dir=tmp_path, host=address)


def _windows_body(rank: int, world: int, pair: tuple[str, str], urls: dict, work: str, key_file: str) -> dict | None:
    """Rollouts from the student servers, a weight sync (which empties their caches), then windows per rollout
    through the "teacher" router (here the same two servers); SGLang's counts of the window requests and of their
    prefix prefills."""
    from topd_megatron.algorithm.batch import build_step_batch
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.sglang.engine import SGLangConfig, SGLangEngine

    par = ParallelConfig(tp=world)
    init_model_parallel(par)
    student = build_model(ModelConfig(path=pair[0], dtype="float32"), par, role="student")
    cfg = SGLangConfig(
        student=ServerConfig(urls=tuple(urls["student"]), api_key_file=key_file),
        teacher=ServerConfig(role="teacher", urls=tuple(urls["teacher"]), api_key_file=key_file),
        sync_mode="disk",
    )
    engine = SGLangEngine(cfg, student, None, run_dir=work, teacher_dir=pair[1])
    prompts = [[1, 5, 7, 9, 11, 3, 4], [1, 5, 8, 6], [3, 4, 6, 2, 9, 12], [7, 7, 8, 9, 10]] * 2
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=24, seed=3))
    step = build_step_batch(gens, pad_id=0, micro_batch_size=8)
    engine.sync_weights()  # resets the counters
    mask = step.token_batch().response_mask
    resp = mask.nonzero().flatten()
    positions = resp[:: max(resp.numel() // 40, 1)]  # about 40 windows, five per rollout
    windows = engine.generate_windows(step.tokens, positions, SamplingParams(max_new_tokens=4, seed=5), model="teacher")
    metrics = engine._cache_metrics()
    engine.close()
    lengths = [int(mask.view(step.tokens.shape[0], -1)[r].nonzero().max()) + 2 for r in range(len(gens))]
    return (
        None
        if rank
        else {
            "metrics": metrics,
            "windows": len(windows),
            "rows": step.tokens.tolist(),
            "positions": positions.tolist(),
            "row_lengths": lengths,
        }
    )


def test_windows_per_rollout_reuse_each_prefix_as_the_planner_models(
    synthetic_pair, student_pool, pool_key_file: Path, tmp_path
) -> None:
    from topd_megatron.plan.step_time import window_prefill_tokens

    urls = {role: [s.url for s in student_pool.servers] for role in ("student", "teacher")}
    pair = (str(synthetic_pair[0]), str(synthetic_pair[0]))
    r = spawn(_windows_body, 2, (pair, urls, str(tmp_path), str(pool_key_file)), timeout=900)[0]
    m = r["metrics"]
    assert r["windows"] == len(r["positions"]) >= 10
    s1 = len(r["rows"][0]) - 1
    prefix_lengths = [p % s1 + 1 for p in r["positions"]]
    rollouts = {p // s1 for p in r["positions"]}
    # measured: prompt tokens SGLang had to compute (not from its cache) for the prefixes and the windows
    measured = sum(m[f"sglang/{k}_prompt_tokens"] * (1 - m[f"sglang/{k}_cached_token_share"])
                   for k in ("window", "window_prefix"))  # fmt: skip
    longest = {}
    for p in r["positions"]:
        longest[p // s1] = max(longest.get(p // s1, 0), p % s1 + 1)
    planned = window_prefill_tokens(sum(longest.values()), len(prefix_lengths), cached_rollouts=False)
    assert 0.8 <= planned / measured <= 1.25, (planned, measured, m)
    without_reuse = sum(prefix_lengths)  # one independent prefill per window
    assert measured < 0.6 * without_reuse and len(rollouts) >= 4, (measured, without_reuse)
    assert m["sglang/window_cached_token_share"] > 0.5, m


@pytest.mark.slow
def test_training_attached_to_two_servers_per_role(synthetic_pair, pools, tmp_path) -> None:
    from tests.distributed.test_train import make_config
    from topd_megatron.rollout.sglang.engine import SGLangConfig
    from topd_megatron.training.loop import train
    from topd_megatron.training.metrics import read_metrics

    urls = {role: tuple(s.url for s in pool.servers) for role, pool in pools.items()}
    cfg = make_config(synthetic_pair, tmp_path / "run", "topd", steps=2, eval_at_start=False)
    cfg = dataclasses.replace(
        cfg,
        rollout="sglang",
        sglang=SGLangConfig(
            student=ServerConfig(urls=urls["student"]),
            teacher=ServerConfig(role="teacher", urls=urls["teacher"]),
            sync_mode="distributed",
        ),
    )
    assert spawn(train, 2, (cfg,), timeout=1500)[0]["steps"] == 2
    rows = read_metrics(tmp_path / "run", "train")
    for row in rows:
        assert row["skipped"] == 0.0 and math.isfinite(row["loss"]) and row["sync/bytes"] > 0
        assert row["detect/windows_generated"] > 0 and row["guidance/packed"] == 1.0
        assert 0.0 <= row["sglang/cached_token_share"] <= 1.0 and row["sglang/window_cached_token_share"] > 0.3
    routers = sorted((tmp_path / "run" / "sglang").glob("sglang-router-*.log"))
    assert len(routers) == 2, "the run put a router in front of each role's two servers"
    assert all(pool.router.alive() and all(s.alive() for s in pool.servers) for pool in pools.values())
