"""The planner (`topd plan`): parameter counts against Hugging Face models, memory formulas on hand-computed cases,
refused layouts with their reasons, preflight checks, the four recipes and the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from topd_megatron import recipes
from topd_megatron.cluster import ClusterConfig
from topd_megatron.config import RunConfig, TrainConfig
from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig
from topd_megatron.plan import cli, plan
from topd_megatron.plan.architecture import PUBLIC_CONFIGS, Architecture, resolve
from topd_megatron.plan.layout import Layout, StepShape
from topd_megatron.plan.memory import (
    GIB,
    dt_reduction_bytes,
    fp8_copy_bytes,
    logits_bytes,
    loss_working_bytes,
    nograd_forward_bytes,
    offloaded_logits_host_bytes,
    rank_params,
    served_report_bytes,
    server_memory,
    student_state_bytes,
    teacher_weight_bytes,
    training_activation_bytes,
    training_role,
)
from topd_megatron.plan.preflight import data_checks, output_check, preflight
from topd_megatron.plan.report import plan_to_json
from topd_megatron.plan.step_time import (
    FP8_SPEEDUP,
    attention_flops,
    forward_seconds,
    gemm_flops,
    training_flops,
    training_seconds,
)
from topd_megatron.rollout.sglang.server import ServerConfig


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes put their run directories under $TOPD_OUT: keep the output probe out of the checkout."""
    monkeypatch.setenv("TOPD_OUT", str(tmp_path / "runs"))


# -- parameter counts --------------------------------------------------------------------------------------------------


