"""Benchmark (not a test): windows sampled in-process (rollout/windows.py) against the planner's estimate of them.

The planner counts in-process windows (`plan.step_time.in_process_window_seconds`: what `topd plan` uses with
`sglang.teacher=None`) at the training GPUs' FLOP rate x MFU, without per-forward overheads, weight or KV reads: a lower
bound, and the one figure between the qwen3 recipe's served-teacher plan and its in-process alternative
(docs/scale.md). This measures it on one rank of this device:

- a random Qwen3-architecture model (`--layers`, `--hidden`, `--heads`, `--kv-heads`, `--head-dim`, `--ffn`,
  `--vocab`; Megatron-Core's local spec, the one the per-window mask runs on), in `--dtype`;
- `--rows` rollout rows of `--seq` random tokens, `--windows` windows per row at distinct random anchors in each row's
  second half, K = `--window` tokens each, temperature 1, all rows in one KV cache (`sample_windows_packed`);
- the prefill alone (a call with K = 1: the rows' prefill and each window's first token) and the whole call (the
  prefill, then K - 1 decode forwards of every window at once), one of each per round for `--rounds` rounds after a
  warm-up (a round's decode: its whole call minus its prefill call); the median and the min-max over the rounds;
- the planner's formula for the same shape, at the FLOP rate a dense matmul of the model's width reaches on this
  device in `--dtype` in the same run (the best a forward's GEMMs reach here, standing in for peak x MFU).

planned / measured below 1 is what the call costs beyond that GEMM rate: per-forward overheads, attention over the
per-window mask and building that mask, weight and KV reads, sampling. The planner counts K decode forwards where the
sampler runs K - 1 after the prefill (its u_1 comes from the prefill's logits): the decode row compares K - 1 of the
planner's forwards with the measured K - 1, the whole-call row the planner's whole formula with the whole call.

Run from the repository root:
    .venv/bin/python bench/window_decode.py                 # CPU, one thread, a small shape: about a minute
    .venv/bin/python bench/window_decode.py --device cuda --dtype bfloat16 --layers 4 --hidden 2560 --heads 32 \\
        --kv-heads 8 --head-dim 128 --ffn 9728 --vocab 151936 --seq 4096 --rows 4 --windows 64 --window 50
        # tools/gpu_check.sh: 4 of Qwen3-4B's 36 layers, its widths and vocabulary
The recorded results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_megatron.distributed.launch import spawn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """What one timed call samples, and the model it samples from."""

    layers: int = 2
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 0
    """0: hidden // heads."""
    ffn: int = 768
    vocab: int = 1024
    seq: int = 256
    rows: int = 2
    windows: int = 16
    window: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 1
    """CPU threads of the timed rank (on CUDA torch's default is kept: the host only launches kernels)."""
    rounds: int = 5

    def __post_init__(self) -> None:
        if self.windows > self.seq // 2 - 1:
            raise ValueError(
                f"--windows {self.windows} needs distinct anchors in the rows' second half: at most"
                f" {self.seq // 2 - 1} for --seq {self.seq}"
            )
        if self.window < 2:
            raise ValueError(f"--window must be >= 2 (a prefill and at least one decode forward), got {self.window}")

    @property
    def columns(self) -> int:
        """Cache columns of one row: the rollout, then K - 1 decode blocks of `windows` columns."""
        return self.seq + (self.window - 1) * self.windows


def gemm_rate(shape: Shape, device: torch.device) -> float:
    """FLOP/s of a [4096 x hidden] @ [hidden x ffn] matmul in the model's dtype on `device`: median of 10."""
    dtype = DTYPES[shape.dtype]
    a = torch.randn(4096, shape.hidden, dtype=dtype, device=device)
    b = torch.randn(shape.hidden, shape.ffn, dtype=dtype, device=device)
    times = []
    for i in range(12):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * 4096 * shape.hidden * shape.ffn / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(rank: int, world: int, model_dir: str, shape: Shape) -> dict[str, float]:
    """On one rank: the GEMM rate, then the seconds of each round's prefill-only and whole call."""
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.rollout.engine import SamplingParams
    from topd_megatron.rollout.windows import sample_windows_packed

    if shape.device == "cpu":
        torch.set_num_threads(shape.threads)
    par = ParallelConfig()
    init_model_parallel(par)
    cfg = ModelConfig(path=model_dir, dtype=shape.dtype, seq_length=shape.columns, transformer_engine=False)
    lm = build_model(cfg, par, role="teacher")
    for m in lm.modules:
        m.eval()
    device = torch.device("cuda", torch.cuda.current_device()) if shape.device == "cuda" else torch.device("cpu")
    gen = torch.Generator().manual_seed(11)
    rows = torch.randint(0, shape.vocab, (shape.rows, shape.seq), generator=gen)
    s1 = shape.seq - 1
    positions = torch.cat(
        [
            r * s1 + shape.seq // 2 + torch.randperm(s1 - shape.seq // 2, generator=gen)[: shape.windows]
            for r in range(shape.rows)
        ]
    )

    def call(k: int) -> float:
        params = SamplingParams(temperature=1.0, max_new_tokens=k, seed=0)
        _sync(device)
        t0 = time.perf_counter()
        out = sample_windows_packed(lm, rows, positions, params, micro_batch_size=shape.rows)
        _sync(device)
        assert len(out) == len(positions) and all(len(g.output_ids) == k for g in out)
        return time.perf_counter() - t0

    rate = gemm_rate(shape, device)
    call(shape.window)  # warm-up
    prefill, whole = [], []
    for _ in range(shape.rounds):  # a prefill-only call, then a whole call: the decode of a round is their difference
        prefill.append(call(1))
        whole.append(call(shape.window))
    return {"gemm_rate": rate, "prefill_s": prefill, "whole_s": whole}


