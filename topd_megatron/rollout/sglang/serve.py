"""One SGLang server in the foreground, for launchers: the Slurm scripts start one per role, then attach training.

    python -m topd_megatron.rollout.sglang.serve --role student --model CKPT --port 30000 --pid-file run/student.pid
    # CPU: the generic torch path is chosen automatically (see server.cpu_server_args), dtype float32

    # one server over 4 GPU nodes (SGLang multi-node: TP 8 per replica, 4 data-parallel replicas), one task per node;
    # beyond loopback every request needs the API key, read from $TOPD_SGLANG_API_KEY
    srun --nodes 4 --ntasks-per-node 1 bash -c 'python -m topd_megatron.rollout.sglang.serve --role student \
        --model CKPT \
        --host 0.0.0.0 --port 30000 --tp 8 --dp 4 --dtype bfloat16 \
        --nnodes 4 --node-rank $SLURM_PROCID --dist-init-addr FIRST_NODE:5000'

The server is launched with `launch_server` (CPU arguments, logs in --log-dir, /health_generate wait). A student
model directory without safetensors (a topd checkpoint, or its hf/ directory) starts with dummy weights, replaced by
the trainer's first weight sync; a teacher needs real weights. Once healthy, the server's PID goes to --pid-file
(written atomically: its appearance means "ready") and the URL is printed. Then this process stays in the foreground:
SIGTERM or SIGINT stop the server's process group and exit 0; a server that exits on its own makes this exit 1.
On node ranks > 0 of a multi-node server there is no HTTP endpoint: the PID file is written as soon as the process
runs (node rank 0 becomes healthy only once every node has joined).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from topd_megatron.rollout.sglang.engine import _resolve
from topd_megatron.rollout.sglang.server import (
    LOOPBACK,
    ServerConfig,
    ServerStartError,
    SGLangServer,
    launch_server,
    start_process,
)

API_KEY_ENV = "TOPD_SGLANG_API_KEY"
"""Environment variable holding the API key (kept off the command line of this process)."""


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT: unwinds startup or the wait, and the server is stopped."""


def _on_signal(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _Stop(signum)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options before `--`; everything after it is passed to `sglang.launch_server` as is."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python -m topd_megatron.rollout.sglang.serve", description=__doc__.split("\n")[0])
    p.add_argument("--role", required=True, choices=["student", "teacher"])
    p.add_argument("--model", required=True, help="HF checkpoint directory, or a topd checkpoint (its hf/ is served)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback needs $" + API_KEY_ENV)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of one replica")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mem-fraction", type=float, default=0.5, help="--mem-fraction-static of SGLang")
    p.add_argument(
        "--max-total-tokens", default="8192", help="KV-cache capacity in tokens; 'auto': sized from --mem-fraction"
    )
    p.add_argument("--log-dir", default="sglang-logs", help="the server's log file goes here")
    p.add_argument("--pid-file", default=None, help="written with the server's PID once it is ready")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to become healthy")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of one multi-node server (one task per node)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank in a multi-node server")
    p.add_argument("--dist-init-addr", default=None, help="HOST:PORT of node rank 0, for a multi-node server")
    args = p.parse_args(argv)
    args.extra = extra
    if args.nnodes > 1 and not args.dist_init_addr:
        p.error("--nnodes > 1 needs --dist-init-addr HOST:PORT (node rank 0)")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node-rank must be in [0, {args.nnodes}), got {args.node_rank}")
    return args


def model_dir(path: str) -> Path:
    """The HF directory to serve: `path` itself, or the hf/ directory of a topd checkpoint."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file():
        return p / "hf"
    return p


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of the command line, resolved like the training engine resolves its own servers (a student
    without safetensors gets `--load-format dummy`)."""
    key_env = API_KEY_ENV if os.environ.get(API_KEY_ENV) else None
    if key_env is None and args.host not in LOOPBACK:
        raise ValueError(f"--host {args.host} listens beyond loopback: set ${API_KEY_ENV} (the trainer needs it too)")
    extra = list(args.extra)
    if args.nnodes > 1:
        extra += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank)]
        extra += ["--dist-init-addr", args.dist_init_addr]
    max_tokens = None if args.max_total_tokens.lower() in ("auto", "none") else int(args.max_total_tokens)
    cfg = ServerConfig(
        role=args.role,
        model_path=f"<{args.role}>",  # filled in by _resolve from the model directory
        host=args.host,
        port=args.port,
        tp=args.tp,
        dp=args.dp,
        dtype=args.dtype,
        mem_fraction=args.mem_fraction,
        max_total_tokens=max_tokens,
        api_key_env=key_env,
        extra_args=tuple(extra),
        startup_timeout_s=args.timeout,
    )
    directory = model_dir(args.model)
    if not (directory / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not an HF checkpoint directory nor a topd checkpoint (no config.json)")
    return _resolve(cfg, directory)


def start_follower(cfg: ServerConfig, log_dir: Path) -> SGLangServer:
    """Node rank > 0 of a multi-node server: no HTTP endpoint to wait for; node rank 0's health covers this node."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"sglang-{cfg.role}-node{cfg.extra_args[cfg.extra_args.index('--node-rank') + 1]}.log"
    api_key = cfg.read_api_key()
    proc = start_process(cfg, cfg.port, api_key, log)
    return SGLangServer(cfg, f"http://{cfg.host}:{cfg.port}", api_key, proc, log)


def write_pid_file(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)  # atomic: a reader never sees a partial file


def serve(args: argparse.Namespace) -> int:
    cfg = server_config(args)
    pid_file = Path(args.pid_file) if args.pid_file else None
    server: SGLangServer | None = None
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)  # a stale file would announce a server that is not ready
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        if args.node_rank > 0:
            server = start_follower(cfg, Path(args.log_dir))
        else:
            server = launch_server(cfg, log_dir=args.log_dir)  # returns once /health_generate answers
        if pid_file is not None:
            write_pid_file(pid_file, server.pid)
        what = f"node rank {args.node_rank} of" if args.node_rank > 0 else "ready:"
        print(f"[serve] {what} SGLang {cfg.role} server {server.url} (pid {server.pid}, log {server.log_path})")
        print(server.url, flush=True)
        while server.alive():
            time.sleep(0.5)
        print(
            f"[serve] the SGLang {cfg.role} server exited with code {server.process.returncode}"
            f" (log {server.log_path}):\n{server.log_tail()}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except _Stop as stop:
        print(f"[serve] signal {stop.args[0]}: stopping the SGLang {cfg.role} server", flush=True)
        return 0
    except ServerStartError as e:
        print(f"[serve] error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if server is not None:
            server.stop()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return serve(args)
    except ValueError as e:  # configuration errors: one clear message
        print(f"[serve] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
