"""Benchmark (not a test): fwd+bwd time and peak memory of `token_divergence` against the naive vocab-parallel KL.

naive: all-gather the student and teacher vocabulary shards to [T, V] on every rank, fp32 `log_softmax` of both,
       reverse KL = sum p (log p - log q), backward through autograd (the gradient of the shard is the slice of the
       gradient of the gathered tensor).
ours:  `topd_megatron.algorithm.loss.token_divergence(kind="reverse_kl")`: shards only, chunked over tokens,
hand-written backward.

Each (method, V, TP) cell runs in fresh processes (topd_megatron.distributed.launch.spawn, gloo on CPU, NCCL on GPU),
so the first call's peak memory is not hidden by memory a previous call left in the allocator. Memory is the peak of
what the fwd+bwd adds on top of its inputs, per rank (max over ranks): on CPU the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) of the first call; on GPU `torch.cuda.max_memory_allocated`. Time is
the median wall time of `--repeats` calls after that first one (both after a warm-up call on 8 tokens). Threads:
one torch thread per rank by default, so TP=2 uses the 2 cores of the machine this was written on; on a shared
2-core machine two OpenMP threads per rank stall every small op while the other core is busy. Inputs are bf16
[T, V/TP] shards (Megatron's logits dtype); the bf16 gradient of the student shard is part of both methods' peak.

A naive cell that would not fit in the machine's available memory (estimated from the method's shape) is measured
at the largest T/2^k that fits and marked `*`: its memory and time are scaled linearly to the requested T.

Run from the repository root:
    python bench/loss.py                                   # T=4096, V=32768 and 151936, TP=1 and 2, on CPU
    python bench/loss.py --tokens 1024 --vocab 32768 --tp 1 --repeats 3
    python bench/loss.py --json > bench.json               # machine-readable rows and machine description
On 1 GPU: python bench/loss.py --device cuda --tp 1; on N >= 2 GPUs: python bench/loss.py --device cuda --tp 1 2
(every TP rank gets its own GPU). Results and the machine they came from are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_megatron.algorithm.loss import token_divergence  # noqa: E402
from topd_megatron.distributed.launch import spawn  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


# ------------------------------------------------------------------ the two methods


class _GatherVocab(torch.autograd.Function):
    """All-gather a [T, V/TP] shard to [T, V]; backward keeps this rank's slice (every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.width, ctx.group = dist.get_rank(group), x.shape[-1], group
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def naive_step(student: torch.Tensor, teacher: torch.Tensor, group) -> None:
    if group is not None:
        student = _GatherVocab.apply(student, group)
        with torch.no_grad():
            teacher = _GatherVocab.apply(teacher, group)
    logp = torch.log_softmax(student.float(), dim=-1)
    logq = torch.log_softmax(teacher.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    kl.sum().backward()


def ours_step(student: torch.Tensor, teacher: torch.Tensor, group, chunk_size: int | None = None) -> None:
    token_divergence(student, teacher, "reverse_kl", group=group, chunk_size=chunk_size).sum().backward()


# ------------------------------------------------------------------ measurement (runs inside each rank)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    return _rss()


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(rank: int, world: int, cell: dict) -> dict:
    import torch.distributed as dist

    if cell["threads"]:
        torch.set_num_threads(cell["threads"])
    device = torch.device(f"cuda:{rank}" if cell["device"] == "cuda" else "cpu")
    group = dist.group.WORLD if world > 1 else None
    t, v_local = cell["tokens"], cell["vocab"] // world
    g = torch.Generator(device=device).manual_seed(1234 + rank)
    student = torch.empty(t, v_local, dtype=torch.bfloat16, device=device)
    teacher = torch.empty_like(student)
    for i in range(0, t, 256):  # fill in slices: no [T, V] fp32 temporary before the measurement
        n = min(256, t - i)
        student[i : i + n] = torch.randn(n, v_local, generator=g, device=device) * 2
        teacher[i : i + n] = torch.randn(n, v_local, generator=g, device=device) * 2
    student.requires_grad_()
    if cell["method"] == "naive":
        step = naive_step
    else:
        step = functools.partial(ours_step, chunk_size=cell["chunk_size"])
    # warm up on 8 tokens: one-time library and thread-pool allocations are not part of either method's peak
    warm = student.detach()[:8].clone().requires_grad_()
    step(warm, teacher[:8], group)
    del warm
    if group is not None:
        dist.barrier()
    base = _reset_peak(device)
    start = time.perf_counter()
    step(student, teacher, group)
    _sync(device)
    first = time.perf_counter() - start
    peak = _peak(device) - base
    times = []
    for _ in range(cell["repeats"]):
        student.grad = None
        if group is not None:
            dist.barrier()
        start = time.perf_counter()
        step(student, teacher, group)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "time_s": statistics.median(times) if times else first, "first_s": first}


