"""The frozen teacher: built like the student, then put in eval mode with every parameter frozen.

The teacher may differ from the student in size and architecture (and be an MoE), but it must
- share the student's tokenizer (checked, see `topd_megatron.models.tokenizer`), so per-token distributions compare;
- share the student's TP size (it is built on the same model-parallel groups), so its vocabulary shards line up
  with the student's shard for shard and the loss never gathers the vocabulary;
- have the same true vocabulary and the same padded vocabulary (same shard boundaries).
It is never wrapped in DDP and never handed to an optimizer: it holds no gradient and no optimizer state.

A teacher that cannot be colocated is served by SGLang instead (`teacher_source='sglang'`): no Megatron teacher is
built, and `served_rollout_scores` / `served_branch_scores` ask its server for the log-probs (and top-k) the loss
needs, laid out on the step's positions (`objective.ServedTeacher`); `generated_window_scores` lays out the same
report from the teacher's own windows, which its server returns with the decode's top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from topd_megatron.algorithm.batch import StepBatch, prefixes
from topd_megatron.algorithm.objective import ServedTeacher
from topd_megatron.algorithm.types import Windows
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import MegatronLM, ModelConfig, build_model
from topd_megatron.models.format import hf_dir
from topd_megatron.models.tokenizer import check_same_tokenizer
from topd_megatron.rollout.engine import AsyncTeacherScorer, Generation, TokenScores
from topd_megatron.training.forward import MicroBatch, forward_logits


def build_teacher(cfg: ModelConfig, parallel: ParallelConfig, student: MegatronLM) -> MegatronLM:
    """Build the teacher on the student's parallel layout and freeze it. Raises ValueError on a mismatch."""
    teacher_hf_dir(cfg, student)
    teacher = build_model(cfg, parallel, role="teacher", wrap_with_ddp=False)
    if (teacher.vocab_size, teacher.padded_vocab_size) != (student.vocab_size, student.padded_vocab_size):
        raise ValueError(
            f"teacher vocabulary ({teacher.vocab_size} true / {teacher.padded_vocab_size} padded rows) differs from"
            f" the student's ({student.vocab_size} / {student.padded_vocab_size}): their vocab shards would not line"
            " up. Use checkpoints with the same vocab_size (and the same model.pad_vocab_to_multiple_of)."
        )
    freeze(teacher)
    return teacher


def teacher_hf_dir(cfg: ModelConfig, student: MegatronLM) -> str:
    """The teacher's HF directory (teacher.path, or a topd checkpoint's hf/: what a served teacher is launched from),
    after checking its tokenizer is the student's. Nothing is built."""
    config_dir = str(hf_dir(cfg.path))
    check_same_tokenizer(student.tokenizer_dir, config_dir)
    return config_dir


def freeze(lm: MegatronLM) -> None:
    """Eval mode (no dropout) and requires_grad=False on every parameter."""
    for module in lm.modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def teacher_logits(teacher: MegatronLM, microbatches: list[MicroBatch], reduce: Any = None) -> list[Any]:
    """The teacher's vocab-sharded logits [b, s, V_padded / TP] per micro-batch (last pipeline stage only; an
    empty list on other stages), or `reduce(mb, logits)` of each (see `training.forward.forward_logits`)."""
    return forward_logits(teacher.modules, microbatches, reduce)


def _served_report(scores: list[Any], n: int, top_k: int, places: list[list[int]]) -> ServedTeacher:
    """Scatter per-sequence TokenScores into a ServedTeacher over `n` positions (`places[j]`: where sequence j's
    scored tokens go). Unscored positions hold 0 log-probs and id 0 (the loss gives them weight 0)."""
    lp = torch.zeros(n, dtype=torch.float32)
    ids = torch.zeros(n, max(top_k, 1), dtype=torch.long) if top_k else None
    top = torch.zeros(n, top_k, dtype=torch.float32) if top_k else None
    for sc, where in zip(scores, places, strict=True):
        idx = torch.tensor(where, dtype=torch.long)
        lp[idx] = torch.tensor(sc.logprobs, dtype=torch.float32)
        if top_k:
            ids[idx] = torch.tensor(sc.top_ids, dtype=torch.long)
            top[idx] = torch.tensor(sc.top_logprobs, dtype=torch.float32)
    return ServedTeacher(token_logprobs=lp, top_ids=ids, top_logprobs=top)


