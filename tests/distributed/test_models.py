"""Student/teacher models on gloo ranks: layouts agree, Megatron matches Hugging Face, checkpoints move between
layouts, and the teacher stays frozen.

Each test body runs on N CPU ranks through `topd_megatron.distributed.launch.spawn`; comparisons gather the
vocabulary shards in the test only (production code never does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from topd_megatron.distributed.launch import spawn

TOKENS = torch.tensor(
    [
        [3, 17, 42, 99, 7, 250, 11, 5, 64, 300, 2, 8],
        [120, 4, 9, 31, 77, 150, 260, 13, 6, 1, 0, 0],
        [44, 45, 46, 200, 201, 383, 0, 12, 18, 90, 91, 92],
        [5, 5, 5, 5, 310, 311, 312, 7, 0, 0, 0, 0],
    ],
    dtype=torch.long,
)
LOSS_MASK = torch.tensor([[1.0] * 11 + [0.0], [1.0] * 9 + [0.0] * 3, [1.0] * 11 + [0.0], [1.0] * 7 + [0.0] * 5])
"""Four sequences, one per micro-batch: the interleaved schedule needs several micro-batches per stage to exercise
its warm-up/steady/cool-down phases."""


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Test-only: concatenate the TP group's vocab shards [b, s, V/TP] -> [b, s, V]."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _forward(lm, forward_only: bool = True) -> tuple[torch.Tensor | None, float | None]:
    """Logits (gathered) and masked next-token CE of TOKENS through get_forward_backward_func, on the rank that
    holds TP rank 0 of the last pipeline stage; (None, None) elsewhere."""
    from megatron.core import parallel_state, tensor_parallel

    from topd_megatron.training.forward import make_microbatch, run_pipeline

    mbs = [make_microbatch(TOKENS[i : i + 1], LOSS_MASK[i : i + 1], index=i) for i in range(len(TOKENS))]
    kept: list[torch.Tensor] = []

    def loss_fn(mb, logits):
        kept.append(_gather_vocab(logits.detach()))
        labels = torch.roll(mb.tokens, -1, dims=1)
        # vocab_parallel_cross_entropy modifies fp32 logits in place: give it its own copy.
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float().transpose(0, 1).clone(), labels.T)
        loss = (ce.T * mb.loss_mask).sum() / mb.loss_mask.sum()
        return loss, {"loss": loss.detach().clone()}

    out = run_pipeline(lm.modules, mbs, loss_fn, forward_only=forward_only)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not last or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None, None
    loss = sum(float(o["loss"]) for o in out) / len(out)
    return torch.cat(kept, dim=0), loss


def _pick(results: list) -> tuple[torch.Tensor, float]:
    found = [r for r in results if r[0] is not None]
    assert len(found) == 1, f"expected exactly one reporting rank, got {len(found)}"
    return found[0]


def layout_body(rank: int, world: int, ckpt: str, tp: int, pp: int, vpp: int | None, sp: bool, backward: bool):
    """Logits and loss on the reporting rank; with `backward`, also the (TP-gathered) gradients of the input
    embedding (first stage) and the output layer (last stage), wherever they live."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model

    par = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp)
    init_model_parallel(par)
    lm = build_model(ModelConfig(path=ckpt, dtype="float32"), par)
    assert len(lm.modules) == (vpp or 1)
    logits, loss = _forward(lm, forward_only=not backward)
    if not backward:
        return logits, loss
    grads = {}
    for chunk in lm.modules:
        for name, attr in (("embedding", "embedding.word_embeddings.weight"), ("output", "output_layer.weight")):
            module = chunk
            try:
                for part in attr.split("."):
                    module = getattr(module, part)
            except AttributeError:
                continue
            g = module.grad
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=parallel_state.get_tensor_model_parallel_group())
            if parallel_state.get_tensor_model_parallel_rank() == 0:
                grads[name] = torch.cat(parts, dim=0)
    return logits, loss, grads


