"""Checkpoint conversion HF <-> topd (tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py) on gloo ranks.

- Round trips HF -> topd -> HF reproduce every safetensors tensor bit for bit (fp32), with the conversion and the
  export at different layouts: TP=2 -> TP=1 for every family and for tied embeddings, TP=1 x PP=2 -> TP=2, and
  TP=2 with a padded vocabulary -> TP=1 x PP=2.
- A student trained and saved by the training loop's checkpointing exports to a directory that transformers loads
  (local files only) and that gives the Megatron student's logits.
- Bad input fails in the launcher, before any rank starts, with exit status 2 and one line naming the problem.

Time: a process's first dist_checkpointing save starts a multiprocessing manager (seconds on a small CPU), so every
checkpoint that needs a save on the ranks is written by one spawn (`saved`); the exports and one more conversion
call the tools' `main()` in this process, reusing its rank launcher. The error paths and --help run the real scripts
as subprocesses.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.distributed.test_models import TOKENS, _forward
from topd_megatron.distributed.launch import spawn
from topd_megatron.models.convert import ImportConfig, check_import, import_rank
from topd_megatron.models.tiny import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
TO_MEGATRON = ROOT / "tools" / "convert_hf_to_megatron.py"
TO_HF = ROOT / "tools" / "convert_megatron_to_hf.py"


@functools.cache
def _tool(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _convert(tool: Path, *args: str) -> None:
    assert _tool(tool).main([str(a) for a in args]) == 0, f"{tool.name} {' '.join(map(str, args))} failed"


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {hf_dir}"
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _assert_same_tensors(original: Path, exported: Path) -> None:
    want, got = _tensors(original), _tensors(exported)
    assert sorted(got) == sorted(want), f"tensor names differ: {sorted(set(got) ^ set(want))}"
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors are not bit-identical, e.g. {differ[:3]}"


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "topd_checkpoint.json").read_text())


def train_and_save(hf_dir: str, run_dir: str) -> torch.Tensor | None:
    """One real optimizer step of a student at TP=2, saved by the training loop's checkpointing; the trained
    student's logits of TOKENS (gathered) on the reporting rank."""
    from megatron.core.distributed import finalize_model_grads

    from topd_megatron.distributed.parallel import ParallelConfig, init_model_parallel
    from topd_megatron.models.build import ModelConfig, build_model
    from topd_megatron.models.checkpoint import save_training_state
    from topd_megatron.training.optim import OptimConfig, build_optimizer, build_scheduler, ddp_config

    par = ParallelConfig(tp=2)
    init_model_parallel(par)
    ocfg = OptimConfig(lr=1e-2)
    student = build_model(
        ModelConfig(path=hf_dir, dtype="float32"), par, wrap_with_ddp=True, ddp_config=ddp_config(ocfg)
    )
    optimizer = build_optimizer(ocfg, student)
    scheduler = build_scheduler(ocfg, optimizer, total_steps=1)
    for m in student.modules:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    _forward(student, forward_only=False)
    finalize_model_grads(student.modules)  # as train_step does: TP-replicated QK-norm grads summed, DP reduced
    ok, _, _ = optimizer.step()
    assert ok, "the optimizer step was skipped"
    save_training_state(run_dir, 1, student, optimizer, scheduler, {"bad_steps": 0})
    return _forward(student)[0]


def save_all_body(
    rank: int, world: int, cfgs: dict[str, ImportConfig], student_hf: str, run_dir: str
) -> tuple[dict[str, str], torch.Tensor | None]:
    """Every conversion of `cfgs`, then `train_and_save`, on this rank: (name -> "" or the traceback, the trained
    student's logits or None). A failure is reported per name, so that it does not hide the others (failures in
    model building happen on every rank alike, before any collective)."""
    errors, logits = {}, None
    for name, cfg in cfgs.items():
        try:
            import_rank(rank, world, cfg)
            errors[name] = ""
        except Exception:  # noqa: BLE001 - reported by the test that uses it
            errors[name] = traceback.format_exc()
    try:
        logits = train_and_save(student_hf, run_dir)
        errors["trained"] = ""
    except Exception:  # noqa: BLE001
        errors["trained"] = traceback.format_exc()
    return errors, logits


ROUND_TRIPS = (*FAMILIES, "qwen3_tied")
"""Every family, and a Qwen3 with tied input/output embeddings (the small Qwen3 students have them)."""


