"""Preemption-safe training: a stop signal makes every rank finish the step in flight, write a checkpoint and exit
with a "requeue me" status; the next start of the same run directory resumes from that checkpoint.

    with StopSignals(cfg.train.stop_signals) as stop:         # on every rank, before the model is built
        for step in ...:
            run_step(...)
            if stop.requested():                                # collective: every rank takes the same branch
                save_training_state(...); write_marker(...); break

Signals: SIGTERM (scancel, a time limit, a preemption) and the early warning a Slurm job asks for with
`#SBATCH --signal=B:USR1@<seconds>` (see slurm/*.sh), configurable with `train.stop_signals`. A signal only sets a
flag; ranks agree on it with one all-reduce at each step boundary, so a signal that reached some ranks only (or
reached them during different steps) still stops all of them after the same step.

The stop is recorded in RUN_DIR/requeue.json (written once the checkpoint is complete; removed when a run starts), and
`topd train` exits with `REQUEUE_EXIT_CODE`. Launchers that lose a worker's exit status (torchrun reports 1 for any
failed or signalled worker) read the file instead: the sbatch scripts requeue the job when it is there.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL of sysexits.h ("try again later"): the run stopped on a signal after a checkpoint; restart it."""
REQUEUE_MARKER = "requeue.json"
"""In the run directory: {"signal", "step", "checkpoint", "time"} of a run that stopped on a signal."""
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def check_signal_names(names: tuple[str, ...], key: str) -> None:
    """Raise ValueError naming `key` unless every name is a catchable signal of this platform."""
    for name in names:
        if name in UNCATCHABLE or not isinstance(getattr(signal, name, None), signal.Signals):
            raise ValueError(f"{key}: {name!r} is not a signal that can be caught (e.g. SIGTERM, SIGUSR1)")


class StopSignals:
    """Records stop signals on this rank; `requested()` agrees on them over all ranks. Installs its handlers in the
    main thread only (elsewhere it never stops a run) and restores the previous ones on exit."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.received: str | None = None
        """The first stop signal this rank received (None: none)."""
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = signal.Signals[name]
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def requested(self) -> str | None:
        """The stop signal when any rank received one, else None (collective over the default group)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return self.received or "a stop signal (received by another rank)"


def clear_marker(run_dir: str | Path) -> None:
    """Forget a previous stop: called by global rank 0 when a run starts."""
    (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)


def write_marker(run_dir: str | Path, *, signal_name: str, step: int, checkpoint: Path) -> None:
    """Record (atomically) that the run stopped on `signal_name` after `step` steps, resumable from `checkpoint`."""
    path = Path(run_dir) / REQUEUE_MARKER
    tmp = path.with_suffix(".json.tmp")
    record = {"signal": signal_name, "step": step, "checkpoint": str(checkpoint), "time": time.time()}
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The stop record of a run, or None when it finished (or failed) without a stop signal."""
    path = Path(run_dir) / REQUEUE_MARKER
    return json.loads(path.read_text()) if path.is_file() else None