def _hf_count(config) -> tuple[int, int]:
    """(total parameters, routed-expert parameters) of the transformers model built from `config`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


@pytest.mark.parametrize(
    "family,extra",
    [
        ("qwen2", {}),
        ("qwen3", {}),
        ("qwen3", {"tie_word_embeddings": True}),
        ("llama", {}),
        ("qwen3_moe", {}),
    ],
)
def test_parameter_counts_equal_the_tiny_hugging_face_models(family: str, extra: dict) -> None:
    from topd_megatron.models.tiny import TinyModelSpec, hf_config_for

    spec = TinyModelSpec(family=family, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, **extra)
    config = hf_config_for(spec, vocab_size=320, bos_id=0, eos_id=1)
    total, experts = _hf_count(config)
    arch = Architecture.from_hf_config(config.to_dict())
    assert arch.params() == total
    if arch.is_moe:
        per_expert = experts // (arch.num_experts * arch.moe_layers)
        inactive = (arch.num_experts - arch.experts_per_token) * per_expert * arch.moe_layers
        assert arch.active_params() == total - inactive
    else:
        assert arch.active_params() == total


def test_parameter_counts_of_biases_sparse_moe_layers_and_a_shared_expert() -> None:
    from transformers import LlamaConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=96, hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    llama = LlamaConfig(**common, intermediate_size=24, attention_bias=True, mlp_bias=True)
    sparse = Qwen3MoeConfig(
        **common,
        intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    shared = Qwen2MoeConfig(
        **common,
        intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
    )
    for config in (llama, sparse, shared):
        arch = Architecture.from_hf_config(config.to_dict())
        assert arch.params() == _hf_count(config)[0], config.model_type
    assert Architecture.from_hf_config(sparse.to_dict()).moe_layers == 1  # layer 1 only: 3 is MLP-only


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("Llama-3.1-8B-Instruct", 8.03e9, None),
        ("Llama-3.3-70B-Instruct", 70.6e9, None),
        ("Llama-3.1-405B-Instruct", 405.9e9, None),
        ("Qwen3-4B-Instruct-2507", 4.02e9, None),
        # the model card rounds 3.35e9 active parameters down to "3.3B", hence the wider tolerance below
        ("Qwen3-30B-A3B-Instruct-2507", 30.5e9, 3.3e9),
    ],
)
def test_public_configs_give_the_published_totals(name: str, total: float, active: float | None) -> None:
    arch = Architecture.from_hf_config(PUBLIC_CONFIGS[name], name)
    assert arch.params() == pytest.approx(total, rel=0.01)
    assert arch.active_params() == pytest.approx(active or total, rel=0.02 if active else 0.01)


def test_a_real_config_json_wins_over_the_public_table(tmp_path: Path) -> None:
    ckpt = tmp_path / "Llama-3.1-8B-Instruct"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(PUBLIC_CONFIGS["Llama-3.1-8B-Instruct"] | {"num_hidden_layers": 2}))
    arch, source = resolve(ckpt)
    assert arch.layers == 2 and source.endswith("config.json")
    arch, source = resolve(tmp_path / "elsewhere" / "Llama-3.1-8B-Instruct")
    assert arch.layers == 32 and "public config" in source
    with pytest.raises(ValueError, match="not a model the planner knows"):
        resolve(tmp_path / "my-model")


# -- memory formulas on a toy model, by hand -------------------------------------------------------------------------

# h=8, 2 layers, 2 heads of 4 (1 KV head), FFN 16, vocab 32, untied Llama.
TOY = Architecture(
    name="toy",
    model_type="llama",
    layers=2,
    hidden=8,
    ffn=16,
    heads=2,
    kv_heads=1,
    head_dim=4,
    vocab=32,
    tied_embeddings=False,
)


def _layout(world: int = 1, tp: int = 1, pp: int = 1, sp: bool = False) -> Layout:
    return Layout(world=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1, etp=tp, sequence_parallel=sp)


def _shape(b: int, s: int, rows: int | None = None, branches: int = 0, window: int = 0) -> StepShape:
    rows = rows or b
    branch_rows = -(-branches // b) * b
    return StepShape(
        seq=s,
        micro_batch=b,
        rollouts=rows,
        rows=rows,
        candidates=branches,
        branches=branches,
        branch_rows=branch_rows,
        branch_seq=s if branches else 0,
        window=window,
    )


def test_toy_parameter_count_by_hand() -> None:
    # embedding 32*8 + output 32*8 + final norm 8
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, two norms 16, MLP 3*8*16 = 384 -> 592
    assert TOY.params() == 256 + 256 + 8 + 2 * 592 == 1704


def test_student_states_with_the_distributed_optimizer_by_hand() -> None:
    params = rank_params(TOY, _layout(world=2), 32, "only")
    assert params.total == 1704
    bf16 = student_state_bytes(params, ModelConfig(path="x", dtype="bfloat16"), _layout(world=2), True)
    # bf16 weights 2 B, fp32 grad buffer 4 B, (fp32 main + m + v) 12 B sharded over DP = 2
    assert list(bf16.values()) == [2 * 1704, 4 * 1704, 12 * 1704 / 2]
    fp32 = student_state_bytes(params, ModelConfig(path="x", dtype="float32"), _layout(world=1), True)
    assert list(fp32.values()) == [4 * 1704, 4 * 1704, 8 * 1704]  # fp32 params are the main params: m + v only
    unsharded = student_state_bytes(params, ModelConfig(path="x", dtype="bfloat16"), _layout(world=2), False)
    assert list(unsharded.values())[2] == 12 * 1704


def test_pipeline_and_tensor_split_by_hand() -> None:
    lay = _layout(world=4, tp=2, pp=2)
    # one layer per stage: (192 + 384) / TP + 16 replicated norm weights = 304
    first, last = rank_params(TOY, lay, 32, "first"), rank_params(TOY, lay, 32, "last")
    assert first.total == 304 + 32 * 8 / 2  # + embedding rows / TP
    assert last.total == 304 + 8 + 32 * 8 / 2  # + final norm + output layer / TP
    fp8_weights = ModelConfig(path="x", dtype="bfloat16", fp8="tensorwise", fp8_weights=True)
    assert teacher_weight_bytes(first, fp8_weights) == 288 * 1 + (304 + 128 - 288) * 2  # layer linears (576 / TP)
    assert fp8_copy_bytes(first, fp8_weights, training=False) == 0  # in FP8, the rest in bf16; no other copy
    # FP8 GEMMs on bf16 weights: the weights stay bf16, TE caches an FP8 copy of the layer linears (the teacher's
    # forward: row-wise; a student trained in FP8: row-wise + column-wise; with FP8 weights the column-wise only)
    fp8_gemms = ModelConfig(path="x", dtype="bfloat16", fp8="delayed")
    assert teacher_weight_bytes(first, fp8_gemms) == (304 + 128) * 2
    assert fp8_copy_bytes(first, fp8_gemms, training=False) == 288
    assert fp8_copy_bytes(first, fp8_gemms, training=True) == 2 * 288
    assert fp8_copy_bytes(first, fp8_weights, training=True) == 288
    assert fp8_copy_bytes(first, ModelConfig(path="x", dtype="bfloat16"), training=True) == 0
    student = student_state_bytes(first, fp8_weights, lay, True)
    assert student["student weights (FP8 layer linears)"] == 288 + (304 + 128 - 288) * 2


def test_activations_by_hand_local_and_te() -> None:
    cfg = ModelConfig(path="x", dtype="bfloat16")
    b, s = 1, 4
    # local, per token per layer: attention norm block 2*8+1 + 8, core 3*2*4 + 2*4 (probs a*S), projection 8 -> 65;
    # MLP norm block 25 + 5*16 -> 105; 170 elements x 2 layers x 4 tokens x 2 bytes = 2720
    # outside: S*S mask 16 B, RoPE cos/sin 4*S*d per layer = 4*4*4*2 x 2 B = 256, token ids 4 x 8 B,
    # final norm block (17 + 8) x 4 tokens x 2 B = 200
    local = training_activation_bytes(TOY, _layout(), _shape(b, s), cfg, "local", "only")
    assert sum(local.values()) == 2720 + 16 + 256 + 32 + 200
    # te: attention 17 + (a + 2g) d = 16 + a d = 8 + 2a = 4 -> 45; MLP 17 + 3*16 -> 65; 110 x 2 x 4 x 2 = 1760;
    # outside: mask 16, ids 32, final norm 17 x 4 x 2 = 136
    te = training_activation_bytes(TOY, _layout(), _shape(b, s), cfg, "te", "only")
    assert sum(te.values()) == 1760 + 16 + 32 + 136
    full_cfg = ModelConfig(path="x", recompute="full")
    full = training_activation_bytes(TOY, _layout(), _shape(b, s), full_cfg, "te", "only")
    assert sum(full.values()) == 8 * 2 * 4 * 2 + 16 + 32 + 136  # one h per token per layer


def test_logits_kv_cache_and_flops_by_hand() -> None:
    assert logits_bytes(8, 4, 32, _layout(world=2, tp=2), 2) == 8 * 4 * 16 * 2
    # a micro-batch of 2 x 4 on TP=2 (16 vocab columns): 3 bf16 student buffers + 1 bf16 teacher copy + 4 fp32 chunks
    bf16 = ModelConfig(path="x")
    mb = 2 * 4 * 16
    assert (
        loss_working_bytes(_shape(2, 4), 32, _layout(world=2, tp=2), bf16, bf16, "cuda")
        == 3 * mb * 2 + mb * 2 + 4 * mb * 4
    )
    served = loss_working_bytes(_shape(2, 4), 32, _layout(world=2, tp=2), bf16, bf16, "cuda", served=True)
    assert served == 3 * mb * 2 + 4 * mb * 4  # no teacher logits to copy
    assert served_report_bytes(100, "top_k", 20) == 100 * (4 + 20 * (8 + 4))  # log-prob, top-k ids and log-probs
    assert served_report_bytes(100, "sampled_token", 20) == 100 * 4
    llama70 = Architecture.from_hf_config(PUBLIC_CONFIGS["Llama-3.3-70B-Instruct"])
    assert llama70.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2
    assert llama70.kv_bytes_per_token(2, tp=8) == 2 * 80 * 1 * 128 * 2
    qwen30 = Architecture.from_hf_config(PUBLIC_CONFIGS["Qwen3-30B-A3B-Instruct-2507"])
    assert qwen30.kv_bytes_per_token(2, tp=8) == 2 * 48 * 1 * 128 * 2  # 4 KV heads replicated over 8 ranks
    assert training_flops(TOY, 100, 4, "full") / training_flops(TOY, 100, 4, "none") == pytest.approx(4 / 3)
    assert TOY.matmul_params() == TOY.params() - 32 * 8  # the input embedding is a lookup


def _toy_run(tmp_path: Path, **train: object) -> RunConfig:
    bf16 = ModelConfig(path=str(tmp_path / "toy"), dtype="bfloat16")
    return RunConfig(student=bf16, teacher=bf16, run_dir=str(tmp_path / "run"), train=TrainConfig(**train))


def test_step_memory_of_the_teacher_logits_by_hand(tmp_path: Path) -> None:
    # 4 rollouts of S = 4 in micro-batches of 2, vocab 32 at TP = 1, bf16; 3 branches with K = 2 window tokens
    shape, lay = _shape(2, 4, rows=4, branches=3, window=2), _layout()
    role = training_role(_toy_run(tmp_path), TOY, TOY, lay, shape, "only", "cuda")
    parts = {k: v * GIB for k, v in role.components.items()}
    assert role.peak_phase == "backward" and role.host_bytes == 0
    assert parts["teacher logits, rollouts (whole step)"] == 4 * 4 * 32 * 2  # [B, S, V/TP] bf16, kept
    assert parts["teacher logits, branch window rows (whole step)"] == 3 * 2 * 32 * 2  # [G K, V/TP]: window rows only
    assert parts["d_t of the step (fp32)"] == 4 * 4 * 4  # the detector keeps d_t, not the student's logits
    # offloaded: nothing of the rollouts' logits on the GPU; on the host, one block per micro-batch, each
    # 2 * 4 * 32 * 2 = 512 bytes (a power of two already)
    off = training_role(_toy_run(tmp_path, offload_teacher_logits=True), TOY, TOY, lay, shape, "only", "cuda")
    assert "teacher logits, rollouts (whole step)" not in off.components and off.host_bytes == 2 * 512
    assert off.total_gib == pytest.approx(role.total_gib - 4 * 4 * 32 * 2 / GIB)
    cpu = training_role(_toy_run(tmp_path, offload_teacher_logits=True), TOY, TOY, lay, shape, "only", "cpu")
    assert cpu.host_bytes == 0  # offloading needs CUDA
    # blocks round up to powers of two: 3 x 4 x 32 x 2 = 768 bytes -> 1024
    assert offloaded_logits_host_bytes(_shape(3, 4, rows=6), 32, lay, ModelConfig(path="x")) == 2 * 1024


def test_no_grad_forwards_and_the_d_t_reduction_by_hand() -> None:
    bf16 = ModelConfig(path="x", dtype="bfloat16")
    # micro-batch 2 x 4, vocab 32: logits 512 bytes; flattening copies the student's slice and the teacher's
    # (b > 1), plus 4 fp32 chunk buffers of min(chunk, 8) = 8 rows x 32
    chunks = 4 * 8 * 32 * 4
    shape = _shape(2, 4)
    assert dt_reduction_bytes(shape, 32, _layout(), bf16, bf16, "cuda", False, False) == 512 + 512 + chunks
    # b = 1: the slices flatten as views; with offload the teacher's micro-batch is copied back to the GPU
    one = _shape(1, 4)
    assert dt_reduction_bytes(one, 32, _layout(), bf16, bf16, "cuda", False, False) == 4 * 8 * 32 * 4 / 2
    assert dt_reduction_bytes(one, 32, _layout(), bf16, bf16, "cuda", True, False) == 256 + 4 * 4 * 32 * 4
    # served: no teacher logits at all
    assert dt_reduction_bytes(shape, 32, _layout(), bf16, bf16, "cuda", False, True) == 512 + chunks
    # the larger of one layer, the output layer's two copies of the logits, one copy + the reduction
    assert nograd_forward_bytes(1760, 512) == 1760
    assert nograd_forward_bytes(100, 512) == 2 * 512
    assert nograd_forward_bytes(1760, 512, 512 + 512 + chunks) == 512 + 512 + 512 + chunks


def test_fp8_server_weights_and_fp8_step_time_by_hand() -> None:
    # layer linears of TOY: 2 x (192 + 384) = 1152 in FP8, the other 552 parameters in bf16, over TP = 2
    plain = ServerConfig(model_path="x", tp=2, dtype="bfloat16", mem_fraction=0.5, max_total_tokens=None)
    quant = ServerConfig(
        model_path="x", tp=2, dtype="bfloat16", mem_fraction=0.5, max_total_tokens=None,
        extra_args=("--quantization", "fp8", "--kv-cache-dtype=fp8_e4m3"),
    )  # fmt: skip
    assert server_memory(TOY, plain, 80).weights == 1704 * 2 / 2
    mem = server_memory(TOY, quant, 80)
    assert mem.fp8 and mem.weights == (1152 + 552 * 2) / 2
    assert mem.kv_bytes_per_token == 2 * 2 * 1 * 4 * 1  # 1-byte KV cache
    # FP8 speeds up the weight GEMMs (2 N T) only; attention stays at the bf16 rate
    rate, tokens, seq = 1e12, 1000.0, 4
    gemm, attn = gemm_flops(TOY, tokens), attention_flops(TOY, tokens, seq)
    assert forward_seconds(TOY, tokens, seq, rate, fp8=True) == pytest.approx(gemm / (rate * FP8_SPEEDUP) + attn / rate)
    assert forward_seconds(TOY, tokens, seq, rate, fp8=False) == pytest.approx((gemm + attn) / rate)
    assert training_seconds(TOY, tokens, seq, "full", rate, fp8=False) == pytest.approx(
        training_flops(TOY, tokens, seq, "full") / rate
    )
    assert training_seconds(TOY, tokens, seq, "none", rate, fp8=True) == pytest.approx(
        3 * gemm / (rate * FP8_SPEEDUP) + 3 * attn / rate
    )


# -- refused layouts ---------------------------------------------------------------------------------------------------


def _reasons(name: str, overrides: list[str]) -> str:
    return "\n".join(plan(recipes.get(name, overrides), run_preflight=False).reasons())


def test_tp_that_does_not_divide_the_teachers_kv_heads_is_refused() -> None:
    reasons = _reasons("qwen3_4b_from_30b_a3b", ["parallel.tp=8", "parallel.ep=1"])
    assert "TP=8 does not divide num_key_value_heads=4" in reasons


def test_world_size_expert_groups_and_prompt_split_are_checked() -> None:
    assert "not divisible by TP*PP*CP = 3*1*1 = 3" in _reasons("llama3_8b_from_70b", ["parallel.tp=3"])
    assert "expert TP*EP*PP = 4*8*1 = 32" in _reasons("qwen3_4b_from_30b_a3b", ["parallel.ep=8"])
    assert "prompts_per_step=5 is not divisible by DP=2" in _reasons(
        "qwen3_4b_from_30b_a3b", ["train.prompts_per_step=5"]
    )
    assert "do not fit in mem_fraction=0.04" in _reasons("llama3_8b_from_70b", ["sglang.student.mem_fraction=0.04"])


def test_a_405b_teacher_on_one_80gb_gpu_is_refused(tmp_path: Path) -> None:
    cfg = RunConfig(
        student=ModelConfig(path=str(tmp_path / "Llama-3.1-8B-Instruct")),
        teacher=ModelConfig(path=str(tmp_path / "Llama-3.1-405B-Instruct")),
        run_dir=str(tmp_path / "run"),
        train=TrainConfig(prompts_per_step=1, samples_per_prompt=1, micro_batch_size=1, max_new_tokens=16),
        cluster=ClusterConfig(nodes=1, gpus_per_node=1, gpu_memory_gib=80.0),
    )
    p = plan(cfg, run_preflight=False)
    assert not p.feasible
    (role,) = p.roles
    assert role.components["teacher weights"] > 700  # 405.9e9 bf16 parameters
    assert any(r.startswith("training rank needs") and "of 80 GiB" in r for r in p.reasons())


def test_student_and_teacher_vocabularies_must_match(tmp_path: Path) -> None:
    cfg = RunConfig(
        student=ModelConfig(path=str(tmp_path / "Qwen3-4B-Instruct-2507")),
        teacher=ModelConfig(path=str(tmp_path / "Llama-3.3-70B-Instruct")),
        run_dir=str(tmp_path / "run"),
        parallel=ParallelConfig(tp=8),
    )
    assert any("teacher vocabulary (128256 true" in r for r in plan(cfg, run_preflight=False).reasons())


def test_a_small_step_of_the_paper_setting_is_feasible() -> None:
    overrides = [
        "parallel.tp=4",
        "parallel.ep=2",
        "train.prompts_per_step=8",
        "train.micro_batch_size=1",
        "objective.detection.max_candidates=1",
        "student.recompute=full",
    ]
    p = plan(recipes.get("qwen3_4b_from_30b_a3b", overrides), run_preflight=False)
    assert p.feasible, p.reasons()
    assert all(r.fits for r in p.roles) and p.step_time is not None and p.step_time.total_s > 0


# -- the recipes and the CLI -------------------------------------------------------------------------------------------


def test_every_recipe_plans() -> None:
    for name in recipes.names():
        p = plan(recipes.get(name))
        if p.student is None:  # the tiny pair exists once `topd prepare` has run; the GPU recipes use the table
            assert name == "tiny" and any("no config.json at" in r for r in p.reasons()), p.reasons()
            continue
        assert p.roles and p.step_time is not None and p.step_time.total_s > 0, name
        assert p.feasible == (not p.reasons())
        if name != "tiny":  # every GPU recipe fits its cluster (its checkpoints are only "not checked" here)
            assert p.feasible, (name, p.reasons())
            assert all(r.fits for r in p.roles), name
        assert {c.name for c in p.checks} >= {"tokenizer", "output"}
        doc = json.loads(json.dumps(plan_to_json(p)))
        assert doc["feasible"] == p.feasible and len(doc["roles"]) == len(p.roles)


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["llama3_8b_from_70b", "--set", "parallel.tp=3"]) == 2
    err = capsys.readouterr().err
    assert "TP=3 does not divide num_attention_heads=32" in err and "not divisible by TP*PP*CP" in err
    assert cli.main(["tiny", "--set", "no.such=1"]) == 2
    assert "topd plan: error" in capsys.readouterr().err
    out = tmp_path / "plan.json"
    feasible = [
        "parallel.tp=4",
        "parallel.ep=2",
        "train.prompts_per_step=8",
        "train.micro_batch_size=1",
        "objective.detection.max_candidates=1",
        "student.recompute=full",
    ]
    args = ["qwen3_4b_from_30b_a3b", "--json-out", str(out)] + [a for kv in feasible for a in ("--set", kv)]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["feasible"] is True
    assert cli.main([*args, "--strict"]) == 2  # the checkpoints are not on this machine
    assert "preflight: student checkpoint: checkpoints/Qwen3-4B-Instruct-2507 missing" in capsys.readouterr().err
    # settings that only make sense together are validated together: a teacher served by SGLang only
    served = ["teacher_source=sglang", "objective.teacher_signal=top_k", "sglang.teacher=default"]
    served += ["sglang.teacher.tp=8", "sglang.teacher.dtype=bfloat16", "sglang.teacher.mem_fraction=0.3"]
    served += ["sglang.teacher.max_total_tokens=none", "sglang.student.mem_fraction=0.5"]  # both servers fit a GPU
    args = ["qwen3_4b_from_30b_a3b", "--json-out", str(out)] + [a for kv in served for a in ("--set", kv)]
    assert cli.main(args) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    (training, *_) = doc["roles"]
    assert "teacher weights" not in training["components_gib"] and training["host_gib"] == 0
    assert "teacher reports (served), rollouts (whole step)" in training["components_gib"]


# -- preflight ---------------------------------------------------------------------------------------------------------


def _checkpoint_with_tokenizer(path: Path, words: list[str]) -> Path:
    from topd_megatron.models.tiny import make_word_tokenizer

    make_word_tokenizer(path, words)
    config = PUBLIC_CONFIGS["Llama-3.1-8B-Instruct"] | {"num_hidden_layers": 2, "vocab_size": 64}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_preflight_checks_tokenizer_identity(tmp_path: Path) -> None:
    a = _checkpoint_with_tokenizer(tmp_path / "a", ["one two three"])
    b = _checkpoint_with_tokenizer(tmp_path / "b", ["one two three four"])
    same = RunConfig(student=ModelConfig(path=str(a)), teacher=ModelConfig(path=str(a)), run_dir=str(tmp_path / "r"))
    checks = {c.name: c for c in preflight(same)}
    assert checks["tokenizer"].status == "ok" and checks["student checkpoint"].status == "ok"
    other = RunConfig(student=ModelConfig(path=str(a)), teacher=ModelConfig(path=str(b)), run_dir=str(tmp_path / "r"))
    checks = {c.name: c for c in preflight(other)}
    assert checks["tokenizer"].status == "error" and "vocabularies differ" in checks["tokenizer"].detail
    missing = RunConfig(
        student=ModelConfig(path=str(a)), teacher=ModelConfig(path=str(tmp_path / "gone")), run_dir=str(tmp_path)
    )
    checks = {c.name: c for c in preflight(missing)}
    assert checks["teacher checkpoint"].status == "not checked" and checks["tokenizer"].status == "not checked"
    assert {c.name: c for c in preflight(missing, strict=True)}["teacher checkpoint"].status == "error"


def test_preflight_checks_data_files_and_the_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("test data\n")
    (data / "dapo_math_17k_train.jsonl").write_text("not json\n")
    monkeypatch.setenv("TOPD_SHARED_DATA", str(data))
    cfg = recipes.get("llama3_8b_from_70b")
    checks = {c.name: c for c in data_checks(cfg, strict=False)}
    assert checks["data train_path"].status == "error" and "not JSON" in checks["data train_path"].detail
    assert checks["data eval_path"].status == "not checked"
    assert {c.name: c for c in data_checks(cfg, strict=True)}["data eval_path"].status == "error"

    assert output_check(str(tmp_path / "new" / "run")).status == "ok"
    assert not list(tmp_path.glob(".topd-plan-probe-*"))  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = output_check(str(blocker / "run"))
    assert bad.status == "error" and "is not a directory" in bad.detail