def test_layouts_give_the_same_logits_loss_and_gradients(tiny_checkpoints: dict[str, Path]) -> None:
    ckpt = str(tiny_checkpoints["qwen3"])
    ref_logits, ref_loss, ref_grads = spawn(layout_body, 1, (ckpt, 1, 1, None, False, True), timeout=600)[0]
    assert ref_logits.shape == (4, 12, 384)
    assert 5.0 < ref_loss < 7.0  # ~ln(384) = 5.95 for a random model
    assert set(ref_grads) == {"embedding", "output"} and all(g.abs().sum() > 0 for g in ref_grads.values())
    layouts = [(2, 1, None, False), (2, 1, None, True), (1, 2, None, False), (2, 2, None, False), (1, 2, 2, False)]
    for tp, pp, vpp, sp in layouts:
        name = f"TP={tp} PP={pp} VPP={vpp} SP={sp}"
        results = spawn(layout_body, tp * pp, (ckpt, tp, pp, vpp, sp, True), timeout=600)
        logits, loss = _pick([r[:2] for r in results])
        diff = (logits - ref_logits).abs().max().item()
        assert diff < 1e-5, f"{name}: logits differ from TP=1 by {diff}"
        assert loss == pytest.approx(ref_loss, abs=1e-6), f"{name}: loss {loss} vs {ref_loss}"
        grads = {k: v for r in results for k, v in r[2].items()}
        assert set(grads) == {"embedding", "output"}, f"{name}: gradients reported: {sorted(grads)}"
        for key, g in grads.items():
            gdiff = (g - ref_grads[key]).abs().max().item()
            assert gdiff < 1e-6, f"{name}: {key} gradient differs from TP=1 by {gdiff}"


def hf_parity_body(rank: int, world: int, ckpts: dict[str, str], tp: int):
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model

    par = ParallelConfig(tp=tp)
    init_model_parallel(par)
    out = {}
    for family, path in ckpts.items():
        lm = build_model(ModelConfig(path=path, dtype="float32"), par)
        out[family] = _forward(lm)[0]
    return out if rank == 0 else None


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hugging_face(tiny_checkpoints: dict[str, Path], tp: int) -> None:
    from transformers import AutoModelForCausalLM

    families = ["qwen2", "qwen3", "llama"]
    ckpts = {f: str(tiny_checkpoints[f]) for f in families}
    megatron = spawn(hf_parity_body, tp, (ckpts, tp), timeout=600)[0]
    for family in families:
        hf = AutoModelForCausalLM.from_pretrained(ckpts[family], dtype=torch.float32).eval()
        with torch.no_grad():
            ref = torch.cat([hf(TOKENS[i : i + 1]).logits for i in range(len(TOKENS))], dim=0)
        diff = (megatron[family] - ref).abs().max().item()
        assert diff <= 1e-4, f"{family} TP={tp}: Megatron vs transformers logits max abs diff {diff}"


def save_body(rank: int, world: int, ckpt: str, out_dir: str, tp: int, pp: int):
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.models.checkpoint import save_model

    par = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(par)
    lm = build_model(ModelConfig(path=ckpt, dtype="float32"), par)
    save_model(lm, out_dir, extra={"note": "layout test"})
    return _forward(lm)


def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    hf = str(tiny_checkpoints["llama"])
    saved = tmp_path / "ckpt"
    logits_4, _ = _pick(spawn(save_body, 4, (hf, str(saved), 2, 2), timeout=600))
    assert (saved / "topd_checkpoint.json").is_file() and (saved / "model" / ".metadata").is_file()
    assert not list(tmp_path.glob(".*partial")), "the temporary directory must be renamed away"
    from_ckpt, _ = _pick(spawn(layout_body, 1, (str(saved), 1, 1, None, False, False), timeout=600))
    from_hf, _ = _pick(spawn(layout_body, 1, (hf, 1, 1, None, False, False), timeout=600))
    assert torch.equal(from_ckpt, from_hf), "TP=1 from the TP2xPP2 checkpoint must equal TP=1 from the HF weights"
    assert (logits_4 - from_ckpt).abs().max().item() < 1e-5


