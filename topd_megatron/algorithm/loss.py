"""Vocab-parallel per-token quantities: exact divergences, token log-probs and entropies on vocabulary shards.

Stage 5 of the data flow (see docs/topd.md, "Per-token divergences"). Student and teacher logits arrive as this
rank's vocabulary shard `[T, V_local]` of Megatron's `parallel_output=True` layout: rank r of the tensor-parallel
`group` holds global vocabulary ids `[r * V_local, (r + 1) * V_local)` (Megatron's VocabUtility split: equal shards,
the padded tail in the last shard or shards). Ids at or past the true `vocab_size` are padding and are dropped
before any softmax is formed; a shard may be padding only. No rank ever gathers the vocabulary: per token, the max
is all-reduced (MAX), then the partition functions and the partial sums of each quantity are all-reduced (SUM), and
JSD adds one more SUM for the two KL terms to its mixture.

Memory: tokens are processed `chunk_size` at a time; each chunk is upcast to fp32 (fp64 stays fp64) and freed
before the next, so the working set is a few `[chunk_size, V_local]` fp32 buffers whatever T is. Backward is written
by hand and recomputes each chunk from the saved inputs and per-token statistics (max and log-partition of each
distribution, plus the value where the gradient needs it); it needs no communication and never stores `[T, V]`
intermediates. The only `[T, V_local]` tensor it creates is the gradient itself (in the student's dtype).

The teacher is frozen: `teacher_logits` is treated as detached (no gradient is returned to it, whatever its
`requires_grad`). Results are per token, in fp32 (fp64 for fp64 inputs), and identical on every rank of the group.

Formulas (p = softmax(student), q = softmax(teacher), over the true vocabulary):
    reverse_kl  sum_v p (log p - log q)        grad_s = p * (log p - log q - KL)
    forward_kl  sum_v q (log q - log p)        grad_s = p - q
    jsd(beta)   beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
                                               grad_s = beta * p * (log p - log m - KL(p||m))
    log_ratio   log p(y) - log q(y)            grad_s = onehot(y) - p
    logprob     log p(y)                       grad_s = onehot(y) - p
    entropy     -sum_v p log p                 grad_s = -p * (log p + H)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

DivergenceKind = Literal["reverse_kl", "forward_kl", "jsd", "log_ratio"]
DIVERGENCE_KINDS: tuple[str, ...] = ("reverse_kl", "forward_kl", "jsd", "log_ratio")

_CHUNK_ELEMENTS_CPU = 1 << 20
"""Default chunk budget on CPU, in logits per chunk: one fp32 buffer (4 MiB) stays cache-resident."""
_CHUNK_ELEMENTS_CPU_GROUP = 1 << 22
"""On CPU with a group: larger chunks (16 MiB buffers), since every chunk costs two gloo round trips."""
_CHUNK_ELEMENTS_GPU = 1 << 24
"""Default chunk budget on GPU: one fp32 buffer is 64 MiB; a chunk's working set is a few of them."""


