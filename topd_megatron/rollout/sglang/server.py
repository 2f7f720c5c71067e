"""SGLang server lifecycle: launch from a config, wait for health, capture logs, stop by PID; or attach to a URL.

    server = launch_server(ServerConfig(model_path="ckpt/hf", role="student"), log_dir="runs/x/sglang")
    ... SGLangClient(server.url, api_key=server.api_key) ...
    server.stop()                       # only the process group this object started

Servers bind to 127.0.0.1 unless `host` says otherwise; a server listening beyond loopback always gets an API key
(generated when none is configured) and every request carries it. Keys come from an environment variable or a 0600
file (`api_keys`) and reach a launched server on its stdin (`launch`), never on a command line. On a machine without
CUDA the server runs SGLang's generic torch path (see `cpu_server_args`), with `topd_megatron.rollout.sglang.cpu_shim`
on its PYTHONPATH.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from topd_megatron.choices import check_choices
from topd_megatron.distributed.env import free_port
from topd_megatron.rollout.sglang.api_keys import check_key_source, read_api_key
from topd_megatron.rollout.sglang.cpu_shim import SHIM_DIR
from topd_megatron.rollout.sglang.launch import KEY_FLAG

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerStartError(RuntimeError):
    """An SGLang server exited or did not become healthy within its startup timeout."""


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """One SGLang server (`python -m sglang.launch_server`)."""

    model_path: str = ""
    """HF checkpoint directory (config + safetensors + tokenizer files). Empty with `url` set."""
    role: Literal["student", "teacher"] = "student"
    """'student' (weights updated every step) or 'teacher' (static); names the log file."""
    url: str | None = None
    """Attach to this already-running server instead of launching one (e.g. 'http://10.0.0.5:30000')."""
    urls: tuple[str, ...] = ()
    """Attach to these already-running servers of the role (behind an sglang-router rank 0 starts); instead of url."""
    servers: int = 1
    """Servers of this role rank 0 launches (each tp x dp GPUs, ports port, port + 1, ...); more than one sit behind
    an sglang-router (rollout/sglang/pool.py)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port is chosen."""
    tp: int = 1
    dp: int = 1
    mem_fraction: float = 0.5
    """--mem-fraction-static: share of device memory for weights and KV cache."""
    max_total_tokens: int | None = 8192
    """KV-cache capacity in tokens (None: SGLang sizes it from mem_fraction). Bounded by default on CPU."""
    dtype: str = "float32"
    context_length: int | None = None
    api_key_env: str | None = None
    """Name of the environment variable holding the server's API key (the key itself is never part of a config).
    With a key, the server refuses requests without it; a launched server listening beyond loopback gets a generated
    key when none is configured."""
    api_key_file: str | None = None
    """Or: a file holding the key, readable by its owner only (mode 0600 or 0400)."""
    random_seed: int = 0
    extra_args: tuple[str, ...] = ()
    """More `sglang.launch_server` arguments, passed as is."""
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    max_retries: int = 5
    """Retries of a request on transient errors (connection refused/reset, timeouts, 5xx), with backoff."""

    def __post_init__(self) -> None:
        check_choices(self, "sglang server")
        if not self.url and not self.urls and not self.model_path:
            raise ValueError("an SGLang server needs model_path (to launch it) or url / urls (to attach to it)")
        if self.url and self.urls:
            raise ValueError("sglang: set url (one server) or urls (several), not both")
        if self.servers < 1:
            raise ValueError(f"sglang servers must be >= 1, got {self.servers}")
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"sglang tp and dp must be >= 1, got tp={self.tp}, dp={self.dp}")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError(f"sglang mem_fraction must be in (0, 1], got {self.mem_fraction}")
        check_key_source(self.api_key_env, self.api_key_file, f"sglang.{self.role}")

    def read_api_key(self) -> str | None:
        """The configured key (None: none configured); ValueError when its variable or file is unusable."""
        return read_api_key(self.api_key_env, self.api_key_file, f"sglang.{self.role}")


def cpu_server_args() -> list[str]:
    """SGLang's generic torch path: the only one that runs without a GPU (its CPU engine needs sgl_kernel CPU ops,
    which are not published)."""
    return [
        "--device",
        "cpu",
        "--attention-backend",
        "torch_native",
        "--sampling-backend",
        "pytorch",
        "--grammar-backend",
        "none",
        "--disable-cuda-graph",
        "--sleep-on-idle",  # the scheduler otherwise polls at 100% of a core, taken from the trainer's ranks
    ]


def server_command(cfg: ServerConfig, port: int, *, with_key: bool, cuda: bool) -> list[str]:
    """The argv of an SGLang server for `cfg` (the trainer owns tokenisation: token ids in and out): SGLang's own
    arguments, run by `topd_megatron.rollout.sglang.launch`, which reads the API key from stdin when `with_key`."""
    cmd = [sys.executable, "-m", "topd_megatron.rollout.sglang.launch", *([KEY_FLAG] if with_key else [])]
    cmd += ["--model-path", cfg.model_path, "--host", cfg.host]
    cmd += ["--port", str(port), "--tp-size", str(cfg.tp), "--dp-size", str(cfg.dp), "--dtype", cfg.dtype]
    cmd += ["--mem-fraction-static", str(cfg.mem_fraction), "--random-seed", str(cfg.random_seed)]
    cmd += ["--skip-tokenizer-init", "--log-level", "warning"]
    if cfg.max_total_tokens is not None:
        cmd += ["--max-total-tokens", str(cfg.max_total_tokens)]
    if cfg.context_length is not None:
        cmd += ["--context-length", str(cfg.context_length)]
    if not cuda:
        cmd += cpu_server_args()
    return cmd + list(cfg.extra_args)


def server_env(*, cuda: bool) -> dict[str, str]:
    """Environment of a launched server. Log-probs are always those of the model's own distribution (temperature 1,
    before top-p), the quantity the trainer's importance ratios and the teacher-served loss need."""
    env = dict(os.environ)
    env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not a rank of the trainer
        env.pop(var, None)
    if not cuda:
        env["SGLANG_USE_CPU_ENGINE"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), env.get("PYTHONPATH", "")) if p)
    return env


