"""topd checkpoints: Megatron distributed weights plus what is needed to rebuild and export the model.

Layout of a checkpoint directory:

    CKPT/
      topd_checkpoint.json   format version, role, vocab sizes, the layout it was saved at, free-form `extra`
      hf/                    the HF config.json, generation config and tokenizer files (enough to rebuild the
                             architecture with Megatron-Bridge and to export back to Hugging Face)
      model/                 megatron.core.dist_checkpointing (torch_dist) shards: loadable at any TP/PP layout

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only after every rank
has finished writing, so an interrupted save never leaves a half-written CKPT (the previous one stays intact).
All functions here are collective over the default process group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from topd_megatron.models.build import CHECKPOINT_META, MegatronLM

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


def _unwrap(module: Any) -> Any:
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


def chunks_sharded_state_dict(modules: list[Any]) -> dict[str, Any]:
    """The sharded state dict of every virtual stage on this rank. Keys of the tensors inside are global (layer
    offsets applied by Megatron), so the dict structure may differ between layouts while the stored tensors match."""
    return {f"chunk{i}": _unwrap(m).sharded_state_dict() for i, m in enumerate(modules)}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(lm: MegatronLM, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Save `lm`'s weights and metadata to `out_dir` atomically (collective). Returns `out_dir`."""
    from megatron.core import dist_checkpointing, parallel_state

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.partial"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
        (tmp / "hf").mkdir()
    _barrier()
    dist_checkpointing.save(chunks_sharded_state_dict(lm.modules), str(tmp / "model"))
    _barrier()
    if _rank() == 0:
        for name in HF_SIDE_FILES:
            src = lm.tokenizer_dir / name
            if src.is_file():
                shutil.copy2(src, tmp / "hf" / name)
        meta = {
            "format": FORMAT,
            "role": lm.role,
            "model_dir": "model",
            "vocab_size": lm.vocab_size,
            "padded_vocab_size": lm.padded_vocab_size,
            "saved_layout": {
                "tp": parallel_state.get_tensor_model_parallel_world_size(),
                "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            },
            "source": str(lm.source),
            "extra": extra or {},
        }
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
        old = out.parent / f".{out.name}.old"
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return out


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(ckpt_dir) / CHECKPOINT_META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_chunk_weights(modules: list[Any], ckpt_dir: str | Path) -> None:
    """Load the weights of a topd checkpoint into freshly built chunks (any layout) in place (collective)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)
    loaded = dist_checkpointing.load(chunks_sharded_state_dict(modules), str(Path(ckpt_dir) / meta["model_dir"]))
    for i, module in enumerate(modules):
        _unwrap(module).load_state_dict(loaded[f"chunk{i}"], strict=True)
