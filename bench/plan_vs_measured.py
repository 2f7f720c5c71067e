"""Benchmark (not a test): the planner's memory model (topd_megatron/plan/memory.py) against what tiny CPU runs
actually allocate, per rank, component by component.

Each case builds the prepared tiny pair (`topd prepare`: a 2-layer Qwen3 student and a 4-layer Qwen3 teacher, fp32)
or a tiny random Llama or Qwen3-MoE student with Megatron-Core on 1 or 2 gloo ranks
(topd_megatron.distributed.launch.spawn),
with the student's DDP and distributed optimizer exactly as training builds them, and measures on every rank:
- weights, fp32 gradient buffer, Adam state, teacher weights: the sum of the distinct storages (untyped_storage()
  .nbytes(), so Megatron's bucket padding is included) of the model parameters, of their `main_grad` buffers, and
  of the optimizer's state tensors after one step (Adam allocates its state lazily);
- activations: the distinct storages saved for backward by the student's forward of one micro-batch
  (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded) (PP = 1 cases);
- loss + backward peak: the high-water mark of CPU allocations (torch.profiler with profile_memory, alloc/free
  events summed in time order) during forward, loss (objective.token_terms + objective.loss, reverse KL against
  teacher logits computed beforehand) and backward of that micro-batch, above what was allocated before it;
- d_t pass peak: the same high-water mark for the detector's no-grad student pass of that micro-batch as
  training.scoring.step_divergence runs it (forward_logits reducing the logits to d_t as they arrive);
- teacher window rows: the distinct storages train_step keeps of a branch micro-batch's teacher logits (the
  `BranchBatch.window_logits` rows of WINDOW tokens per row, cut out as the logits arrive) (PP = 1 cases);
- packed cases (`packed`): the same for a micro-batch of packed rows (algorithm/packing.py: WINDOWS_PER_ROW windows
  of WINDOW tokens packed after each rollout, the per-window mask, RoPE at the windows' positions), trained on the
  OPD term of the rollout columns plus the guidance KL of the window rows, as training/step.py's one pass does, and
  the teacher's window rows cut out of its packed forward;
- weight sync bytes: the Hugging Face tensors the weight sync exports (rollout/sglang/weight_sync.hf_weights), summed,
  against the planner's P x bytes (plan/step_time.weight_sync_seconds moves that many bytes).
The planner's numbers for the same layout and micro-batch (attention='local': Megatron-Core's local spec, the CPU
path) are printed next to them with the ratio planned / measured.

Run from the repository root (about 3 minutes on 2 CPU cores, most of it importing Megatron once per case):
    .venv/bin/python bench/plan_vs_measured.py
    .venv/bin/python bench/plan_vs_measured.py --markdown          # the table recorded in docs/scale.md
    .venv/bin/python bench/plan_vs_measured.py --json-out plan_vs_measured.json
On GPUs the same measurement would use torch.cuda.max_memory_allocated and attention='te'; not done here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from topd_megatron.distributed.launch import spawn  # noqa: E402

MICRO_BATCH = 4
SEQ = 64
WINDOW = 8
"""K of the branch windows whose teacher rows are kept."""
WINDOWS_PER_ROW = 3
"""Guidance windows packed after each rollout in the packed cases."""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    world: int
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    student: str = "prepared"
    """'prepared' (the tiny pair's Qwen3 student), 'llama' or 'moe' (a tiny random Llama or Qwen3-MoE with the pair's
    tokenizer)."""
    packed: bool = False
    """Train on packed rows (WINDOWS_PER_ROW windows of WINDOW tokens after each rollout) instead of plain ones."""


CASES = (
    Case("qwen3 TP1", 1),
    Case("qwen3 TP1 selective", 1, recompute="selective"),
    Case("qwen3 TP1 full", 1, recompute="full"),
    Case("qwen3 TP2", 2, tp=2),
    Case("qwen3 TP2 SP", 2, tp=2, sequence_parallel=True),
    Case("qwen3 TP2 SP selective", 2, tp=2, sequence_parallel=True, recompute="selective"),
    Case("qwen3 TP2 SP full", 2, tp=2, sequence_parallel=True, recompute="full"),
    Case("qwen3 DP2", 2),
    Case("qwen3 PP2", 2, pp=2),
    Case("llama TP1", 1, student="llama"),
    Case("llama TP2 SP selective", 2, tp=2, sequence_parallel=True, recompute="selective", student="llama"),
    Case("qwen3_moe TP1", 1, student="moe"),
    Case("qwen3 TP1 packed", 1, packed=True),
    Case("qwen3 TP1 packed selective", 1, recompute="selective", packed=True),
    Case("qwen3 TP2 SP packed", 2, tp=2, sequence_parallel=True, packed=True),
)


# ------------------------------------------------------------------ measurement (runs inside each rank)


def _storages(tensors) -> dict[int, int]:
    """data_ptr -> nbytes of the distinct storages behind `tensors`."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
            st = t.untyped_storage()
            out.setdefault(st.data_ptr(), st.nbytes())
    return out


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    out = []
    for opt in inner:
        for state in opt.optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        for group in getattr(opt, "shard_fp32_from_float16_groups", []) or []:
            out += list(group)
    return out


