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

from topd_megatron.models.build import MegatronLM
from topd_megatron.models.format import (
    CHECKPOINT_META,
    FORMAT,
    HF_SIDE_FILES,
    chunks_sharded_state_dict,
    move_into_place,
    unwrap,
)


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
        move_into_place(tmp, out)
    _barrier()
    return out


# --- training state -------------------------------------------------------------------------------------------------

OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""Distributed-optimizer state as its flat per-bucket shards: fully parallel, reshardable across data-parallel sizes
(resume at the TP/PP layout it was saved with). Megatron-Core 0.19.2's "fully_reshardable" format loses the step
counters of torch Adam on load, so it is not used."""
LATEST = "latest"
"""File in the run's checkpoint directory naming the newest complete training checkpoint."""


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


def save_training_state(
    run_dir: str | Path, step: int, lm: MegatronLM, optimizer: Any, scheduler: Any, extra: dict[str, Any]
) -> Path:
    """Atomically save everything needed to continue after `step` steps (collective).

    RUN/checkpoints/step_00000N/ holds the model and optimizer (dist_checkpointing: any layout, sharded optimizer
    state), the scheduler, per-rank RNG states and `extra` (data position, counters); RUN/checkpoints/latest names
    it once it is complete, so a crash at any point leaves the previous checkpoint as the one resumed from.
    """
    import torch
    from megatron.core import dist_checkpointing

    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    out = ckpt_root / name
    tmp = ckpt_root / f".{name}.partial"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "state").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    model_sd = chunks_sharded_state_dict(lm.modules)
    state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMAT)}
    dist_checkpointing.save(state, str(tmp / "state"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        meta = {"format": FORMAT, "step": step, "scheduler": scheduler.state_dict(), "extra": extra}
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        pointer = ckpt_root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        pointer.replace(ckpt_root / LATEST)  # atomic: readers see the old or the new name, never a partial one
    _barrier()
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise ValueError(f"{pointer} names {path}, which is incomplete; remove the pointer to start over")
    return path


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Give a fresh optimizer its state tensors (Adam moments and step counters) so that Megatron can describe the
    state it is about to load: one step of the inner torch optimizer on zero gradients. The values are overwritten
    by the load."""
    import torch

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if len(inner.state) > 0:
            continue
        params = [p for group in inner.param_groups for p in group["params"] if p.numel() > 0]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in params:
            p.grad = None


def _restore_adam_steps(optimizer: Any, loaded: Any) -> None:
    """Set every parameter's Adam step counter to the saved step count, each in its own tensor.

    Megatron-Core 0.19.2's DistributedOptimizer (torch Adam, no Apex/TE) keeps the step count in its param_groups
    when saving, but on load (a) the per-parameter `step` entries end up at the value of the state it loaded into,
    not the saved one, and (b) it gives every parameter the *same* tensor, which torch Adam then increments once per
    parameter per step. Both corrupt the bias correction from the first update after a resume.
    """
    import torch

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded] if len(chained) == 1 else [loaded[i] for i in range(len(chained))]
    for opt, part in zip(chained, parts, strict=True):
        groups = part.get("optimizer", {}).get("param_groups", []) if isinstance(part, dict) else []
        steps = {g["step"] for g in groups if "step" in g}
        if len(steps) != 1:
            continue  # an optimizer that stores its step elsewhere (Apex/TE): nothing to repair
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = torch.tensor(step, dtype=state["step"].dtype)


def load_training_state(ckpt: Path, lm: MegatronLM, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from `ckpt` (collective); returns its metadata."""
    import torch
    from megatron.core import dist_checkpointing

    meta = json.loads((ckpt / "train_state.json").read_text())
    _materialize_optimizer_state(optimizer)
    model_sd = chunks_sharded_state_dict(lm.modules)
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_FORMAT)
    state = {"model": model_sd, "optimizer": opt_sd}
    loaded = dist_checkpointing.load(state, str(ckpt / "state"))
    for i, module in enumerate(lm.modules):
        unwrap(module).load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    with torch.no_grad():  # the state is copied in place into (views of) parameters
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = ckpt / "rng" / f"rank_{_rank():05d}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{ckpt} has no RNG state for rank {_rank()}: resume with the world size it was saved with")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
