"""Weights & Biases as a metrics sink (`metrics.wandb`), offline: the run files are written under RUN_DIR/wandb and
read back here (the transaction log of each offline run, `run-ID.wandb`, parsed as wandb-core writes it: a LevelDB
log of `wandb_internal_pb2.Record` protobufs). The W&B history equals metrics.jsonl, the W&B config is the RunConfig,
a restart continues the same W&B run, and no secret reaches any file.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

from tests.distributed.test_train import make_config
from tests.sglang.test_secrets import files_holding
from topd_megatron.distributed.launch import spawn
from topd_megatron.rollout.sglang.engine import SGLangConfig
from topd_megatron.rollout.sglang.server import ServerConfig
from topd_megatron.training.loop import train
from topd_megatron.training.metrics import MetricsConfig, WandbConfig, read_metrics

BLOCK = 32768


def wandb_records(path: Path) -> Iterator[object]:
    """The records of a W&B transaction log: a 7-byte header (':W&B', magic 0xBEE1, version), then LevelDB log
    blocks of 32 KiB whose chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) hold protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _history(log: Path) -> tuple[str, dict[str, object], list[dict[str, float]]]:
    """(run id, config, history rows) of one offline run."""
    run_id, config, rows = "", {}, []
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return run_id, config, rows


def test_offline_wandb_records_the_metrics_and_the_config_and_a_restart_continues_the_run(
    synthetic_pair, tmp_path: Path
) -> None:
    key = secrets.token_urlsafe(24)
    cfg = make_config(synthetic_pair, tmp_path / "run", "opd", steps=2, tp=1, eval_at_start=False)
    cfg = dataclasses.replace(
        cfg,
        metrics=MetricsConfig(wandb=WandbConfig(project="topd-test", mode="offline", tags=("ci",))),
        sglang=SGLangConfig(student=ServerConfig(model_path="<student>", api_key_env="TOPD_TEST_WANDB_KEY")),
    )
    env = {"TOPD_TEST_WANDB_KEY": key, "WANDB_SILENT": "true"}
    spawn(train, 1, (cfg,), timeout=600, env=env)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3))
    spawn(train, 1, (longer,), timeout=600, env=env)  # resumes from step 2

    logs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2, logs  # one offline run per start ...
    runs = [_history(log) for log in logs]
    assert runs[0][0] == runs[1][0] == (tmp_path / "run" / "wandb_run_id").read_text().strip()  # ... of one W&B run
    config = runs[1][1]
    assert config["train"]["steps"] == 3 and config["sglang"]["student"]["api_key_env"] == "TOPD_TEST_WANDB_KEY"
    logged = [r for _, _, rows in runs for r in rows if "train/loss" in r]
    train_rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["train/loss"] for r in logged] == [r["loss"] for r in train_rows]
    evals = [r for _, _, rows in runs for r in rows if "eval/avg@1" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert files_holding(tmp_path, key) == []
