"""The SGLang rollout engine: student rollouts and teacher near-future windows from SGLang servers.

Same `RolloutEngine` interface as the embedded engine, same collective contract: every rank of a model-parallel
group calls `generate` with the same prompts and gets the same generations. Inside, one *leader* per data-parallel
replica (TP rank 0, first pipeline stage) sends the HTTP requests and broadcasts the answers to its group.

Servers: global rank 0 launches them (or attaches to URLs) when the engine is built and stops them by PID in
`close()`; a role may have several servers (`ServerConfig.servers` / `urls`) behind an sglang-router
(rollout/sglang/pool.py), every one of which receives the student's weights. When a server dies mid-request, every
rank learns it (one all-reduce of a failure flag), rank 0 restarts the dead servers (only those), the student's
weights are pushed again, and the same `generate` call is retried: the step goes on with the same prompts and the
same weights; restarts are counted in the metrics (`sglang/restarts`).

Windows (`generate_windows`, the WindowSampler protocol) go out rollout by rollout, in chunks that fit the servers'
KV caches: first each rollout's longest needed prefix (a prefill without new tokens: it enters the radix cache once,
or is already there when the teacher server scored the rollout), then its windows, which find their prefix cached.
SGLang reports per request how many prompt tokens its cache held; `sync_weights` returns the step's shares
(`sglang/cached_token_share` over all requests, `sglang/window_cached_token_share` over window requests). Asked for
`top_k`, a role's windows carry the model's top-k ids and log-probs at every window position, from the decode that
sampled them: a served teacher's report on its windows without a second prefill (training/scoring.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from topd_megatron.choices import check_choices
from topd_megatron.rollout.engine import Generation, Role, SamplingParams, TokenScores
from topd_megatron.rollout.sglang.client import SGLangClient, SGLangUnavailable
from topd_megatron.rollout.sglang.pool import Endpoint, ServerPool, start_pool
from topd_megatron.rollout.sglang.router import POLICIES
from topd_megatron.rollout.sglang.selftest import SelfTestConfig
from topd_megatron.rollout.sglang.server import ServerConfig
from topd_megatron.rollout.sglang.weight_sync import SyncMode, WeightSync
from topd_megatron.seeds import server_request_seeds

MEMORY_SAVER_ARGS = ("--enable-memory-saver", "--enable-weights-cpu-backup")
"""Launch arguments of a time-sliced student server (training/colocation.py releases and resumes its memory)."""
FAN_OUT = 64
"""Concurrent HTTP requests to a router: it balances requests, not the prompts inside one request."""


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
    """Global rank 0's node address, as the servers and the trainer's other nodes reach it: where the student server's
    ranks join the 'distributed' sync, and where a role's sglang-router listens (set it when the servers or the
    trainer span nodes; 'disk' then needs a filesystem both see, 'tensor' the same machine)."""
    max_restarts: int = 3
    """Server restarts allowed per generate call before the run fails."""
    router_policy: str = "cache_aware"
    """sglang-router policy in front of a role's servers when it has several ('cache_aware': a request goes where
    its prefix is cached; 'round_robin', 'random', 'power_of_two')."""
    colocate: Literal["share", "time_slice"] = "share"
    """How a student server on the training GPUs (cluster.student_server_nodes = 0) shares them: 'share' (its
    mem_fraction of every GPU the whole run) or 'time_slice' (the server releases its weights and KV cache while
    Megatron trains, Megatron's weights, gradients and optimizer state wait in host memory while the server samples:
    SGLang's release/resume_memory_occupation, training/colocation.py; CUDA only, checked at start)."""
    time_slice_span: Literal["step", "call"] = "step"
    """With colocate='time_slice', how long the student servers stay whole. 'step': from the step's rollouts to the
    end of detection (phases 1-2): Megatron's weights stay on the GPUs for the d_t pass beside them, only its
    gradient buffers and optimizer state wait in host memory, so the fresh student windows find the rollouts in the
    servers' KV caches and the step swaps once (the servers' mem_fraction must leave room for Megatron's weights and
    the d_t pass: `topd plan`). 'call': every student call swaps Megatron's whole states out and back."""
    window_cache_share: float = 0.5
    """Share of a role's KV-cache tokens one chunk of per-rollout window requests may take (prefixes + windows), so
    that a chunk's prefixes stay cached until its windows are served."""
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
        if self.router_policy not in POLICIES:
            raise ValueError(f"sglang.router_policy={self.router_policy!r}: choose one of {POLICIES}")
        if not 0.0 < self.window_cache_share <= 1.0:
            raise ValueError(f"sglang.window_cache_share must be in (0, 1], got {self.window_cache_share}")


def _resolve(cfg: ServerConfig, model_dir: Path) -> ServerConfig:
    """Fill in the model's own HF directory. For the student, one without weights (a topd checkpoint's hf/) starts
    the server with dummy weights, replaced by the first weight sync; the teacher is never synced, so it needs real
    HF weights."""
    if cfg.url or cfg.urls or (cfg.model_path and not cfg.model_path.startswith("<")):
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
        self.cache_counts: dict[str, list[int]] = {}
        """kind -> [prompt tokens, cached tokens] of the requests since the last `sync_weights`."""
        self._killed = False
        mp_group = ps.get_model_parallel_group()
        self.mp_group = mp_group
        self.mp_src = dist.get_global_rank(mp_group, 0)
        self.leader = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
        student_cfg = cfg.student
        if cfg.colocate == "time_slice" and not (student_cfg.url or student_cfg.urls):
            student_cfg = dataclasses.replace(student_cfg, extra_args=(*student_cfg.extra_args, *MEMORY_SAVER_ARGS))
        self.server_cfgs = {"student": _resolve(student_cfg, student.tokenizer_dir)}
        if cfg.teacher is not None:
            model_dir = teacher.tokenizer_dir if teacher is not None else teacher_dir
            attached = cfg.teacher.url or cfg.teacher.urls or not cfg.teacher.model_path.startswith("<")
            if model_dir is None and not attached:
                raise ValueError("sglang.teacher is set but there is no teacher model path to serve")
            self.server_cfgs["teacher"] = _resolve(cfg.teacher, Path(model_dir) if model_dir is not None else Path())
        self.vocab_sizes = {"student": student.vocab_size}
        if cfg.teacher is not None:
            self.vocab_sizes["teacher"] = teacher.vocab_size if teacher is not None else _hf_vocab_size(model_dir)
        self.pools: dict[str, ServerPool] = {}
        self.endpoints: dict[str, Endpoint] = self._start_servers()
        self.clients = {r: self._client(r) for r in self.endpoints} if self.leader or dist.get_rank() == 0 else {}
        scfg = self.server_cfgs["student"]
        self.sync = WeightSync(
            cfg.sync_mode,
            student,
            self.server_clients("student"),
            server_ranks=scfg.tp * scfg.dp,
            work_dir=self.work_dir,
            bucket_mb=cfg.bucket_mb,
            group_address=cfg.sync_address,
        )
        if "--load-format" in scfg.extra_args or scfg.url or scfg.urls:
            # a server started without real weights, or one we attach to: whatever it holds (dummy weights, another
            # run's), it must sample from this student from the first rollout on
            self.sync.sync()

    def _start_servers(self) -> dict[str, Endpoint]:
        """Collective: rank 0 launches (or attaches to) every role's servers; everyone gets their endpoints."""
        failure: BaseException | None = None
        endpoints: list[Any] = [None]
        if dist.get_rank() == 0:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            try:
                for role, scfg in self.server_cfgs.items():
                    self.pools[role] = start_pool(
                        scfg, log_dir=self.work_dir, policy=self.cfg.router_policy, router_host=self.cfg.sync_address
                    )
            except BaseException as e:
                failure = e
            endpoints = [None if failure else {r: pool.endpoint() for r, pool in self.pools.items()}]
        dist.broadcast_object_list(endpoints, src=0)
        if failure is not None:
            self.close()
            raise failure
        if endpoints[0] is None:
            raise RuntimeError("the SGLang servers failed to start on rank 0 (see its error)")
        return endpoints[0]

    def _client(self, role: str, url: str | None = None, key: str | None = None) -> SGLangClient:
        scfg = self.server_cfgs[role]
        if url is None:
            url, key = self.endpoints[role].url, self.endpoints[role].api_key
        return SGLangClient(url, api_key=key, timeout_s=scfg.request_timeout_s, max_retries=scfg.max_retries)

    def server_clients(self, role: str) -> list[SGLangClient]:
        """One client per server of the role (global rank 0, which pushes the weights; [] elsewhere)."""
        if dist.get_rank() != 0:
            return []
        return [self._client(role, url, key) for url, key in self.endpoints[role].servers]

    # -- RolloutEngine -----------------------------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, float]:
        """Push the student's weights to its servers (collective). A server lost during the push is restarted and
        the push repeated (every rank sees the same outcome of a push, so all take the same branch). Also returns
        the prefix-cache shares of the requests since the last call."""
        for attempt in range(self.cfg.max_restarts + 1):
            try:
                calls = {f"sglang/{role}_calls": float(n) for role, n in self.calls.items()}
                synced = self.sync.sync() | {"sglang/restarts": float(self.restarts)} | calls
                return synced | self._cache_metrics()
            except SGLangUnavailable:
                if attempt == self.cfg.max_restarts:
                    raise
                self._recover(resync=False)
        raise AssertionError("unreachable")

    def _count(self, kind: str, prompt_tokens: int, cached_tokens: int) -> None:
        counts = self.cache_counts.setdefault(kind, [0, 0])
        counts[0] += prompt_tokens
        counts[1] += cached_tokens

    def release_memory(self, tags: tuple[str, ...]) -> None:
        """Collective: every student server frees these GPU memory regions ('weights', 'kv_cache'; time slicing)."""
        self._memory_occupation("/release_memory_occupation", tags)

    def resume_memory(self, tags: tuple[str, ...]) -> None:
        """Collective: every student server takes these GPU memory regions back (weights from their host backup)."""
        self._memory_occupation("/resume_memory_occupation", tags)

    def _memory_occupation(self, path: str, tags: tuple[str, ...]) -> None:
        outcome: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                for client in self.server_clients("student"):
                    client.post(path, {"tags": list(tags)}, retry=False)
            except Exception as e:  # every rank raises it
                outcome = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise RuntimeError(
                f"SGLang {path} failed: {outcome[0]} (time-sliced servers need {' '.join(MEMORY_SAVER_ARGS)})"
            )

    def _cache_metrics(self) -> dict[str, float]:
        """sglang/<kind>_cached_token_share per request kind and sglang/cached_token_share over all (then reset)."""
        out: dict[str, float] = {}
        total = [0, 0]
        for kind, (prompt, cached) in self.cache_counts.items():
            out[f"sglang/{kind}_cached_token_share"] = cached / prompt if prompt else 0.0
            out[f"sglang/{kind}_prompt_tokens"] = float(prompt)
            total = [total[0] + prompt, total[1] + cached]
        if total[0]:
            out["sglang/cached_token_share"] = total[1] / total[0]
        self.cache_counts = {}
        return out

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: Literal["student", "teacher"] = "student"
    ) -> list[Generation]:
        return self._generate(prompts, params, model=model, kind=f"{model}_generate")

    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, *, model: str, kind: str, seeds: list[int] | None = None
    ) -> list[Generation]:
        if model not in self.endpoints:
            if model == "teacher" and self.fallback is not None:
                return self.fallback.generate(prompts, params, model="teacher")
            raise ValueError(f"no SGLang server for the {model}; configure sglang.{model}")
        self.calls[model] += 1
        gens = self._collective(model, lambda: self._request(model, prompts, params, seeds))
        for g in gens:
            self._count(kind, g.meta.get("prompt_tokens", 0), g.meta.get("cached_tokens", 0))
        return gens

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
        return self.score_async(sequences, starts, top_k=top_k, model=model, start=False).result()

    def score_async(
        self,
        sequences: list[list[int]],
        starts: list[int],
        *,
        top_k: int = 0,
        model: Literal["student", "teacher"] = "teacher",
        start: bool = True,
    ) -> PendingScores:
        """`score`, begun now: the leaders send the requests from a background thread and this returns at once (no
        collective), so the model-parallel group can run other work (a forward pass) while the server scores;
        `result()` is the collective `score` would have been (a lost server is restarted and the request sent again).
        Every rank calls it at the same point, like `score`."""
        if model not in self.endpoints:
            raise ValueError(f"no SGLang server for the {model}; configure sglang.{model}")
        self.calls[model] += 1
        vocab = self.vocab_sizes.get(model)
        client = self.clients.get(model)

        def one(items: list[tuple[list[int], int]]) -> list[TokenScores]:
            return client.score([q for q, _ in items], [s for _, s in items], top_k=top_k, vocab_size=vocab)

        def request() -> list[TokenScores]:
            return self._fan_out(model, one, list(zip(sequences, starts, strict=True)))

        started = _in_background(request) if start and self.leader else None

        def finish() -> list[TokenScores]:
            scores = self._collective(model, request, started=started)
            for sc in scores:
                self._count(f"{model}_score", sc.prompt_tokens, sc.cached_tokens)
            return scores

        return PendingScores(finish)

    def generate_windows(
        self,
        rows: Tensor,
        positions: Tensor,
        params: SamplingParams,
        *,
        model: Role,
        first_window: int = 0,
        top_k: int = 0,
    ) -> list[Generation]:
        """Windows rollout by rollout (WindowSampler): per chunk of rollouts that fits `window_cache_share` of the
        role's KV cache, first each rollout's longest needed prefix (prefill only), then its windows. Window i gets
        the seed of window `first_window + i` of one call for the whole step (a step sampled in parts). `top_k` > 0:
        each window also carries the model's top-k at its positions (served roles; an in-process fallback has none)."""
        if model not in self.endpoints:
            if model == "teacher" and self.fallback is not None:
                return self.fallback.generate_windows(rows, positions, params, model="teacher")
            raise ValueError(f"no SGLang server for the {model}; configure sglang.{model}")
        self.calls[model] += 1
        answer = self._collective(
            model, lambda: self._window_requests(model, rows, positions, params, first_window, top_k)
        )
        return self._counted_windows(answer)

    def serves(self, model: Role) -> bool:
        """Whether the role has SGLang servers (else its windows come from an in-process fallback)."""
        return model in self.endpoints

    def window_cache_budget(self, model: Role) -> int | None:
        """KV-cache tokens one chunk of the role's window requests may take (`window_cache_share` of its servers'
        pools together); None when the servers did not report their pools."""
        ep = self.endpoints.get(model)
        if ep is None:
            return None
        return int(ep.kv_tokens * max(len(ep.servers), 1) * self.cfg.window_cache_share) or None

    def generate_window_pair(
        self, rows: Tensor, positions: Tensor, params: SamplingParams, *, first_window: int = 0, teacher_top_k: int = 0
    ) -> dict[Role, list[Generation]]:
        """PairedWindowSampler: the teacher's and the student's windows at `positions`, both roles' requests in flight
        at the same time (where each role's servers have GPUs of their own the step waits for the slower of the two, not
        for their sum; servers sharing the same GPUs share their memory bandwidth too), with the per-window seeds
        `generate_windows` gives each role (the teacher's with its top-k when `teacher_top_k` > 0). With an in-process
        fallback teacher, one role after the other."""
        roles: tuple[Role, Role] = ("teacher", "student")
        top_k: dict[Role, int] = {"teacher": teacher_top_k, "student": 0}
        if any(r not in self.endpoints for r in roles):
            return {
                r: self.generate_windows(rows, positions, params, model=r, first_window=first_window, top_k=top_k[r])
                for r in roles
            }
        for r in roles:
            self.calls[r] += 1

        def both() -> dict[Role, tuple[list[Generation], list[tuple[int, int]]]]:
            with ThreadPoolExecutor(max_workers=len(roles)) as pool:
                futures = {
                    r: pool.submit(self._window_requests, r, rows, positions, params, first_window, top_k[r])
                    for r in roles
                }
                return {r: f.result() for r, f in futures.items()}

        answers = self._collective("teacher and student", both)
        return {r: self._counted_windows(answers[r]) for r in roles}

    def _window_requests(
        self,
        model: Role,
        rows: Tensor,
        positions: Tensor,
        params: SamplingParams,
        first_window: int = 0,
        top_k: int = 0,
    ) -> tuple[list[Generation], list[tuple[int, int]]]:
        """On a leader: the role's window requests, chunk by chunk (each chunk's longest prefixes prefilled first);
        the windows and the (prompt, cached) token counts of the prefills."""
        budget = self.window_cache_budget(model)
        seeds = server_request_seeds(params.seed, first_window + positions.numel())[first_window:]
        s1 = rows.shape[1] - 1
        out: list[Generation] = []
        prefilled: list[tuple[int, int]] = []
        for chunk in window_chunks(rows, positions, params.max_new_tokens, budget):
            warm = [rows[r, : j + 1].tolist() for r, j in longest_prefixes(rows, positions[chunk])]
            prefilled += self._prefill_requests(model, warm)
            prefixes = [rows[int(p) // s1, : int(p) % s1 + 1].tolist() for p in positions[chunk]]
            out += self._request(model, prefixes, params, seeds[chunk.start : chunk.stop], top_k=top_k)
        return out, prefilled

    def _counted_windows(self, answer: tuple[list[Generation], list[tuple[int, int]]]) -> list[Generation]:
        gens, prefilled = answer
        for prompt, cached in prefilled:
            self._count("window_prefix", prompt, cached)
        for g in gens:
            self._count("window", g.meta.get("prompt_tokens", 0), g.meta.get("cached_tokens", 0))
        return gens

    def _prefill_requests(self, model: str, sequences: list[list[int]]) -> list[tuple[int, int]]:
        """On a leader: compute and cache the KV of `sequences` (no new token; SGLang inserts finished requests in
        its cache); the (prompt, cached) token counts SGLang reports per sequence."""

        def one(items: list[list[int]]) -> list[dict]:
            answer = self.clients[model].post(
                "/generate", {"input_ids": items, "sampling_params": {"max_new_tokens": 0}}
            )
            return answer if isinstance(answer, list) else [answer]

        counts = []
        for out in self._fan_out(model, one, sequences):
            meta = out.get("meta_info") or {}
            counts.append((int(meta.get("prompt_tokens") or 0), int(meta.get("cached_tokens") or 0)))
        return counts

    def _collective(self, model: str, request: Any, *, started: Future | None = None) -> Any:
        """Run `request()` on the leaders (the first attempt: the answer of `started`, the same request begun in the
        background, when given), restart a lost server and retry (everyone agrees through one all-reduce of a failure
        flag), then broadcast the leader's answer over the model-parallel group."""
        for attempt in range(self.cfg.max_restarts + 1):
            result, error = None, None
            if self.leader:
                try:
                    result = started.result() if attempt == 0 and started is not None else request()
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
            self._recover(resync="student" in model)  # the teacher's servers never receive weights
        raise AssertionError("unreachable")

    def _request(
        self,
        model: str,
        prompts: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None = None,
        *,
        top_k: int = 0,
    ) -> list[Generation]:
        client = self.clients[model]
        if model == "student" and self.cfg.kill_student_at_call == self.calls["student"] and not self._killed:
            self._killed = True  # once: the retries of this call must reach the restarted server
            if dist.get_rank() == 0:
                self._kill("student")
        seeds = seeds if seeds is not None else server_request_seeds(params.seed, len(prompts))

        def one(items: list[tuple[list[int], int]]) -> list[Generation]:
            return client.generate([p for p, _ in items], params, seeds=[s for _, s in items], top_k=top_k)

        return self._fan_out(model, one, list(zip(prompts, seeds, strict=True)))

    def _fan_out(self, model: str, call: Callable[[list], list], items: Sequence) -> list:
        """`call(items)` as one batched request to a role with one server; one request per item, FAN_OUT at a time
        and in order, when a router spreads them over several servers."""
        if len(self.endpoints[model].servers) <= 1 or len(items) <= 1:
            return call(list(items))
        with ThreadPoolExecutor(max_workers=min(len(items), FAN_OUT)) as pool:
            parts = list(pool.map(lambda item: call([item]), items))
        return [x for part in parts for x in part]

    def _kill(self, role: str) -> None:
        """Fault injection: SIGKILL the role's first server's process group as the rollout request goes out."""
        server = self.pools[role].servers[0]
        if server.process is not None and server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()

    def _recover(self, *, resync: bool = True) -> None:
        """Collective: rank 0 restarts the dead launched servers (only those); with `resync` (a call that involved the
        student's servers) the student's weights are pushed again to every student server, unless only teacher
        servers were restarted (a teacher server lost during the windows of both roles, under time slicing, must not
        read Megatron's offloaded states)."""
        status: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                restarted = {r: pool.restart_dead() for r, pool in self.pools.items()}
                self.restarts += sum(restarted.values())
                teacher_only = restarted.get("teacher", 0) > 0 and not restarted.get("student", 0)
                status = [({r: pool.endpoint() for r, pool in self.pools.items()}, teacher_only)]
            except Exception as e:
                status = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(status, src=0)
        if isinstance(status[0], str):
            raise SGLangUnavailable(f"restarting the SGLang server failed: {status[0]}")
        self.endpoints, teacher_only = status[0]
        if self.clients:
            self.clients = {r: self._client(r) for r in self.endpoints}
        self.sync.reset(self.server_clients("student"))
        if resync and not teacher_only:
            self.sync.sync()

    def close(self) -> None:
        """Stop the routers and servers this engine launched (rank 0; attached servers are left running)."""
        if getattr(self, "sync", None) is not None:
            self.sync.close()
        for pool in getattr(self, "pools", {}).values():
            pool.stop()
        self.pools = {}


def _in_background(fn: Callable[[], Any]) -> Future:
    """`fn()` on a daemon thread (a run that stops, or fails, does not wait for an HTTP request in flight)."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to whoever waits for the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True, name="sglang-score").start()
    return future


@dataclass(frozen=True, slots=True)
class PendingScores:
    """Scores being computed by a server (`SGLangEngine.score_async`); `result()` is collective."""

    finish: Callable[[], list[TokenScores]]

    def result(self) -> list[TokenScores]:
        return self.finish()


def longest_prefixes(rows: torch.Tensor, positions: torch.Tensor) -> list[tuple[int, int]]:
    """(row, j) of the longest prefix rows[row, : j + 1] each rollout's windows need (positions flat, ascending)."""
    s1 = rows.shape[1] - 1
    last: dict[int, int] = {}
    for p in positions.tolist():
        last[p // s1] = max(last.get(p // s1, -1), p % s1)
    return sorted(last.items())


def window_chunks(rows: torch.Tensor, positions: torch.Tensor, window: int, budget: int | None) -> list[slice]:
    """Consecutive slices of `positions` that never split a rollout, each needing at most `budget` KV tokens
    (longest prefix of each of its rollouts + `window` per window); a rollout larger than the budget is a chunk of
    its own. None: one chunk."""
    if budget is None or positions.numel() == 0:
        return [slice(0, positions.numel())]
    s1 = rows.shape[1] - 1
    chunks, start, used = [], 0, 0
    i, n = 0, positions.numel()
    while i < n:
        row = int(positions[i]) // s1
        end = i
        while end < n and int(positions[end]) // s1 == row:
            end += 1
        need = int(positions[end - 1]) % s1 + 1 + window * (end - i)
        if used and used + need > budget:
            chunks.append(slice(start, i))
            start, used = i, 0
        used += need
        i = end
    chunks.append(slice(start, n))
    return chunks
