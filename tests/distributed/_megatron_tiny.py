"""A tiny Megatron-Core GPT and the plumbing to compare it across parallel layouts (used by test_megatron_cpu.py).

The reference is always the same model at TP=1, PP=1 built from one seed. A sharded model (any TP/PP/VPP) gets
its weights from that reference through Megatron's own `sharded_state_dict` (each ShardedTensor names its global
key, layer offset and shard offset), so its loss and gradients must equal the reference's up to fp32 rounding.
Everything runs in fp32 without dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel

VOCAB = 128
SEQ = 16
HIDDEN = 64
SEED = 1234


def init_layout(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = SEED) -> None:
    """(Re)initialise Megatron's parallel state for this layout and seed every RNG with `seed`."""
    init_model_parallel(ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=False, seed=seed))


def tiny_config(
    num_layers: int = 2, tp: int = 1, pp: int = 1, vpp: int | None = None, sequence_parallel: bool = False
) -> TransformerConfig:
    """fp32, no dropout. TP/PP sizes must be given: without them every pipeline stage builds all layers."""
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=2 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bias_dropout_fusion=False,  # torch.compile of the fused kernel costs seconds per process on CPU
        # Interleaved PP=2: both neighbours are the same rank, and the batched p2p path posts its two sends to it in
        # an order the receiver pairs the other way round (activations land in the gradient buffer). The unbatched
        # path sends the two directions on two communicators (p2p_communication.py:67). Megatron-LM gets there
        # through overlap_p2p_comm=True, its default with VPP. Not CPU-specific.
        batch_p2p_comm=vpp is None,
    )


def build_model(config: TransformerConfig) -> list[GPTModel]:
    """The model chunks this rank holds (one per virtual stage), for the current parallel state."""
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=get_gpt_layer_local_spec(),
                vocab_size=VOCAB,
                max_sequence_length=SEQ,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage if config.virtual_pipeline_model_parallel_size else None,
            )
        )
    return chunks


def sharded_state_dict(chunk: torch.nn.Module) -> dict:
    """Megatron's sharded state dict of one model chunk (DDP-wrapped or not)."""
    return getattr(chunk, "module", chunk).sharded_state_dict()


def _sharded_tensors(chunks: list[torch.nn.Module]) -> Iterator[ShardedTensor]:
    for chunk in chunks:
        sharded, _ = extract_sharded_tensors(sharded_state_dict(chunk))
        yield from _flatten(sharded)