def default_chunk_size(v_local: int, device: torch.device | str = "cpu", world: int = 1) -> int:
    """Tokens per chunk so that one `[chunk, V_local]` fp32 buffer stays within the device's budget."""
    if torch.device(device).type == "cuda":
        budget = _CHUNK_ELEMENTS_GPU
    else:
        budget = _CHUNK_ELEMENTS_CPU if world == 1 else _CHUNK_ELEMENTS_CPU_GROUP
    return max(1, budget // max(1, v_local))


def _group_rank_world(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: ProcessGroup | None, world: int) -> None:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Shard:
    """Where this rank's shard sits in the global vocabulary."""

    __slots__ = ("rank", "world", "v_local", "start", "n_valid", "vocab_size")

    def __init__(self, v_local: int, vocab_size: int, rank: int, world: int) -> None:
        self.rank, self.world, self.v_local, self.vocab_size = rank, world, v_local, vocab_size
        self.start = rank * v_local
        # Columns of this shard that hold real vocabulary entries; the rest is Megatron's padding.
        self.n_valid = min(max(vocab_size - self.start, 0), v_local)


def _check_group_shapes(fn: str, logits: Tensor, vocab_size: int, chunk: int, group, world: int) -> None:
    """One tiny all-reduce so that ranks with different T, V_local or settings fail clearly instead of hanging."""
    if world == 1:
        return
    vals = torch.tensor([logits.shape[0], logits.shape[1], vocab_size, chunk], dtype=torch.int64, device=logits.device)
    both = torch.cat([vals, -vals])
    # MAX of (x, -x) over the group gives (max, -min): equal everywhere iff every rank passed the same value.
    _all_reduce(both, dist.ReduceOp.MAX, group, world)
    hi, lo = both[:4], -both[4:]
    if not torch.equal(hi, lo):
        names = ("T (tokens)", "V_local (shard width)", "vocab_size", "chunk_size")
        bad = [f"{n}: min {int(a)} max {int(b)}" for n, a, b in zip(names, lo, hi, strict=True) if a != b]
        raise ValueError(
            f"{fn}: ranks of the group disagree on " + "; ".join(bad) + " (every rank must pass equal"
            " shards [T, V_local] of the same tokens)"
        )


def _validate(
    fn: str,
    student: Tensor,
    teacher: Tensor | None,
    tokens: Tensor | None,
    vocab_size: int | None,
    group: ProcessGroup | None,
    chunk_size: int | None,
) -> tuple[_Shard, int]:
    if student.dim() != 2:
        raise ValueError(f"{fn}: expected logits of shape [T, V_local], got {tuple(student.shape)}")
    if not student.is_floating_point():
        raise TypeError(f"{fn}: logits must be floating point, got {student.dtype}")
    if teacher is not None:
        if teacher.shape != student.shape:
            raise ValueError(
                f"{fn}: mismatched student/teacher shard shapes: student {tuple(student.shape)} vs teacher"
                f" {tuple(teacher.shape)} (both must be this rank's [T, V_local] vocabulary shard)"
            )
        if not teacher.is_floating_point():
            raise TypeError(f"{fn}: teacher logits must be floating point, got {teacher.dtype}")
        if teacher.device != student.device:
            raise ValueError(f"{fn}: student logits on {student.device} but teacher logits on {teacher.device}")
    rank, world = _group_rank_world(group)
    t_len, v_local = student.shape
    total = v_local * world
    if vocab_size is None:
        vocab_size = total
    if vocab_size < 1 or vocab_size > total:
        raise ValueError(
            f"{fn}: vocab_size={vocab_size} is larger than the group's total vocabulary {total} = {world} ranks x"
            f" {v_local} (or < 1); vocab_size must be the true vocabulary, at most the padded one"
        )
    chunk = default_chunk_size(v_local, student.device, world) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    if tokens is not None:
        if tokens.shape != (t_len,):
            raise ValueError(f"{fn}: tokens must have shape [T] = [{t_len}], got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{fn}: tokens must be int64 or int32 global vocabulary ids, got {tokens.dtype}")
        if t_len and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise ValueError(
                f"{fn}: tokens must be global ids in [0, vocab_size={vocab_size}), got range"
                f" [{int(tokens.min())}, {int(tokens.max())}]"
            )
    _check_group_shapes(fn, student, vocab_size, chunk, group, world)
    return _Shard(v_local, vocab_size, rank, world), chunk


def _nonfinite_error(fn: str, which: str, bad_rows: Tensor, logits: Tensor, sh: _Shard) -> ValueError:
    rows = bad_rows.nonzero().flatten().tolist()
    where = f"token position {rows[0]}"
    if len(rows) > 1:
        where += f" (and {len(rows) - 1} more: {rows[1:9]}{' ...' if len(rows) > 9 else ''})"
    col = ""
    row = logits[rows[0], : sh.n_valid]
    if not torch.isfinite(row).all():  # only the rank that holds the entry knows its vocabulary id
        v = int((~torch.isfinite(row)).nonzero()[0]) + sh.start
        col = f", vocabulary id {v} (seen on group rank {sh.rank})"
    return ValueError(f"{fn}: {which} contain NaN or Inf at {where}{col}")


class _VocabParallelStat(torch.autograd.Function):
    """Per-token statistic of one or two vocab-sharded distributions; see the module docstring for the formulas.

    op: "reverse_kl" | "forward_kl" | "jsd" | "log_ratio" | "logprob" | "entropy".
    Saved for backward: the inputs (already alive in the caller's graph) and `stats` [5, T] = (student max, student
    log-partition, teacher max, teacher log-partition, aux) where aux is KL(p||q), KL(p||m) or H as the op needs.
    """

    @staticmethod
    def forward(ctx, student, teacher, tokens, op, beta, sh, group, chunk, fn):
        t_len = student.shape[0]
        acc = _acc_dtype(student.dtype)
        out = torch.empty(t_len, dtype=acc, device=student.device)
        stats = torch.zeros(5, t_len, dtype=acc, device=student.device)
        bad = torch.zeros(2, t_len, dtype=acc, device=student.device)
        for c0 in range(0, t_len, chunk):
            c1 = min(t_len, c0 + chunk)
            _forward_chunk(student, teacher, tokens, op, beta, sh, group, c0, c1, out, stats, bad)
        # every rank holds the same all-reduced flags, so every rank raises the same error (no rank is left waiting
        # in a collective); checked once per call, so the device is synchronised once, not once per chunk
        if t_len and bool(bad.any()):
            which = 0 if bool(bad[0].any()) else 1
            raise _nonfinite_error(
                fn, ("student logits", "teacher logits")[which], bad[which] > 0, (student, teacher)[which], sh
            )
        ctx.save_for_backward(student, teacher, tokens, stats)
        ctx.op, ctx.beta, ctx.sh, ctx.chunk = op, beta, sh, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        student, teacher, tokens, stats = ctx.saved_tensors
        sh: _Shard = ctx.sh
        t_len = student.shape[0]
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        if sh.n_valid < sh.v_local:
            grad[:, sh.n_valid :].zero_()  # padded vocabulary entries take no part in the softmax
        grad_out = grad_out.to(stats.dtype)
        for c0 in range(0, t_len, ctx.chunk):
            c1 = min(t_len, c0 + ctx.chunk)
            if sh.n_valid:
                g = _backward_chunk(student, teacher, tokens, ctx.op, ctx.beta, sh, c0, c1, stats, grad_out[c0:c1])
                grad[c0:c1, : sh.n_valid].copy_(g)
        return grad, None, None, None, None, None, None, None, None


def _load(x: Tensor, c0: int, c1: int, n_valid: int, acc: torch.dtype) -> Tensor:
    """A private, writable copy of rows [c0, c1) and the real-vocabulary columns, in the accumulation dtype."""
    return x[c0:c1, :n_valid].to(dtype=acc, copy=True)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[t, v] * b[t, v] without materialising the product (a batched matrix product)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _gather_local(x: Tensor, tokens: Tensor, sh: _Shard) -> Tensor:
    """x[t, tokens[t] - start] where this shard owns tokens[t], else 0 (so that a SUM over the group gathers it)."""
    local = tokens.to(torch.int64) - sh.start
    owned = (local >= 0) & (local < sh.n_valid)
    if sh.n_valid == 0:
        return torch.zeros(tokens.shape[0], dtype=x.dtype, device=x.device)
    vals = x.gather(1, local.clamp(0, sh.n_valid - 1).unsqueeze(1)).squeeze(1)
    return torch.where(owned, vals, torch.zeros_like(vals))


def _partial_sums(op: str, s: Tensor, t: Tensor | None, tokens: Tensor | None, sh: _Shard, n: int) -> Tensor:
    """[4, n] this shard's partial sums of a chunk, from the max-shifted logits `s`, `t` ([n, V_local], modified in
    place): row 0 sum_v e^{ls}; row 1 sum_v e^{lt}; rows 2-3 the op's terms (module docstring)."""
    sums = torch.zeros(4, n, dtype=s.dtype, device=s.device)
    if not sh.n_valid:
        return sums
    es = s.exp()
    sums[0] = es.sum(dim=1)
    if op == "reverse_kl":
        sums[1] = torch.exp(t).sum(dim=1)
        sums[2] = _rowdot(es, t.neg_().add_(s))  # sum_v e^{ls} (ls - lt)
    elif op == "forward_kl":
        et = t.exp()
        sums[1] = et.sum(dim=1)
        sums[2] = _rowdot(et, s.neg_().add_(t))  # sum_v e^{lt} (lt - ls)
    elif op == "jsd":
        sums[1] = torch.exp(t).sum(dim=1)
    elif op == "log_ratio":
        sums[1] = torch.exp(t).sum(dim=1)
        sums[2] = _gather_local(s, tokens, sh)
        sums[3] = _gather_local(t, tokens, sh)
    elif op == "logprob":
        sums[2] = _gather_local(s, tokens, sh)
    elif op == "entropy":
        sums[2] = _rowdot(es, s)  # sum_v e^{ls} ls
    return sums


def _forward_chunk(student, teacher, tokens, op, beta, sh: _Shard, group, c0, c1, out, stats, bad) -> None:
    acc = stats.dtype
    n, nv = c1 - c0, sh.n_valid
    dev = student.device
    s = _load(student, c0, c1, nv, acc)
    t = _load(teacher, c0, c1, nv, acc) if teacher is not None else None

    # (1) max + non-finite flags. A row sum is finite iff every entry is (finite logits summing past 3e38 are
    # not logits): one reduction instead of an elementwise mask.
    red = torch.full((4, n), -math.inf, dtype=acc, device=dev)
    red[2:] = 0.0
    if nv:
        red[0] = s.amax(dim=1)
        red[2] = (~torch.isfinite(s.sum(dim=1))).to(acc)
        if t is not None:
            red[1] = t.amax(dim=1)
            red[3] = (~torch.isfinite(t.sum(dim=1))).to(acc)
    # all-reduce #1 (MAX): global max of each distribution per token, and "some rank saw NaN/Inf" flags.
    _all_reduce(red, dist.ReduceOp.MAX, group, sh.world)
    bad[:, c0:c1] = red[2:]
    ms, mt = red[0], red[1]
    stats[0, c0:c1] = ms
    s.sub_(ms.unsqueeze(1))  # s is now shifted: ls = s - max_s (<= 0)
    if t is not None:
        stats[2, c0:c1] = mt
        t.sub_(mt.unsqueeze(1))  # lt = t - max_t

    # (2) partition functions and the op's partial sums on this shard.
    sums = _partial_sums(op, s, t, tokens[c0:c1] if tokens is not None else None, sh, n)
    # all-reduce #2 (SUM): partition functions, partial sums and the target logit (owned by exactly one rank).
    _all_reduce(sums, dist.ReduceOp.SUM, group, sh.world)
    lzs = sums[0].log()
    stats[1, c0:c1] = lzs
    if op in ("reverse_kl", "forward_kl", "jsd", "log_ratio"):
        lzt = sums[1].log()
        stats[3, c0:c1] = lzt
    if op == "reverse_kl":
        kl = sums[2] / sums[0] - lzs + lzt
        out[c0:c1] = kl
        stats[4, c0:c1] = kl
    elif op == "forward_kl":
        out[c0:c1] = sums[2] / sums[1] - lzt + lzs
    elif op == "log_ratio":
        out[c0:c1] = (sums[2] - lzs) - (sums[3] - lzt)
    elif op == "logprob":
        out[c0:c1] = sums[2] - lzs
    elif op == "entropy":
        h = lzs - sums[2] / sums[0]
        out[c0:c1] = h
        stats[4, c0:c1] = h
    elif op == "jsd":
        parts = torch.zeros(2, n, dtype=acc, device=dev)
        if nv:
            logp, logq = s.sub_(lzs.unsqueeze(1)), t.sub_(lzt.unsqueeze(1))
            logm = _log_mixture(logp, logq, beta)
            parts[0] = _rowdot(logp.exp(), logp - logm)
            parts[1] = _rowdot(logq.exp(), logq - logm)
        # all-reduce #3 (SUM, JSD only): KL(p||m) and KL(q||m), which need the global partitions inside log m.
        _all_reduce(parts, dist.ReduceOp.SUM, group, sh.world)
        out[c0:c1] = beta * parts[0] + (1.0 - beta) * parts[1]
        stats[4, c0:c1] = parts[0]


def _log_mixture(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    """log(beta p + (1 - beta) q), stable for extreme logits."""
    return torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))


