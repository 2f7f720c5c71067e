"""API keys of SGLang servers: read from an environment variable or from a file that only its owner can read; never
taken from a command line, and never stored in a config.

    sglang.student.api_key_env=TOPD_SGLANG_API_KEY       # the config names the variable, not the key
    sglang.teacher.api_key_file=/secure/sglang.key        # or a file of mode 0600 (0400)

The key itself stays in memory: the trainer sends it in request headers, a launched server gets it on its stdin
(`topd_megatron.rollout.sglang.launch`).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_key_source(env: str | None, file: str | None, what: str) -> None:
    """Config-time check of where a key comes from (ValueError naming `what`): at most one source, a valid name."""
    if env is not None and file is not None:
        raise ValueError(f"{what}: set api_key_env or api_key_file, not both")
    if env is not None and not _ENV_NAME.match(env):
        raise ValueError(f"{what}.api_key_env must name an environment variable (got {env!r}), not hold the key")


def read_api_key(env: str | None, file: str | None, what: str) -> str | None:
    """The key from environment variable `env` or file `file` (None when neither is set). ValueError naming the fix
    when the variable is unset or empty, or the file is missing, empty, or readable by group or others."""
    if env is not None:
        key = os.environ.get(env, "").strip()
        if not key:
            raise ValueError(f"{what}.api_key_env={env}: the environment variable {env} is not set (or empty)")
        return key
    if file is None:
        return None
    path = Path(file)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ValueError(f"{what}.api_key_file: cannot read {path} ({e.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{what}.api_key_file: {path} has mode {stat.S_IMODE(mode):04o}, readable beyond its owner; run"
            f" `chmod 600 {path}`"
        )
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{what}.api_key_file: {path} is empty")
    return key
