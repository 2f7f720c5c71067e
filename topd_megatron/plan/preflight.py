"""Preflight: cheap checks of a run's inputs before any GPU time, from files only.

    checks = preflight(cfg, strict=False)      # [Check(name, status, detail), ...]

- checkpoints: the student's and teacher's directories exist (config.json there or in hf/);
- tokenizer: student and teacher share one tokenizer (vocabulary, special tokens, EOS, chat template), checked with
  topd_megatron.models.tokenizer.check_same_tokenizer when both directories are here;
- SGLang model paths set explicitly in the sglang section exist;
- data: the task loads, and its data files (a task's `*_path` attributes, e.g. math_jsonl's train/eval JSONL) are
  readable and their first row parses;
- output: the run directory (or its nearest existing parent) is writable (a probe file is created and removed).
A path that is absent on the planning machine is "not checked: PATH missing" (the plan may be made on a laptop);
with `strict` it is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from topd_megatron.config import RunConfig
from topd_megatron.models.tokenizer import check_same_tokenizer
from topd_megatron.plan.architecture import config_json_path
from topd_megatron.tasks import load_task

Status = Literal["ok", "not checked", "error"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str


def _missing(name: str, path: str | Path, strict: bool) -> Check:
    return Check(name, "error" if strict else "not checked", f"{path} missing")


def _tokenizer_dir(path: str) -> Path:
    """Where a checkpoint keeps its tokenizer: the HF directory itself, or hf/ of a topd checkpoint."""
    p = Path(path)
    return p / "hf" if (p / "hf" / "config.json").is_file() else p


def checkpoint_checks(cfg: RunConfig, strict: bool) -> list[Check]:
    out = []
    for role in ("student", "teacher"):
        path = getattr(cfg, role).path
        if not Path(path).is_dir():
            out.append(_missing(f"{role} checkpoint", path, strict))
        elif config_json_path(path) is None:
            out.append(Check(f"{role} checkpoint", "error", f"{path} has no config.json (nor hf/config.json)"))
        else:
            out.append(Check(f"{role} checkpoint", "ok", path))
    if all(c.status == "ok" for c in out):
        s, t = _tokenizer_dir(cfg.student.path), _tokenizer_dir(cfg.teacher.path)
        try:
            check_same_tokenizer(s, t)
            out.append(Check("tokenizer", "ok", "student and teacher share vocabulary, specials, EOS, chat template"))
        except (OSError, ValueError) as e:
            out.append(Check("tokenizer", "error", str(e)))
    else:
        missing = [c.detail.removesuffix(" missing") for c in out if c.status != "ok"]
        out.append(Check("tokenizer", "not checked", f"{', '.join(missing)} missing"))
    if cfg.rollout == "sglang":
        servers = [("student", cfg.sglang.student)] + ([("teacher", cfg.sglang.teacher)] if cfg.sglang.teacher else [])
        for who, server in servers:
            if server.url or not server.model_path or server.model_path.startswith("<"):
                continue  # attached, or serving the model's own directory (checked above)
            if Path(server.model_path).is_dir():
                out.append(Check(f"sglang {who} model", "ok", server.model_path))
            else:
                out.append(_missing(f"sglang {who} model", server.model_path, strict))
    return out


def _first_row(path: Path) -> str | None:
    """None when the file's first non-empty line is a JSON object, else what is wrong."""
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"first row is not JSON ({e})"
                return None if isinstance(row, dict) else "first row is not a JSON object"
    return "no rows"


def data_checks(cfg: RunConfig, strict: bool) -> list[Check]:
    try:
        task = load_task(cfg.task)
    except FileNotFoundError as e:
        return [Check("data", "error" if strict else "not checked", str(e))]
    except ValueError as e:
        return [Check("data", "error", str(e))]
    names = [f.name for f in dataclasses.fields(task)] if dataclasses.is_dataclass(task) else vars(task)
    paths = {k: getattr(task, k) for k in sorted(names) if k.endswith("_path") and isinstance(getattr(task, k), str)}
    if not paths:
        return [Check("data", "ok", f"{cfg.task}: no data files")]
    out = []
    for key, value in paths.items():
        p = Path(value)
        if not p.is_file():
            out.append(_missing(f"data {key}", p, strict))
            continue
        try:
            problem = _first_row(p)
        except OSError as e:
            problem = f"not readable ({e})"
        out.append(Check(f"data {key}", "error" if problem else "ok", f"{p}: {problem}" if problem else str(p)))
    return out


def output_check(run_dir: str) -> Check:
    """Create and remove a probe file in the run directory, or in its nearest existing parent."""
    target = Path(run_dir).absolute()
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return Check("output", "error", f"{parent} is not a directory (run_dir {run_dir})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".topd-plan-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return Check("output", "error", f"{parent} is not writable ({e})")
    where = str(parent) if parent == target else f"{parent} (run_dir {run_dir} will be created there)"
    return Check("output", "ok", f"writable: {where}")


def preflight(cfg: RunConfig, *, strict: bool = False) -> list[Check]:
    return checkpoint_checks(cfg, strict) + data_checks(cfg, strict) + [output_check(cfg.run_dir)]