def frozen_teacher_body(rank: int, world: int, student_dir: str, teacher_dir: str):
    from megatron.core import parallel_state

    from topd_megatron.algorithm.loss import token_divergence
    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.training.forward import make_microbatch, run_pipeline
    from topd_megatron.training.optim import OptimConfig, build_optimizer, ddp_config
    from topd_megatron.training.teacher import build_teacher, teacher_logits

    par = ParallelConfig(tp=2)
    init_model_parallel(par)
    ocfg = OptimConfig(lr=1e-2, clip_grad=1.0)
    student = build_model(
        ModelConfig(path=student_dir, dtype="float32"), par, wrap_with_ddp=True, ddp_config=ddp_config(ocfg)
    )
    teacher = build_teacher(ModelConfig(path=teacher_dir, dtype="float32"), par, student)
    optimizer = build_optimizer(ocfg, student)
    before = {n: p.detach().clone() for n, p in teacher.modules[0].named_parameters()}
    student_before = {n: p.detach().clone() for n, p in student.modules[0].named_parameters()}
    mbs = [make_microbatch(TOKENS, LOSS_MASK)]
    t_logits = teacher_logits(teacher, mbs)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def loss_fn(mb, logits):
        b, s, v = logits.shape
        d = token_divergence(
            logits.reshape(b * s, v),
            t_logits[mb.index].reshape(b * s, v),
            "reverse_kl",
            vocab_size=student.vocab_size,
            group=tp_group,
        )
        loss = (d * mb.loss_mask.reshape(-1)).sum() / mb.loss_mask.sum()
        return loss, {"loss": loss.detach().clone()}

    for m in student.modules:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    out = run_pipeline(student.modules, mbs, loss_fn, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    teacher_ids = {id(p) for m in teacher.modules for p in m.parameters()}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    state_params = [p for o in inner for p in o.state]
    return {
        "loss": float(out[0]["loss"]),
        "step_ok": bool(ok),
        "grad_norm": float(grad_norm),
        "teacher_grads": [
            n
            for n, p in teacher.modules[0].named_parameters()
            if p.grad is not None or getattr(p, "main_grad", None) is not None
        ],
        "teacher_requires_grad": [n for n, p in teacher.modules[0].named_parameters() if p.requires_grad],
        "teacher_in_optimizer": sum(id(p) in teacher_ids for p in opt_params),
        "teacher_in_state": sum(id(p) in teacher_ids for p in state_params),
        "state_entries": len(state_params),
        "teacher_changed": [n for n, p in teacher.modules[0].named_parameters() if not torch.equal(p, before[n])],
        "student_changed": sum(not torch.equal(p, student_before[n]) for n, p in student.modules[0].named_parameters()),
        "teacher_training": any(m.training for m in teacher.modules[0].modules()),
    }


def test_teacher_is_frozen_and_holds_no_optimizer_state(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    student = make_tiny_checkpoint(tmp_path / "s", TinyModelSpec(family="qwen3", seed=1), tiny_tokenizer_dir)
    teacher = make_tiny_checkpoint(
        tmp_path / "t", TinyModelSpec(family="llama", hidden_size=96, num_layers=3, seed=2), tiny_tokenizer_dir
    )
    results = spawn(frozen_teacher_body, 2, (str(student), str(teacher)), timeout=600)
    for r in results:
        assert r["step_ok"] and r["grad_norm"] > 0 and r["loss"] > 0
        assert r["teacher_grads"] == [] and r["teacher_requires_grad"] == []
        assert r["teacher_in_optimizer"] == 0 and r["teacher_in_state"] == 0 and r["state_entries"] > 0
        assert r["teacher_changed"] == [] and not r["teacher_training"]
        assert r["student_changed"] > 0, "the student must have been updated by the step"
