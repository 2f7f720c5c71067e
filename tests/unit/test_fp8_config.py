"""TransformerEngine FP8 configuration: what a ModelConfig's fp8 settings turn into on the Megatron provider, and the
clear fallback where TE is missing. (Running FP8 needs TE with CUDA: tools/gpu_check.sh does that on a GPU.)"""

from __future__ import annotations

import logging

import pytest

from topd_megatron.distributed.parallel import ParallelConfig
from topd_megatron.models.build import ModelConfig, _configure_provider, fp8_settings


def test_fp8_settings_per_role_and_recipe():
    assert fp8_settings(ModelConfig(path="m"), "student") == {}
    student = fp8_settings(ModelConfig(path="m", fp8="tensorwise"), "student")
    assert student == {"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_param": False}
    teacher = fp8_settings(ModelConfig(path="m", fp8="delayed", fp8_weights=True), "teacher")
    assert teacher == {
        "fp8": "e4m3",
        "fp8_recipe": "delayed",
        "fp8_param": True,
        "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max",
    }
    from megatron.core.enums import Fp8Recipe

    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert Fp8Recipe(fp8_settings(ModelConfig(path="m", fp8=recipe), "teacher")["fp8_recipe"])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"fp8": "e5m2"}, "model.fp8 must be one of"),
        ({"fp8": "tensorwise", "dtype": "float32"}, "needs model.dtype=bfloat16"),
        ({"fp8_weights": True}, "needs an FP8 recipe"),
    ],
)
def test_bad_fp8_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(path="m", **kw)


@pytest.fixture
def provider(tmp_path):
    from topd_megatron.models.bridge_import import import_bridge
    from topd_megatron.models.tiny import TinyModelSpec, hf_config_for

    hf = hf_config_for(TinyModelSpec(family="llama", num_layers=2), vocab_size=128, bos_id=1, eos_id=2)
    hf.architectures = ["LlamaForCausalLM"]
    return import_bridge().AutoBridge.from_hf_config(hf).to_megatron_provider(load_weights=False)


def test_with_transformer_engine_the_provider_gets_the_fp8_fields(provider):
    from megatron.bridge.models.gpt_provider import transformer_engine_layer_spec

    cfg = ModelConfig(path="m", fp8="blockwise", fp8_weights=True)
    _configure_provider(provider, cfg, ParallelConfig(), te=True, role="teacher")
    assert (provider.fp8, provider.fp8_recipe, provider.fp8_param) == ("e4m3", "blockwise", True)
    assert provider.transformer_layer_spec is transformer_engine_layer_spec


def test_without_transformer_engine_fp8_falls_back_to_the_local_spec_with_a_message(provider, caplog):
    from megatron.bridge.models.gpt_provider import local_layer_spec

    cfg = ModelConfig(path="m", fp8="tensorwise")
    with caplog.at_level(logging.WARNING, logger="topd_megatron.models.build"):
        _configure_provider(provider, cfg, ParallelConfig(), te=False, role="student")
    assert provider.fp8 is None and provider.transformer_layer_spec is local_layer_spec
    assert "model.fp8='tensorwise' needs TransformerEngine with CUDA" in caplog.text