def _profiled_peak(fn) -> int:
    """High-water mark of CPU allocations made while `fn` runs, above the level when it starts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak


def measure(rank: int, world: int, case: Case, student_dir: str, teacher_dir: str) -> dict[str, float]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from topd_megatron.algorithm import objective
    from topd_megatron.algorithm.batch import BranchBatch
    from topd_megatron.algorithm.loss import token_divergence
    from topd_megatron.algorithm.types import TokenBatch
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.models.positions import positioned
    from topd_megatron.rollout.sglang.weight_sync import hf_weights
    from topd_megatron.training.forward import forward_logits, make_microbatch
    from topd_megatron.training.optim import OptimConfig, build_optimizer, ddp_config
    from topd_megatron.training.teacher import build_teacher, teacher_logits

    torch.set_num_threads(1)
    par = ParallelConfig(tp=case.tp, pp=case.pp, sequence_parallel=case.sequence_parallel)
    init_model_parallel(par)
    optim_cfg = OptimConfig()
    s_cfg = ModelConfig(path=student_dir, dtype="float32", recompute=case.recompute, seq_length=SEQ)
    student = build_model(s_cfg, par, role="student", wrap_with_ddp=True, ddp_config=ddp_config(optim_cfg))
    teacher = build_teacher(ModelConfig(path=teacher_dir, dtype="float32", seq_length=SEQ), par, student)
    optimizer = build_optimizer(optim_cfg, student)
    params = _storages(p for m in student.modules for p in m.parameters())
    grads = _storages(p.main_grad for m in student.modules for p in m.parameters())
    out: dict[str, float] = {
        "student weights": sum(params.values()),
        "student gradient buffer": sum(grads.values()),
        "teacher weights": sum(_storages(p for m in teacher.modules for p in m.parameters()).values()),
    }

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, student.vocab_size, (MICRO_BATCH, SEQ), generator=gen)
    mb = make_microbatch(tokens)
    response = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.bool)
    response[:, SEQ // 4 :] = True
    tb = TokenBatch.from_padded(tokens[:, 1:], response[:, 1:])
    cfg = objective.preset("opd")
    kw = {"vocab_size": student.vocab_size, "group": ps.get_tensor_model_parallel_group()}
    for m in student.modules:
        m.zero_grad_buffer()
    if case.pp == 1:
        t_logits = teacher_logits(teacher, [mb])[0]

        def d_t(m, s_l: torch.Tensor) -> torch.Tensor:  # training.scoring.step_divergence's reduction
            return objective.token_terms(cfg, tb, s_l[:, :-1], t_logits[:, :-1], **kw).divergence.detach().float()

        # first through Megatron's schedule, as training does (it sets up the MoE aux-loss scale an MoE layer
        # called directly would otherwise create with another shape)
        dt_peak = _profiled_peak(lambda: forward_logits(student.modules, [mb], d_t))
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in params:
                saved.setdefault(st.data_ptr(), st.nbytes())
            return t

        packed = _packed_rows(tokens, response, student.vocab_size) if case.packed else None
        if packed is not None:  # the teacher's window rows, cut out of its forward over the packed rows
            kept = teacher_logits(teacher, packed.microbatches(), lambda m, t: packed.window_logits(m.index, t))
        else:
            half = torch.full((MICRO_BATCH,), SEQ // 2, dtype=torch.long)
            branch = BranchBatch(
                tokens=tokens, starts=half, lengths=torch.full_like(half, WINDOW), micro_batch_size=MICRO_BATCH
            )
            kept = teacher_logits(teacher, branch.microbatches(), lambda m, t: branch.window_logits(m.index, t))

        def step() -> None:
            model = student.modules[0]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if packed is None:
                    logits = model(mb.tokens, mb.position_ids, mb.attention_mask)
                else:  # as training.forward runs a packed micro-batch
                    pmb = packed.microbatches()[0]
                    with positioned(model, pmb.position_ids):
                        logits = model(pmb.tokens, pmb.position_ids, pmb.window_mask.dense())
            out["student activations"] = sum(saved.values())
            terms = objective.token_terms(cfg, tb, logits[:, :SEQ][:, :-1], t_logits[:, :-1], **kw)
            value, _ = objective.loss(cfg, tb, terms)
            if packed is not None:  # + the guidance KL of the window rows (training/step.py PackedLoss)
                rows = packed.window_logits(0, logits)
                value = value + token_divergence(rows, kept[0], "reverse_kl", **kw).sum()
                del rows
            del logits, terms
            value.backward()

        out["forward + loss + backward peak"] = _profiled_peak(step)
        out["d_t pass peak (no grad)"] = dt_peak
        out["teacher window rows (kept)"] = sum(_storages(kept).values())
    finalize_model_grads(student.modules)
    out["weight sync bytes (HF export)"] = float(sum(t.numel() * t.element_size() for _, t in hf_weights(student)))
    optimizer.step()  # Adam allocates its state on the first step
    state = _storages(_optimizer_tensors(optimizer))
    out["student optimizer"] = sum(v for k, v in state.items() if k not in params and k not in grads)
    return out


def _packed_rows(tokens: torch.Tensor, response: torch.Tensor, vocab: int):
    """WINDOWS_PER_ROW windows of WINDOW random tokens packed after each row (anchors in the response)."""
    from topd_megatron.algorithm.packing import pack_rows
    from topd_megatron.algorithm.types import Windows

    s1 = SEQ - 1
    anchors = [SEQ // 4 + i * SEQ // (2 * WINDOWS_PER_ROW) for i in range(WINDOWS_PER_ROW)]
    positions = torch.tensor([r * s1 + j for r in range(MICRO_BATCH) for j in anchors])
    gen = torch.Generator().manual_seed(8)
    windows = Windows(
        tokens=torch.randint(0, vocab, (positions.numel(), WINDOW), generator=gen),
        lengths=torch.full((positions.numel(),), WINDOW),
    )
    return pack_rows(tokens, response, positions, windows, pad_id=0, micro_batch_size=MICRO_BATCH, width_multiple=2)


# ------------------------------------------------------------------ the planner's numbers


def planned(case: Case, student_dir: str, teacher_dir: str) -> list[dict[str, float]]:
    """The planner's bytes per rank (one dict per pipeline stage; the same for every TP/DP rank)."""
    from topd_megatron.models.build import ModelConfig, padded_vocab
    from topd_megatron.plan.architecture import resolve
    from topd_megatron.plan.layout import Layout, StepShape
    from topd_megatron.plan.memory import (
        dt_reduction_bytes,
        dtype_bytes,
        forward_working_bytes,
        logits_bytes,
        loss_working_bytes,
        nograd_forward_bytes,
        rank_params,
        recompute_transient_bytes,
        student_state_bytes,
        teacher_weight_bytes,
        training_activation_bytes,
    )

    s_arch, _ = resolve(student_dir)
    t_arch, _ = resolve(teacher_dir)
    s_cfg = ModelConfig(path=student_dir, dtype="float32", recompute=case.recompute, seq_length=SEQ)
    t_cfg = ModelConfig(path=teacher_dir, dtype="float32", seq_length=SEQ)
    layout = Layout(
        world=case.world,
        tp=case.tp,
        pp=case.pp,
        vpp=1,
        cp=1,
        ep=1,
        etp=case.tp,
        sequence_parallel=case.sequence_parallel,
    )
    branches = MICRO_BATCH * WINDOWS_PER_ROW if case.packed else 0
    shape = StepShape(
        seq=SEQ,
        micro_batch=MICRO_BATCH,
        rollouts=MICRO_BATCH,
        rows=MICRO_BATCH,
        candidates=branches,
        branches=branches,
        branch_rows=0,
        branch_seq=-(-(SEQ + WINDOWS_PER_ROW * (WINDOW - 1)) // 2) * 2 if case.packed else 0,  # even: SP at TP=2
        window=WINDOW,
        packed=case.packed,
    )
    rows = padded_vocab(s_arch.vocab, s_cfg, case.tp)
    out = []
    for stage in ("only",) if case.pp == 1 else ("first", "last"):
        sp = rank_params(s_arch, layout, rows, stage)
        tp = rank_params(t_arch, layout, rows, stage)
        states = student_state_bytes(sp, s_cfg, layout, use_distributed_optimizer=True)
        row = {
            "student weights": states["student weights"],
            "student gradient buffer": states["student gradient buffer (fp32)"],
            "student optimizer": next(v for k, v in states.items() if k.startswith("student optimizer")),
            "teacher weights": teacher_weight_bytes(tp, t_cfg),
            "weight sync bytes (HF export)": float(s_arch.params() * dtype_bytes(s_cfg.dtype)),
        }
        if case.pp == 1:
            act = sum(training_activation_bytes(s_arch, layout, shape, s_cfg, "local", stage).values())
            row["student activations"] = act
            loss = loss_working_bytes(shape, rows, layout, s_cfg, t_cfg, "cpu")
            transient = recompute_transient_bytes(s_arch, layout, shape, s_cfg, "local")
            row["forward + loss + backward peak"] = act + max(loss, transient)
            layer = forward_working_bytes(s_arch, layout, MICRO_BATCH, SEQ, s_cfg, "local")
            reduction = dt_reduction_bytes(shape, rows, layout, s_cfg, t_cfg, "cpu", offload=False, served=False)
            mb_logits = logits_bytes(MICRO_BATCH, SEQ, rows, layout, 4)
            row["d_t pass peak (no grad)"] = nograd_forward_bytes(layer, mb_logits, reduction)
            row["teacher window rows (kept)"] = (
                MICRO_BATCH * WINDOW * rows / case.tp * 4 * max(shape.branches // MICRO_BATCH, 1)
            )
        out.append(row)
    return out


# ------------------------------------------------------------------ driver


def tiny_student(family: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random student of `family` (llama, qwen3_moe: 4 experts, 2 per token) with the pair's tokenizer."""
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    return make_tiny_checkpoint(out, TinyModelSpec(family=family, num_layers=2, seed=3), tokenizer_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)

    from topd_megatron.analysis.prepare import prepare
    from topd_megatron.logs import quiet_third_party

    quiet_third_party()
    pair = prepare()
    chosen = [c for c in CASES if args.cases is None or c.name in args.cases.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="topd-plan-bench-") as tmp:
        students = {"prepared": pair.student_dir}
        for kind, family in (("llama", "llama"), ("moe", "qwen3_moe")):
            if any(c.student == kind for c in chosen):
                students[kind] = tiny_student(family, pair.student_dir, Path(tmp) / kind)
        for case in chosen:
            student = str(students[case.student])
            teacher = str(pair.teacher_dir)
            measured = spawn(measure, case.world, (case, student, teacher), timeout=600)
            plans = planned(case, student, teacher)
            for rank, m in enumerate(measured):
                stage = rank // (case.world // case.pp)  # Megatron's rank order: TP fastest, then DP, then PP
                p = plans[min(stage, len(plans) - 1)]
                if rank and case.pp == 1 and m == measured[0]:
                    continue  # identical ranks: show one
                for component, value in m.items():
                    rows.append(
                        {
                            "case": case.name,
                            "rank": rank,
                            "component": component,
                            "measured_kib": value / 1024,
                            "planned_kib": p[component] / 1024,
                            "ratio": p[component] / value if value else float("nan"),
                        }
                    )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "micro_batch": MICRO_BATCH,
                    "seq": SEQ,
                    "window": WINDOW,
                    "cases": [asdict(c) for c in chosen],
                    "rows": rows,
                }
            )
        )
    if args.markdown:
        print("| case | rank | component | measured KiB | planned KiB | planned / measured |")
        print("|---|---|---|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['case']} | {r['rank']} | {r['component']} | {r['measured_kib']:.1f} | {r['planned_kib']:.1f}"
                f" | {r['ratio']:.3f} |"
            )
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"planner vs measured, micro-batch {MICRO_BATCH} x {SEQ} tokens, fp32, CPU")
        for col in ("case", "rank", "component", "measured KiB", "planned KiB", "planned / measured"):
            table.add_column(col, justify="right" if col[0] in "mpr" and col != "rank" else "left")
        for r in rows:
            table.add_row(
                r["case"],
                str(r["rank"]),
                r["component"],
                f"{r['measured_kib']:.1f}",
                f"{r['planned_kib']:.1f}",
                f"{r['ratio']:.3f}",
            )
        Console(width=140).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
