"""Tiny random Hugging Face checkpoints (Qwen2, Qwen3, Llama, Qwen3-MoE) and a tiny byte-level BPE tokenizer.

Tests and the embedded default build their models here, locally (no model hub): a real `config.json` +
`model.safetensors` + tokenizer files, exactly what a user's checkpoint directory holds, so the same code path
(Megatron-Bridge provider, weight mapping) is exercised at every size.

    make_tiny_checkpoint(out_dir, TinyModelSpec(family="qwen3", hidden_size=64, num_layers=2), tokenizer_dir)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from topd_megatron.choices import check_choices

Family = Literal["qwen2", "qwen3", "llama", "qwen3_moe"]
FAMILIES: tuple[str, ...] = get_args(Family)


@dataclass(kw_only=True, slots=True)
class TinyModelSpec:
    """Architecture of a tiny random checkpoint. Defaults give a ~100k-parameter model with a 512-token vocabulary."""

    family: Family = "qwen3"
    """One of qwen2 (QKV bias), qwen3 (QK-norm), llama, qwen3_moe (QK-norm, routed experts)."""
    vocab_size: int | None = None
    """Embedding rows; None uses the tokenizer's length rounded up to a multiple of 64 (HF-style padding)."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    """None means hidden_size // num_heads."""
    intermediate_size: int = 128
    num_experts: int = 4
    """qwen3_moe only."""
    experts_per_token: int = 2
    """qwen3_moe only."""
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    seed: int = 0
    """Seed of the random initialisation; the same spec and seed give bit-identical weights."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_choices(self, "tiny model")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")


def hf_config_for(spec: TinyModelSpec, vocab_size: int, bos_id: int | None, eos_id: int | None):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.init_std,
        rope_theta=spec.rope_theta,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        torch_dtype="float32",
    )
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    if spec.family == "qwen2":
        return Qwen2Config(**common)
    if spec.family == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim)
    if spec.family == "llama":
        return LlamaConfig(**common, head_dim=head_dim)
    return Qwen3MoeConfig(
        **common,
        head_dim=head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        moe_intermediate_size=spec.intermediate_size,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


def make_tiny_checkpoint(out_dir: str | Path, spec: TinyModelSpec, tokenizer_dir: str | Path) -> Path:
    """Write a random HF checkpoint for `spec` with the tokenizer files of `tokenizer_dir` into `out_dir`.

    Weights are drawn from a generator seeded by `spec.seed` (independent of the global RNG). Returns `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab_size = spec.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = hf_config_for(spec, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # HF zero-initialises norms to ones and biases to zeros; randomise them too so a mapping that drops or
        # swaps a bias or a norm weight shows up as a logits mismatch.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.data.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.data.normal_(0.0, spec.init_std)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


# --- tiny tokenizer -----------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def make_tiny_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer (the scheme Qwen and Llama 3 use) on `corpus` and save it HF-style.

    Deterministic for a given corpus and vocab size. Specials: <|endoftext|> (pad/bos), <|im_start|>, <|im_end|>
    (eos, the end of an assistant turn), with a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    return _save_tokenizer(fast, CHAT_TEMPLATE, out_dir)


# --- the embedded default pair ------------------------------------------------------------------------------------


def default_corpus() -> list[str]:
    """Short math sentences covering a tiny BPE tokenizer's merges (tests build their tokenizer from it)."""
    lines = []
    for a in range(40):
        for b in range(0, 40, 3):
            lines.append(f"Compute {a} + {b}. We add {a} and {b} to get {a + b}. The answer is \\boxed{{{a + b}}}.")
            lines.append(f"What is {a} times {b}? {a} * {b} = {a * b}, so the answer is {a * b}.")
    return lines


def cache_root() -> Path:
    """Where derived artefacts (tiny checkpoints, prepared models) are cached: $TOPD_CACHE_DIR or ~/.cache."""
    return Path(os.environ.get("TOPD_CACHE_DIR", Path.home() / ".cache" / "topd-megatron"))


WORD_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def make_word_tokenizer(out_dir: str | Path, corpus: list[str]) -> Path:
    """A word-level tokenizer (split on whitespace) over the words of `corpus`, saved HF-style.

    For synthetic tasks whose text is whitespace-separated words: every number and word is one token, which keeps
    sequences short for tiny models. Same specials and ChatML-style template as `make_tiny_tokenizer`, plus <unk>.
    Ids are deterministic: specials first, then the words in sorted order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in corpus for w in line.split()} | {"user", "assistant", "system"})
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    return _save_tokenizer(fast, WORD_CHAT_TEMPLATE, out_dir)


def _save_tokenizer(fast: Any, chat_template: str, out_dir: str | Path) -> Path:
    """Attach the chat template and write the tokenizer files to `out_dir` (replacing what was there)."""
    fast.chat_template = chat_template
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    fast.save_pretrained(str(out))
    return out
