"""Megatron-Core on CPU gloo ranks (through topd_megatron.distributed.platform) gives the single-process numbers.

Every rank first builds the tiny GPT at TP=1/PP=1 from one seed and runs it alone: that is the reference (no
collective touches it). It then switches Megatron's parallel state to the layout under test, loads its shard of the
reference weights and checks, in fp32:
- TP=2, TP=2 + sequence parallel, PP=2 (1F1B) and PP=2 x VPP=2 (interleaved), through get_forward_backward_func
  with DDP and finalize_model_grads: the reference loss and, shard by shard, the reference gradients; together the
  ranks compare every element of every reference gradient. Also: Megatron's default causal mask gives the loss of
  the explicit one (2 ranks);
- DDP + get_megatron_optimizer (Adam, clip_grad=1.0 with grad norms of 2-5, so it clips), with and without the
  distributed optimizer, data split over 2 DP ranks: each step's loss, gradient norm and updated weights equal a
  single-process torch AdamW + clip_grad_norm_ step on the whole batch, and the loss goes down (2 ranks);
- TP=2 x PP=2 gives the reference loss; dist_checkpointing.save there, then load at TP=1 (plain, and fully parallel
  with the exchange between DP ranks) into a model built from another seed: identical weights and logits (4 ranks).

Tolerances: the sharded runs add the same fp32 products in another order (split matmuls, all-reduces). Measured:
losses within 5e-7, gradients within 1e-7, weights after 3 optimizer steps within 1.2e-7, grad norms within 1e-7
relative. TOL = 1e-5 leaves margin and still catches a misplaced shard (those move the loss by > 1e-3). A checkpoint
round trip moves bytes, so it must be exact.

Run: pytest tests/distributed/test_megatron_cpu.py (~2 min on 2 busy cores; the first spawn of a session pays
topd_megatron.distributed.launch's forkserver preload, and each dist_checkpointing.save ~20 s for its writer's
spawned Manager).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from topd_megatron.distributed.launch import spawn

TOL = 1e-5
LAYERS = 4  # PP=2 x VPP=2 puts one layer in each of the four chunks
LAYOUTS = {
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "pp2_vpp2": {"pp": 2, "vpp": 2},
}
STEPS = 3
LR = 1e-2
# Adam's update g / (sqrt(v) + eps) is ~sign(g) wherever |g| >> eps, so it turns fp32 reduction-order noise (~1e-9)
# on gradients that are ~0 in exact arithmetic (attention keys: softmax ignores a shift) into differences of up to
# lr. eps=1e-4 keeps that below 1e-6 while staying under the gradients that matter (1e-3..1e-1).
ADAM_EPS = 1e-4


def _reference(data: dict) -> tuple[float, dict, dict, object]:
    """(loss, weights, grads, model) of the tiny GPT at TP=1/PP=1, built from the shared seed, on this rank alone."""
    from tests.distributed import _megatron_tiny as tiny

    tiny.init_layout()
    (model,) = tiny.build_model(tiny.tiny_config(num_layers=LAYERS))
    loss = tiny.forward_loss(model, data)
    loss.backward()
    return loss.item(), tiny.full_tensors([model]), tiny.full_tensors([model], grads=True), model


def _layouts_rank(rank: int, world_size: int) -> dict:
    import torch

    from tests.distributed import _megatron_tiny as tiny
    from topd_megatron.distributed import platform

    data = tiny.batch(seed=0)
    ref_loss, ref_weights, ref_grads, ref_model = _reference(data)
    with torch.no_grad():  # no mask: Megatron builds its default causal mask (device="cuda", transformer/utils.py:39)
        default_mask_loss = tiny.forward_loss(ref_model, {**data, "attention_mask": None}).item()
    out = {
        "reference": ref_loss,
        "default_mask": default_mask_loss,
        "layer_active": platform.apply(),
        "type_name_here": torch.ones(1).type(),  # only megatron.core.optimizer is told CUDA type names
    }
    for name, layout in LAYOUTS.items():
        tp, pp, vpp = layout.get("tp", 1), layout.get("pp", 1), layout.get("vpp")
        tiny.init_layout(tp=tp, pp=pp, vpp=vpp)
        config = tiny.tiny_config(LAYERS, tp, pp, vpp, layout.get("sequence_parallel", False))
        chunks = tiny.build_model(config)
        tiny.load_shards(chunks, ref_weights)
        chunks = tiny.wrap_ddp(chunks)
        loss = tiny.pipeline_loss(chunks, data, num_microbatches=4)
        grad_diff, covered = tiny.compare_shards(chunks, ref_grads, grads=True)
        out[name] = {"loss": loss, "grad_diff": grad_diff, "covered": covered}
    return out


def test_tp_sp_pp_vpp_match_single_process() -> None:
    results = spawn(_layouts_rank, 2, timeout=300)
    ref = results[0]["reference"]
    assert 4.0 < ref < 6.0, f"reference loss {ref} is not ~ln(128)=4.85 for a random init"
    assert results[1]["reference"] == ref
    assert all(r["layer_active"] for r in results), "the CPU platform layer was not active in the ranks"
    assert results[0]["type_name_here"] == "torch.FloatTensor"
    assert results[0]["default_mask"] == pytest.approx(ref, abs=TOL), "Megatron's default causal mask differs"
    for name in LAYOUTS:
        losses = [r[name]["loss"] for r in results if r[name]["loss"] is not None]
        assert losses, f"{name}: no rank reported a loss"
        for loss in losses:
            assert abs(loss - ref) < TOL, f"{name}: loss {loss} != reference {ref}"
        for rank, r in enumerate(results):
            assert r[name]["grad_diff"] < TOL, f"{name} rank {rank}: grads differ by {r[name]['grad_diff']}"
            assert r[name]["covered"] == 1.0, f"{name}: ranks compared {r[name]['covered']:.0%} of the grads"


def _optimizer_rank(rank: int, world_size: int) -> dict:
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tests.distributed import _megatron_tiny as tiny

    data = tiny.batch(seed=1)
    # Single-process reference: the whole batch, torch AdamW (Megatron's fallback Adam), clip_grad_norm_.
    tiny.init_layout()
    (ref_model,) = tiny.build_model(tiny.tiny_config(num_layers=2))
    init_weights = tiny.full_tensors([ref_model])
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=0.0, eps=ADAM_EPS)
    ref_losses, ref_norms, ref_weights = [], [], []
    for _ in range(STEPS):
        ref_opt.zero_grad()
        loss = tiny.forward_loss(ref_model, data)
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=1.0).item())
        ref_opt.step()
        ref_losses.append(loss.item())
        ref_weights.append(tiny.full_tensors([ref_model]))

    out = {"reference": {"losses": ref_losses, "norms": ref_norms}}
    my_half = {k: v if k == "attention_mask" else v.chunk(world_size)[rank] for k, v in data.items()}
    for distributed in (False, True):
        tiny.init_layout()  # TP=1, PP=1: both ranks are data-parallel
        chunks = tiny.build_model(tiny.tiny_config(num_layers=2))
        tiny.load_shards(chunks, init_weights)
        chunks = tiny.wrap_ddp(chunks, use_distributed_optimizer=distributed)
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=LR,
            weight_decay=0.0,
            adam_eps=ADAM_EPS,
            clip_grad=1.0,
            use_distributed_optimizer=distributed,
        )
        optimizer = get_megatron_optimizer(opt_config, chunks)
        losses, norms, weight_diffs = [], [], []
        for step in range(STEPS):
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            loss = torch.tensor(tiny.pipeline_loss(chunks, my_half, num_microbatches=1))
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            ok, grad_norm, _ = optimizer.step()
            assert ok, "optimizer step was skipped"
            losses.append(loss.item() / world_size)
            norms.append(float(grad_norm))
            weight_diffs.append(tiny.compare_shards(chunks, ref_weights[step], grads=False)[0])
        out[f"distributed={distributed}"] = {"losses": losses, "norms": norms, "weight_diffs": weight_diffs}
    return out


def test_ddp_and_megatron_optimizer_match_single_process_steps() -> None:
    results = spawn(_optimizer_rank, 2, timeout=300)
    ref = results[0]["reference"]
    assert ref["norms"][0] > 1.0, f"grad norm {ref['norms'][0]} <= clip_grad: the test would not exercise clipping"
    for variant in ("distributed=False", "distributed=True"):
        for rank, r in enumerate(results):
            got = r[variant]
            assert got["losses"] == pytest.approx(ref["losses"], abs=TOL), f"{variant} rank {rank}: losses"
            assert got["norms"] == pytest.approx(ref["norms"], rel=TOL), f"{variant} rank {rank}: grad norms"
            assert max(got["weight_diffs"]) < TOL, f"{variant} rank {rank}: weights differ {got['weight_diffs']}"
            assert got["losses"][-1] < got["losses"][0] - 0.1, f"{variant}: loss did not go down: {got['losses']}"


def _checkpoint_rank(rank: int, world_size: int, ckpt_dir: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    from tests.distributed import _megatron_tiny as tiny

    data = tiny.batch(seed=2)
    ref_loss, ref_weights, _, _ = _reference(data)
    (ref_model,) = tiny.build_model(tiny.tiny_config(num_layers=LAYERS))
    tiny.load_shards([ref_model], ref_weights)
    with torch.no_grad():
        ref_logits = ref_model(data["tokens"], data["position_ids"], data["attention_mask"])

    tiny.init_layout(tp=2, pp=2)
    chunks = tiny.build_model(tiny.tiny_config(LAYERS, tp=2, pp=2))
    tiny.load_shards(chunks, ref_weights)
    tp2pp2_loss = tiny.pipeline_loss(tiny.wrap_ddp(chunks), data, num_microbatches=2)
    dist_checkpointing.save(tiny.sharded_state_dict(chunks[0]), ckpt_dir)

    out = {"reference": ref_loss, "tp2pp2_loss": tp2pp2_loss}
    for fully_parallel in (False, True):
        tiny.init_layout(seed=99)  # TP=1, PP=1: four data-parallel ranks; another seed gives other weights
        (model,) = tiny.build_model(tiny.tiny_config(num_layers=LAYERS))
        differed_before = tiny.compare_shards([model], ref_weights, grads=False)[0]
        strategy = None
        if fully_parallel:  # each DP rank reads a quarter of the checkpoint, then they exchange (exchange_utils.py)
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(ckpt_dir), dp_group)
        loaded = dist_checkpointing.load(tiny.sharded_state_dict(model), ckpt_dir, sharded_strategy=strategy)
        model.load_state_dict(loaded)
        with torch.no_grad():
            logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
        out[f"fully_parallel={fully_parallel}"] = {
            "differed_before": differed_before,
            "weight_diff": tiny.compare_shards([model], ref_weights, grads=False)[0],
            "logits_equal": torch.equal(logits, ref_logits),
            "logits_shape": tuple(logits.shape),
        }
    return out


def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()  # dist_checkpointing.save needs an existing directory
    results = spawn(_checkpoint_rank, 4, args=(str(ckpt_dir),), timeout=300)
    ref = results[0]["reference"]
    tp2pp2 = [r["tp2pp2_loss"] for r in results if r["tp2pp2_loss"] is not None]
    assert len(tp2pp2) == 2 and all(abs(loss - ref) < TOL for loss in tp2pp2), (tp2pp2, ref)
    assert (ckpt_dir / "metadata.json").exists()
    for variant in ("fully_parallel=False", "fully_parallel=True"):
        for rank, r in enumerate(results):
            got = r[variant]
            assert got["differed_before"] > 1e-3, f"{variant} rank {rank}: the seed-99 model had the reference weights"
            assert got["weight_diff"] == 0.0, f"{variant} rank {rank}: loaded weights differ by {got['weight_diff']}"
            assert got["logits_shape"] == (4, 16, 128)
            assert got["logits_equal"], f"{variant} rank {rank}: logits after TP2xPP2 -> TP1 differ from the reference"
