"""A rank's random-number-generator state as a safetensors file: no pickle, so reading it runs no code.

    save_rng_state(path)          # Python's `random`, NumPy's global generator, torch's CPU generator, Megatron's
    load_rng_state(path)          # RNG tracker states (its named CUDA/CPU generator states), in one file per rank

The torch and Megatron states are uint8 tensors, NumPy's Mersenne-Twister keys an int64 tensor; Python's state and
NumPy's position/Gaussian cache are JSON in the safetensors header. A file that is not a safetensors file of this
format (a pickle, a truncated write) raises `CheckpointError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from topd_megatron.models.safe_load import CheckpointError

RNG_FORMAT = "topd-rng/1"
MEGATRON_PREFIX = "megatron/"


def save_rng_state(path: str | Path) -> None:
    """Write this process's RNG states to `path` (safetensors)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel
    from safetensors.torch import save_file

    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state().clone(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[MEGATRON_PREFIX + name] = state.detach().cpu().clone()
    header = {
        "format": RNG_FORMAT,
        "python": json.dumps([version, list(mt_state), gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_cached)]),
    }
    save_file(tensors, str(path), metadata=header)


def _read(path: Path, *, tensors: bool) -> tuple[dict[str, str], dict[str, Any]]:
    """The header (and the tensors) of an RNG state file; CheckpointError when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            data = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}  # noqa: SIM118 - not a dict
    except Exception as e:  # a pickle, a truncated or foreign file
        raise CheckpointError(
            f"{path} is not a safetensors RNG state ({type(e).__name__}: {e}); topd stores RNG states only as"
            " safetensors and never unpickles checkpoint files. The checkpoint is corrupt or was not written by topd."
        ) from None
    if header.get("format") != RNG_FORMAT:
        raise CheckpointError(f"{path}: unknown RNG state format {header.get('format')!r} (expected {RNG_FORMAT})")
    return header, data


def check_rng_file(path: str | Path) -> None:
    """Check that `path` is an RNG state of this format (reads the header only)."""
    _read(Path(path), tensors=False)


def load_rng_state(path: str | Path) -> None:
    """Restore the RNG states written by `save_rng_state` (CheckpointError when `path` is not such a file)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    header, tensors = _read(Path(path), tensors=True)
    version, mt_state, gauss = json.loads(header["python"])
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_pos, np_has_gauss, np_cached = json.loads(header["numpy"])
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(tensors["torch"])
    megatron = {k[len(MEGATRON_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MEGATRON_PREFIX)}
    tensor_parallel.get_cuda_rng_tracker().set_states(megatron)
