"""Build a Megatron-Core GPT model (student or teacher) from a Hugging Face directory or a topd Megatron checkpoint.

    lm = build_model(ModelConfig(path="ckpts/qwen3-4b"), ParallelConfig(tp=2), role="student")
    logits_shard = lm.modules[0](tokens, position_ids, attention_mask)      # [b, s, padded_vocab / tp]

Both sources go through Megatron-Bridge: its per-family provider turns the HF `config.json` into a Megatron
`TransformerConfig`, and its mapping table loads HF safetensors into the TP/PP-sharded parameters. A topd checkpoint
carries the HF config and tokenizer next to the distributed weights, so it builds the same provider and then loads
the weights with `megatron.core.dist_checkpointing` at whatever TP/PP the run uses.

Layout decisions made here:
- `parallel_output=True`: the output layer returns this rank's vocabulary shard; nothing gathers the vocabulary.
- The vocabulary is exactly the HF config's `vocab_size` unless `pad_vocab_to_multiple_of` is set, in which case
  Megatron pads it to a multiple of that times TP; padded entries are at ids >= `MegatronLM.vocab_size` and must
  be masked wherever probabilities are formed (`topd_megatron.algorithm.loss` takes `vocab_size` for that).
- TransformerEngine layer specs when TE is importable and CUDA is present, Megatron-Core's local spec otherwise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from topd_megatron.choices import check_choices
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.logs import quiet_stdout
from topd_megatron.models.bridge_import import have_transformer_engine, import_bridge
from topd_megatron.models.format import CHECKPOINT_META, checkpoint_kind, load_chunk_weights
from topd_megatron.models.positions import install as install_positions

log = logging.getLogger(__name__)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Where a model comes from and how it is laid out in memory."""

    path: str
    """A Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer files) or a topd checkpoint."""
    dtype: Literal["float64", "float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter/compute dtype. Use float32 (or float64, for equality tests of two computations) on CPU."""
    pad_vocab_to_multiple_of: int | None = None
    """Pad the vocabulary to a multiple of this times TP (Megatron's make_vocab_size_divisible_by). None keeps the
    checkpoint's vocabulary, which TP must then divide."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: selective recomputes core attention, full recomputes whole layers."""
    transformer_engine: bool | None = None
    """Use TransformerEngine layer specs. None: when TE is importable and CUDA is available."""
    seq_length: int = 4096
    """Longest sequence (prompt + response + window) the model will see."""
    fp8: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    """TransformerEngine FP8 recipe for this model's GEMMs (the student trains in FP8 'hybrid': E4M3 forward, E5M2
    gradients; the teacher's forward runs in E4M3). Needs TE with CUDA; elsewhere a warning and the local spec."""
    fp8_weights: bool = False
    """Hold the weights themselves in FP8 (Megatron's fp8_param): halves the frozen teacher's weight memory."""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        if self.fp8 is not None and self.dtype != "bfloat16":
            raise ValueError(f"model.fp8={self.fp8!r} needs model.dtype=bfloat16 (FP8 GEMMs keep bf16 elsewhere)")
        if self.fp8_weights and self.fp8 is None:
            raise ValueError("model.fp8_weights=True needs an FP8 recipe: set model.fp8 (e.g. 'tensorwise')")
        if self.pad_vocab_to_multiple_of is not None and self.pad_vocab_to_multiple_of < 1:
            raise ValueError(f"model.pad_vocab_to_multiple_of must be >= 1, got {self.pad_vocab_to_multiple_of}")


@dataclass(slots=True)
class MegatronLM:
    """A built model and what the rest of the pipeline needs to know about it."""

    modules: list[Any]
    """One Megatron module per virtual pipeline stage held by this rank (DDP-wrapped for a trainable student)."""
    provider: Any
    """The Megatron-Bridge provider (a TransformerConfig) the modules were built from."""
    bridge: Any
    """The Megatron-Bridge AutoBridge: HF <-> Megatron weight mapping for this architecture."""
    hf_config: Any
    """The Hugging Face config of the architecture."""
    vocab_size: int
    """The model's true vocabulary (HF config vocab_size); logits at ids >= this are padding."""
    padded_vocab_size: int
    """Rows of the Megatron embedding/output layer (vocab_size rounded up when padding is on)."""
    tokenizer_dir: Path
    """Directory holding the tokenizer files."""
    source: Path
    """Where the weights came from."""
    role: str = "student"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.provider


def use_transformer_engine(cfg: ModelConfig) -> bool:
    available = have_transformer_engine() and torch.cuda.is_available()
    if cfg.transformer_engine and not available:
        raise ValueError(
            "model.transformer_engine=True but TransformerEngine with CUDA is not available here;"
            " install transformer-engine[pytorch] on a GPU machine or set model.transformer_engine=None"
        )
    return available if cfg.transformer_engine is None else cfg.transformer_engine


def check_layout(hf_config: Any, parallel: ParallelConfig, cfg: ModelConfig, name: str) -> None:
    """Raise ValueError when `parallel` cannot shard this architecture, naming the constraint and the fix."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    vocab = hf_config.vocab_size
    layers = hf_config.num_hidden_layers
    problems = []
    if heads % parallel.tp:
        problems.append(f"TP={parallel.tp} does not divide num_attention_heads={heads}")
    if kv_heads % parallel.tp:
        problems.append(f"TP={parallel.tp} does not divide num_key_value_heads={kv_heads}")
    if cfg.pad_vocab_to_multiple_of is None and vocab % parallel.tp:
        problems.append(
            f"TP={parallel.tp} does not divide vocab_size={vocab} (set model.pad_vocab_to_multiple_of, e.g. 128,"
            " to let Megatron pad the vocabulary; padded entries are masked)"
        )
    stages = parallel.pp * (parallel.vpp or 1)
    if layers % stages:
        problems.append(f"PP={parallel.pp} x VPP={parallel.vpp or 1} does not divide num_hidden_layers={layers}")
    if getattr(hf_config, "num_experts", None) and hf_config.num_experts % parallel.ep:
        problems.append(f"EP={parallel.ep} does not divide num_experts={hf_config.num_experts}")
    if problems:
        raise ValueError(
            f"{name} ({cfg.path}) cannot use this parallel layout: " + "; ".join(problems) + ". Choose sizes that"
            " divide these dimensions."
        )


def padded_vocab(vocab_size: int, cfg: ModelConfig, tp: int) -> int:
    if cfg.pad_vocab_to_multiple_of is None:
        return vocab_size
    multiple = cfg.pad_vocab_to_multiple_of * tp
    return -(-vocab_size // multiple) * multiple


def fp8_settings(cfg: ModelConfig, role: str) -> dict[str, Any]:
    """The TransformerConfig fields that turn on `cfg.fp8` for a model of this role ({} when FP8 is off).

    student: fp8='hybrid' (E4M3 forward, E5M2 for gradients); teacher: fp8='e4m3' (forward only). `fp8_recipe` is the
    recipe name (Megatron's Fp8Recipe values); delayed scaling keeps a 1024-step amax history reduced with max;
    `fp8_param` stores the weights in FP8 (model.fp8_weights)."""
    if cfg.fp8 is None:
        return {}
    settings: dict[str, Any] = {
        "fp8": "hybrid" if role == "student" else "e4m3",
        "fp8_recipe": cfg.fp8,
        "fp8_param": cfg.fp8_weights,
    }
    if cfg.fp8 == "delayed":
        settings.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return settings


def _configure_provider(provider: Any, cfg: ModelConfig, parallel: ParallelConfig, te: bool, role: str) -> None:
    from megatron.bridge.models.gpt_provider import local_layer_spec, transformer_engine_layer_spec

    dtype = DTYPES[cfg.dtype]
    provider.tensor_model_parallel_size = parallel.tp
    provider.pipeline_model_parallel_size = parallel.pp
    provider.virtual_pipeline_model_parallel_size = parallel.vpp
    provider.context_parallel_size = parallel.cp
    provider.expert_model_parallel_size = parallel.ep
    provider.sequence_parallel = parallel.sequence_parallel
    provider.parallel_output = True
    provider.seq_length = cfg.seq_length
    provider.params_dtype = dtype
    provider.pipeline_dtype = dtype
    provider.autocast_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = dtype == torch.float16
    if cfg.pad_vocab_to_multiple_of is not None:
        provider.should_pad_vocab = True
        provider.make_vocab_size_divisible_by = cfg.pad_vocab_to_multiple_of
    else:
        provider.should_pad_vocab = False
    provider.transformer_layer_spec = transformer_engine_layer_spec if te else local_layer_spec
    if cfg.fp8 is not None:
        if te:
            for key, value in fp8_settings(cfg, role).items():
                setattr(provider, key, value)
        else:
            log.warning(
                "%s: model.fp8=%r needs TransformerEngine with CUDA, which is not available here; running the local"
                " layer spec in %s instead (install transformer-engine[pytorch] on a GPU machine for FP8)",
                role,
                cfg.fp8,
                cfg.dtype,
            )
    if not torch.cuda.is_available():
        # Fused CUDA kernels do not exist on CPU; these flags select plain PyTorch paths with identical math.
        for flag in (
            "gradient_accumulation_fusion",
            "bias_activation_fusion",
            "bias_dropout_fusion",
            "masked_softmax_fusion",
            "persist_layer_norm",
            "apply_rope_fusion",
            "cross_entropy_loss_fusion",
        ):
            if hasattr(provider, flag):
                setattr(provider, flag, False)
        if getattr(provider, "num_moe_experts", None):
            provider.moe_permute_fusion = False  # TE's fused permutation kernels (the bridge turns them on)
            provider.moe_token_dispatcher_type = "allgather"  # the all-to-all dispatcher creates CUDA streams
    if parallel.vpp is not None and parallel.pp == 2:
        # With two stages both pipeline neighbours are the same rank, and Megatron's batched send/recv of the
        # interleaved schedule pairs activations with gradients the wrong way round (silently wrong numbers,
        # seen over gloo). Unbatched p2p is exact.
        provider.batch_p2p_comm = False
    if cfg.recompute == "selective":
        provider.recompute_granularity = "selective"
    elif cfg.recompute == "full":
        provider.recompute_granularity = "full"
        provider.recompute_method = "uniform"
        provider.recompute_num_layers = 1
    provider.finalize()


def build_model(
    cfg: ModelConfig,
    parallel: ParallelConfig,
    *,
    role: Literal["student", "teacher"] = "student",
    wrap_with_ddp: bool = False,
    ddp_config: Any | None = None,
) -> MegatronLM:
    """Build `cfg` on this rank's share of `parallel` (Megatron's parallel state must already be initialised).

    For an HF source the weights are loaded through Megatron-Bridge's mapping (sharded per TP/PP rank); for a topd
    checkpoint they are loaded with dist_checkpointing (any saved layout loads at any run layout).
    """
    from transformers import AutoConfig

    kind = checkpoint_kind(cfg.path)
    src = Path(cfg.path)
    config_dir = src if kind == "hf" else src / "hf"  # hf_dir(src), without classifying it twice
    hf_config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    check_layout(hf_config, parallel, cfg, role)
    rows = padded_vocab(hf_config.vocab_size, cfg, parallel.tp)
    if kind == "megatron":
        saved_rows = json.loads((src / CHECKPOINT_META).read_text())["padded_vocab_size"]
        if saved_rows != rows:
            raise ValueError(
                f"{src} was saved with {saved_rows} vocabulary rows but this layout gives {rows}; use the"
                " model.pad_vocab_to_multiple_of (and a TP size) that reproduce the saved padding"
            )
    te = use_transformer_engine(cfg)
    if not te and torch.cuda.is_available():
        log.warning("TransformerEngine not available: using Megatron-Core's local layer spec (no FP8)")

    bridge_mod = import_bridge()
    if kind == "hf":
        bridge = bridge_mod.AutoBridge.from_hf_pretrained(str(src))
        provider = bridge.to_megatron_provider(load_weights=True)
    else:
        bridge = bridge_mod.AutoBridge.from_hf_config(hf_config)
        provider = bridge.to_megatron_provider(load_weights=False)
        provider.perform_initialization = False
    _configure_provider(provider, cfg, parallel, te, role)

    # the bridge resets params_dtype to float32 whenever fp16/bf16 are given: float64 passes neither
    half = {} if cfg.dtype == "float64" else {"fp16": provider.fp16, "bf16": provider.bf16}
    with quiet_stdout():  # per-rank parameter counts, weight-loading progress bars
        modules = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=not torch.cuda.is_available(), **half
        )
    if kind == "megatron":
        load_chunk_weights(modules, src)
    if cfg.dtype == "float64":  # torch norms are created in the default dtype: make every tensor float64 (lossless)
        modules = [m.to(torch.float64) for m in modules]
    for m in modules:
        install_positions(m)  # per-token RoPE positions for packed rows (models/positions.py); inert otherwise
    if wrap_with_ddp:
        modules = wrap_ddp(modules, provider, ddp_config)
    lm = MegatronLM(
        modules=modules,
        provider=provider,
        bridge=bridge,
        hf_config=hf_config,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=rows,
        tokenizer_dir=config_dir,
        source=src,
        role=role,
    )
    return lm


def wrap_ddp(modules: list[Any], provider: Any, ddp_config: Any) -> list[Any]:
    """Wrap each chunk in Megatron-Core's DistributedDataParallel (contiguous fp32 grad buffers, optional ZeRO-1
    layout for the distributed optimizer). Only the first chunk uses buckets, as in Megatron's own training loop."""
    from megatron.core.distributed import DistributedDataParallel

    if ddp_config is None:
        raise ValueError("wrap_with_ddp=True needs a ddp_config (see topd_megatron.training.optim.ddp_config)")
    wrapped = [
        DistributedDataParallel(config=provider, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(modules)
    ]
    for m in wrapped:
        m.broadcast_params()  # data-parallel replicas start bit-identical
    return wrapped
