"""Pins what topd_megatron.distributed.platform (the CPU layer) assumes about megatron-core; fails loudly when
Megatron changes.

It reads megatron/core's source files without importing Megatron (about a second, most of it the scan). When a test here
fails: re-check the function it names (the message says what the layer relies on), fix
topd_megatron/distributed/platform.py if needed, run tests/distributed/test_megatron_cpu.py, then record the new hash
or site here / in PINNED_SOURCES.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from topd_megatron.distributed import platform


def _megatron_core_root() -> Path:
    return Path(str(importlib.metadata.distribution("megatron-core").locate_file("megatron/core")))


def _definition(qualname: str) -> tuple[str, ast.AST]:
    """(source text of the file, the def/class node) named 'package.module:Class.method'."""
    module, _, path = qualname.partition(":")
    file = _megatron_core_root().joinpath(*module.split(".")[2:]).with_suffix(".py")
    source = file.read_text()
    node: ast.AST = ast.parse(source)
    for name in path.split("."):
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        found = [n for n in node.body if isinstance(n, defs) and n.name == name]  # type: ignore[attr-defined]
        if not found:
            raise LookupError(f"megatron-core no longer defines {qualname} (looked in {file})")
        node = found[-1]
    return source, node


def source_hash(qualname: str) -> str:
    """sha256[:16] of the exact source text of a Megatron function (decorators excluded), as in PINNED_SOURCES."""
    source, node = _definition(qualname)
    return hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()[:16]


def test_megatron_core_version_is_the_pinned_one() -> None:
    found = importlib.metadata.version("megatron-core")
    assert found == platform.MEGATRON_CORE_VERSION, (
        f"megatron-core {found} is installed; topd_megatron.distributed.platform was pinned against"
        f" {platform.MEGATRON_CORE_VERSION}. Check every failure below, update PINNED_SOURCES and"
        " MEGATRON_CORE_VERSION, and run tests/distributed/test_megatron_cpu.py"
    )


@pytest.mark.parametrize("qualname", sorted(platform.PINNED_SOURCES))
def test_pinned_megatron_function_unchanged(qualname: str) -> None:
    recorded, recheck = platform.PINNED_SOURCES[qualname]
    current = source_hash(qualname)
    assert current == recorded, (
        f"megatron-core changed {qualname}, which topd_megatron.distributed.platform relies on. Re-check: {recheck}. "
        f"If the layer still holds, record the new hash {current!r} in platform.PINNED_SOURCES."
    )


# Calls in megatron/core that pass a literal CUDA device to something the layer does not remap, by file and
# enclosing function; each is GPU-only (or unsupported on CPU) for the reason given.
KNOWN_UNREMAPPED_CUDA_SITES: dict[str, tuple[set[str], str]] = {
    "distributed/fsdp/src/megatron_fsdp/param_and_grad_buffer.py": (
        {"MultiGroupUBRAllocator.__enter__", "MultiGroupUBRAllocator.__exit__", "ParamAndGradBuffer.__init__"},
        "Megatron FSDP: not supported on CPU",
    ),
    "distributed/fsdp/src/megatron_fsdp/utils.py": (
        {"_get_cuda_rng_state", "_set_cuda_rng_state"},
        "Megatron FSDP: not supported on CPU",
    ),
    "distributed/torch_fully_sharded_data_parallel.py": (
        {"TorchFullyShardedDataParallel.__init__"},
        "torch FSDP2 wrapper: not supported on CPU",
    ),
    "fault_injector.py": ({"setup_fault_injection"}, "fault injection: GPU only"),
    "inference/symmetric_memory.py": ({"SymmetricMemoryBuffer.__init__"}, "NVSHMEM symmetric memory: GPU only"),
    "nccl_allocator.py": (
        {
            "MultiGroupMemPoolAllocator.__enter__",
            "MultiGroupMemPoolAllocator.__exit__",
            "deregister_mem_pool",
            "nccl_mem.__init__",
            "register_mem_pool",
        },
        "NCCL user buffers: GPU only",
    ),
    "optimizer/cpu_offloading/hybrid_optimizer.py": (
        {"HybridDeviceOptimizer._move_new_state_to_right_device"},
        "optimizer CPU offloading: meaningless without a GPU",
    ),
    "pipeline_parallel/combined_1f1b.py": ({"combined_forward_backward_step"}, "enable_autocast: unsupported"),
    "pipeline_parallel/schedules.py": ({"forward_step"}, "torch.autocast('cuda') when enable_autocast: unsupported"),
    "pipeline_parallel/utils.py": ({"set_streams"}, "CUDA streams for EP/A2A overlap: GPU only"),
    "tensor_parallel/random.py": (
        {"_get_cuda_rng_state", "_set_cuda_rng_state"},
        "graph-safe path only (use_cudagraphable_rng); _set_cuda_rng_state is replaced by platform section 5",
    ),
    "transformer/moe/moe_layer.py": (
        {"MoELayer.setup_delayed_wgrad_for_dispatch_backward_overlap"},
        "MoE dispatch overlap streams: GPU only",
    ),
    "transformer/moe/token_dispatcher.py": (
        {"MoEAlltoAllTokenDispatcher.__init__"},
        "moe_permute_fusion (TE): GPU only",
    ),
}


_CUDA_LITERAL = re.compile(r"""["']cuda(:\d+)?["']""")


def _is_cuda_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] == "cuda"