# ------------------------------------------------------------------ driver


def mem_available() -> int:
    m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(m.group(1)) * 1024 if m else 1 << 62


def estimate_bytes(method: str, tokens: int, vocab: int, tp: int) -> int:
    """Rough per-process need (inputs + what fwd+bwd adds), measured shape of each method on this machine."""
    shard = tokens * vocab // tp * 2  # one bf16 shard
    full_fp32 = tokens * vocab * 4
    if method == "naive":
        gathered = 2 * tokens * vocab * 2 if tp > 1 else 0
        return 2 * shard + gathered + 6 * full_fp32 + 512 * MiB
    return 3 * shard + 512 * MiB


def run_cell(method: str, tokens: int, vocab: int, tp: int, args) -> dict:
    row = {"method": method, "vocab": vocab, "tp": tp, "tokens": tokens, "tokens_measured": tokens}
    measured = tokens
    if args.device == "cpu":
        budget = args.mem_fraction * mem_available()
        while measured > 64 and tp * estimate_bytes(method, measured, vocab, tp) > budget:
            measured //= 2
    cell = {
        "method": method,
        "tokens": measured,
        "vocab": vocab,
        "device": args.device,
        "threads": args.threads or max(1, (os.cpu_count() or 1) // tp),
        "repeats": args.repeats,
        "chunk_size": args.chunk_size,
    }
    results = spawn(_measure, tp, args=(cell,), timeout=args.timeout)
    scale = tokens / measured
    row.update(
        {
            "tokens_measured": measured,
            "threads": cell["threads"],
            "chunk_size": args.chunk_size if method == "ours" else None,
            "peak_mib": max(r["peak_bytes"] for r in results) * scale / MiB,
            "time_s": max(r["time_s"] for r in results) * scale,
            "first_s": max(r["first_s"] for r in results) * scale,
            "extrapolated": measured != tokens,
        }
    )
    return row


def machine() -> dict:
    cpu = ""
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        cpu = platform.processor()
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict]) -> str:
    head = (
        f"{'V':>7} {'TP':>2} {'method':>6} {'T':>5} {'fwd+bwd s':>10} {'peak MiB':>9} {'time naive/ours':>16} "
        f"{'mem naive/ours':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        other = next((o for o in rows if o["vocab"] == r["vocab"] and o["tp"] == r["tp"] and o is not r), None)
        tr = mr = ""
        if r["method"] == "ours" and other is not None:
            tr = f"{other['time_s'] / r['time_s']:.2f}x"
            mr = f"{other['peak_mib'] / max(r['peak_mib'], 1e-9):.1f}x"
        mark = "*" if r["extrapolated"] else ""
        lines.append(
            f"{r['vocab']:>7} {r['tp']:>2} {r['method']:>6} {r['tokens']:>5} {r['time_s']:>9.2f}{mark:1} "
            f"{r['peak_mib']:>8.0f}{mark:1} {tr:>16} {mr:>15}"
        )
    if any(r["extrapolated"] for r in rows):
        lines.append(
            "* measured at T="
            + ", ".join(
                f"{r['tokens_measured']} ({r['method']}, V={r['vocab']}, TP={r['tp']})"
                for r in rows
                if r["extrapolated"]
            )
            + " (too large for this machine's memory), scaled linearly to T"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per micro-batch")
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936], help="padded vocabulary sizes V")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes")
    p.add_argument("--methods", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the first (memory) call")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (0: cores // TP)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for ours (default: from V_local)")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="share of MemAvailable a cell may plan to use")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = p.parse_args(argv)
    for v in args.vocab:
        for tp in args.tp:
            if v % tp:
                p.error(f"--vocab {v} is not divisible by TP={tp} (Megatron pads the vocabulary to a multiple)")
    info = machine()
    rows = []
    # Ranks (and the launcher's forkserver) inherit stdout: point it at stderr while measuring, so that library
    # logging in the ranks cannot interleave with the table or the JSON document.
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        for v in args.vocab:
            for tp in args.tp:
                for method in args.methods:
                    rows.append(run_cell(method, args.tokens, v, tp, args))
                    print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    info["loadavg_end"] = os.getloadavg()
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
    else:
        print(json.dumps(info))
        print(table(rows))


if __name__ == "__main__":
    main()
