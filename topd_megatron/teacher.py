"""The frozen teacher: built like the student, then put in eval mode with every parameter frozen.

The teacher may differ from the student in size and architecture (and be an MoE), but it must
- share the student's tokenizer (checked, see `topd_megatron.tokenizer`), so per-token distributions compare;
- share the student's TP size (it is built on the same model-parallel groups), so its vocabulary shards line up
  with the student's shard for shard and the loss never gathers the vocabulary;
- have the same true vocabulary and the same padded vocabulary (same shard boundaries).
It is never wrapped in DDP and never handed to an optimizer: it holds no gradient and no optimizer state.
"""

from __future__ import annotations

import torch

from topd_megatron.forward import MicroBatch, forward_logits
from topd_megatron.models.build import MegatronLM, ModelConfig, build_model
from topd_megatron.parallel import ParallelConfig
from topd_megatron.tokenizer import check_same_tokenizer


def build_teacher(cfg: ModelConfig, parallel: ParallelConfig, student: MegatronLM) -> MegatronLM:
    """Build the teacher on the student's parallel layout and freeze it. Raises ValueError on a mismatch."""
    from topd_megatron.models.build import checkpoint_kind

    kind = checkpoint_kind(cfg.path)
    teacher_tok = cfg.path if kind == "hf" else f"{cfg.path}/hf"
    check_same_tokenizer(student.tokenizer_dir, teacher_tok)
    teacher = build_model(cfg, parallel, role="teacher", wrap_with_ddp=False)
    if (teacher.vocab_size, teacher.padded_vocab_size) != (student.vocab_size, student.padded_vocab_size):
        raise ValueError(
            f"teacher vocabulary ({teacher.vocab_size} true / {teacher.padded_vocab_size} padded rows) differs from"
            f" the student's ({student.vocab_size} / {student.padded_vocab_size}): their vocab shards would not line"
            " up. Use checkpoints with the same vocab_size (and the same model.pad_vocab_to_multiple_of)."
        )
    freeze(teacher)
    return teacher


def freeze(lm: MegatronLM) -> None:
    """Eval mode (no dropout) and requires_grad=False on every parameter."""
    for module in lm.modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def teacher_logits(teacher: MegatronLM, microbatches: list[MicroBatch]) -> list[torch.Tensor]:
    """The teacher's vocab-sharded logits [b, s, V_padded / TP] per micro-batch (last pipeline stage only; an
    empty list on other stages)."""
    return forward_logits(teacher.modules, microbatches)
