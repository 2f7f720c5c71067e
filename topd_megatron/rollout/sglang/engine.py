"""The SGLang rollout engine: student rollouts and teacher near-future windows from SGLang servers.

Same `RolloutEngine` interface as the embedded engine, same collective contract: every rank of a model-parallel
group calls `generate` with the same prompts and gets the same generations. Inside, one *leader* per data-parallel
replica (TP rank 0, first pipeline stage) sends the HTTP requests and broadcasts the answers to its group.

Servers: global rank 0 launches them (or attaches to URLs) when the engine is built and stops them by PID in
`close()`. When a server dies mid-request, every rank learns it (one all-reduce of a failure flag), rank 0 restarts
it, the student's weights are pushed again, and the same `generate` call is retried: the step goes on with the same
prompts and the same weights; restarts are counted in the metrics (`sglang/restarts`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from topd_megatron.choices import check_choices
from topd_megatron.rollout.engine import Generation, SamplingParams, TokenScores
from topd_megatron.rollout.sglang.client import SGLangClient, SGLangUnavailable
from topd_megatron.rollout.sglang.selftest import SelfTestConfig
from topd_megatron.rollout.sglang.server import ServerConfig, SGLangServer, launch_server
from topd_megatron.rollout.sglang.weight_sync import SyncMode, WeightSync
from topd_megatron.seeds import server_request_seeds


@dataclass(kw_only=True, slots=True)
class SGLangConfig:
    """SGLang servers of a run. model_path may stay empty: the student's and teacher's own HF directories are used."""

    student: ServerConfig = field(default_factory=lambda: ServerConfig(role="student", model_path="<student>"))
    teacher: ServerConfig | None = None
    """A teacher server for near-future windows (and oracle continuations). None: the colocated Megatron teacher
    generates them in-process."""
    sync_mode: SyncMode = "distributed"
    """How the student's weights reach its server after every step: 'disk', 'tensor' or 'distributed'."""
    bucket_mb: int = 256
    sync_address: str = "127.0.0.1"
    """Where the student server's ranks reach global rank 0 for the 'distributed' sync (this node's address when the
    server runs on another node; 'disk' then needs a filesystem both see, 'tensor' the same machine)."""
    max_restarts: int = 3
    """Server restarts allowed per generate call before the run fails."""
    kill_student_at_call: int | None = None
    """Fault injection (tests): SIGKILL the student server as this (1-based) call for student samples goes out."""
    selftest: SelfTestConfig = field(default_factory=SelfTestConfig)
    """The served-model self-test before step 1 (rollout/sglang/selftest.py); on by default."""

    OVERRIDE_DEFAULTS: ClassVar[dict[str, Any]] = {
        "teacher": lambda: ServerConfig(role="teacher", model_path="<teacher>")
    }
    """What `sglang.teacher=default` sets (topd_megatron.overrides): a teacher server on the teacher's own weights."""

    def __post_init__(self) -> None:
        check_choices(self, "sglang")


def _resolve(cfg: ServerConfig, model_dir: Path) -> ServerConfig:
    """Fill in the model's own HF directory. For the student, one without weights (a topd checkpoint's hf/) starts
    the server with dummy weights, replaced by the first weight sync; the teacher is never synced, so it needs real
    HF weights."""
    if cfg.url or (cfg.model_path and not cfg.model_path.startswith("<")):
        return cfg
    cfg = dataclasses.replace(cfg, model_path=str(model_dir))
    if not any(model_dir.glob("*.safetensors")):
        if cfg.role == "teacher":
            raise ValueError(
                f"sglang.teacher: {model_dir} has no safetensors weights to serve (a topd checkpoint?); set"
                " sglang.teacher.model_path to the teacher's Hugging Face directory"
            )
        cfg = dataclasses.replace(cfg, extra_args=(*cfg.extra_args, "--load-format", "dummy"))
    return cfg


