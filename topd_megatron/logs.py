"""Console hygiene for topd's processes: third-party INFO logs and warnings off unless TOPD_VERBOSE=1.

Megatron-Core and Megatron-Bridge log every config they build and warn about every missing CUDA extension (Apex,
TransformerEngine, fused kernels), once per rank; on a CPU machine that buries the run's own output. Errors and
warnings of the WARNING level and above from loggers still show, as do warnings raised by topd itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

NOISY_PACKAGES = ("megatron", "torch", "transformers", "nemo_run", "modelopt", "sglang", "fiddle")


def quiet_third_party() -> None:
    """Silence third-party INFO logs, Python warnings and progress bars (idempotent; no-op with TOPD_VERBOSE=1)."""
    if os.environ.get("TOPD_VERBOSE") == "1":
        return
    for name in NOISY_PACKAGES:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # "GPTModel IS DEPRECATED"
    logging.getLogger("megatron.bridge.utils.fusions").setLevel(logging.ERROR)  # fusions unavailable on CPU
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)  # internal API
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").setLevel(logging.ERROR)  # async save
    for pkg in NOISY_PACKAGES:
        warnings.filterwarnings("ignore", module=rf"{pkg}(\..*)?$")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Swallow what third-party code prints to stdout inside the block (Megatron's per-rank parameter counts,
    Megatron-Bridge's weight-loading progress bars); errors still reach stderr. No-op with TOPD_VERBOSE=1."""
    if os.environ.get("TOPD_VERBOSE") == "1":
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
    sys.stdout.flush()
