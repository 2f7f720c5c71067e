"""Model architectures for the planner: shapes from a Hugging Face `config.json` and exact parameter counts.

    arch = Architecture.from_hf_config(json.loads(Path("ckpt/config.json").read_text()))
    arch.params(), arch.active_params()                    # 8_030_261_248 for Llama-3.1-8B (dense: the same)
    arch, source = resolve(ModelConfig(path="checkpoints/Qwen3-4B-Instruct-2507"))   # config.json, else the table

Supported `model_type`s: llama, qwen2, qwen3, qwen3_moe, qwen2_moe (routed experts plus a gated shared expert).

Parameter count, with h hidden size, L layers, V vocabulary, a attention heads, g KV heads, d head dim, f FFN size,
E experts, k experts per token, f_e expert FFN size, f_s shared-expert FFN size:
    embedding            V h                    output layer   V h (0 when tied)           final norm   h
    attention per layer  h a d + 2 h g d + a d h   (Q, K, V, output projections)
                         + (a + 2 g) d QKV bias (Qwen2; Llama/Qwen3 with attention_bias) + h output bias
                         (Llama/Qwen3 with attention_bias) + 2 d Q/K norms (Qwen3) + 2 h RMSNorms
    dense MLP (SwiGLU)   3 h f  (+ 2 f + h with Llama's mlp_bias)
    MoE MLP              h E router + E * 3 h f_e experts + 3 h f_s shared expert + h shared-expert gate
Layers whose MLP is MoE: i in 0..L-1 with (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers (as HF).
Active parameters per token: the same sum with k of the E experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")


@dataclass(frozen=True, slots=True)
class ParamSplit:
    """Parameter counts of one part of the model, by how Megatron-Core shards them over the ranks of a layout."""

    tp: int = 0
    """Split over tensor-parallel ranks: QKV/projection/FC weights, column-parallel biases, embedding rows."""
    replicated: int = 0
    """Held whole by every tensor-parallel rank: norms, row-parallel biases, Q/K norms, the MoE router."""
    expert: int = 0
    """Routed-expert weights: split over expert-parallel ranks (E / EP experts each) and the expert TP (= TP)."""

    @property
    def total(self) -> int:
        return self.tp + self.replicated + self.expert

    def __add__(self, other: ParamSplit) -> ParamSplit:
        return ParamSplit(
            tp=self.tp + other.tp, replicated=self.replicated + other.replicated, expert=self.expert + other.expert
        )

    def __mul__(self, n: int) -> ParamSplit:
        return ParamSplit(tp=self.tp * n, replicated=self.replicated * n, expert=self.expert * n)


@dataclass(frozen=True, slots=True)
class Architecture:
    """The shapes the planner needs, in Hugging Face terms."""

    name: str
    model_type: str
    layers: int
    hidden: int
    ffn: int
    """Dense MLP intermediate size (unused by layers whose MLP is MoE)."""
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    experts_per_token: int = 0
    moe_ffn: int = 0
    """Intermediate size of one routed expert."""
    shared_expert_ffn: int = 0
    """Intermediate size of the shared expert (Qwen2-MoE); 0: none."""
    moe_layers: int = 0
    """Layers whose MLP is MoE."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and self.moe_layers > 0

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    # -- parameters by part ------------------------------------------------------------------------------------------
    def embedding(self, vocab_rows: int | None = None) -> ParamSplit:
        """Input embedding (or the output layer): `vocab_rows` x h, rows split over TP."""
        return ParamSplit(tp=(vocab_rows or self.vocab) * self.hidden)

    def attention(self) -> ParamSplit:
        """One layer's attention block with its input RMSNorm (and the MLP's input RMSNorm: both norms are here)."""
        h, a, g, d = self.hidden, self.heads, self.kv_heads, self.head_dim
        tp = h * a * d + 2 * h * g * d + a * d * h + ((a + 2 * g) * d if self.qkv_bias else 0)
        replicated = 2 * h + (h if self.out_bias else 0) + (2 * d if self.qk_norm else 0)
        return ParamSplit(tp=tp, replicated=replicated)

    def dense_mlp(self) -> ParamSplit:
        h, f = self.hidden, self.ffn
        return ParamSplit(tp=3 * h * f + (2 * f if self.mlp_bias else 0), replicated=h if self.mlp_bias else 0)

    def moe_mlp(self, experts: int | None = None) -> ParamSplit:
        """One MoE MLP with `experts` routed experts counted (all of them by default; k for the active count)."""
        h = self.hidden
        n = self.num_experts if experts is None else experts
        shared = 3 * h * self.shared_expert_ffn
        gate = h if self.shared_expert_ffn else 0
        return ParamSplit(tp=shared, replicated=h * self.num_experts + gate, expert=n * 3 * h * self.moe_ffn)

    def layer(self, moe: bool) -> ParamSplit:
        return self.attention() + (self.moe_mlp() if moe else self.dense_mlp())

    # -- totals ------------------------------------------------------------------------------------------------------
    def params(self) -> int:
        """Total parameters, as `sum(p.numel() for p in model.parameters())` of the HF model."""
        return self._count(self.num_experts)

    def active_params(self) -> int:
        """Parameters used per token (k of the E routed experts in every MoE layer)."""
        return self._count(self.experts_per_token)

    def matmul_params(self) -> int:
        """Active parameters that cost 2 FLOPs per token in a forward pass: the active count without the input
        embedding (a lookup), the output layer counted once even when tied."""
        return self.active_params() - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def _count(self, experts: int) -> int:
        h = self.hidden
        embed = self.vocab * h * (1 if self.tied_embeddings else 2)
        per_moe = (self.attention() + self.moe_mlp(experts)).total if self.moe_layers else 0
        return embed + h + self.dense_layers * self.layer(moe=False).total + self.moe_layers * per_moe

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV-cache bytes per token on one GPU of a server with tensor parallelism `tp`:
        2 (K and V) * layers * ceil(kv_heads / tp) * head_dim * dtype bytes (KV heads are replicated when tp >
        kv_heads)."""
        return 2 * self.layers * -(-self.kv_heads // tp) * self.head_dim * dtype_bytes

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> Architecture:
        """From a Hugging Face `config.json` (as a dict). Raises ValueError for an unsupported `model_type`."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ValueError(f"{name or 'model'}: model_type {mt!r} is not supported by the planner ({supported})")
        layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
        moe = mt in ("qwen3_moe", "qwen2_moe")
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if moe else 0
        step = int(cfg.get("decoder_sparse_step") or 1)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if experts and (i + 1) % step == 0 and i not in mlp_only)
        attention_bias = bool(cfg.get("attention_bias", False))
        qwen2_like = mt in ("qwen2", "qwen2_moe")
        return cls(
            name=name or cfg.get("_name_or_path", "") or mt,
            model_type=mt,
            layers=layers,
            hidden=hidden,
            ffn=int(cfg.get("intermediate_size") or 0),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("qkv_bias", True)) if qwen2_like else attention_bias,
            out_bias=False if qwen2_like else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            num_experts=experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if moe else 0,
            moe_ffn=int(cfg.get("moe_intermediate_size") or 0) if moe else 0,
            shared_expert_ffn=int(cfg.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0,
            moe_layers=moe_layers,
        )


