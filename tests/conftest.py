"""Shared fixtures: tiny random HF checkpoints built locally, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from topd_megatron.paths import shared_data_dir

SHARED_DATA = shared_data_dir()
"""The project's real data (benchmarks, Qwen tokenizers); see topd_megatron/paths.py for how it is found."""


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from topd_megatron.models.tiny import default_corpus, make_tiny_tokenizer

    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", default_corpus(), vocab_size=384)


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


@pytest.fixture(scope="session")
def synthetic_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(student, teacher) tiny random HF checkpoints over the synthetic task's word-level tokenizer: a 2-layer Qwen3
    student and a wider 2-layer Llama teacher (different architectures, one tokenizer)."""
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint, make_word_tokenizer
    from topd_megatron.tasks.synthetic import default

    root = tmp_path_factory.mktemp("pair")
    tok = make_word_tokenizer(root / "tok", default().tokenizer_corpus())
    student = make_tiny_checkpoint(root / "student", TinyModelSpec(family="qwen3", num_layers=2, seed=3), tok)
    teacher = make_tiny_checkpoint(
        root / "teacher", TinyModelSpec(family="llama", hidden_size=96, num_layers=2, seed=4), tok
    )
    return student, teacher
