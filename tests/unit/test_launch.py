"""The rank launcher: results come back per rank, every failing rank's traceback is reported, hangs time out."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from topd_megatron.distributed.launch import DistributedFailure, spawn


def sum_ranks(rank: int, world: int, scale: int) -> tuple[int, int]:
    t = torch.tensor([rank * scale])
    dist.all_reduce(t)
    return rank, int(t)


def fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 waits for a partner that never arrives


def everyone_fails(rank: int, world: int) -> None:
    raise RuntimeError(f"failure number {rank}")


def sleep_forever(rank: int, world: int) -> None:
    while True:
        time.sleep(0.1)


@pytest.mark.parametrize("world", [2, 4])
def test_results_come_back_in_rank_order(world: int) -> None:
    results = spawn(sum_ranks, world, (10,), timeout=120)
    expected = 10 * sum(range(world))
    assert results == [(r, expected) for r in range(world)]


def test_every_failing_rank_is_reported_with_its_traceback() -> None:
    with pytest.raises(DistributedFailure) as info:
        spawn(everyone_fails, 2, timeout=120)
    msg = str(info.value)
    assert "2 of 2 ranks failed" in msg
    assert "RuntimeError: failure number 0" in msg and "RuntimeError: failure number 1" in msg
    assert msg.count("Traceback (most recent call last)") == 2


def test_a_rank_blocked_by_a_failed_peer_is_stopped_and_reported() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedFailure) as info:
        spawn(fail_on_rank_one, 2, timeout=300)
    msg = str(info.value)
    assert "--- rank 1 ---" in msg and "ValueError: boom on rank one" in msg
    assert "--- rank 0 ---" in msg and "fail_on_rank_one" in msg  # rank 0's stack shows where it was stuck
    assert time.monotonic() - start < 120, "a failed peer must not make the launcher wait for the full timeout"


def test_a_hung_run_times_out_with_stacks() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedFailure) as info:
        spawn(sleep_forever, 2, timeout=5)
    msg = str(info.value)
    assert "timed out after 5s" in msg and "sleep_forever" in msg
    assert time.monotonic() - start < 60


def wait_for_stop(rank: int, world: int, ready_dir: str) -> str | None:
    """Install the stop handling, announce readiness, wait (at most 60 s) until every rank agrees on a stop."""
    import pathlib

    from topd_megatron.training.preemption import StopSignals

    with StopSignals(("SIGUSR1",)) as stop:
        pathlib.Path(ready_dir, f"ready.{rank}").touch()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agreed = stop.requested()  # collective, as at a step boundary
            if agreed is not None:
                return agreed
            time.sleep(0.05)
    return None


def test_a_stop_signal_sent_to_the_launcher_reaches_every_rank(tmp_path) -> None:
    """`kill -USR1 <topd pid>`: the process that started the ranks passes the signal on; each rank's StopSignals
    records it and the ranks agree on it at the next boundary."""
    import os
    import signal
    import threading

    def send_when_ready() -> None:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # to this (launching) process only

    sender = threading.Thread(target=send_when_ready)
    sender.start()
    try:
        results = spawn(wait_for_stop, 2, (str(tmp_path),), timeout=180, forward_signals=("SIGUSR1",))
    finally:
        sender.join()
    assert results == ["SIGUSR1", "SIGUSR1"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the launcher's own handling is restored
