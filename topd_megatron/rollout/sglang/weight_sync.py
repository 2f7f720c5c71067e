"""Weight sync from the Megatron student (TP/PP sharded) to an SGLang server, in three modes.

Megatron-Bridge's mapping turns the student's shards into full Hugging Face tensors (`export_hf_weights`, collective
over the replica's TP/PP group); the first replica's ranks take part, global rank 0 pushes:

    disk         write an HF checkpoint (config + safetensors, atomic rename) and POST /update_weights_from_disk;
    tensor       buckets of tensors handed over by shared memory (CUDA IPC on GPUs): /update_weights_from_tensor;
                 the server must run on the same machine;
    distributed  a process group between rank 0 and the server's ranks (NCCL on GPU, gloo on CPU), one broadcast
                 per tensor in the order announced by /update_weights_from_distributed, bucket by bucket.

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
    """Pushes the student's weights to one SGLang server. Construct on every rank; `sync` is collective."""

    def __init__(
        self,
        mode: SyncMode,
        lm: Any,
        client: SGLangClient | None,
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
        self.mode, self.lm, self.client = mode, lm, client
        self.server_ranks = server_ranks
        """Ranks of the server (its tp * dp): members of the distributed-mode group after rank 0."""
        self.work_dir = Path(work_dir)
        self.bucket_bytes = bucket_mb << 20
        self.group_port = group_port
        self.group_address = group_address
        self.group_timeout_s = group_timeout_s
        self.group_name = ""
        self._group: Any = None
        self._groups_formed = 0
        self.version = 0

    def reset(self, client: SGLangClient | None) -> None:
        """After a server restart: a new client, and the distributed group must be formed again."""
        self.client = client
        self._group = None

    def close(self) -> None:
        """Leave the distributed-mode group (the server forgets it; best effort: the server may be gone)."""
        if self._group is None or self.client is None:
            return
        try:
            self.client.post("/destroy_weights_update_group", {"group_name": self.group_name}, retry=False)
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

        assert self.client is not None
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
        self.client.post("/update_weights_from_disk", payload)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return {"sync/bytes": float(nbytes), "sync/tensors": float(len(tensors)), "sync/buckets": 1.0}

    def _push_buckets(self, named: Iterator[tuple[str, torch.Tensor]], send: Any) -> dict[str, float]:
        """`send(bucket)` for every bucket, between /begin_weight_update and /end_weight_update; then flush the
        server's prefix cache (it holds KV of the old weights)."""
        assert self.client is not None
        nbytes = count = n_buckets = 0
        self.client.post("/begin_weight_update", {})
        try:
            for bucket in buckets(named, self.bucket_bytes):
                send(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                count += len(bucket)
                n_buckets += 1
        finally:
            self.client.post("/end_weight_update", {}, retry=False)
        self.client.flush_cache()
        return {"sync/bytes": float(nbytes), "sync/tensors": float(count), "sync/buckets": float(n_buckets)}

    def _push_tensor(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
        import torch.multiprocessing as mp
        from sglang.srt.utils import MultiprocessingSerializer

        mp.set_sharing_strategy("file_system")  # CPU tensors reach the server's processes by shared-memory name

        def send(bucket: list[tuple[str, torch.Tensor]]) -> None:
            payload = MultiprocessingSerializer.serialize([(n, t.contiguous()) for n, t in bucket], output_str=True)
            self.client.post(
                "/update_weights_from_tensor",
                {"serialized_named_tensors": [payload] * self.server_ranks, "flush_cache": False},
                retry=False,
            )

        return self._push_buckets(named, send)

    def _ensure_group(self) -> Any:
        """Form the update group: rank 0 of it is this process (it hosts the rendezvous store), then the server's."""
        if self._group is not None:
            return self._group
        from sglang.srt.utils.common import init_custom_process_group

        assert self.client is not None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        port = self.group_port or free_port("0.0.0.0" if self.group_address != "127.0.0.1" else "127.0.0.1")
        world = 1 + self.server_ranks
        # a fresh name every time: a server keeps the groups of trainers that died, and refuses a name twice
        self._groups_formed += 1
        self.group_name = f"topd_weight_sync_{os.getpid()}_{self._groups_formed}_{time.time_ns()}"
        request = {
            "master_address": self.group_address,
            "master_port": port,
            "rank_offset": 1,
            "world_size": world,
            "group_name": self.group_name,
            "backend": backend,
        }
        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                answer["body"] = self.client.post("/init_weights_update_group", request, retry=False)
            except Exception as e:  # reported below, on the main thread
                answer["error"] = e

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        self._group = init_custom_process_group(
            backend=backend,
            init_method=f"tcp://{self.group_address}:{port}",
            world_size=world,
            rank=0,
            group_name=self.group_name,
            timeout=timedelta(seconds=self.group_timeout_s),
        )
        thread.join()
        if "error" in answer:
            self._group = None
            raise answer["error"]
        return self._group

    def _push_distributed(self, named: Iterator[tuple[str, torch.Tensor]]) -> dict[str, float]:
        assert self.client is not None
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
            answer: dict[str, Any] = {}

            def announce() -> None:  # the server blocks in this request until it has received every broadcast
                try:
                    answer["body"] = self.client.post("/update_weights_from_distributed", request, retry=False)
                except Exception as e:
                    answer["error"] = e

            thread = threading.Thread(target=announce, daemon=True)
            thread.start()
            for _, t in bucket:
                dist.broadcast(t.contiguous() if device is None else t.to(device), group_src=0, group=group)
            thread.join()
            if "error" in answer:
                raise SGLangResponseError(f"distributed weight update failed: {answer['error']}")

        return self._push_buckets(named, send)
