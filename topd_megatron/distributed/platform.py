"""CPU platform layer: lets Megatron-Core 0.19.2 run on CPU over gloo. Call `apply()` once at process start.

`topd_megatron.distributed.env.init_process_group()` calls it before creating the process group, so every entry
point and every `topd_megatron.distributed.launch.spawn` rank gets it. It is active only where
`torch.cuda.is_available()` is False: on a
CUDA machine `apply()` returns False and touches nothing. It is idempotent and returns True when the layer is active.

With it these run on CPU, each checked against a single-process reference by tests/distributed/test_megatron_cpu.py:
TP, TP + sequence parallel, PP, interleaved PP, DDP, `get_megatron_optimizer` with gradient clipping, the distributed
optimizer, and dist_checkpointing (save at TP2xPP2, plain and fully parallel load at TP1).

What it handles, one section per mechanism below (file:line in megatron/core 0.19.2; those tests reach every site
listed unless it is marked "not exercised"):

1. Version gate. The layer leans on Megatron internals whose source is pinned in `PINNED_SOURCES` and checked by
   tests/unit/test_platform_pins.py. Another megatron-core may import and run yet give wrong numbers (an RNG state
   no longer restored, a type check that now passes for the wrong reason) or fail deep inside a collective, far
   from the cause. The pin test runs only where the tests run; `apply()` runs in every process, so it refuses an
   unexpected version with an error that says what to do. TOPD_ALLOW_UNPINNED_MEGATRON=1 overrides it, to try a
   new version (then run the pin test to see what changed).

2. `torch.cuda` stand-ins, since without CUDA these raise or silently do nothing:
   - `current_device()` returns 'cpu' (an index is not enough: `device=0` means cuda:0). Called in forward and in
     autograd backward: tensor_parallel/layers.py:305/647/1000/1041/1363/1403, mappings.py:145/185, utils.py:715
     (global memory buffer); also p2p_communication.py:334/342, param_and_grad_buffer.py:1180/1186,
     state_dict_saver.py:252.
   - `synchronize()` and `empty_cache()` do nothing (CPU work is synchronous): p2p_communication.py:419,
     filesystem_async.py:248, fully_parallel.py:287/296.
   - `current_stream()` returns a stream whose waits do nothing: param_and_grad_buffer.py:632 (start_grad_sync).
   - `get_rng_state` / `set_rng_state` / `manual_seed` act on the CPU default generator, which on a CPU-only
     machine plays the device generator that Megatron's RNG tracker forks (tensor_parallel/random.py:118,
     303-306, 490). Without this they are no-ops (`_lazy_call` queues them forever): TP weight init and dropout
     would not follow the tracker. One difference from GPU remains: outside a tracker fork, host-side sampling
     and what would be device-side sampling (dropout outside TP regions) now draw from the same generator.

3. 'cuda' device arguments mean the CPU. Megatron hard-codes `device="cuda"` and `.cuda()`: schedules.py:749/
   1121/2292, clip_grads.py:108/112/180, optimizer.py:315/698/702/1249, utils.py:1332, transformer/utils.py:39
   (the default causal mask), exchange_utils.py:105/109/506 (fully parallel load), ... The factories it uses that
   way (`REMAPPED_FACTORIES`), `Tensor.cuda` and `ShardedTensor.init_data` are wrapped to read a CUDA device as
   'cpu'. A wrapper costs one Python call per factory call and nothing per compute op. A TorchFunctionMode would
   catch every op, but even an empty one costs 1.2-2 ms on a 5.4 ms tiny-model fwd+bwd (measured, see below) and
   holds only in the thread that enters it. tests/unit/test_platform_pins.py scans megatron/core for literal CUDA
   devices passed to anything else.

4. `Tensor.type()` names. Megatron's optimizers branch on type strings: clip_grads.py:174 asserts
   'torch.cuda.FloatTensor' (reached whenever clip_grad > 0); distrib_optimizer.py:401/466/758 and
   optimizer.py:1009/1028 (bf16/fp16 params, not exercised) raise on anything but
   'torch.cuda.{Float,Half,BFloat16}Tensor'. For callers in `megatron.core.optimizer` only, a CPU tensor reports
   the CUDA type name; everyone else sees the true name.

5. Megatron's RNG tracker. `_set_cuda_rng_state` (tensor_parallel/random.py:135, called at 308/323/345) sets the
   CUDA generator through `_lazy_call`; it is replaced by a CPU `set_rng_state` (CUDA-graph-safe states have no
   CPU equivalent and raise). The tracker's fork (random.py:333) warns 'CPU RNG state changed within GPU RNG
   context' whenever work inside a fork draws random numbers, which on CPU is every fork that does (weight init,
   dropout): that one message is filtered from its logger. The CPU state outside a fork is restored on exit, as
   the CUDA state is on GPU.

6. Sequence parallel with torch norms. Without Apex the local layer spec uses `WrappedTorchNorm`, which asserts
   `not config.sequence_parallel` (transformer/torch_norm.py:50). Under sequence parallelism a norm only needs its
   weight grads summed over TP, which `finalize_model_grads` does for parameters marked `sequence_parallel`
   (finalize_model_grads.py:452), as Apex's FusedLayerNorm marks them (fused_layer_norm.py:119). The wrapper
   builds the torch norm from a copy of the config with sequence_parallel=False and marks its parameters.

Not handled, being the same on GPU (the caller's job): dist_checkpointing.save needs an existing directory
(serialization.py:420), psutil (a declared dependency), and an `if __name__ == "__main__"` guard in scripts that
save (its writer starts a spawn-mode Manager). Not supported on CPU: CUDA graphs, FP8, NCCL user buffers, Megatron
FSDP, optimizer CPU offloading, partial distributed optimizer and MoE overlap streams (`torch.cuda.Stream`), and
`enable_autocast` (`torch.autocast("cuda")` is disabled with a warning when CUDA is absent).

Overhead, tiny GPT (hidden 64, 2 layers, 2x16 tokens) fwd+bwd, 1 thread, best median of 7x30 steps on a busy
2-core machine: 5.43 ms with the layer, 5.37 ms with its global wrappers (sections 3 and 4) swapped back to torch's
own functions (run again: 6.02 vs 6.05), i.e. within noise. Reproduce: `python -m tests.distributed._megatron_tiny`.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

MEGATRON_CORE_VERSION = "0.19.2"
"""The megatron-core version this layer was written for; PINNED_SOURCES were recorded from it."""
ALLOW_UNPINNED_ENV = "TOPD_ALLOW_UNPINNED_MEGATRON"
"""Set to 1 to apply the layer on another megatron-core version (then run tests/unit/test_platform_pins.py)."""

PINNED_SOURCES: dict[str, tuple[str, str]] = {
    # "module:qualname" of a Megatron function this layer replaces, wraps or relies on: (sha256[:16] of its source
    # text, what to re-check if it changed). tests/unit/test_platform_pins.py recomputes the hashes.
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": (
        "dea947ca0b7dc92b",
        "replaced by _set_rng_state_cpu (section 5): its signature, and that it only sets the device RNG state",
    ),
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": (
        "0c2b8f05b864739e",
        "must still read torch.cuda.random.get_rng_state when graph_safe=False (section 2)",
    ),
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add": (
        "c7b54631963881cc",
        "must still use only torch.cuda.get_rng_state/manual_seed and _set_cuda_rng_state (sections 2 and 5)",
    ),
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork": (
        "92b05af7dcf35f45",
        "the filtered warning text and the restore-on-exit logic (section 5)",
    ),
    "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed": (
        "5ffdbe70cf9d0d16",
        "must still seed through torch.cuda.manual_seed and the tracker only (section 2)",
    ),
    "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucketGroup.start_grad_sync": (
        "eabd0cc281353408",
        "uses of torch.cuda.current_stream() beyond wait_event/wait_stream (section 2)",
    ),
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": (
        "19d15a603c4a9b10",
        "the Tensor.type() assertion (section 4)",
    ),
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": (
        "50d3a4557502a5a2",
        "the Tensor.type() checks (section 4)",
    ),
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._build_model_and_main_param_groups": (
        "8cb3e3830d392558",
        "the Tensor.type() checks (section 4)",
    ),
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": (
        "5771a1b549f9739f",
        "the Tensor.type() check (section 4)",
    ),
    "megatron.core.dist_checkpointing.mapping:ShardedTensor.init_data": (
        "68bb88e62a3693be",
        "wrapped by init_data_on_cpu (section 3): its device argument",
    ),
    "megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__": (
        "0b47766ef14b10d0",
        "wrapped by torch_norm_allowing_sequence_parallel (section 6): its signature and config checks",
    ),
    "megatron.core.distributed.finalize_model_grads:_allreduce_non_tensor_model_parallel_grads": (
        "59a4d77616f3a9ec",
        "must still sum over TP the grads of parameters marked `sequence_parallel` (section 6)",
    ),
}

_active = False


def is_active() -> bool:
    """Whether `apply()` has installed the CPU layer in this process."""
    return _active


def apply() -> bool:
    """Install the CPU layer if CUDA is unavailable (idempotent). Returns True when the layer is active.

    On CPU it imports megatron.core, and raises RuntimeError on an unexpected megatron-core version unless
    TOPD_ALLOW_UNPINNED_MEGATRON=1.
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    _check_megatron_version()
    _install_torch_cuda_standins()
    _install_device_remapping()
    _install_cuda_type_names()
    _install_rng_tracker_on_cpu()
    _install_torch_norm_sequence_parallel()
    _active = True
    return True