class SGLangServer:
    """A running server: launched by us (`process` set, stopped by PID) or attached to (`process` None)."""

    def __init__(
        self, cfg: ServerConfig, url: str, api_key: str | None, process: subprocess.Popen | None, log: Path | None
    ) -> None:
        self.cfg, self.url, self.api_key, self.process, self.log_path = cfg, url, api_key, process, log

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server's process group (the one this object started; attached servers are left alone)."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session=True: the server leads its own group
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _reap_group(pgid)

    def restart(self) -> SGLangServer:
        """Stop (if still running) and launch again with the same config, port and key. Launched servers only."""
        if self.process is None:
            raise ServerStartError(f"the SGLang server at {self.url} was attached to, not launched: cannot restart it")
        self.stop()
        port = int(self.url.rsplit(":", 1)[1])
        return _launch(self.cfg, port, self.api_key, self.log_path)

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reap_group(pgid: int) -> None:
    """Kill what is left of a group we started (SGLang's scheduler/detokenizer children) after its leader exited."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_server(cfg: ServerConfig, *, log_dir: str | Path) -> SGLangServer:
    """Launch `cfg` (or attach when `cfg.url` is set) and return once it serves /health_generate."""
    if cfg.url:
        server = SGLangServer(cfg, cfg.url.rstrip("/"), cfg.read_api_key(), None, None)
        wait_healthy(server, cfg.startup_timeout_s)
        return server
    return _healthy_or_stopped(start_server(cfg, log_dir=log_dir))


def _healthy_or_stopped(server: SGLangServer) -> SGLangServer:
    """Wait for a server we started; stop it if it does not become healthy."""
    try:
        wait_healthy(server, server.cfg.startup_timeout_s)
    except BaseException:
        server.stop(grace_s=5.0)
        raise
    return server


def start_server(cfg: ServerConfig, *, log_dir: str | Path, api_key: str | None = None) -> SGLangServer:
    """Start the server process of `cfg` without waiting for it (see `wait_healthy`); several start in parallel.
    `api_key`: the key it requires (default: the configured one, or a generated one when it listens beyond loopback)."""
    if api_key is None:
        api_key = cfg.read_api_key()  # an unusable key source is refused first: nothing else is read before it
    if not (Path(cfg.model_path) / "config.json").is_file():
        raise ValueError(f"sglang {cfg.role}: {cfg.model_path} is not an HF checkpoint directory (no config.json)")
    if api_key is None and cfg.host not in LOOPBACK:
        api_key = secrets.token_urlsafe(24)  # never serve beyond loopback without a key
    port = cfg.port or free_port(cfg.host if cfg.host in LOOPBACK else "0.0.0.0")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return _launch(cfg, port, api_key, log_dir / f"sglang-{cfg.role}-{port}.log", wait=False)


def start_process(cfg: ServerConfig, port: int, api_key: str | None, log: Path) -> subprocess.Popen:
    """Start the server process of `cfg` on `port` in its own process group (stopped as a whole), its output
    appended to `log`; the key goes to its stdin, which is then closed."""
    import torch

    cuda = torch.cuda.is_available()
    env = server_env(cuda=cuda)
    if cfg.api_key_env is not None:
        env.pop(cfg.api_key_env, None)  # the server gets its key on stdin, not in its environment
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            server_command(cfg, port, with_key=api_key is not None, cuda=cuda),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if api_key is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
    if api_key is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(api_key.encode() + b"\n")
        finally:
            proc.stdin.close()
    return proc


def _launch(cfg: ServerConfig, port: int, api_key: str | None, log: Path | None, *, wait: bool = True) -> SGLangServer:
    assert log is not None
    proc = start_process(cfg, port, api_key, log)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    server = SGLangServer(cfg, f"http://{host}:{port}", api_key, proc, log)
    return _healthy_or_stopped(server) if wait else server


def wait_healthy(server: SGLangServer, timeout_s: float) -> None:
    """Poll /health_generate (a real one-token generation) until it answers 200; fail fast if the process exits."""
    import requests

    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerStartError(
                f"SGLang {server.cfg.role} server exited with code {server.process.returncode} during startup"
                f" (log {server.log_path}):\n{server.log_tail()}"
            )
        try:
            r = requests.get(f"{server.url}/health_generate", headers=headers, timeout=30)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = type(e).__name__
        time.sleep(1.0)
    where = f" (log {server.log_path}):\n{server.log_tail()}" if server.log_path else ""
    raise ServerStartError(
        f"SGLang {server.cfg.role} server at {server.url} was not healthy within {timeout_s:.0f} s (last: {last});"
        f" raise startup_timeout_s if the model is large, or check the log{where}"
    )
