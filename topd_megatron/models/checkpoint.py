"""topd checkpoints: Megatron distributed weights plus what is needed to rebuild and export the model, and training
checkpoints (weights, optimizer, scheduler, RNG, data position) that resume at any layout.

Layout of a model checkpoint directory:

    CKPT/
      topd_checkpoint.json   format version, role, vocab sizes, the layout it was saved at, free-form `extra`
      hf/                    the HF config.json, generation config and tokenizer files (enough to rebuild the
                             architecture with Megatron-Bridge and to export back to Hugging Face)
      model/                 megatron.core.dist_checkpointing (torch_dist) shards: loadable at any TP/PP layout

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only after every rank
has finished writing, so an interrupted save never leaves a half-written CKPT (the previous one stays intact).
All functions here are collective over the default process group. Nothing is unpickled on load: JSON,
safetensors, and Megatron's dist_checkpointing after `models.safe_load` has checked it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from topd_megatron.models.build import MegatronLM
from topd_megatron.models.format import (
    CHECKPOINT_META,
    FORMAT,
    HF_SIDE_FILES,
    chunks_sharded_state_dict,
    move_into_place,
    unwrap,
)
from topd_megatron.models.rng_state import check_rng_file, load_rng_state, save_rng_state
from topd_megatron.models.safe_load import CheckpointError, check_dist_checkpoint

log = logging.getLogger(__name__)


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

TRAIN_FORMAT = "topd-megatron-train/2"
"""Format of a training checkpoint's train_state.json (2: any layout, RNG states as safetensors)."""
OPTIMIZER_FORMATS: dict[str, dict[str, Any]] = {
    "any_layout": {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": True,
    },
    "same_model_parallel": {"distrib_optim_sharding_type": "dp_reshardable"},
}
"""How the distributed optimizer's state is stored (`train.checkpoint_optimizer`):

'any_layout': Megatron's fully_reshardable format, in model space: one fp32 main parameter, Adam exp_avg and
exp_avg_sq per model parameter at its global shape, so a checkpoint loads at any TP/PP/DP. Saving gathers each DP
group's flat shards on its DP rank 0 over gloo (host memory: the optimizer state of one TP x PP shard, 12 bytes per
parameter); loading reads a superset and slices it, with no communication.

'same_model_parallel': Megatron's dp_reshardable format, the flat per-bucket shards as they are: fully parallel, no
gather, resumable at the same TP/PP/VPP (any DP).

Megatron-Core 0.19.2 restores torch Adam's per-parameter step counters wrongly with either (see `_load_optimizer`):
the step counts are saved in train_state.json and set back after the load."""
LATEST = "latest"
"""File in the run's checkpoint directory naming the newest complete training checkpoint."""


@dataclass(frozen=True, slots=True)
class TrainingLayout:
    """What a training checkpoint was written with, or what a run resumes with. TP/PP/VPP/world may change between
    the two; the optimizer kind and the parameter dtype may not."""

    tp: int
    pp: int
    vpp: int | None
    world: int
    """Training ranks (DP = world / (TP x PP))."""
    distributed_optimizer: bool
    dtype: str
    """The student's parameter dtype ('float32', 'bfloat16', ...)."""

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def describe(self) -> str:
        vpp = f" VPP={self.vpp}" if self.vpp else ""
        return f"TP={self.tp} PP={self.pp}{vpp} DP={self.dp}"


def _current_layout(lm: MegatronLM, optimizer: Any) -> TrainingLayout:
    from megatron.core import parallel_state as ps

    first = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    return TrainingLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        world=dist.get_world_size() if dist.is_initialized() else 1,
        distributed_optimizer=bool(first.config.use_distributed_optimizer),
        dtype=str(lm.provider.params_dtype).removeprefix("torch."),
    )


