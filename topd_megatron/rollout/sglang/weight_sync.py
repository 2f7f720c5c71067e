"""Weight sync from the Megatron student (TP/PP sharded) to every SGLang server of the student, in three modes.

Megatron-Bridge's mapping turns the student's shards into full Hugging Face tensors (`export_hf_weights`, collective
over the replica's TP/PP group); the first replica's ranks take part, global rank 0 pushes:

    disk         write an HF checkpoint (config + safetensors, atomic rename) and POST /update_weights_from_disk;
    tensor       buckets of tensors handed over by shared memory (CUDA IPC on GPUs): /update_weights_from_tensor;
                 the server must run on the same machine;
    distributed  a process group between rank 0 and the servers' ranks (NCCL on GPU, gloo on CPU), one broadcast
                 per tensor in the order announced by /update_weights_from_distributed, bucket by bucket.

With several student servers (behind a router) the weights are exported once and reach every server: one checkpoint
and one /update_weights_from_disk per server, each tensor bucket handed to each server, or one process group holding
all servers' ranks (server i at rank offset 1 + i * ranks), so that one broadcast per tensor updates them all.

`tensor` and `distributed` updates sit between /begin_weight_update and /end_weight_update. Every sync returns
`sync/seconds`, `sync/bytes`, `sync/tensors` and `sync/buckets`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist

from topd_megatron.distributed.env import free_port
from topd_megatron.logs import quiet_stdout
from topd_megatron.rollout.sglang.client import SGLangClient, SGLangResponseError

SyncMode = Literal["disk", "tensor", "distributed"]
SYNC_MODES: tuple[str, ...] = get_args(SyncMode)


def hf_weights(lm: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full CPU tensor) of every student weight, in Megatron-Bridge's order. Collective over the TP/PP group
    of this replica: every rank of it must iterate to the end."""
    with quiet_stdout():
        for item in lm.bridge.export_hf_weights(lm.modules, cpu=True, show_progress=False):
            yield item[0], item[1].detach()