def _backward_chunk(student, teacher, tokens, op, beta, sh: _Shard, c0, c1, stats, go) -> Tensor:
    acc = stats.dtype
    nv = sh.n_valid
    go = go.unsqueeze(1)
    logp = _load(student, c0, c1, nv, acc)
    logp.sub_(stats[0, c0:c1].unsqueeze(1)).sub_(stats[1, c0:c1].unsqueeze(1))  # two steps keep log p exact
    p = logp.exp()
    if op in ("reverse_kl", "forward_kl", "jsd"):
        logq = _load(teacher, c0, c1, nv, acc)
        logq.sub_(stats[2, c0:c1].unsqueeze(1)).sub_(stats[3, c0:c1].unsqueeze(1))
    if op == "reverse_kl":
        return logp.sub_(logq).sub_(stats[4, c0:c1].unsqueeze(1)).mul_(p).mul_(go)
    if op == "forward_kl":
        return p.sub_(logq.exp_()).mul_(go)
    if op == "jsd":
        logm = _log_mixture(logp, logq, beta)
        return logp.sub_(logm).sub_(stats[4, c0:c1].unsqueeze(1)).mul_(p).mul_(go * beta)
    if op == "entropy":
        return logp.add_(stats[4, c0:c1].unsqueeze(1)).mul_(p).mul_(-go)
    # log_ratio and logprob: onehot(y) - p; the rank that owns y adds go at its column (no host sync)
    g = p.neg_().mul_(go)
    local = tokens[c0:c1].to(torch.int64) - sh.start
    owned = ((local >= 0) & (local < nv)).to(acc).unsqueeze(1)
    g.scatter_add_(1, local.clamp(0, nv - 1).unsqueeze(1), go * owned)
    return g