def planned(model_dir: str, shape: Shape, rate: float) -> dict[str, float]:
    """The planner's in-process windows for this shape at `rate`: the prefill term alone and the whole formula."""
    from topd_megatron.plan.architecture import resolve
    from topd_megatron.plan.step_time import in_process_window_seconds

    arch, _ = resolve(model_dir)
    prefill, whole = (
        in_process_window_seconds(arch, shape.rows, shape.rows * shape.windows, shape.seq, k, rate, fp8=False)
        for k in (0, shape.window)
    )
    return {"prefill_s": prefill, "whole_s": whole}


def make_model(shape: Shape, out: Path) -> Path:
    """A random Qwen3-architecture checkpoint of `shape` with a byte-level tokenizer of `shape.vocab` entries."""
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint, make_tiny_tokenizer

    corpus = [f"window {i} of row {i % 7}: {i * 37 % 1000} tokens" for i in range(400)]
    tok = make_tiny_tokenizer(out / "tokenizer", corpus, vocab_size=min(shape.vocab, 512))
    spec = TinyModelSpec(
        family="qwen3",
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_layers=shape.layers,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim or None,
        intermediate_size=shape.ffn,
        max_position_embeddings=max(shape.columns, 2048),
        seed=5,
    )
    return make_tiny_checkpoint(out / "model", spec, tok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Shape()
    for name in (
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "head_dim",
        "ffn",
        "vocab",
        "seq",
        "rows",
        "windows",
        "window",
        "threads",
        "rounds",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=defaults.device)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    shape = Shape(**{k: v for k, v in vars(args).items() if k not in ("markdown", "json_out")})
    if (shape.device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {shape.device}, but torch.cuda.is_available() is {torch.cuda.is_available()}")

    from topd_megatron.logs import quiet_third_party

    quiet_third_party()
    with tempfile.TemporaryDirectory(prefix="topd-window-bench-") as tmp:
        model_dir = str(make_model(shape, Path(tmp)))
        m = spawn(measure, 1, (model_dir, shape), timeout=1800)[0]
        p = planned(model_dir, shape, m["gemm_rate"])
    k = shape.window
    decode = [w - f for f, w in zip(m["prefill_s"], m["whole_s"], strict=True)]
    rows = [
        ("prefill (K = 1)", m["prefill_s"], p["prefill_s"]),
        (f"{k - 1} decode forwards", decode, (p["whole_s"] - p["prefill_s"]) * (k - 1) / k),
        ("whole call", m["whole_s"], p["whole_s"]),
    ]
    title = (
        f"{shape.rows} rows x {shape.seq} tokens, {shape.windows} windows per row, K = {k}; {shape.layers} layers of"
        f" {shape.hidden}, {shape.dtype} on {shape.device}; GEMM rate {m['gemm_rate'] / 1e12:.3f} TFLOP/s"
    )
    table_rows = [
        (
            name,
            (
                f"{statistics.median(meas):.4f} ({min(meas):.4f}-{max(meas):.4f})",
                f"{plan:.4f}",
                f"{plan / statistics.median(meas):.3f}",
            ),
        )
        for name, meas, plan in rows
    ]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"shape": asdict(shape), "measured": m, "planned": p}) + "\n")
    if args.markdown:
        print(title + "\n")
        print("| part | measured s, median (min-max) | planned s | planned / measured median |")
        print("|---|---:|---:|---:|")
        for name, cells in table_rows:
            print("| " + " | ".join((name, *cells)) + " |")
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("part", "measured s, median (min-max)", "planned s", "planned / measured median"):
            table.add_column(col, justify="left" if col == "part" else "right")
        for name, cells in table_rows:
            table.add_row(name, *cells)
        Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
