"""Import Megatron-Bridge on machines without TransformerEngine.

Megatron-Bridge 0.6.2 imports `transformer_engine.pytorch` unconditionally in one module,
`megatron/bridge/peft/lora_layers.py` (LoRA adapters built from TE ops), which `AutoBridge`'s import path reaches.
We do not use LoRA. Without TE (every CPU machine, and GPU machines without it), `import_bridge()` lets exactly that
one module see a placeholder `transformer_engine` while it executes, and removes the placeholder right after, so no
other module (Megatron-Core checks `import transformer_engine` to choose its layer specs) ever sees a fake TE.
With TE installed this module does nothing but `import megatron.bridge`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any

_GUARDED = "megatron.bridge.peft.lora_layers"
_TE_NAMES = ("transformer_engine", "transformer_engine.pytorch")


class _PlaceholderType(type):
    """Classes whose attributes are again placeholder classes (`te.ops.Sequential` in annotations)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderType(name, (), {"__module__": cls.__module__})
        setattr(cls, name, value)
        return value


class _Placeholder(types.ModuleType):
    """Any attribute is a fresh, never-instantiated class, so isinstance() checks against it are simply False."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderType(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _GuardedLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        te = _Placeholder("transformer_engine")
        te.__path__ = []  # a package, so `transformer_engine.pytorch` resolves
        te.pytorch = _Placeholder("transformer_engine.pytorch")
        saved = {name: sys.modules.get(name) for name in _TE_NAMES}
        sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te.pytorch
        try:
            self._inner.exec_module(module)
        finally:
            for name, old in saved.items():
                if old is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = old


class _GuardFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _GUARDED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _GuardedLoader(spec.loader)
        return spec


class _DropBelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def have_transformer_engine() -> bool:
    """True when the real TransformerEngine PyTorch extension is importable."""
    if isinstance(sys.modules.get("transformer_engine"), _Placeholder):
        return False
    return importlib.util.find_spec("transformer_engine") is not None


def import_bridge() -> types.ModuleType:
    """Import and return `megatron.bridge` (with `AutoBridge`), with or without TransformerEngine."""
    # Megatron-Bridge logs every optional import it could not make (FP8 managers without TE, ...) with a traceback,
    # at INFO, forcing its logger's level at import; a filter survives that.
    noisy = logging.getLogger("megatron.bridge.utils.import_utils")
    if not any(isinstance(f, _DropBelowWarning) for f in noisy.filters):
        noisy.addFilter(_DropBelowWarning())
    if "megatron.bridge" in sys.modules or have_transformer_engine():
        import megatron.bridge

        return megatron.bridge
    # Modules Megatron-Core decides TE-or-not in must be imported before the placeholder can exist.
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.transformer.moe.moe_utils  # noqa: F401

    finder = _GuardFinder()
    sys.meta_path.insert(0, finder)
    try:
        import megatron.bridge
    finally:
        sys.meta_path.remove(finder)
    return megatron.bridge