def _flatten(tree: object) -> Iterator[ShardedTensor]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _flatten(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _flatten(value)
    elif isinstance(tree, ShardedTensor):
        yield tree


def _global_index(sh_ten: ShardedTensor) -> tuple[tuple[str, tuple[int, ...]], tuple[slice, ...]]:
    """(key and layer offset in the reference, slice of the reference tensor this shard covers)."""
    prepend = sh_ten.prepend_axis_num
    offsets = sh_ten.global_offset[prepend:]
    index = tuple(slice(o, o + n) for o, n in zip(offsets, sh_ten.local_shape, strict=True))
    return (sh_ten.key, tuple(sh_ten.global_offset[:prepend])), index


def full_tensors(reference: list[torch.nn.Module], grads: bool = False) -> dict:
    """The TP=1/PP=1 reference's weights (or gradients) by (key, layer offset), cloned."""
    out = {}
    for sh_ten in _sharded_tensors(reference):
        name, _ = _global_index(sh_ten)
        out[name] = _grad(sh_ten.data) if grads else sh_ten.data.detach().clone()
    return out


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    return grad.detach().clone()


def load_shards(chunks: list[torch.nn.Module], full: dict) -> None:
    """Copy this rank's shard of every reference tensor into `chunks`."""
    with torch.no_grad():
        for sh_ten in _sharded_tensors(chunks):
            name, index = _global_index(sh_ten)
            sh_ten.data.copy_(full[name][index])


def compare_shards(chunks: list[torch.nn.Module], full: dict, grads: bool) -> tuple[float, float]:
    """(max |shard - reference slice| over this rank's tensors or their grads, fraction of all reference elements
    that some rank compared). Collective over the default group: every rank must call it."""
    worst = 0.0
    covered = {name: torch.zeros(ten.shape) for name, ten in full.items()}
    for sh_ten in _sharded_tensors(chunks):
        name, index = _global_index(sh_ten)
        mine = _grad(sh_ten.data) if grads else sh_ten.data.detach()
        worst = max(worst, (mine - full[name][index]).abs().max().item())
        covered[name][index] = 1.0
    flat = torch.cat([c.flatten() for c in covered.values()])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
    return worst, flat.mean().item()


def batch(seed: int, size: int = 4) -> dict[str, torch.Tensor]:
    """Token ids, labels (next tokens), positions and an explicit causal mask for `size` sequences."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(SEQ).expand(size, SEQ).contiguous(),
        "attention_mask": torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1),
    }


def micro_batches(data: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`data` split into `n` equal micro-batches along the batch dimension (the mask is shared)."""
    return [{k: v if k == "attention_mask" else v.chunk(n)[i] for k, v in data.items()} for i in range(n)]


def forward_loss(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a whole (non-pipelined) model."""
    per_token = model(
        data["tokens"], data["position_ids"], data["attention_mask"], labels=data["labels"]
    )  # [b, s], vocab-parallel cross-entropy
    return per_token.float().mean()


def _forward_step(data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
    data = next(data_iterator)
    output = model(data["tokens"], data["position_ids"], data["attention_mask"], labels=data["labels"])

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place by num_microbatches

    return output, loss_func


def pipeline_loss(chunks: list[torch.nn.Module], data: dict[str, torch.Tensor], num_microbatches: int) -> float | None:
    """Run Megatron's schedule (1F1B, interleaved or none) over `num_microbatches`; the mean loss on the last stage."""
    mbs = micro_batches(data, num_microbatches)
    iterators = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=data["tokens"].shape[0] // num_microbatches,
        forward_only=False,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.stack([d["loss"] for d in losses]).mean().item()


def wrap_ddp(chunks: list[GPTModel], use_distributed_optimizer: bool = False) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk; the schedule then finishes grad sync through finalize_model_grads."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def measure_overhead(rounds: int = 7, steps: int = 30) -> dict[str, float]:
    """Best-of-`rounds` median ms of one tiny-GPT fwd+bwd (2 layers, 2 sequences, 1 thread) in three settings: the
    CPU layer as installed; its global wrappers (platform sections 3 and 4) swapped back to torch's own functions;
    and the layer plus an empty TorchFunctionMode (the least a mode-based layer would cost). Single process."""
    import statistics
    import time

    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.overrides import TorchFunctionMode

    from topd_megatron.distributed import platform
    from topd_megatron.distributed.env import init_process_group

    class EmptyMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    init_process_group()
    init_layout()
    (model,) = build_model(tiny_config(num_layers=2))
    data = batch(seed=0, size=2)
    wrapped = [(torch, name) for name in platform.REMAPPED_FACTORIES]
    wrapped += [(torch.Tensor, "cuda"), (torch.Tensor, "type"), (ShardedTensor, "init_data")]
    installed = {(owner, name): getattr(owner, name) for owner, name in wrapped}

    def step() -> None:
        forward_loss(model, data).backward()

    def timed() -> float:
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    for _ in range(5):
        step()
    results: dict[str, list[float]] = {"layer": [], "wrappers off": [], "layer + empty mode": []}
    for _ in range(rounds):
        results["layer"].append(timed())
        for (owner, name), fn in installed.items():
            setattr(owner, name, fn.__wrapped__)
        results["wrappers off"].append(timed())
        for (owner, name), fn in installed.items():
            setattr(owner, name, fn)
        with EmptyMode():
            results["layer + empty mode"].append(timed())
    return {name: min(values) for name, values in results.items()}


if __name__ == "__main__":
    for setting, ms in measure_overhead().items():
        print(f"{setting:>20}: {ms:.2f} ms per fwd+bwd")
