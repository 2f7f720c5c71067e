"""Where the project's shared data lives (benchmarks, training prompts, real tokenizers).

The data sits next to the repository, in `../shared/data` (see that folder's README for the schema and sources).
Resolution order:
  1. $TOPD_SHARED_DATA, if set;
  2. `<repository>/../shared/data`;
  3. for a clone of a local checkout (`git clone /path/to/checkout`), `<origin>/../shared/data`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _origin_path() -> Path | None:
    try:
        url = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if url.startswith("file://"):
        url = url[len("file://") :]
    return Path(url) if url and Path(url).is_dir() else None


def shared_data_dir() -> Path:
    """The shared data directory; raises FileNotFoundError saying how to point at it."""
    candidates = []
    if os.environ.get("TOPD_SHARED_DATA"):
        candidates.append(Path(os.environ["TOPD_SHARED_DATA"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    origin = _origin_path()
    if origin is not None:
        candidates.append(origin.resolve().parent / "shared" / "data")
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    raise FileNotFoundError(
        "shared data not found (looked in: " + ", ".join(str(c) for c in candidates) + "); set TOPD_SHARED_DATA to"
        " the directory holding aime24.jsonl, math500.jsonl, tokenizers/, ..."
    )
