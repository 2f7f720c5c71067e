"""Run a function on N local ranks (gloo on CPU, NCCL on GPU) and collect every rank's result or traceback.

Used by the distributed tests and by `topd run` for single-machine runs. Clusters launch through torchrun or srun
instead (see `topd_megatron.distributed.env.init_process_group`), which read the same environment variables this
module sets.

    results = spawn(fn, world_size=2, args=(cfg,), timeout=300)   # fn(rank, world_size, *args) -> picklable

Guarantees:
- every rank's exception is reported with its full traceback (all failing ranks, not only the first);
- a hung run is stopped after `timeout` seconds: live ranks first dump their Python stacks (faulthandler on SIGUSR1),
  which are included in the error, then they are killed by PID;
- ranks are forked from a `forkserver` that has already imported torch, Megatron-Core and Megatron-Bridge (about
  30 s of imports on a small CPU), so a spawn costs well under a second after the first; `fn` must be importable
  (a module-level function), as with the `spawn` start method.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from topd_megatron.distributed import env as rank_env
from topd_megatron.logs import quiet_third_party


class DistributedFailure(RuntimeError):
    """One or more ranks raised, died or hung; the message holds every rank's report."""


PRELOAD = "topd_megatron.distributed.preload"
SHIELDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
"""Signals the forkserver ignores: a signal sent to the whole process group (a job's stop signal) must reach the
ranks, not kill the forkserver they were forked from (the parent would then take every rank for dead). Ranks set
them back to the default action before running anything."""
_ctx = None


def _context() -> Any:
    """The forkserver context, its server preloading the heavy imports once per parent process."""
    global _ctx
    if _ctx is None:
        from multiprocessing import forkserver

        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload([PRELOAD])
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SHIELDED} if main else {}
        try:
            forkserver.ensure_running()  # inherits the ignored dispositions across its exec
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return _ctx


class _Forward:
    """While waiting for the ranks, the parent passes `names` on to every live rank instead of dying of them."""

    def __init__(self, names: Sequence[str], procs: list[Any]) -> None:
        self.names, self.procs, self.previous = names, procs, {}

    def _handle(self, signum: int, frame: object) -> None:
        for p in self.procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    def __enter__(self) -> _Forward:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signal.Signals[n]: signal.signal(signal.Signals[n], self._handle) for n in self.names}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    env: dict[str, str],
    result_dir: str,
    init_process_group: bool,
) -> None:
    for sig in SHIELDED:  # the forkserver ignores them; a rank does not
        signal.signal(sig, signal.SIG_DFL)
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})

    quiet_third_party()
    stack_file = open(Path(result_dir) / f"stacks.{rank}.txt", "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    out = Path(result_dir) / f"result.{rank}.pkl"
    try:
        if init_process_group:
            rank_env.init_process_group()
        value = fn(rank, world_size, *args)
        payload = ("ok", value)
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        payload = ("error", traceback.format_exc())
    try:
        blob = pickle.dumps(payload)
    except Exception:  # noqa: BLE001
        blob = pickle.dumps(("error", f"rank {rank}: result is not picklable:\n{traceback.format_exc()}"))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    if init_process_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs: list[Any], result_dir: str, timeout: float) -> tuple[dict[int, Any], dict[int, str]]:
    """Wait for every rank's result file; (results, failure reports) by rank. Hung ranks dump their stacks and are
    killed after `timeout`; once one rank failed, the others get 10 s to fail too."""
    deadline = time.monotonic() + timeout
    reports: dict[int, str] = {}
    results: dict[int, Any] = {}
    pending = set(range(len(procs)))
    while pending:
        for rank in sorted(pending):
            out = Path(result_dir) / f"result.{rank}.pkl"
            p = procs[rank]
            if out.exists():
                status, value = pickle.loads(out.read_bytes())
                if status == "ok":
                    results[rank] = value
                else:
                    reports[rank] = value
                pending.discard(rank)
            elif not p.is_alive():
                p.join()
                reports[rank] = f"process exited with code {p.exitcode} before reporting a result"
                pending.discard(rank)
        if reports and pending:
            # One rank failed: the others are probably blocked in a collective; give them a moment to fail too.
            deadline = min(deadline, time.monotonic() + 10.0)
        if pending and time.monotonic() > deadline:
            for rank in sorted(pending):
                pid = procs[rank].pid
                if pid is not None and procs[rank].is_alive():
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            for rank in sorted(pending):
                stacks = (Path(result_dir) / f"stacks.{rank}.txt").read_text()
                reports[rank] = f"timed out after {timeout:.0f}s; Python stacks at the time:\n{stacks}"
                procs[rank].kill()
            pending.clear()
        if pending:
            time.sleep(0.05)
    return results, reports


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    init_process_group: bool = True,
    forward_signals: Sequence[str] = (),
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh processes and return the per-rank results.

    Each rank gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK/LOCAL_RANK/WORLD_SIZE, plus `env`. With
    `init_process_group` the default process group (gloo on CPU, NCCL on GPU) is created before `fn` runs and
    destroyed after it. The signals named in `forward_signals` ('SIGTERM', ...) that reach this process while the
    ranks run are passed on to them. Raises `DistributedFailure` naming every rank that failed, died or timed out.
    """
    ctx = _context()
    base_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(rank_env.free_port())}
    base_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="topd-spawn-") as result_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, tuple(args), base_env, result_dir, init_process_group),
                daemon=False,
            )
            for rank in range(world_size)
        ]
        with _Forward(forward_signals, procs):
            for p in procs:
                p.start()
            results, reports = _collect(procs, result_dir, timeout)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    if reports:
        parts = [f"--- rank {r} ---\n{reports[r]}" for r in sorted(reports)]
        raise DistributedFailure(f"{len(reports)} of {world_size} ranks failed:\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]


def launched_externally() -> bool:
    """Whether torchrun or srun started this process as one rank of a job."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def run_ranks(
    fn: Callable[..., Any], world: int, cfg: Any, *, timeout: float, forward_signals: Sequence[str] = ()
) -> Any:
    """Run `fn(rank, world, cfg)` on this job's ranks and return the one non-None report (on global rank 0 only
    when launched by torchrun/srun: the other ranks get None and print nothing). When this process starts the ranks,
    it passes `forward_signals` on to them (see `spawn`)."""
    if launched_externally():
        import torch.distributed as dist

        rank_env.init_process_group()
        report = fn(dist.get_rank(), dist.get_world_size(), cfg)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, report)
        if dist.get_rank() != 0:
            return None
        reports = [r for r in gathered if r is not None]
    else:
        ranks = spawn(fn, world, (cfg,), timeout=timeout, forward_signals=forward_signals)
        reports = [r for r in ranks if r is not None]
    if len(reports) != 1:
        raise RuntimeError(f"expected one reporting rank, got {len(reports)}")
    return reports[0]
