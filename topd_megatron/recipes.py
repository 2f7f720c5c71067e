"""Finding the recipes: the repository's `recipes/` folder, mounted as the package `topd_recipes` on first use.

    from topd_megatron import recipes
    cfg = recipes.get("tiny", ["train.steps=2"])     # a RunConfig, dotted-key overrides applied
    recipes.names()                                 # what `recipes/__init__.py` registers

Recipes live at the top of the repository, where users look for them and edit them; they are not installed as a
top-level package (a package named `recipes` would collide with other projects in a user's site-packages). The
folder is `$TOPD_RECIPES_DIR` when set (a copy of `recipes/` kept elsewhere), else `<repository>/recipes` next to
this package. Inside it, recipe modules import each other relatively (`from ._common import ...`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from topd_megatron.config import RunConfig
from topd_megatron.overrides import apply_overrides
from topd_megatron.paths import REPO_ROOT

PACKAGE = "topd_recipes"
"""The module name the recipes folder is mounted under."""


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    build: Callable[[], RunConfig]
    summary: str
    needs_tiny_pair: bool = False
    """The recipe trains the prepared tiny pair (`topd prepare` makes it; launchers run it first)."""


def recipes_dir() -> Path:
    """The folder holding the recipe modules (ValueError naming the fix when there is none)."""
    folder = Path(os.environ.get("TOPD_RECIPES_DIR") or REPO_ROOT / "recipes")
    if not (folder / "__init__.py").is_file():
        raise ValueError(
            f"no recipes folder at {folder}: run from a clone of the repository (pip install -e .) or set"
            " TOPD_RECIPES_DIR to a copy of its recipes/ folder"
        )
    return folder


def package() -> ModuleType:
    """The recipes folder as the package `topd_recipes` (imported once per process)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = recipes_dir()
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return module


def registry() -> dict[str, Recipe]:
    """Every registered recipe by name (`recipes/__init__.py`'s RECIPES)."""
    return {r.name: r for r in package().RECIPES}


def names() -> list[str]:
    return list(registry())


def recipe(name: str) -> Recipe:
    known = registry()
    if name not in known:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(known)}")
    return known[name]


def get(name: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The recipe's RunConfig with dotted-key overrides applied (see topd_megatron.overrides)."""
    return apply_overrides(recipe(name).build(), list(overrides))