def _hf_vocab_size(model_dir: str | Path | None) -> int | None:
    """vocab_size of a Hugging Face directory's config.json (None when unknown)."""
    import json

    config = Path(model_dir) / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("vocab_size")


class SGLangEngine:
    """Rollouts from SGLang servers; optional fallback to an in-process engine for the teacher's windows."""

    def __init__(
        self,
        cfg: SGLangConfig,
        student: Any,
        teacher: Any | None,
        *,
        run_dir: str | Path,
        teacher_fallback: Any | None = None,
        teacher_dir: str | Path | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.student = student
        self.fallback = teacher_fallback
        self.work_dir = Path(run_dir) / "sglang"
        self.restarts = 0
        self.calls = {"student": 0, "teacher": 0}
        self._killed = False
        mp_group = ps.get_model_parallel_group()
        self.mp_group = mp_group
        self.mp_src = dist.get_global_rank(mp_group, 0)
        self.leader = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
        self.server_cfgs = {"student": _resolve(cfg.student, student.tokenizer_dir)}
        if cfg.teacher is not None:
            model_dir = teacher.tokenizer_dir if teacher is not None else teacher_dir
            if model_dir is None and not (cfg.teacher.url or not cfg.teacher.model_path.startswith("<")):
                raise ValueError("sglang.teacher is set but there is no teacher model path to serve")
            self.server_cfgs["teacher"] = _resolve(cfg.teacher, Path(model_dir) if model_dir is not None else Path())
        self.vocab_sizes = {"student": student.vocab_size}
        if cfg.teacher is not None:
            self.vocab_sizes["teacher"] = teacher.vocab_size if teacher is not None else _hf_vocab_size(model_dir)
        self.servers: dict[str, SGLangServer] = {}
        if dist.get_rank() == 0:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            failure: BaseException | None = None
            try:
                for role, scfg in self.server_cfgs.items():
                    self.servers[role] = launch_server(scfg, log_dir=self.work_dir)
            except BaseException as e:
                failure = e
            endpoints = [None if failure else {r: (s.url, s.api_key) for r, s in self.servers.items()}]
        else:
            failure, endpoints = None, [None]
        dist.broadcast_object_list(endpoints, src=0)
        if failure is not None:
            self.close()
            raise failure
        if endpoints[0] is None:
            raise RuntimeError("the SGLang servers failed to start on rank 0 (see its error)")
        self.endpoints: dict[str, tuple[str, str | None]] = endpoints[0]
        self.clients = {r: self._client(r) for r in self.endpoints} if self.leader or dist.get_rank() == 0 else {}
        scfg = self.server_cfgs["student"]
        self.sync = WeightSync(
            cfg.sync_mode,
            student,
            self.clients.get("student") if dist.get_rank() == 0 else None,
            server_ranks=scfg.tp * scfg.dp,
            work_dir=self.work_dir,
            bucket_mb=cfg.bucket_mb,
            group_address=cfg.sync_address,
        )
        if "--load-format" in scfg.extra_args or scfg.url:
            # a server started without real weights, or one we attach to: whatever it holds (dummy weights, another
            # run's), it must sample from this student from the first rollout on
            self.sync.sync()

    def _client(self, role: str) -> SGLangClient:
        url, key = self.endpoints[role]
        scfg = self.server_cfgs[role]
        return SGLangClient(url, api_key=key, timeout_s=scfg.request_timeout_s, max_retries=scfg.max_retries)

    # -- RolloutEngine -----------------------------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, float]:
        """Push the student's weights to its server (collective). A server lost during the push is restarted and the
        push repeated (every rank sees the same outcome of a push, so all take the same branch)."""
        for attempt in range(self.cfg.max_restarts + 1):
            try:
                calls = {f"sglang/{role}_calls": float(n) for role, n in self.calls.items()}
                return self.sync.sync() | {"sglang/restarts": float(self.restarts)} | calls
            except SGLangUnavailable:
                if attempt == self.cfg.max_restarts:
                    raise
                self._recover(resync=False)
        raise AssertionError("unreachable")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: Literal["student", "teacher"] = "student"
    ) -> list[Generation]:
        if model not in self.endpoints:
            if model == "teacher" and self.fallback is not None:
                return self.fallback.generate(prompts, params, model="teacher")
            raise ValueError(f"no SGLang server for the {model}; configure sglang.{model}")
        self.calls[model] += 1
        return self._collective(model, lambda: self._request(model, prompts, params))

    def score(
        self,
        sequences: list[list[int]],
        starts: list[int],
        *,
        top_k: int = 0,
        model: Literal["student", "teacher"] = "teacher",
    ) -> list[TokenScores]:
        """Teacher forcing on the `model`'s server (collective, like `generate`): log p(seq[i] | seq[:i]) for
        i >= starts[j] of each sequence, with the top-k ids and log-probs at those positions when top_k > 0."""
        if model not in self.endpoints:
            raise ValueError(f"no SGLang server for the {model}; configure sglang.{model}")
        self.calls[model] += 1
        vocab = self.vocab_sizes.get(model)
        return self._collective(
            model, lambda: self.clients[model].score(sequences, starts, top_k=top_k, vocab_size=vocab)
        )

    def _collective(self, model: str, request: Any) -> Any:
        """Run `request()` on the leaders, restart a lost server and retry (everyone agrees through one all-reduce of
        a failure flag), then broadcast the leader's answer over the model-parallel group."""
        for attempt in range(self.cfg.max_restarts + 1):
            result, error = None, None
            if self.leader:
                try:
                    result = request()
                except SGLangUnavailable as e:
                    error = str(e)
            failed = torch.tensor([0.0 if error is None else 1.0])
            dist.all_reduce(failed)  # every rank learns that some leader lost its server
            if failed.item() == 0:
                box = [result]
                dist.broadcast_object_list(box, src=self.mp_src, group=self.mp_group)
                return box[0]
            if attempt == self.cfg.max_restarts:
                raise SGLangUnavailable(
                    f"the SGLang {model} server failed {attempt + 1} times in one call (max_restarts ="
                    f" {self.cfg.max_restarts}); last error: {error}"
                )
            self._recover()
        raise AssertionError("unreachable")

    def _request(self, model: str, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        client = self.clients[model]
        if model == "student" and self.cfg.kill_student_at_call == self.calls["student"] and not self._killed:
            self._killed = True  # once: the retries of this call must reach the restarted server
            if dist.get_rank() == 0:
                self._kill("student")
        seeds = server_request_seeds(params.seed, len(prompts))
        return client.generate(prompts, params, seeds=seeds)

    def _kill(self, role: str) -> None:
        """Fault injection: SIGKILL the server's process group as the rollout request goes out."""
        server = self.servers[role]
        if server.process is not None and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()

    def _recover(self, *, resync: bool = True) -> None:
        """Collective: rank 0 restarts every dead launched server; the student's weights are pushed again."""
        status: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                for role, server in list(self.servers.items()):
                    client = self.clients[role]
                    if server.alive() and client.healthy():
                        continue
                    self.servers[role] = server.restart()
                    self.restarts += 1
                status = [{r: (s.url, s.api_key) for r, s in self.servers.items()}]
            except Exception as e:
                status = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(status, src=0)
        if isinstance(status[0], str):
            raise SGLangUnavailable(f"restarting the SGLang server failed: {status[0]}")
        self.endpoints = status[0]
        if self.clients:
            self.clients = {r: self._client(r) for r in self.endpoints}
        self.sync.reset(self.clients.get("student") if dist.get_rank() == 0 else None)
        if resync:
            self.sync.sync()

    def close(self) -> None:
        """Stop the servers this engine launched (rank 0; attached servers are left running)."""
        if getattr(self, "sync", None) is not None:
            self.sync.close()
        for server in self.servers.values():
            server.stop()
        self.servers = {}
