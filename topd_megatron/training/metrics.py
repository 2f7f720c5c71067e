"""Metrics to JSONL (one object per line: {"step": n, "split": "train"|"eval", ...}) and TensorBoard.

Only the process that owns the logger writes (global rank 0). A resumed run first drops the records of steps at
or after the resume point, so the file always describes one uninterrupted history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_before(self.path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                self._tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def keep_before(path: Path, step: int) -> None:
    """Drop the records of `step` and later from a JSONL file of {"step": n, ...} records (atomically): a resumed run
    rewrites them."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [r for r in rows if split is None or r["split"] == split]
