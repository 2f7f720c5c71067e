"""Reading checkpoints without executing code.

A checkpoint shared by someone else must not be able to run code when it is loaded. What a topd checkpoint holds
and how each part is read:

    train_state.json, topd_checkpoint.json, hf/*.json     JSON
    rng/rank_NNNNN.safetensors                            safetensors (tensors) + JSON in its header
    model/ and state/ (Megatron dist_checkpointing,       `.metadata` is a pickle that torch.distributed.checkpoint
    torch_dist)                                           unpickles with `pickle.load`, and its non-tensor items
                                                          (Megatron's common state, the optimizer's param groups) are
                                                          unpickled with `torch.load(weights_only=False)`

The last row is checked here before Megatron reads it: `.metadata` with an unpickler that only builds the
checkpoint-metadata classes of torch.distributed.checkpoint (anything else is refused), and every non-tensor item
with torch's `weights_only=True` unpickler (tensors, containers, numbers and strings only). Tensor data is read by
torch with `weights_only=True` already. A file that fails either check raises `UnsafeCheckpointError` and nothing
of the checkpoint is loaded.

    check_dist_checkpoint(CKPT / "state")        # raises UnsafeCheckpointError / CheckpointError
    loaded = load_dist(sharded_state_dict, CKPT / "state")   # the check, then dist_checkpointing.load (collective)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A model or training checkpoint that is missing, partial, corrupt or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would execute code (or build arbitrary objects) when read."""


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}
"""The only globals a torch_dist `.metadata` file may name (plus torch dtypes): plain records of the checkpoint's
layout. Constructing them runs no user code."""


class _Refused(pickle.UnpicklingError):
    """A global outside the allowed ones."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles `.metadata` of torch.distributed.checkpoint, refusing every global outside `_METADATA_CLASSES`."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def _refuse(path: Path, what: str, error: BaseException) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: {what} would build objects that run code when loaded ({type(error).__name__}: {error}). topd"
        " loads checkpoints only without executing code; this file was not written by topd (or was altered). Do not"
        " load it; if you trust its origin, re-save the weights from the code that wrote them."
    )


def read_dist_metadata(directory: str | Path) -> Any:
    """The `torch.distributed.checkpoint.metadata.Metadata` of a torch_dist directory, read with the restricted
    unpickler. Raises CheckpointError when it is missing or unreadable, UnsafeCheckpointError when it names a
    global outside the allowed checkpoint classes."""
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a complete dist_checkpointing directory")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except _Refused as e:
        raise _refuse(path, "its metadata", e) from None
    except Exception as e:  # truncated or foreign bytes: bad input, not a crash
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt") from None


def check_dist_checkpoint(directory: str | Path) -> None:
    """Check that reading the torch_dist checkpoint in `directory` runs no code (see the module docstring)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    meta = read_dist_metadata(directory)
    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in meta.storage_data.items():
        if index.fqn not in byte_keys:
            continue  # tensor data: torch reads it with weights_only=True
        path = directory / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e}); the checkpoint is incomplete") from None
        if len(raw) != info.length:
            raise CheckpointError(f"{path} is truncated: item {index.fqn} ends past the end of the file")
        _check_item(raw, path, index.fqn)


def _check_item(raw: bytes, path: Path, fqn: str, depth: int = 0) -> None:
    """Unpickle a non-tensor item with torch's weights_only unpickler; an item that holds a byte stream (BytesIO, which
    Megatron-Core's import allows that unpickler to build) is checked again inside, so a pickle wrapped in one is seen
    whatever the process has allowed."""
    import torch

    try:
        obj = torch.load(io.BytesIO(raw), weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(path, f"item {fqn!r}", e) from None
    except Exception as e:
        raise CheckpointError(f"cannot read item {fqn!r} of {path} ({type(e).__name__}: {e})") from None
    if isinstance(obj, io.BytesIO | bytes | bytearray) and depth < 4:
        inner = obj.getvalue() if isinstance(obj, io.BytesIO) else bytes(obj)
        if inner.startswith((b"PK", b"\x80")):  # a torch.save zip archive or a pickle: what a loader would unpickle
            _check_item(inner, path, fqn, depth + 1)


def load_dist(sharded_state_dict: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """`megatron.core.dist_checkpointing.load` of `directory` into `sharded_state_dict` (collective), after
    `check_dist_checkpoint` has found nothing in it that runs code."""
    from megatron.core import dist_checkpointing

    check_dist_checkpoint(directory)
    return dist_checkpointing.load(sharded_state_dict, str(directory))
