"""Shared fixtures: tiny random HF checkpoints built locally, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from topd_megatron.paths import shared_data_dir

SHARED_DATA = shared_data_dir()
"""The project's real data (benchmarks, Qwen tokenizers); see topd_megatron/paths.py for how it is found."""


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from topd_megatron.models.tiny import _default_corpus, make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", _default_corpus(), vocab_size=384)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """family -> HF checkpoint dir: 4 layers (so PP=2 x VPP=2 splits), 4 heads / 2 KV heads, vocab 384."""
    from topd_megatron.models.tiny import FAMILIES, TinyModelSpec, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    return {
        family: make_tiny_checkpoint(
            root / family, TinyModelSpec(family=family, num_layers=4, seed=10 + i), tiny_tokenizer_dir
        )
        for i, family in enumerate(FAMILIES)
    }
