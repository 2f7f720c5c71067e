"""Checkpoint conversion between Hugging Face directories and topd checkpoints, through Megatron-Bridge.

    report = hf_to_megatron(ImportConfig(hf_dir="ckpts/qwen3-4b", out_dir="ckpts/qwen3-4b-topd", tp=2))
    report = megatron_to_hf(ExportConfig(source="runs/my-run", out_dir="export/student", base="ckpts/qwen3-4b"))

Both directions run on TP x PP ranks: started here with `topd_megatron.distributed.launch.spawn` (gloo on CPU, NCCL
on GPU), or
this process is one rank of a torchrun/srun job (RANK set). Every check that can fail on bad input runs first and
raises `ValueError` with the fix before any rank starts: `check_paths` (missing directories, an output directory in
the way; standard library only, so instant), then `check_import` / `plan_export` (partial or foreign checkpoints, a
layout the architecture cannot use).

- HF -> topd: `build_model` loads the safetensors through Megatron-Bridge's mapping into the TP/PP shards, and
  `models.checkpoint.save_model` writes them with dist_checkpointing (loadable at any layout) next to the HF config and
  tokenizer files.
- topd -> HF: the checkpoint is built at the export layout and Megatron-Bridge's `save_hf_pretrained` gathers the
  shards back to HF tensors and writes config.json, safetensors, tokenizer files and the generation config, into a
  hidden sibling directory that is renamed into place at the end. Training checkpoints (weights + optimizer state)
  are exported the same way, on top of the model they started from (`ExportConfig.base`).

In fp32 a round trip HF -> topd -> HF reproduces every tensor bit for bit, whatever the two layouts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from topd_megatron.distributed.launch import run_ranks
from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
from topd_megatron.logs import quiet_stdout
from topd_megatron.models.build import (
    CHECKPOINT_META,
    DTYPES,
    ModelConfig,
    build_model,
    check_layout,
    checkpoint_kind,
    padded_vocab,
)
from topd_megatron.models.checkpoint import LATEST, latest_checkpoint, save_model
from topd_megatron.models.format import chunks_sharded_state_dict, move_into_place
from topd_megatron.models.format import hf_dir as model_hf_dir
from topd_megatron.models.safe_load import CheckpointError, load_dist, read_dist_metadata

Dtype = Literal["float32", "bfloat16", "float16"]
EMBEDDING_KEY = "embedding.word_embeddings.weight"
"""The Megatron (dist_checkpointing) key of the input embedding: its shape gives the vocabulary rows."""
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
"""HF tensors with one row per vocabulary entry (Megatron's padding rows are dropped from them on export)."""
TRAIN_STATE = "train_state.json"
"""Marks a training checkpoint (`topd_megatron.models.checkpoint.save_training_state`)."""


class ConvertError(ValueError):
    """Input the conversion cannot work with; the message says what is wrong and what to do."""


def check_paths(source: str | Path, out_dir: str | Path, *, overwrite: bool, base: str | Path | None = None) -> None:
    """The checks that need only the standard library, so that a mistyped path fails at once: the source (and
    `base`) exist, and `out_dir` is empty or `overwrite` is set, and writing it cannot replace a source."""
    out = Path(out_dir).resolve()
    for src in (source, base):
        if src is None:
            continue
        if not Path(src).is_dir():
            raise ConvertError(f"{src} does not exist or is not a directory")
        if out == Path(src).resolve() or out in Path(src).resolve().parents:
            raise ConvertError(f"output directory {out_dir} would replace the source {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output path {out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it")


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in get_args(Dtype):
        raise ConvertError(f"dtype must be one of {get_args(Dtype)}, got {dtype!r}")


def _hf_dtype(hf_dir: Path) -> Dtype:
    """The dtype named in an HF config.json (`dtype`, or `torch_dtype` in older files); bfloat16 when absent."""
    config = json.loads((hf_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in get_args(Dtype) else "bfloat16"


def _check_layout(model: ModelConfig, hf_dir: Path, parallel: ParallelConfig) -> None:
    """`build.check_layout` on the HF config in `hf_dir`."""
    from transformers import AutoConfig

    check_layout(AutoConfig.from_pretrained(str(hf_dir), local_files_only=True), parallel, model, "model")


# --- HF -> topd -------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ImportConfig:
    """A Hugging Face checkpoint to convert into a topd checkpoint, and the layout to build it at."""

    hf_dir: str
    """HF checkpoint directory: config.json, *.safetensors, tokenizer files."""
    out_dir: str
    """The topd checkpoint to write (topd_checkpoint.json, hf/, model/)."""
    tp: int = 1
    """Tensor-parallel size of the conversion (the saved checkpoint loads at any TP/PP)."""
    pp: int = 1
    """Pipeline-parallel size of the conversion."""
    role: Literal["student", "teacher"] = "student"
    """Recorded in topd_checkpoint.json."""
    dtype: Dtype | None = None
    """Dtype of the stored weights; None keeps the dtype named in the HF config.json."""
    pad_vocab_to_multiple_of: int | None = None
    """Pad the vocabulary rows to a multiple of this times TP (needed when TP does not divide vocab_size); the
    runs that load the checkpoint must use the same `model.pad_vocab_to_multiple_of`."""
    overwrite: bool = False
    """Replace a non-empty `out_dir`."""

    def __post_init__(self) -> None:
        if self.role not in ("student", "teacher"):
            raise ConvertError(f"role must be student or teacher, got {self.role!r}")
        _check_dtype(self.dtype)

    @property
    def model(self) -> ModelConfig:
        assert self.dtype is not None, "resolve the dtype with check_import first"
        return ModelConfig(path=self.hf_dir, dtype=self.dtype, pad_vocab_to_multiple_of=self.pad_vocab_to_multiple_of)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp)


def check_import(cfg: ImportConfig) -> ImportConfig:
    """Validate `cfg` without starting ranks (ValueError naming the problem); returns it with the dtype resolved."""
    check_paths(cfg.hf_dir, cfg.out_dir, overwrite=cfg.overwrite)
    parallel = cfg.parallel  # validates the sizes
    if checkpoint_kind(cfg.hf_dir) != "hf":
        raise ConvertError(
            f"{cfg.hf_dir} is already a topd checkpoint (it loads at any TP/PP); export it to Hugging Face with"
            " tools/convert_megatron_to_hf.py instead"
        )
    cfg = replace(cfg, dtype=cfg.dtype or _hf_dtype(Path(cfg.hf_dir)))
    _check_layout(cfg.model, Path(cfg.hf_dir), parallel)
    vocab_size = json.loads((Path(cfg.hf_dir) / "config.json").read_text())["vocab_size"]
    rows = padded_vocab(vocab_size, cfg.model, cfg.tp)
    if cfg.tp == 1 and rows != vocab_size:
        # Megatron-Bridge 0.6.2 pads HF vocabulary tensors on load only when TP > 1 (ColumnParallelMapping).
        raise ConvertError(
            f"padding the vocabulary ({vocab_size} -> {rows} rows) needs TP > 1 with Megatron-Bridge's loader; TP=1"
            " divides any vocabulary, so drop --pad-vocab-to-multiple-of or convert at TP > 1"
        )
    return cfg


def import_rank(rank: int, world: int, cfg: ImportConfig) -> dict[str, Any] | None:
    """One rank of the HF -> topd conversion (collective); the report on global rank 0."""
    init_model_parallel(cfg.parallel)
    lm = build_model(cfg.model, cfg.parallel, role=cfg.role)
    out = save_model(lm, cfg.out_dir, extra={"converted_from": str(Path(cfg.hf_dir).resolve()), "dtype": cfg.dtype})
    if rank != 0:
        return None
    return {"out_dir": str(out), "layout": {"tp": cfg.tp, "pp": cfg.pp}, "dtype": cfg.dtype, "role": cfg.role}


def hf_to_megatron(cfg: ImportConfig, *, timeout: float = 3600.0) -> dict[str, Any] | None:
    """Convert `cfg.hf_dir` into a topd checkpoint at `cfg.out_dir`; the report (None on non-zero launched ranks)."""
    cfg = check_import(cfg)
    return run_ranks(import_rank, cfg.tp * cfg.pp, cfg, timeout=timeout)


# --- topd -> HF -------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class ExportConfig:
    """A topd or training checkpoint to export as a Hugging Face directory."""

    source: str
    """A topd checkpoint directory, a training checkpoint RUN/checkpoints/step_N, or a run directory RUN (or
    RUN/checkpoints): its latest checkpoint."""
    out_dir: str
    """The HF directory to write."""
    base: str | None = None
    """For training checkpoints only: the HF or topd checkpoint the run's student was built from (its
    `student.path`); training checkpoints hold weights and optimizer state, not the config and tokenizer."""
    dtype: Dtype | None = None
    """Dtype of the exported safetensors; None keeps the dtype the weights are stored in."""
    tp: int = 1
    """Tensor-parallel size to gather the weights on (any layout reads any checkpoint)."""
    pp: int = 1
    """Pipeline-parallel size to gather the weights on."""
    overwrite: bool = False
    """Replace a non-empty `out_dir`."""

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)


@dataclass(kw_only=True, slots=True)
class ExportPlan:
    """An ExportConfig resolved against the files on disk (see `plan_export`)."""

    model: ModelConfig
    """What `build_model` builds: the topd checkpoint itself, or the base of a training checkpoint."""
    parallel: ParallelConfig
    out_dir: str
    train_weights: str | None
    """A training checkpoint's dist_checkpointing directory whose model weights replace the base's; None for a topd
    checkpoint."""
    vocab_size: int
    """HF vocab_size; exported vocabulary tensors keep this many rows."""
    weight_dtype: Dtype
    """Dtype of the exported tensors."""
    source: str
    """The checkpoint the weights come from (for the report)."""


def _stored_embedding(weights_dir: Path) -> tuple[int, Dtype]:
    """Rows and dtype of the input embedding stored in a dist_checkpointing (torch_dist) directory."""
    try:
        meta = read_dist_metadata(weights_dir).state_dict_metadata
    except CheckpointError as e:  # a truncated, foreign or unsafe file: report it as bad input, not as a crash
        raise ConvertError(str(e)) from e
    entry = meta.get(EMBEDDING_KEY)
    if entry is None or not hasattr(entry, "size"):
        raise ConvertError(f"{weights_dir} holds no {EMBEDDING_KEY}; it is not a GPT model checkpoint")
    names = {v: k for k, v in DTYPES.items()}
    dtype = entry.properties.dtype
    if dtype not in names:
        raise ConvertError(f"{weights_dir}: unsupported weight dtype {dtype}")
    return int(entry.size[0]), names[dtype]


def resolve_source(source: str | Path) -> tuple[Literal["topd", "training"], Path]:
    """Classify an export source: ("topd", checkpoint dir) or ("training", RUN/checkpoints/step_N)."""
    p = Path(source)
    if not p.is_dir():
        raise ConvertError(f"{p} does not exist or is not a directory")
    if (p / CHECKPOINT_META).is_file():
        checkpoint_kind(p)  # complete?
        return "topd", p
    if (p / TRAIN_STATE).is_file():
        step = p
    elif (p / "checkpoints").is_dir() or (p / LATEST).is_file():
        run = p if (p / "checkpoints").is_dir() else p.parent
        step = latest_checkpoint(run)
        if step is None:
            raise ConvertError(
                f"run directory {run} has no complete training checkpoint (checkpoints/latest is missing)"
            )
    elif (p / "config.json").is_file():
        raise ConvertError(f"{p} is already a Hugging Face checkpoint; nothing to export")
    else:
        raise ConvertError(
            f"{p} is not a topd checkpoint ({CHECKPOINT_META}), a training checkpoint ({TRAIN_STATE}) or a run"
            " directory (checkpoints/latest)"
        )
    if not (step / "state" / ".metadata").is_file():
        raise ConvertError(f"training checkpoint {step} is incomplete: state/.metadata is missing")
    return "training", step


def plan_export(cfg: ExportConfig) -> ExportPlan:
    """Resolve and validate `cfg` without starting ranks (ValueError naming the problem)."""
    check_paths(cfg.source, cfg.out_dir, overwrite=cfg.overwrite, base=cfg.base)
    parallel = ParallelConfig(tp=cfg.tp, pp=cfg.pp)  # validates the sizes
    kind, src = resolve_source(cfg.source)
    if kind == "topd":
        if cfg.base is not None:
            raise ConvertError(f"{src} is a topd checkpoint, which carries its config and tokenizer; drop --base")
        model_path, weights_dir, train_weights = src, src / "model", None
    else:
        if cfg.base is None:
            raise ConvertError(
                f"{src} is a training checkpoint, which holds no HF config or tokenizer; pass --base DIR, the HF or"
                " topd checkpoint the run's student was built from (its student.path)"
            )
        model_path, weights_dir = Path(cfg.base), src / "state"
        train_weights = str(weights_dir)
    hf_dir = model_hf_dir(model_path)
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    rows, stored_dtype = _stored_embedding(weights_dir)
    pad = None
    if rows != vocab_size:
        # Rebuild the saved padding at this layout: `rows // tp` rounds vocab_size up to exactly `rows`.
        if rows % parallel.tp:
            raise ConvertError(f"the checkpoint has {rows} vocabulary rows, which TP={parallel.tp} does not divide")
        pad = rows // parallel.tp
        if parallel.tp == 1 and hf_dir == model_path:
            # Megatron-Bridge 0.6.2 pads HF vocabulary tensors on load only when TP > 1 (ColumnParallelMapping).
            raise ConvertError(
                f"the checkpoint's vocabulary is padded ({vocab_size} -> {rows} rows), and Megatron-Bridge pads the"
                " Hugging Face weights of --base only at TP > 1: pass --tp 2 (or a topd checkpoint as --base)"
            )
    model = ModelConfig(path=str(model_path), dtype=stored_dtype, pad_vocab_to_multiple_of=pad)
    _check_layout(model, hf_dir, parallel)
    return ExportPlan(
        model=model,
        parallel=parallel,
        out_dir=cfg.out_dir,
        train_weights=train_weights,
        vocab_size=vocab_size,
        weight_dtype=cfg.dtype or stored_dtype,
        source=str(src),
    )


def _load_training_weights(modules: list[Any], weights_dir: str) -> None:
    """Replace the chunks' weights by the model part of a training checkpoint (any layout; collective). The
    optimizer state stored next to them is not read."""
    from megatron.core.utils import unwrap_model

    loaded = load_dist(chunks_sharded_state_dict(modules), weights_dir)
    for i, module in enumerate(modules):
        unwrap_model(module).load_state_dict(loaded[f"chunk{i}"], strict=True)


def _conform_weights(hf_dir: Path, vocab_size: int, tied: bool) -> None:
    """Make the exported safetensors hold what transformers' `save_pretrained` writes. Megatron-Bridge exports
    Megatron's padded vocabulary rows as they are (transformers refuses to load them) and writes a tied output layer
    out as `lm_head.weight`; here the vocabulary tensors are cut to `vocab_size` rows and a tied `lm_head.weight`
    is dropped."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    drop = {"lm_head.weight"} if tied else set()
    index_file = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    removed = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            padded = {k for k in VOCAB_TENSORS if k in names and f.get_slice(k).get_shape()[0] > vocab_size}
        dropped = names & drop
        if not padded and not dropped:
            continue
        tensors = load_file(str(path))
        for key in dropped | padded:
            t = tensors.pop(key)
            if key in dropped:
                removed += t.numel() * t.element_size()
                if index is not None:
                    index["weight_map"].pop(key, None)
            else:
                removed += (t.shape[0] - vocab_size) * t[0].numel() * t.element_size()
                tensors[key] = t[:vocab_size].clone()
        if tensors:
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            path.unlink()
    if index is not None and removed:
        if "total_size" in index.get("metadata", {}):
            index["metadata"]["total_size"] -= removed
        index_file.write_text(json.dumps(index, indent=2) + "\n")


def _finish_hf_dir(hf_dir: Path, weight_dtype: Dtype) -> None:
    """Name the exported dtype in config.json and make sure a generation config is there."""
    from transformers import AutoConfig, GenerationConfig

    config_file = hf_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = weight_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = weight_dtype
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not (hf_dir / "generation_config.json").is_file():
        hf_config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(hf_dir))


def export_rank(rank: int, world: int, plan: ExportPlan) -> dict[str, Any] | None:
    """One rank of the topd -> HF export (collective); the report on global rank 0."""
    import torch.distributed as dist

    init_model_parallel(plan.parallel)
    lm = build_model(plan.model, plan.parallel)
    if plan.train_weights is not None:
        _load_training_weights(lm.modules, plan.train_weights)
    out = Path(plan.out_dir)
    tmp = out.parent / f".{out.name}.partial"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    weight_dtype = DTYPES[plan.weight_dtype] if plan.weight_dtype != plan.model.dtype else None  # cast on export
    with quiet_stdout():  # progress bars
        lm.bridge.save_hf_pretrained(
            lm.modules, str(tmp), show_progress=False, source_path=str(lm.tokenizer_dir), weight_dtype=weight_dtype
        )
    dist.barrier()
    report = None
    if rank == 0:
        _conform_weights(tmp, plan.vocab_size, tied=bool(getattr(lm.hf_config, "tie_word_embeddings", False)))
        _finish_hf_dir(tmp, plan.weight_dtype)
        move_into_place(tmp, out)
        report = {
            "out_dir": str(out),
            "source": plan.source,
            "dtype": plan.weight_dtype,
            "files": sorted(p.name for p in out.iterdir()),
        }
    dist.barrier()
    return report


def megatron_to_hf(cfg: ExportConfig, *, timeout: float = 3600.0) -> dict[str, Any] | None:
    """Export `cfg.source` to a Hugging Face directory at `cfg.out_dir`; the report (None on non-zero launched
    ranks)."""
    plan = plan_export(cfg)
    return run_ranks(export_rank, plan.parallel.tp * plan.parallel.pp, plan, timeout=timeout)
