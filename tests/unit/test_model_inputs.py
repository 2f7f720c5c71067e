"""Bad model inputs fail early with one clear error naming the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from tests.conftest import SHARED_DATA
from topd_megatron.cli import main as topd_main
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig, check_layout
from topd_megatron.models.format import CheckpointError, checkpoint_kind
from topd_megatron.models.tokenizer import check_same_tokenizer

QWEN3_TOKENIZER = SHARED_DATA / "tokenizers" / "qwen3-4b-2507"
QWEN2_TOKENIZER = SHARED_DATA / "tokenizers" / "qwen2-1.5b-instruct"


def _layout_error(ckpt: Path, **parallel: int) -> str:
    config = AutoConfig.from_pretrained(str(ckpt))
    with pytest.raises(ValueError) as info:
        check_layout(config, ParallelConfig(**parallel), ModelConfig(path=str(ckpt)), "student")
    return str(info.value)


def test_tp_that_does_not_divide_heads(tiny_checkpoints: dict[str, Path]) -> None:
    msg = _layout_error(tiny_checkpoints["qwen3"], tp=3)
    assert "TP=3 does not divide num_attention_heads=4" in msg
    assert "num_key_value_heads=2" in msg


def test_tp_that_does_not_divide_the_vocabulary(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "odd_vocab"
    shutil.copytree(tiny_checkpoints["llama"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 385
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = _layout_error(ckpt, tp=2)
    assert "does not divide vocab_size=385" in msg and "pad_vocab_to_multiple_of" in msg
    # With padding the same layout is accepted.
    check_layout(
        AutoConfig.from_pretrained(str(ckpt)),
        ParallelConfig(tp=2),
        ModelConfig(path=str(ckpt), pad_vocab_to_multiple_of=64),
        "student",
    )


def test_pp_that_does_not_divide_layers(tiny_checkpoints: dict[str, Path]) -> None:
    assert "PP=3 x VPP=1 does not divide num_hidden_layers=4" in _layout_error(tiny_checkpoints["qwen2"], pp=3)


def test_missing_and_partial_checkpoints(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint_kind(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint"):
        checkpoint_kind(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_checkpoints["qwen3"] / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        checkpoint_kind(no_weights)
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["qwen3"], sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="1 of 2 safetensors shards .* missing"):
        checkpoint_kind(sharded)
    partial = tmp_path / "partial_topd"
    (partial / "model").mkdir(parents=True)
    (partial / "topd_checkpoint.json").write_text(json.dumps({"format": "topd-megatron/1", "model_dir": "model"}))
    with pytest.raises(CheckpointError, match="partial topd checkpoint"):
        checkpoint_kind(partial)
    assert checkpoint_kind(tiny_checkpoints["qwen3"]) == "hf"


def test_teacher_with_another_tokenizer_is_refused(tiny_tokenizer_dir: Path) -> None:
    check_same_tokenizer(QWEN3_TOKENIZER, QWEN3_TOKENIZER)
    with pytest.raises(ValueError, match="vocabularies differ") as info:
        check_same_tokenizer(tiny_tokenizer_dir, QWEN3_TOKENIZER)
    assert "must share one tokenizer" in str(info.value)
    # Same BPE files, different special tokens / chat template (Qwen2 vs Qwen3): still a different tokenizer.
    with pytest.raises(ValueError, match="differs from the student's"):
        check_same_tokenizer(QWEN2_TOKENIZER, QWEN3_TOKENIZER)


def test_cli_refuses_a_mismatched_pair_before_starting_ranks(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    foreign = make_tiny_checkpoint(tmp_path / "foreign", TinyModelSpec(family="qwen3"), QWEN3_TOKENIZER)
    rc = topd_main(["agree", "--student", str(tiny_checkpoints["qwen3"]), "--teacher", str(foreign), "--tp", "2"])
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err
    rc = topd_main(["agree", "--student", str(tiny_checkpoints["qwen3"]), "--teacher", str(foreign), "--tp", "3"])
    assert rc == 2
    assert "TP=3 does not divide" in capsys.readouterr().err


def test_a_prompt_longer_than_the_sequence_length_is_refused_before_any_rank_starts(
    synthetic_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses
    import json

    from tests.distributed.test_train import make_config

    cfg = make_config(synthetic_pair, tmp_path / "run", "opd", steps=1)
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, seq_length=20))
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert topd_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train problem" in err and "its prompt has" in err and "with train.max_new_tokens=12" in err, err
    assert "> 20, the sequence length of the models" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_generated_windows_count_towards_the_sequence_length(synthetic_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """TOPD's windows (K tokens after (x, y_<t), t up to the last response token) make a training sequence up to
    prompt + max_new_tokens - 1 + K long: a length that fits OPD's rollouts is refused for TOPD, naming the window."""
    import dataclasses

    from tests.distributed.test_train import make_config
    from topd_megatron.models.format import hf_dir
    from topd_megatron.models.tokenizer import encode_prompt, load_tokenizer
    from topd_megatron.tasks import load_task
    from topd_megatron.training.loop import check_prompt_lengths

    opd = make_config(synthetic_pair, tmp_path / "opd", "opd", steps=1)
    task = load_task(opd.task)
    pool = task.train_problems(opd.train.problem_pool, seed=opd.train.seed)
    tokenizer = load_tokenizer(hf_dir(opd.student.path))
    train_prompt = max(len(encode_prompt(tokenizer, p.prompt)) for p in pool[: opd.train.prompts_per_step])
    evals = task.eval_problems(opd.eval.problems, seed=opd.eval.problem_seed)
    eval_prompt = max(len(encode_prompt(tokenizer, p.prompt)) for p in evals)
    fits_opd = max(train_prompt, eval_prompt) + opd.train.max_new_tokens  # both use 12 new tokens
    window = fits_opd - (train_prompt + opd.train.max_new_tokens) + 2  # one token too many for TOPD
    topd = make_config(synthetic_pair, tmp_path / "topd", "topd", steps=1)
    topd.objective.detection.window = window

    def at(cfg, seq_length: int):
        return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, seq_length=seq_length))

    check_prompt_lengths(at(opd, fits_opd), task, pool)
    with pytest.raises(ValueError, match=f"and windows of objective.detection.window={window} the sequence would have"):
        check_prompt_lengths(at(topd, fits_opd), task, pool)
    check_prompt_lengths(at(topd, fits_opd + 1), task, pool)