def buckets(named: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most `bucket_bytes` (a larger tensor travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class WeightSync:
    """Pushes the student's weights to its SGLang servers. Construct on every rank; `sync` is collective."""

    def __init__(
        self,
        mode: SyncMode,
        lm: Any,
        client: SGLangClient | list[SGLangClient] | None,
        *,
        server_ranks: int,
        work_dir: Path,
        bucket_mb: int = 256,
        group_port: int = 0,
        group_address: str = "127.0.0.1",
        group_timeout_s: float = 120.0,
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown weight sync mode {mode!r}; choose from {SYNC_MODES}")
        self.mode, self.lm = mode, lm
        self.clients = _as_list(client)
        """One client per student server (global rank 0 only; [] elsewhere)."""
        self.server_ranks = server_ranks
        """Ranks of each server (its tp * dp): members of the distributed-mode group after rank 0."""
        self.work_dir = Path(work_dir)
        self.bucket_bytes = bucket_mb << 20
        self.group_port = group_port
        self.group_address = group_address
        self.group_timeout_s = group_timeout_s
        self.group_name = ""
        self._group: Any = None
        self._groups_formed = 0
        self.version = 0

    def reset(self, client: SGLangClient | list[SGLangClient] | None) -> None:
        """After a server restart: new clients, and the distributed group must be formed again (by every server)."""
        self.close()
        self.clients = _as_list(client)

    def close(self) -> None:
        """Leave the distributed-mode group (the servers forget it; best effort: a server may be gone)."""
        if self._group is None:
            return
        for client in self.clients:
            try:
                client.post("/destroy_weights_update_group", {"group_name": self.group_name}, retry=False)
            except Exception:  # the server is stopping or gone: nothing to leave
                pass
        self._group = None

    def sync(self) -> dict[str, float]:
        """Collective over all trainer ranks: export on the first data-parallel replica, push from global rank 0."""
        from megatron.core import parallel_state as ps

        t0 = time.perf_counter()
        outcome: list[Any] = [{"sync/bytes": 0.0, "sync/tensors": 0.0, "sync/buckets": 0.0}]
        if ps.get_data_parallel_rank() == 0:
            named = hf_weights(self.lm)
            if dist.get_rank() == 0:
                try:
                    outcome = [getattr(self, f"_push_{self.mode}")(named)]
                except Exception as e:  # every rank raises it, none waits forever
                    for _ in named:  # finish the gathers the other ranks are in
                        pass
                    outcome = [e]
            else:
                for _ in named:  # take part in the gathers
                    pass
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        self.version += 1
        return outcome[0] | {"sync/seconds": time.perf_counter() - t0}

    # -- rank 0 only -----------------------------------------------------------------------------------------------
    def _push_disk(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
        from safetensors.torch import save_file

        assert self.clients
        tensors = {name: t.contiguous() for name, t in named}
        final = self.work_dir / "student-weights"
        tmp = self.work_dir / ".student-weights.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        self.lm.hf_config.save_pretrained(str(tmp))
        (tmp / "topd_sync.json").write_text(json.dumps({"version": self.version + 1}) + "\n")
        old = self.work_dir / ".student-weights.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        # the format is named: a server started with --load-format dummy would otherwise reuse its dummy loader
        payload = {"model_path": str(final.resolve()), "load_format": "safetensors", "flush_cache": True}
        for client in self.clients:
            client.post("/update_weights_from_disk", payload)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"sync/bytes": float(nbytes), "sync/tensors": float(len(tensors)), "sync/buckets": 1.0}

    def _push_buckets(self, named: Iterator[tuple[str, torch.Tensor]], send: Any) -> dict[str, float]:
        """`send(bucket)` for every bucket, between /begin_weight_update and /end_weight_update on every server;
        then flush their prefix caches (they hold KV of the old weights)."""
        assert self.clients
        nbytes = count = n_buckets = 0
        begun: list[SGLangClient] = []
        try:
            for client in self.clients:
                client.post("/begin_weight_update", {})
                begun.append(client)
            for bucket in buckets(named, self.bucket_bytes):
                send(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                count += len(bucket)
                n_buckets += 1
        finally:
            for client in begun:
                client.post("/end_weight_update", {}, retry=False)
        for client in self.clients:
            client.flush_cache()
        return {"sync/bytes": float(nbytes), "sync/tensors": float(count), "sync/buckets": float(n_buckets)}

    def _push_tensor(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
        import torch.multiprocessing as mp
        from sglang.srt.utils import MultiprocessingSerializer

        mp.set_sharing_strategy("file_system")  # CPU tensors reach the server's processes by shared-memory name

        def send(bucket: list[tuple[str, torch.Tensor]]) -> None:
            payload = MultiprocessingSerializer.serialize([(n, t.contiguous()) for n, t in bucket], output_str=True)
            for client in self.clients:
                client.post(
                    "/update_weights_from_tensor",
                    {"serialized_named_tensors": [payload] * self.server_ranks, "flush_cache": False},
                    retry=False,
                )

        return self._push_buckets(named, send)

    def _ensure_group(self) -> Any:
        """Form the update group: rank 0 of it is this process (it hosts the rendezvous store), then each server's
        ranks in turn."""
        if self._group is not None:
            return self._group
        from sglang.srt.utils.common import init_custom_process_group

        assert self.clients
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        port = self.group_port or free_port("0.0.0.0" if self.group_address != "127.0.0.1" else "127.0.0.1")
        world = 1 + self.server_ranks * len(self.clients)
        # a fresh name every time: a server keeps the groups of trainers that died, and refuses a name twice
        self._groups_formed += 1
        self.group_name = f"topd_weight_sync_{os.getpid()}_{self._groups_formed}_{time.time_ns()}"
        request = {
            "master_address": self.group_address,
            "master_port": port,
            "world_size": world,
            "group_name": self.group_name,
            "backend": backend,
        }
        calls = [
            (client, "/init_weights_update_group", request | {"rank_offset": 1 + i * self.server_ranks})
            for i, client in enumerate(self.clients)
        ]
        threads, answers = _post_in_threads(calls)
        self._group = init_custom_process_group(
            backend=backend,
            init_method=f"tcp://{self.group_address}:{port}",
            world_size=world,
            rank=0,
            group_name=self.group_name,
            timeout=timedelta(seconds=self.group_timeout_s),
        )
        for thread in threads:
            thread.join()
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            self._group = None
            raise errors[0]
        return self._group

    def _push_distributed(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
        assert self.clients
        group = self._ensure_group()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

        def send(bucket: list[tuple[str, torch.Tensor]]) -> None:
            request = {
                "names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": self.group_name,
                "flush_cache": False,
            }
            # every server blocks in this request until it has received every broadcast of the bucket
            threads, answers = _post_in_threads(
                [(c, "/update_weights_from_distributed", request) for c in self.clients]
            )
            for _, t in bucket:
                dist.broadcast(t.contiguous() if device is None else t.to(device), group_src=0, group=group)
            for thread in threads:
                thread.join()
            errors = [a["error"] for a in answers if "error" in a]
            if errors:
                raise SGLangResponseError(f"distributed weight update failed: {errors[0]}")

        return self._push_buckets(named, send)


def _as_list(client: SGLangClient | list[SGLangClient] | None) -> list[SGLangClient]:
    if client is None:
        return []
    return list(client) if isinstance(client, list) else [client]


def _post_in_threads(calls: list[tuple[SGLangClient, str, dict]]) -> tuple[list[threading.Thread], list[dict]]:
    """POST each (client, path, payload) on its own thread (requests that block until a collective completes);
    answers[i] gets 'body' or 'error'. Join the threads, then read the answers."""
    answers: list[dict[str, Any]] = [{} for _ in calls]

    def post(i: int, client: SGLangClient, path: str, payload: dict) -> None:
        try:
            answers[i]["body"] = client.post(path, payload, retry=False)
        except Exception as e:  # reported by the caller, on the main thread
            answers[i]["error"] = e

    threads = [threading.Thread(target=post, args=(i, *call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, answers
