"""Where the GPU recipes find checkpoints and write runs (environment variables with defaults)."""

from __future__ import annotations

import os
from pathlib import Path


def checkpoint(name: str) -> str:
    """$TOPD_CKPT_DIR/NAME (default checkpoints/NAME): a Hugging Face or converted topd checkpoint directory."""
    return str(Path(os.environ.get("TOPD_CKPT_DIR", "checkpoints")) / name)


def run_dir(name: str) -> str:
    """$TOPD_OUT/NAME (default runs/NAME)."""
    return str(Path(os.environ.get("TOPD_OUT", "runs")) / name)