def served_rollout_scores(engine: Any, step: StepBatch, top_k: int) -> ServedTeacher:
    """The served teacher's report on every position of `step.token_batch()` (collective over the model-parallel
    group, like the engine's calls): one teacher-forced request per rollout scores its response tokens; position
    p = row * (S - 1) + (i - 1) receives the score of token i of that row."""
    return start_served_rollout_scores(engine, step, top_k, background=False)()


def start_served_rollout_scores(
    engine: Any, step: StepBatch, top_k: int, *, background: bool = True
) -> Callable[[], ServedTeacher]:
    """`served_rollout_scores`, begun now on an AsyncTeacherScorer's server (no collective until the returned
    function is called: it waits for the report, collectively); with `background=False`, or an engine that cannot
    begin early, the requests go out when it is called."""
    s1 = step.targets_per_row
    seqs, starts, places = [], [], []
    for row in range(step.num_rollouts):
        resp = step.response_mask[row].nonzero().flatten()
        if resp.numel() == 0:
            continue
        first, last = int(resp[0]), int(resp[-1])
        seqs.append(step.tokens[row, : last + 1].tolist())
        starts.append(first)
        places.append([row * s1 + i - 1 for i in range(first, last + 1)])
    n = step.tokens.shape[0] * s1
    if seqs and background and isinstance(engine, AsyncTeacherScorer):
        pending = engine.score_async(seqs, starts, top_k=top_k)
        return lambda: _served_report(pending.result(), n, top_k, places)
    return lambda: _served_report(engine.score(seqs, starts, top_k=top_k) if seqs else [], n, top_k, places)


def served_branch_scores(engine: Any, step: StepBatch, positions: torch.Tensor, windows: Windows, top_k: int) -> Any:
    """The served teacher's report on the window tokens of the branch sequences (x, y_<t, u_1..u_K') of `positions`,
    packed window after window ([sum(windows.lengths)] rows: the order `objective.branch_terms` expects)."""
    seqs, starts, places, offset = [], [], [], 0
    for pre, w, n in zip(prefixes(step, positions), windows.tokens, windows.lengths, strict=True):
        n = int(n)
        if n:
            seqs.append(pre + w[:n].tolist())
            starts.append(len(pre))
            places.append(list(range(offset, offset + n)))
        offset += n
    scores = engine.score(seqs, starts, top_k=top_k) if seqs else []
    return _served_report(scores, offset, top_k, places)


def generated_window_scores(generations: list[Generation], k: int, top_k: int) -> ServedTeacher:
    """The teacher's report on its own windows, packed window after window (the first `k` tokens of each generation,
    `batch.windows_from_generations`' lengths): the log-prob of each window token and, with top_k > 0, the top-k ids
    and log-probs at each window position, as the decode that sampled the window computed them (temperature 1). The
    same quantities as `served_branch_scores` on these windows, without a second prefill of the branches."""
    places, scores, offset = [], [], 0
    for i, g in enumerate(generations):
        n = len(g.output_ids[:k])
        if top_k and (g.output_top_ids is None or g.output_top_logprobs is None or len(g.output_top_ids) < n):
            raise ValueError(f"window {i} was generated without its top-{top_k} log-probs (ask the engine for top_k)")
        tops = (g.output_top_ids[:n], g.output_top_logprobs[:n]) if top_k else (None, None)  # type: ignore[index]
        scores.append(TokenScores(logprobs=g.output_logprobs[:n], top_ids=tops[0], top_logprobs=tops[1]))
        places.append(list(range(offset, offset + n)))
        offset += n
    return _served_report(scores, offset, top_k, places)