def _run(fn, student, teacher, tokens, op, beta, vocab_size, group, chunk_size) -> Tensor:
    sh, chunk = _validate(fn, student, teacher, tokens, vocab_size, group, chunk_size)
    if teacher is not None:
        teacher = teacher.detach()  # the teacher is frozen: no gradient flows to it
    return _VocabParallelStat.apply(student, teacher, tokens, op, beta, sh, group, chunk, fn)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: DivergenceKind,
    *,
    tokens: Tensor | None = None,
    beta: float = 0.5,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token divergence between the student and teacher distributions, exact on vocabulary shards.

    Args:
        student_logits: `[T, V_local]`, this rank's shard (any float dtype; bf16/fp16 are accumulated in fp32).
            Gradients flow to it.
        teacher_logits: `[T, V_local]`, same layout; treated as detached (frozen teacher).
        kind: "reverse_kl" KL(p||q) (docs/topd.md default), "forward_kl" KL(q||p), "jsd" (beta-weighted,
            m = beta p + (1 - beta) q), or "log_ratio" log p(y_t) - log q(y_t) at `tokens`.
        tokens: `[T]` global vocabulary ids, required for "log_ratio".
        beta: JSD weight, 0 < beta < 1 (0.5: the symmetric JSD, bounded by log 2).
        vocab_size: the true vocabulary; global ids >= vocab_size (Megatron's padding) are ignored. None: every
            entry of every shard is real.
        group: the tensor-parallel group the vocabulary is sharded over (shards in group-rank order). None: one
            rank holding the whole vocabulary.
        chunk_size: tokens per chunk (memory is bounded by the chunk); None picks one from V_local and the device.

    Returns:
        `[T]` (no reduction over tokens) in fp32, or fp64 for fp64 inputs; identical on every rank of the group.
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"token_divergence: kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")
    if kind == "log_ratio" and tokens is None:
        raise ValueError("token_divergence: kind='log_ratio' needs tokens (the [T] sampled global ids y_t)")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"token_divergence: jsd needs 0 < beta < 1 (JSD is identically 0 at the ends), got {beta}")
    return _run(
        "token_divergence",
        student_logits,
        teacher_logits,
        tokens if kind == "log_ratio" else None,
        kind,
        beta,
        vocab_size,
        group,
        chunk_size,
    )


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """log softmax(logits)[t, tokens[t]] per token: `[T, V_local]` shard and `[T]` global ids -> `[T]` (fp32/fp64).

    Differentiable with respect to `logits` (use it under `torch.no_grad()` for the teacher). Same sharding,
    padding and chunking contract as `token_divergence`.
    """
    return _run("token_logprobs", logits, None, tokens, "logprob", 0.0, vocab_size, group, chunk_size)


