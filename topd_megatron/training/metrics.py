"""Metrics to JSONL (one object per line: {"step": n, "split": "train"|"eval"|"selftest", ...}), TensorBoard, and
optionally Weights & Biases (`metrics.wandb`).

Only the process that owns the logger writes (global rank 0). A resumed run first drops the records of steps at
or after the resume point, so the file always describes one uninterrupted history. A W&B run keeps its id in
RUN_DIR/wandb_run_id, so every restart of the run continues the same W&B run; its values are `{split}/{key}` against
the custom x-axis `step` (the training step), and its config is the RunConfig (which holds no secret: API keys are
named by variable or file).
"""

from __future__ import annotations

import importlib.util
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from topd_megatron.choices import check_choices


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """A Weights & Biases run next to the JSONL and TensorBoard logs (the `wandb` package, `pip install
    topd-megatron[wandb]`)."""

    project: str = "topd"
    mode: Literal["offline", "online", "disabled"] = "offline"
    """'offline': the run is written under RUN_DIR/wandb (upload it later with `wandb sync`); 'online': streamed
    (the API key comes from WANDB_API_KEY or `wandb login`, never from the config)."""
    entity: str | None = None
    name: str | None = None
    """Display name (default: the run directory's name)."""
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choices(self, "metrics.wandb")
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("metrics.wandb needs the wandb package: pip install 'topd-megatron[wandb]'")


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """Where a run's metrics go besides RUN_DIR/metrics.jsonl and RUN_DIR/tensorboard."""

    wandb: WandbConfig | None = None
    """A W&B run (`--set metrics.wandb=default --set metrics.wandb.project=NAME`); None: none."""


class _WandbSink:
    """One W&B run per run directory, continued by every restart."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(8) + "\n")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            mode=cfg.mode,
            config=config,
            tags=list(cfg.tags),
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        data = {f"{split}/{k}": float(v) for k, v in values.items() if _finite_number(v)}
        self.run.log(data | {"step": step})

    def close(self) -> None:
        self.run.finish()


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        wandb: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        """`wandb` adds a W&B run recording `config` (the RunConfig as a dict) and every logged value."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb: _WandbSink | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_before(self.path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
        if wandb is not None:
            self._wandb = _WandbSink(wandb, Path(run_dir), config or {})

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                self._tb.add_scalar(f"{split}/{key}", float(value), step)
        if self._wandb is not None:
            self._wandb.log(step, split, values)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


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