# Public config.json values of the recipe models (the fields the planner reads), used when a checkpoint directory is
# not present on the planning machine. A real config.json at the model path always wins.
_LLAMA3_VOCAB = 128256
PUBLIC_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen3-4B-Instruct-2507": {
        "model_type": "qwen3",
        "num_hidden_layers": 36,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "Qwen3-30B-A3B-Instruct-2507": {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 48,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "Llama-3.1-8B-Instruct": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "Llama-3.3-70B-Instruct": {
        "model_type": "llama",
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "Llama-3.1-405B-Instruct": {
        "model_type": "llama",
        "num_hidden_layers": 126,
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "vocab_size": _LLAMA3_VOCAB,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
}


def config_json_path(model_path: str | Path) -> Path | None:
    """The config.json of a Hugging Face directory or of a topd checkpoint (its hf/ copy), if present."""
    p = Path(model_path)
    for candidate in (p / "config.json", p / "hf" / "config.json"):
        if candidate.is_file():
            return candidate
    return None


def resolve(model_path: str | Path) -> tuple[Architecture, str]:
    """(architecture, where it came from) for a model path: its config.json when present, else the public config
    of the model named by the path's basename. Raises ValueError when neither exists."""
    found = config_json_path(model_path)
    name = Path(model_path).name
    if found is not None:
        return Architecture.from_hf_config(json.loads(found.read_text()), name=name), str(found)
    by_lower = {k.lower(): k for k in PUBLIC_CONFIGS}
    key = by_lower.get(name.lower())
    if key is None:
        raise ValueError(
            f"no config.json at {model_path} and {name!r} is not a model the planner knows"
            f" ({', '.join(PUBLIC_CONFIGS)}); download the checkpoint (config.json is enough) or name the directory"
            " after the model"
        )
    return Architecture.from_hf_config(PUBLIC_CONFIGS[key], name=key), f"public config of {key} ({model_path} absent)"