@dataclass
class Saved:
    """What the module's one spawn of 2 ranks wrote."""

    sources: dict[str, Path]
    """name -> the HF checkpoint it was converted from."""
    paths: dict[str, Path]
    """name -> topd checkpoint (each of ROUND_TRIPS converted at TP=2 as a teacher; "llama-pp2" at TP=1 x PP=2), and
    "trained" -> the training run directory (the qwen3 student after one step at TP=2)."""
    errors: dict[str, str]
    trained_logits: torch.Tensor | None
    """The trained Megatron student's logits of TOKENS."""

    def get(self, name: str) -> Path:
        if self.errors[name]:
            pytest.fail(f"writing {name} failed on the ranks:\n{self.errors[name]}")
        return self.paths[name]


@pytest.fixture(scope="module")
def saved(
    tiny_checkpoints: dict[str, Path], tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Saved:
    from topd_megatron.models.tiny import TinyModelSpec, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("saved")
    tied = TinyModelSpec(family="qwen3", num_layers=2, tie_word_embeddings=True, seed=7)
    sources = {**tiny_checkpoints, "qwen3_tied": make_tiny_checkpoint(root / "qwen3_tied-hf", tied, tiny_tokenizer_dir)}
    cfgs = {
        name: ImportConfig(hf_dir=str(sources[name]), out_dir=str(root / name), tp=2, role="teacher")
        for name in ROUND_TRIPS
    }
    sources["llama-pp2"] = sources["llama"]
    cfgs["llama-pp2"] = ImportConfig(hf_dir=str(sources["llama"]), out_dir=str(root / "llama-pp2"), pp=2)
    cfgs = {name: check_import(cfg) for name, cfg in cfgs.items()}
    run = root / "run"
    results = spawn(save_all_body, 2, (cfgs, str(sources["qwen3"]), str(run)), timeout=300)
    logits = [r[1] for r in results if r[1] is not None]
    return Saved(
        sources=sources,
        paths={name: Path(cfg.out_dir) for name, cfg in cfgs.items()} | {"trained": run},
        errors=results[0][0],
        trained_logits=logits[0] if len(logits) == 1 else None,
    )


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_tp2_to_tp1_is_bit_exact(name: str, saved: Saved, tmp_path: Path) -> None:
    hf, ckpt, back = saved.sources[name], saved.get(name), tmp_path / "hf"
    meta = _meta(ckpt)
    assert meta["role"] == "teacher" and meta["saved_layout"]["tp"] == 2 and meta["extra"]["dtype"] == "float32"
    assert (ckpt / "hf" / "tokenizer.json").is_file() and (ckpt / "model" / ".metadata").is_file()
    _convert(TO_HF, ckpt, back)
    _assert_same_tensors(hf, back)
    config, original = (json.loads((d / "config.json").read_text()) for d in (back, hf))
    for key in ("architectures", "vocab_size", "tie_word_embeddings", "num_hidden_layers", "dtype"):
        assert config[key] == original[key], f"config.json {key}: {config[key]} != {original[key]}"
    assert (back / "generation_config.json").is_file() and (back / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*")), "temporary directories must be renamed away"


def test_round_trip_pp2_to_tp2_is_bit_exact(saved: Saved, tmp_path: Path) -> None:
    ckpt = saved.get("llama-pp2")
    assert _meta(ckpt)["saved_layout"] == {"tp": 1, "pp": 2, "vpp": None}
    _convert(TO_HF, ckpt, tmp_path / "hf", "--tp", "2")
    _assert_same_tensors(saved.sources["llama-pp2"], tmp_path / "hf")


def test_padded_vocab_round_trip_and_bfloat16_export(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Converted by the CLI at TP=2 with the vocabulary padded from 384 to 400 rows and exported at TP=1 x PP=2: the
    padding rows are dropped again. Exported in bfloat16, it holds the rounded weights and says so in config.json."""
    hf = tiny_checkpoints["qwen2"]
    ckpt, back, back_bf16 = tmp_path / "topd", tmp_path / "hf", tmp_path / "hf-bf16"
    _convert(TO_MEGATRON, hf, ckpt, "--tp", "2", "--pad-vocab-to-multiple-of", "100")
    meta = _meta(ckpt)
    assert meta["role"] == "student" and meta["saved_layout"]["tp"] == 2
    assert meta["padded_vocab_size"] == 400 and meta["vocab_size"] == 384
    _convert(TO_HF, ckpt, back, "--pp", "2")
    _assert_same_tensors(hf, back)
    _convert(TO_HF, ckpt, back_bf16, "--tp", "2", "--dtype", "bfloat16")
    want, got = _tensors(hf), _tensors(back_bf16)
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert json.loads((back_bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_exported_training_checkpoint_matches_megatron_logits(saved: Saved, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, run, megatron_logits = saved.sources["qwen3"], saved.get("trained"), saved.trained_logits
    assert megatron_logits is not None and megatron_logits.shape == (*TOKENS.shape, 384)
    exported, from_step = tmp_path / "student", tmp_path / "student-step1"
    _convert(TO_HF, run, exported, "--base", hf)
    _convert(TO_HF, run / "checkpoints" / "step_000001", from_step, "--base", hf)
    _assert_same_tensors(exported, from_step)
    trained, initial = _tensors(exported), _tensors(hf)
    assert sum(not torch.equal(trained[k], initial[k]) for k in initial) > len(initial) // 2, "not the trained weights"

    model = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        hf_logits = torch.cat([model(TOKENS[i : i + 1]).logits for i in range(len(TOKENS))], dim=0)
    diff = (hf_logits - megatron_logits).abs().max().item()
    assert diff <= 1e-4, f"exported student vs Megatron student: logits max abs diff {diff}"
    tokenizer = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    reference = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    text = "Compute 12 + 7. The answer is \\boxed{19}."
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.chat_template == reference.chat_template and tokenizer.eos_token == reference.eos_token


def _run(script: Path, *args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_bad_input_exits_2_before_any_rank_starts(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = tiny_checkpoints["llama"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("not mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    step = tmp_path / "run" / "checkpoints" / "step_000002"
    (step / "state").mkdir(parents=True)
    (step / "train_state.json").write_text("{}")
    (step / "state" / ".metadata").write_bytes(b"")
    (step.parent / "latest").write_text("step_000002\n")
    # (script, args) -> words the error line must contain. The real scripts run as subprocesses for the first three;
    # the others call the same main() in this process (cheaper: the imports are done).
    scripts = {
        (TO_MEGATRON, (tmp_path / "missing", tmp_path / "out1")): ("missing", "does not exist"),
        (TO_MEGATRON, (hf, full)): ("full", "not empty", "--overwrite"),
        (TO_HF, (tmp_path / "missing", tmp_path / "out2")): ("missing", "does not exist"),
    }
    in_process = {
        (TO_MEGATRON, (empty, tmp_path / "out3")): ("empty", "neither a Hugging Face checkpoint"),
        (TO_MEGATRON, (hf, tmp_path / "out4", "--tp", "3")): ("TP=3", "num_attention_heads"),
        (TO_MEGATRON, (hf, tmp_path / "out5", "--pad-vocab-to-multiple-of", "100")): ("384 -> 400", "TP > 1"),
        (TO_HF, (hf, tmp_path / "out6")): ("already a Hugging Face checkpoint",),
        (TO_HF, (tmp_path / "run", tmp_path / "out7")): ("training checkpoint", "--base"),
        (TO_HF, (tmp_path / "run", full, "--base", hf)): ("full", "not empty", "--overwrite"),
        (TO_HF, (tmp_path / "run", tmp_path / "out8", "--base", hf)): ("cannot read", "step_000002"),
    }
    procs = {case: _run(case[0], *case[1]) for case in scripts}
    results = {case: (proc.communicate(timeout=120)[1], proc.returncode) for case, proc in procs.items()}
    for case in in_process:
        code = _tool(case[0]).main([str(a) for a in case[1]])
        results[case] = (capsys.readouterr().err, code)
    for (script, args), (err, code) in results.items():
        lines = err.strip().splitlines()
        assert code == 2, f"{script.name} {args}: exit {code}\n{err}"
        assert len(lines) == 1 and lines[0].startswith(f"{script.stem}: error: "), err
        for word in {**scripts, **in_process}[(script, args)]:
            assert str(word) in lines[0], f"{script.name} {args}: {word!r} not in {lines[0]!r}"
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", "."))], "nothing may be written"


def test_help_of_both_tools() -> None:
    procs = {script: _run(script, "--help") for script in (TO_MEGATRON, TO_HF)}
    outputs = {}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.startswith(f"usage: {script.stem}") and "--tp" in out and "--dtype" in out and "OUT_DIR" in out
        outputs[script] = out
    assert "HF_DIR" in outputs[TO_MEGATRON] and "--overwrite" in outputs[TO_MEGATRON]
    assert all(word in outputs[TO_HF] for word in ("topd checkpoint", "training checkpoint", "run directory", "--base"))