def _chained(optimizer: Any) -> list[Any]:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _adam_steps(optimizer: Any) -> list[int | None]:
    """Adam's step count of each chained optimizer, agreed over all ranks (collective; None: no state yet)."""
    local = []
    for opt in _chained(optimizer):
        local.append(sorted({int(float(s["step"])) for s in opt.optimizer.state.values() if "step" in s}))
    everyone: list[Any] = [local]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    steps: list[int | None] = []
    for i in range(len(local)):
        values = sorted({v for rank in everyone for v in rank[i]})
        if len(values) > 1:
            raise RuntimeError(f"optimizer {i}: parameters disagree on Adam's step count {values}; not saving")
        steps.append(values[0] if values else None)
    return steps


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written (a full disk, a quota, an I/O error); the previous one is intact."""


def _agree(error: BaseException | None, what: str, tmp: Path) -> None:
    """Collective: when any rank failed (`error`), every rank raises CheckpointWriteError, after rank 0 removed the
    partial directory `tmp` (freeing what it took)."""
    message: Any = None if error is None else f"{type(error).__name__}: {error}"
    everyone: list[Any] = [message]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, message)
    failures = [m for m in everyone if m is not None]
    if not failures:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    latest = tmp.parent / LATEST
    kept = latest.read_text().strip() if latest.is_file() else None
    free = shutil.disk_usage(tmp.parent).free / 2**20
    raise CheckpointWriteError(
        f"could not write {what} ({failures[0].splitlines()[0]}; {free:.1f} MiB free there after cleaning up); "
        + (
            f"{kept} is still the latest checkpoint and loads: free space and rerun to resume from it"
            if kept
            else "there is no earlier checkpoint: free space and rerun"
        )
    )


def save_training_state(
    run_dir: str | Path,
    step: int,
    lm: MegatronLM,
    optimizer: Any,
    scheduler: Any,
    extra: dict[str, Any],
    *,
    optimizer_format: str = "any_layout",
) -> Path:
    """Atomically save everything needed to continue after `step` steps (collective).

    RUN/checkpoints/step_00000N/ holds the model and optimizer (dist_checkpointing; the optimizer in
    `OPTIMIZER_FORMATS[optimizer_format]`), train_state.json (scheduler, Adam step counts, the layout, `extra`:
    data position, counters) and per-rank RNG states (safetensors); RUN/checkpoints/latest names it once it is
    complete, so a crash at any point leaves the previous checkpoint as the one resumed from. A write that fails on
    any rank (a full disk) raises CheckpointWriteError on every rank, with the partial directory removed and the
    previous checkpoint untouched.
    """
    from megatron.core import dist_checkpointing

    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    out = ckpt_root / name
    tmp = ckpt_root / f".{name}.partial"
    what = f"the checkpoint of step {step} to {ckpt_root}"
    error: BaseException | None = None
    if _rank() == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "state").mkdir(parents=True)
            (tmp / "rng").mkdir()
        except OSError as e:
            error = e
    _agree(error, what, tmp)
    steps = _adam_steps(optimizer)
    layout = _current_layout(lm, optimizer)
    model_sd = chunks_sharded_state_dict(lm.modules)
    opt_sd = optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_FORMATS[optimizer_format])
    state = {"model": model_sd, "optimizer": opt_sd}
    try:
        dist_checkpointing.save(state, str(tmp / "state"))  # raises on every rank when a rank's write fails
        save_rng_state(tmp / "rng" / f"rank_{_rank():05d}.safetensors")
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch wraps write errors (a BaseException)
        error = e
    _agree(error, what, tmp)
    if _rank() == 0:
        meta = {
            "format": TRAIN_FORMAT,
            "step": step,
            "layout": asdict(layout),
            "padded_vocab_size": lm.padded_vocab_size,
            "optimizer_format": optimizer_format,
            "optimizer_steps": steps,
            "scheduler": scheduler.state_dict(),
            "extra": extra,
        }
        try:
            (tmp / "train_state.json").write_text(json.dumps(meta, indent=2, default=float) + "\n")
            move_into_place(tmp, out)
            pointer = ckpt_root / f".{LATEST}.tmp"
            pointer.write_text(name + "\n")
            pointer.replace(ckpt_root / LATEST)  # atomic: readers see the old or the new name, never a partial one
        except OSError as e:
            error = e
    _agree(error, what, tmp)
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is incomplete; remove the pointer to start over")
    return path


def read_training_meta(ckpt: Path) -> dict[str, Any]:
    """train_state.json of a training checkpoint, checked to be of the current format (CheckpointError)."""
    try:
        meta = json.loads((ckpt / "train_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt}/train_state.json ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{ckpt} is a training checkpoint of format {found!r}, not {TRAIN_FORMAT!r} (older versions stored RNG"
            " states as pickles and resumed only at their own layout); start the run in a new run_dir, or"
            " export its weights (tools/convert_megatron_to_hf.py) and start from them"
        )
    return meta


def check_resumable(ckpt: Path, layout: TrainingLayout) -> dict[str, Any]:
    """Before any model is built: refuse (CheckpointError, naming the fix) a checkpoint that cannot be resumed with
    `layout`; return its metadata. TP, PP, VPP and the world size may differ from the saved ones."""
    meta = read_training_meta(ckpt)
    saved = TrainingLayout(**meta["layout"])
    problems = []
    if saved.distributed_optimizer != layout.distributed_optimizer:
        problems.append(
            f"optim.use_distributed_optimizer={saved.distributed_optimizer} when saved,"
            f" {layout.distributed_optimizer} now"
        )
    if saved.dtype != layout.dtype:
        problems.append(f"student.dtype={saved.dtype} when saved, {layout.dtype} now")
    if meta["optimizer_format"] == "same_model_parallel" and (saved.tp, saved.pp, saved.vpp) != (
        layout.tp,
        layout.pp,
        layout.vpp,
    ):
        problems.append(
            f"its optimizer state was saved with train.checkpoint_optimizer=same_model_parallel, which loads only at"
            f" the TP/PP/VPP it was saved at (now {layout.describe()})"
        )
    if problems:
        raise CheckpointError(
            f"{ckpt} (saved at {saved.describe()}) cannot be resumed by this run: {'; '.join(problems)}. Set them"
            " back to the saved values, or start a new run_dir."
        )
    return meta


def _materialize_optimizer_state(optimizer: Any) -> None:
    """Give a fresh optimizer its state tensors (Adam moments and step counters) so that Megatron can describe the
    state it is about to load: one step of the inner torch optimizer on zero gradients. The values are overwritten
    by the load."""
    import torch

    for opt in _chained(optimizer):
        inner = opt.optimizer
        if len(inner.state) > 0:
            continue
        params = [p for group in inner.param_groups for p in group["params"] if p.numel() > 0]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p in params:
            p.grad = None


def _load_optimizer(optimizer: Any, loaded: dict[str, Any], steps: list[int | None]) -> None:
    """Load an optimizer state (`OPTIMIZER_FORMATS`) into `optimizer`, then give every parameter's Adam state the saved
    step count, each in its own tensor.

    Megatron-Core 0.19.2's DistributedOptimizer (torch Adam, no Apex/TE) cannot do the last part itself: its
    load_state_dict gives every parameter the *same* step tensor (which torch Adam then increments once per parameter
    per step), and its fully_reshardable loader expects a saved tensor for every tensor in the live state, `step`
    included, which it never saves (KeyError). So the parameter state is loaded here with the step counters set
    aside as plain numbers, and the counters are set back from train_state.json afterwards.
    """
    import torch

    chained = _chained(optimizer)
    parts = [loaded] if len(chained) == 1 else [loaded[i] for i in range(len(chained))]
    for opt, part, step in zip(chained, parts, steps, strict=True):
        part = dict(part)
        param_state = part.pop("param_state", None)
        kind = part.pop("param_state_sharding_type", None)
        with torch.no_grad():  # the state is copied in place into (views of) parameters
            opt.load_state_dict(part)  # param groups (and the grad scaler)
            dtypes = {}
            for key, state in opt.optimizer.state.items():
                if isinstance(state.get("step"), torch.Tensor):
                    dtypes[key] = state["step"].dtype
                    state["step"] = 0.0  # not a tensor while Megatron copies the saved tensors in
            if kind == "fully_reshardable":
                opt.load_parameter_state_from_fully_reshardable(param_state)
            elif kind == "dp_reshardable":
                opt.load_parameter_state_from_dp_reshardable(param_state)
            elif param_state is not None:
                raise CheckpointError(f"optimizer state of an unknown format {kind!r}")
        for key, state in opt.optimizer.state.items():
            if step is not None and key in dtypes:
                state["step"] = torch.tensor(float(step), dtype=dtypes[key])


def check_checkpoint_files(ckpt: Path) -> None:
    """Refuse (CheckpointError) a training checkpoint holding anything that would run code when read: a pickle in
    rng/, or dist_checkpointing metadata/items beyond plain data (`models.safe_load`). Reads only metadata."""
    if not (ckpt / "rng").is_dir() or not (ckpt / "state").is_dir():
        raise CheckpointError(f"{ckpt} is incomplete (no rng/ or state/); resume from another checkpoint")
    stray = sorted(p.name for p in (ckpt / "rng").iterdir() if p.suffix != ".safetensors")
    if stray:
        raise CheckpointError(
            f"{ckpt}/rng holds {stray}: topd stores RNG states only as safetensors and never unpickles checkpoint"
            " files (a pickle can run code when loaded). Remove them, or do not load this checkpoint if you do not"
            " know where they come from."
        )
    for rng_file in sorted((ckpt / "rng").iterdir()):
        check_rng_file(rng_file)
    check_dist_checkpoint(ckpt / "state")


def _check_files(ckpt: Path) -> None:
    """`check_checkpoint_files` on rank 0; every rank gets the verdict (collective)."""
    verdict: list[Any] = [None]
    if _rank() == 0:
        try:
            check_checkpoint_files(ckpt)
        except CheckpointError as e:
            verdict = [str(e)]
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def load_training_state(
    ckpt: Path, lm: MegatronLM, optimizer: Any, scheduler: Any, layout: TrainingLayout
) -> dict[str, Any]:
    """Restore model, optimizer (Adam moments and step counts), scheduler and RNG from `ckpt` at `layout`, which may
    differ from the saved one in TP/PP/VPP/DP (collective); returns the checkpoint's metadata.

    Per-rank RNG states are restored when the layout is the saved one; at another layout each rank keeps the state
    `parallel.seed` gave it (rollouts, windows and evaluations are seeded per step, see seeds.py: this only changes
    dropout, which no recipe uses)."""
    from megatron.core import dist_checkpointing

    meta = check_resumable(ckpt, layout)
    if meta["padded_vocab_size"] != lm.padded_vocab_size:
        raise CheckpointError(
            f"{ckpt} was saved with {meta['padded_vocab_size']} vocabulary rows, this run has {lm.padded_vocab_size};"
            " use the student.pad_vocab_to_multiple_of it was saved with"
        )
    _check_files(ckpt)
    _materialize_optimizer_state(optimizer)
    model_sd = chunks_sharded_state_dict(lm.modules)
    opt_sd = optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=OPTIMIZER_FORMATS[meta["optimizer_format"]]
    )
    loaded = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, str(ckpt / "state"))
    for i, module in enumerate(lm.modules):
        unwrap(module).load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
    _load_optimizer(optimizer, loaded["optimizer"], meta["optimizer_steps"])
    scheduler.load_state_dict(meta["scheduler"])
    saved = TrainingLayout(**meta["layout"])
    if saved == layout:
        rng_file = ckpt / "rng" / f"rank_{_rank():05d}.safetensors"
        if not rng_file.is_file():
            raise CheckpointError(f"{ckpt} has no RNG state for rank {_rank()} ({rng_file.name}): it is incomplete")
        load_rng_state(rng_file)
    elif _rank() == 0:
        log.warning(
            "resuming %s (saved at %s) at %s: RNG states start from parallel.seed",
            ckpt,
            saved.describe(),
            layout.describe(),
        )
    return meta