def token_entropy(
    logits: Tensor,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Entropy -sum_v p log p of softmax(logits) per token: `[T, V_local]` shard -> `[T]`, differentiable."""
    return _run("token_entropy", logits, None, None, "entropy", 0.0, vocab_size, group, chunk_size)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial values whose result every rank uses identically: the backward is the
    identity (each rank's part receives the gradient of the replicated sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup | None, world: int) -> Tensor:
        out = x.clone()
        _all_reduce(out, dist.ReduceOp.SUM, group, world)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def topk_divergence(
    student_logits: Tensor,
    top_ids: Tensor,
    teacher_top_logprobs: Tensor,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse KL on the teacher's top-k support, both distributions renormalised there, per token:

        d_t = sum_j p~_tj (log p~_tj - log q~_tj),  p~_t = softmax_j log p_t(v_tj),  q~_t = softmax_j log q_t(v_tj)

    for a teacher that only reports its k most likely tokens (e.g. served by an inference engine). `student_logits`
    is this rank's `[T, V_local]` shard, `top_ids` `[T, k]` global ids below the true vocabulary, and
    `teacher_top_logprobs` `[T, k]` the teacher's log-probs of those ids. Returns `[T]` (fp32 for 16-bit inputs,
    else the input dtype), identical on every rank; exact gradients flow to `student_logits` only. The student's
    logits at the k ids are summed over the group (`[T, k]` values; no rank gathers the vocabulary).
    """
    if top_ids.dim() != 2 or top_ids.shape != teacher_top_logprobs.shape or top_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"topk_divergence: top_ids {tuple(top_ids.shape)} and teacher_top_logprobs"
            f" {tuple(teacher_top_logprobs.shape)} must both be [T, k] with T = {student_logits.shape[0]}"
        )
    if top_ids.shape[1] == 0:
        raise ValueError("topk_divergence: k must be >= 1")
    limit = vocab_size if vocab_size is not None else None
    if top_ids.numel() and (int(top_ids.min()) < 0 or (limit is not None and int(top_ids.max()) >= limit)):
        raise ValueError(f"topk_divergence: top_ids must be in [0, {limit}) (the true vocabulary)")
    # Only the logits at the k ids matter: the full-vocabulary normaliser cancels in the renormalisation.
    rank, world = _group_rank_world(group)
    v_local = student_logits.shape[-1]
    lo = rank * v_local
    here = (top_ids >= lo) & (top_ids < lo + v_local)
    local = student_logits.gather(1, (top_ids - lo).clamp(0, v_local - 1)).to(_acc_dtype(student_logits.dtype))
    lp_s = _SumOverGroup.apply(torch.where(here, local, torch.zeros_like(local)), group, world)
    log_p = lp_s - torch.logsumexp(lp_s, dim=-1, keepdim=True)
    lq = teacher_top_logprobs.to(log_p.dtype)
    log_q = lq - torch.logsumexp(lq, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def vocab_parallel_embedding(
    weight: Tensor,
    ids: Tensor,
    *,
    vocab_size: int | None = None,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Rows of a vocab-parallel embedding table for global `ids`, without gathering the table.

    Args:
        weight: this rank's `[V_local, H]` shard of the (padded) input embedding, Megatron's VocabParallelEmbedding
            layout (same split as the logits).
        ids: global token ids, any shape `[...]`, each in [0, vocab_size).
    Returns:
        `[..., H]` (detached), identical on every rank: each id's row is taken on the rank that owns it and the
        others contribute zeros to one SUM all-reduce of only the looked-up rows.
    """
    if weight.dim() != 2:
        raise ValueError(f"vocab_parallel_embedding: expected a [V_local, H] shard, got {tuple(weight.shape)}")
    rank, world = _group_rank_world(group)
    v_local = weight.shape[0]
    vocab = v_local * world if vocab_size is None else vocab_size
    if vocab < 1 or vocab > v_local * world:
        raise ValueError(
            f"vocab_parallel_embedding: vocab_size={vocab} is larger than the group's total vocabulary"
            f" {v_local * world} = {world} ranks x {v_local} (or < 1)"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(f"vocab_parallel_embedding: ids must be in [0, {vocab}), got [{lo}, {hi}]")
    local = ids.to(torch.int64) - rank * v_local
    owned = (local >= 0) & (local < v_local)
    with torch.no_grad():
        rows = weight[local.clamp(0, v_local - 1)]
        rows = rows * owned.unsqueeze(-1).to(rows.dtype)
        # all-reduce (SUM): each id's row lives on exactly one rank; the others add zeros.
        _all_reduce(rows, dist.ReduceOp.SUM, group, world)
    return rows
