"""`sglang.launch_server` with its API key read from standard input, so that it is never on a command line.

    python -m topd_megatron.rollout.sglang.launch --api-key-stdin [sglang.launch_server arguments]   # key on stdin

SGLang 0.5.23 takes its key only as `--api-key KEY` (visible to every user in `ps` and /proc/PID/cmdline) and reads
no environment variable for it. This wrapper parses the arguments with SGLang's own parser, sets the key on the
parsed server arguments in memory, and runs the server in this process, as `python -m sglang.launch_server` does;
SGLang's scheduler and detokenizer processes receive the arguments through multiprocessing, not argv. The key is
masked in everything this process writes to stdout and stderr (SGLang logs its server arguments at INFO level).
Used by `topd_megatron.rollout.sglang.server`, which writes the key to this process's stdin and closes it.
"""

from __future__ import annotations

import io
import os
import sys
from typing import TextIO

KEY_FLAG = "--api-key-stdin"


class _Masked(io.TextIOBase):
    """A text stream that writes to `stream` with every occurrence of `secret` replaced by '***'."""

    def __init__(self, stream: TextIO, secret: str) -> None:
        self.stream, self.secret = stream, secret

    def write(self, text: str) -> int:
        self.stream.write(text.replace(self.secret, "***"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()


def read_key(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the key from stdin when `KEY_FLAG` is in argv, else None; the SGLang arguments). Refuses --api-key."""
    if any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        raise SystemExit(f"launch: pass the API key on stdin with {KEY_FLAG}, never as --api-key on the command line")
    if KEY_FLAG not in argv:
        return None, argv
    key = sys.stdin.readline().strip()
    if not key:
        raise SystemExit(f"launch: {KEY_FLAG} given but no key arrived on stdin")
    return key, [a for a in argv if a != KEY_FLAG]


def main(argv: list[str] | None = None) -> None:
    key, args = read_key(sys.argv[1:] if argv is None else argv)
    if key is not None:
        sys.stdout = _Masked(sys.stdout, key)
        sys.stderr = _Masked(sys.stderr, key)
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(args)
    if key is not None:
        server_args.api_key = key  # in memory only: not in argv, nor in the recorded launch command
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