def _unremapped_cuda_sites() -> dict[str, dict[str, int]]:
    """{file: {enclosing function: first line}} of calls passing a literal CUDA device to a non-remapped callee."""
    remapped = {f"torch.{name}" for name in platform.REMAPPED_FACTORIES}
    root = _megatron_core_root()
    sites: dict[str, dict[str, int]] = {}

    def visit(node: ast.AST, scope: list[str], rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, [*scope, child.name], rel)
                continue
            if isinstance(child, ast.Call) and (
                any(kw.arg == "device" and _is_cuda_literal(kw.value) for kw in child.keywords)
                or any(_is_cuda_literal(arg) for arg in child.args)
            ):
                callee = ast.unparse(child.func)
                if callee not in remapped and not callee.endswith(".init_data"):
                    sites.setdefault(rel, {}).setdefault(".".join(scope) or "<module>", child.lineno)
            visit(child, scope, rel)

    for file in sorted(root.rglob("*.py")):
        text = file.read_text()
        if not _CUDA_LITERAL.search(text):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in some Megatron docstrings
            tree = ast.parse(text)
        visit(tree, [], file.relative_to(root).as_posix())
    return sites


def test_megatron_passes_literal_cuda_devices_only_to_remapped_functions() -> None:
    unexpected = [
        f"megatron/core/{rel}:{line} in {func}"
        for rel, funcs in _unremapped_cuda_sites().items()
        for func, line in funcs.items()
        if func not in KNOWN_UNREMAPPED_CUDA_SITES.get(rel, (set(), ""))[0]
    ]
    assert not unexpected, (
        "megatron-core now passes a literal CUDA device to a function topd_megatron.distributed.platform does not"
        " remap:\n  "
        + "\n  ".join(unexpected)
        + "\nAdd the callee to platform.REMAPPED_FACTORIES (or wrap it like ShardedTensor.init_data), or, if the code"
        " is GPU-only, record it in KNOWN_UNREMAPPED_CUDA_SITES with the reason."
    )


def test_apply_refuses_an_unexpected_megatron_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    monkeypatch.delenv(platform.ALLOW_UNPINNED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.19\.2, found 0\.99\.0"):
        platform._check_megatron_version()
    monkeypatch.setenv(platform.ALLOW_UNPINNED_ENV, "1")
    platform._check_megatron_version()  # the override lets it through


def test_apply_touches_nothing_where_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_active", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    watched = {
        **{f"torch.cuda.{name}": (torch.cuda, name) for name in platform.TORCH_CUDA_STANDINS},
        **{f"torch.{name}": (torch, name) for name in platform.REMAPPED_FACTORIES},
        "Tensor.cuda": (torch.Tensor, "cuda"),
        "Tensor.type": (torch.Tensor, "type"),
    }
    before = {key: getattr(owner, name) for key, (owner, name) in watched.items()}
    modules_before = set(sys.modules)
    assert platform.apply() is False
    assert platform.is_active() is False
    changed = [key for key, (owner, name) in watched.items() if getattr(owner, name) is not before[key]]
    assert not changed, f"apply() changed {changed} on a CUDA machine"
    assert set(sys.modules) == modules_before, "apply() imported modules on a CUDA machine"
