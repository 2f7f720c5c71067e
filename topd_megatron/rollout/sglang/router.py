"""sglang-router in front of the N SGLang servers of one role: requests spread over the servers, and with the
cache-aware policy (the default) a request goes to the server whose radix cache holds the longest prefix of it, so
the windows of a rollout land where the rollout's prefix lives.

    router = launch_router(["http://10.0.0.5:30000", "http://10.0.0.6:30000"], role="teacher", log_dir=run_dir)
    SGLangClient(router.url).generate(...)          # as if it were one server
    router.stop()                                   # only the process this object started

The router binds to 127.0.0.1 on one node; when the trainer spans nodes it binds to rank 0's node address
(`sglang.sync_address`), which every data-parallel leader reaches, and then always requires a key (generated when
the servers have none). Servers that require an API key get it from
the router, and the router then requires the same key of its own clients (sglang-router's one `api_key` does both).
The key reaches the router process (`python -m topd_megatron.rollout.sglang.router --api-key-stdin`) on its stdin, as
a launched server's does (rollout/sglang/launch.py), never on its command line or in its environment.
Weight updates and restarts address every server directly (the router only forwards generation).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from topd_megatron.distributed.env import free_port
from topd_megatron.rollout.sglang.launch import KEY_FLAG, read_key
from topd_megatron.rollout.sglang.server import LOOPBACK

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")


class RouterStartError(RuntimeError):
    """The router exited or did not answer /health within its timeout."""


@dataclass(slots=True)
class RouterProcess:
    """A router we launched (stopped by PID) or attached to (`process` None)."""

    url: str
    process: subprocess.Popen | None
    log_path: Path | None

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def router_command(
    worker_urls: list[str],
    port: int,
    policy: str,
    metrics_port: int,
    *,
    with_key: bool = False,
    host: str = "127.0.0.1",
) -> list[str]:
    """The router's argv (no secret in it: with `with_key` it reads the key from stdin), listening on `host`. Its
    Prometheus exporter gets a port of its own on loopback (the default one is shared by every router on a machine)."""
    if policy not in POLICIES:
        raise ValueError(f"sglang router policy {policy!r}: choose one of {POLICIES}")
    return [
        sys.executable, "-m", "topd_megatron.rollout.sglang.router", *([KEY_FLAG] if with_key else []),
        "--host", host, "--port", str(port),
        "--policy", policy, "--log-level", "warn", "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(metrics_port), "--worker-urls", *worker_urls,
    ]  # fmt: skip


def launch_router(
    worker_urls: list[str],
    *,
    role: str,
    log_dir: str | Path,
    policy: str = "cache_aware",
    api_key: str | None = None,
    host: str = "127.0.0.1",
    strip_env: tuple[str, ...] = (),
    timeout_s: float = 120.0,
) -> RouterProcess:
    """Start a router over `worker_urls`, listening on `host` (an address the trainer's other nodes reach, or
    loopback), and return once it lists every worker. `strip_env`: variables (API keys) left out of its environment."""
    import requests

    if host not in LOOPBACK and not api_key:
        raise ValueError(f"an sglang-router listening on {host} needs an API key")
    port = free_port(host)
    log = Path(log_dir) / f"sglang-router-{role}-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            router_command(worker_urls, port, policy, free_port("127.0.0.1"), with_key=bool(api_key), host=host),
            env={k: v for k, v in os.environ.items() if k not in strip_env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if api_key else subprocess.DEVNULL,
            start_new_session=True,
        )
    if api_key:
        assert proc.stdin is not None
        try:
            proc.stdin.write(api_key.encode() + b"\n")
        finally:
            proc.stdin.close()
    router = RouterProcess(url=f"http://{host}:{port}", process=proc, log_path=log)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if not router.alive():
            raise RouterStartError(f"the sglang-router for the {role} servers exited (log {log}):\n{_tail(log)}")
        try:
            answer = requests.get(f"{router.url}/workers", headers=headers, timeout=5)
            workers = answer.json().get("workers", []) if answer.status_code == 200 else []
            if len(workers) >= len(worker_urls):
                return router
            last = f"{len(workers)} of {len(worker_urls)} workers registered"
        except (requests.RequestException, ValueError) as e:
            last = type(e).__name__
        time.sleep(0.5)
    router.stop()
    raise RouterStartError(f"the sglang-router for the {role} servers was not ready in {timeout_s:.0f} s ({last})")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def main(argv: list[str] | None = None) -> None:
    """`python -m topd_megatron.rollout.sglang.router [--api-key-stdin] ARGS`: sglang-router's launcher, the workers'
    API key read from stdin (set on the parsed arguments in memory)."""
    from sglang_router.launch_router import launch_router as start
    from sglang_router.launch_router import parse_router_args

    key, rest = read_key(sys.argv[1:] if argv is None else argv)
    args = parse_router_args(rest)
    args.api_key = key
    start(args)


if __name__ == "__main__":
    main()
