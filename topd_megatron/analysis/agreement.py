"""Student/teacher agreement, position by position, on tensor-parallel gloo (or NCCL) ranks.

The smallest real piece of TOPD: both models score the same (prompt, response) sequences, logits stay sharded over
the vocabulary, and for every response position we report whether the two models' top-1 tokens agree, the reverse
KL(student || teacher) computed on the shards (`topd_megatron.algorithm.loss.token_divergence`), and both models'
log-probabilities of the actual token. High-divergence positions are exactly TOPD's candidates.

    topd agree --tp 2                 # tiny embedded pair, 2 gloo ranks
    torchrun --nproc-per-node 8 -m topd_megatron.cli agree --student S --teacher T --tp 8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from topd_megatron.algorithm.loss import token_divergence, token_logprobs
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.models.tokenizer import encode_example
from topd_megatron.rollout.sampling import vocab_parallel_argmax
from topd_megatron.training.forward import forward_logits, make_microbatch
from topd_megatron.training.session import rank_session
from topd_megatron.training.teacher import teacher_logits

DEFAULT_EXAMPLES = (
    ("Compute 12 + 7.", "We add 12 and 7 to get 19. The answer is \\boxed{19}."),
    ("What is 6 times 9?", "6 * 9 = 54, so the answer is 54."),
    ("Compute 31 + 25.", "We add 31 and 25 to get 56. The answer is \\boxed{56}."),
    ("What is 13 times 3?", "13 * 3 = 39, so the answer is 39."),
)


@dataclass(kw_only=True, slots=True)
class AgreementConfig:
    """Which models to compare, on which layout and which sequences."""

    student: ModelConfig
    teacher: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    examples: tuple[tuple[str, str], ...] = DEFAULT_EXAMPLES
    """(user prompt, assistant response) pairs, rendered with the student's chat template."""


def encode_examples(tokenizer: Any, examples: tuple[tuple[str, str], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [n, s] and a response mask [n, s] (1 on response tokens, incl. the final EOS)."""
    rows, masks = [], []
    for prompt, response in examples:
        ids, n_prompt = encode_example(tokenizer, prompt, response)
        rows.append(ids)
        masks.append([0] * n_prompt + [1] * (len(ids) - n_prompt))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
    return tokens, mask


def run(rank: int, world: int, cfg: AgreementConfig) -> dict[str, Any] | None:
    """Rank body: build both models on `cfg.parallel`, score the examples, return the report on the reporting rank
    (TP rank 0 of the last pipeline stage, DP rank 0) and None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with rank_session(cfg.parallel, cfg.student, teacher=cfg.teacher) as session:
        student, tokenizer = session.student, session.tokenizer
        for m in student.modules:
            m.eval()
        tokens, mask = encode_examples(tokenizer, cfg.examples)
        microbatches = [make_microbatch(tokens, mask)]
        s_logits = forward_logits(student.modules, microbatches)
        t_logits = teacher_logits(session.teacher, microbatches)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    b, s, v_local = s_logits[0].shape
    # Position t predicts token t+1: align logits[:, :-1] with tokens[:, 1:].
    s_pred = s_logits[0][:, :-1].reshape(-1, v_local)
    t_pred = t_logits[0][:, :-1].reshape(-1, v_local)
    next_tokens = tokens[:, 1:].reshape(-1)
    kl = token_divergence(s_pred, t_pred, "reverse_kl", vocab_size=student.vocab_size, group=group)
    s_lp = token_logprobs(s_pred, next_tokens, vocab_size=student.vocab_size, group=group)
    t_lp = token_logprobs(t_pred, next_tokens, vocab_size=student.vocab_size, group=group)
    s_top = vocab_parallel_argmax(s_pred, group, vocab_size=student.vocab_size)
    t_top = vocab_parallel_argmax(t_pred, group, vocab_size=student.vocab_size)
    if parallel_state.get_tensor_model_parallel_rank() != 0 or parallel_state.get_data_parallel_rank() != 0:
        return None
    resp = mask[:, 1:].reshape(-1) > 0
    agree = (s_top == t_top).float()
    positions = []
    for i in range(b):
        for j in range(s - 1):
            k = i * (s - 1) + j
            if resp[k]:
                positions.append(
                    {
                        "example": i,
                        "position": j + 1,
                        "token": tokenizer.decode([int(next_tokens[k])]),
                        "student_top": tokenizer.decode([int(s_top[k])]),
                        "teacher_top": tokenizer.decode([int(t_top[k])]),
                        "agree": bool(agree[k]),
                        "reverse_kl": float(kl[k]),
                        "student_logprob": float(s_lp[k]),
                        "teacher_logprob": float(t_lp[k]),
                    }
                )
    return {
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "world": dist.get_world_size()},
        "vocab_size": student.vocab_size,
        "padded_vocab_size": student.padded_vocab_size,
        "response_tokens": int(resp.sum()),
        "top1_agreement": float(agree[resp].mean()),
        "mean_reverse_kl": float(kl[resp].mean()),
        "positions": positions,
    }