# --- 1. Version gate --------------------------------------------------------------------------------------------------


def _check_megatron_version() -> None:
    try:
        found = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError("topd_megatron.distributed.platform: megatron-core is not installed") from e
    if found != MEGATRON_CORE_VERSION and os.environ.get(ALLOW_UNPINNED_ENV) != "1":
        raise RuntimeError(
            f"topd_megatron.distributed.platform: the CPU layer was written for megatron-core"
            f" {MEGATRON_CORE_VERSION}, found {found}. It patches Megatron internals that may have changed: run"
            f" tests/unit/test_platform_pins.py"
            f" to see which and update topd_megatron/distributed/platform.py, or set {ALLOW_UNPINNED_ENV}=1 to try"
            " anyway."
        )


# --- 2. torch.cuda stand-ins ------------------------------------------------------------------------------------------


class _NullStream:
    """What `torch.cuda.current_stream()` returns on CPU: work is synchronous, so there is nothing to wait for."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NULL_STREAM = _NullStream()


def _manual_seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


TORCH_CUDA_STANDINS: dict[str, Callable] = {
    "current_device": lambda: "cpu",
    "synchronize": lambda device=None: None,
    "empty_cache": lambda: None,
    "current_stream": lambda device=None: _NULL_STREAM,
    "get_rng_state": lambda device="cuda": torch.get_rng_state(),
    "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
    "manual_seed": _manual_seed_cpu,
}
"""torch.cuda functions replaced on CPU, by name."""


def _install_torch_cuda_standins() -> None:
    for name, standin in TORCH_CUDA_STANDINS.items():
        setattr(torch.cuda, name, standin)
    for name in ("get_rng_state", "set_rng_state", "manual_seed"):
        setattr(torch.cuda.random, name, TORCH_CUDA_STANDINS[name])  # random.py:118 reads it from the submodule


# --- 3. 'cuda' device arguments mean the CPU --------------------------------------------------------------------------

REMAPPED_FACTORIES = ("tensor", "zeros", "ones", "empty", "empty_like")
"""torch functions whose `device=` may name CUDA; the pin test checks that Megatron passes a literal one to no other."""


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # torch reads a bare index as a CUDA device


def _remap_device_argument(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def factory_on_cpu(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return factory_on_cpu


def _install_device_remapping() -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for name in REMAPPED_FACTORIES:
        setattr(torch, name, _remap_device_argument(getattr(torch, name)))

    @functools.wraps(torch.Tensor.cuda)
    def cuda_on_cpu(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        return self.to("cpu", non_blocking=non_blocking, **kwargs)

    torch.Tensor.cuda = cuda_on_cpu

    # Its default init_fn is the torch.empty bound before apply() ran; fully parallel load passes it "cuda".
    init_data = ShardedTensor.init_data

    @functools.wraps(init_data)
    def init_data_on_cpu(self: ShardedTensor, device: Any, *args: Any, **kwargs: Any) -> None:
        return init_data(self, "cpu" if _is_cuda_device(device) else device, *args, **kwargs)

    ShardedTensor.init_data = init_data_on_cpu


# --- 4. Tensor.type() names for Megatron's optimizer checks -----------------------------------------------------------

_CUDA_TYPE_NAME_CALLERS = "megatron.core.optimizer."


def _install_cuda_type_names() -> None:
    tensor_type = torch.Tensor.type

    @functools.wraps(tensor_type)
    def type_as_cuda_for_megatron_optimizer(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # a conversion, not a query
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        if self.device.type == "cpu":
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(_CUDA_TYPE_NAME_CALLERS):
                return "torch.cuda." + name.removeprefix("torch.")
        return name

    torch.Tensor.type = type_as_cuda_for_megatron_optimizer


# --- 5. Megatron's RNG tracker ----------------------------------------------------------------------------------------

_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


def _set_rng_state_cpu(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    if graph_safe:
        raise NotImplementedError("CUDA-graph-safe RNG states (use_cudagraphable_rng) have no CPU equivalent")
    torch.set_rng_state(new_state)


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _FORK_WARNING


def _install_rng_tracker_on_cpu() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._set_cuda_rng_state = _set_rng_state_cpu
    logging.getLogger(megatron_random.__name__).addFilter(_DropForkWarning())


# --- 6. Sequence parallel with torch norms ----------------------------------------------------------------------------


def _install_torch_norm_sequence_parallel() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build_norm = WrappedTorchNorm.__new__

    @functools.wraps(build_norm)
    def torch_norm_allowing_sequence_parallel(cls: type, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return build_norm(cls, config, *args, **kwargs)
        config_without_sp = copy.copy(config)  # shallow, so __post_init__ does not run again
        config_without_sp.sequence_parallel = False
        norm = build_norm(cls, config_without_sp, *args, **kwargs)
        for param in norm.parameters():
            # finalize_model_grads sums these over TP: each TP rank saw only its shard of the sequence.
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(torch_norm_allowing_sequence_parallel)
