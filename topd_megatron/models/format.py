"""The topd checkpoint format: what a model directory is, where its HF side files are, how its weights load.

A topd checkpoint directory:

    CKPT/
      topd_checkpoint.json   format version, role, vocab sizes, the layout it was saved at, free-form `extra`
      hf/                    the HF config.json, generation config and tokenizer files (enough to rebuild the
                             architecture with Megatron-Bridge and to export back to Hugging Face)
      model/                 megatron.core.dist_checkpointing (torch_dist) shards: loadable at any TP/PP layout

Writing one is `topd_megatron.models.checkpoint.save_model`; building a model from one is `models.build`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from topd_megatron.models.safe_load import CheckpointError, load_dist

CHECKPOINT_META = "topd_checkpoint.json"
FORMAT = "topd-megatron/1"
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
)


def unwrap(module: Any) -> Any:
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


def chunks_sharded_state_dict(modules: list[Any]) -> dict[str, Any]:
    """The sharded state dict of every virtual stage on this rank. Keys of the tensors inside are global (layer
    offsets applied by Megatron), so the dict structure may differ between layouts while the stored tensors match."""
    return {f"chunk{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(modules)}


def checkpoint_kind(path: str | Path) -> Literal["hf", "megatron"]:
    """Classify a model directory, raising CheckpointError with the fix when it is missing or incomplete."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model path {p} does not exist or is not a directory")
    if (p / CHECKPOINT_META).is_file():
        meta = json.loads((p / CHECKPOINT_META).read_text())
        model_dir = p / meta.get("model_dir", "model")
        if not (model_dir / ".metadata").is_file():
            raise CheckpointError(
                f"{p} is a partial topd checkpoint: {model_dir}/.metadata is missing (the save was interrupted?)."
                " Resume from an earlier checkpoint or re-convert the HF weights."
            )
        if not (p / "hf" / "config.json").is_file():
            raise CheckpointError(f"{p} is a partial topd checkpoint: hf/config.json is missing")
        return "megatron"
    if (p / "config.json").is_file():
        index = p / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{p} is a partial Hugging Face checkpoint: {len(missing)} of {len(shards)} safetensors shards"
                    f" listed in model.safetensors.index.json are missing (e.g. {missing[0]}); finish the download."
                )
            return "hf"
        if not list(p.glob("*.safetensors")):
            raise CheckpointError(
                f"{p} has config.json but no *.safetensors weights; topd reads safetensors only"
                " (convert .bin weights with transformers' save_pretrained(safe_serialization=True))."
            )
        return "hf"
    raise CheckpointError(
        f"{p} is neither a Hugging Face checkpoint (config.json + *.safetensors) nor a topd checkpoint"
        f" ({CHECKPOINT_META}); point model.path at one of those."
    )


def hf_dir(path: str | Path) -> Path:
    """The directory with a model's HF config and tokenizer: the directory itself for a Hugging Face checkpoint, its
    `hf/` for a topd checkpoint (CheckpointError, a ValueError, when `path` is neither)."""
    return Path(path) if checkpoint_kind(path) == "hf" else Path(path) / "hf"


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(ckpt_dir) / CHECKPOINT_META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_chunk_weights(modules: list[Any], ckpt_dir: str | Path) -> None:
    """Load the weights of a topd checkpoint into freshly built chunks (any layout) in place (collective). Nothing
    in the checkpoint is unpickled beyond plain data (`models.safe_load`)."""
    meta = read_meta(ckpt_dir)
    loaded = load_dist(chunks_sharded_state_dict(modules), Path(ckpt_dir) / meta["model_dir"])
    for i, module in enumerate(modules):
        unwrap(module).load_state_dict(loaded[f"chunk{i}"], strict=True)


def move_into_place(tmp: Path, out: Path) -> None:
    """Make the finished directory `tmp` the directory `out`: the previous `out` (if any) is moved aside first and
    removed only after the rename, so a crash leaves either the old or the new directory, never a partial one."""
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
