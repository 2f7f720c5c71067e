"""Dotted-key overrides and the recipe registry (what `topd train --recipe NAME --set KEY=VALUE` builds)."""

from __future__ import annotations

import dataclasses

import pytest

from topd_megatron import recipes
from topd_megatron.config import RunConfig, config_from_dict
from topd_megatron.overrides import apply_overrides, flatten


def test_every_recipe_builds_a_complete_config_that_round_trips_through_json():
    for name in recipes.names():
        cfg = recipes.get(name)
        assert isinstance(cfg, RunConfig)
        assert config_from_dict(dataclasses.asdict(cfg)) == cfg
        assert cfg.cluster.training_gpus % cfg.parallel.model_parallel_size == 0, name


def test_overrides_parse_by_field_type_and_revalidate():
    cfg = recipes.get(
        "tiny",
        [
            "train.steps=3",
            "optim.lr=5e-5",
            "train.eval_at_start=false",
            "train.inject_nan_at=1,3",
            "objective.guidance=on_path",
            "sglang.teacher=default",
            "sglang.teacher.port=4321",
            "student.pad_vocab_to_multiple_of=none",
            "rollout=sglang",
        ],
    )
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.eval_at_start) == (3, 5e-5, False)
    assert cfg.train.inject_nan_at == (1, 3)
    assert cfg.objective.guidance == "on_path"
    assert (cfg.sglang.teacher.role, cfg.sglang.teacher.model_path, cfg.sglang.teacher.port) == (
        "teacher",
        "<teacher>",
        4321,
    )
    assert cfg.rollout == "sglang" and cfg.student.pad_vocab_to_multiple_of is None
    # untouched leaves stay as the recipe made them
    base, new = flatten(recipes.get("tiny")), flatten(cfg)
    missing = object()
    changed = {k for k in base.keys() | new.keys() if base.get(k, missing) != new.get(k, missing)}
    assert "sglang.teacher" in changed and "sglang.teacher.port" in changed  # None -> a ServerConfig
    assert {k for k in changed if not k.startswith("sglang.teacher")} == {
        "train.steps",
        "optim.lr",
        "train.eval_at_start",
        "train.inject_nan_at",
        "objective.guidance",
        "rollout",
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=2", "train has no field 'stepz'"),
        ("bogus=1", "the run config has no field 'bogus'"),
        ("train.steps=two", "override train.steps='two'"),
        ("train.steps=0", "must be >= 1"),
        ("objective.guidance=sideways", "must be one of ['none', 'teacher_window', 'on_path', 'upweight']"),
        ("train.eval_at_start=maybe", "must be true or false"),
        ("sglang.teacher.port=1", "sglang.teacher is None; set it first with sglang.teacher=default"),
        ("train.steps", "is not KEY=VALUE"),
        ("train=3", "set it to 'default'"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ValueError, match=None) as err:
        recipes.get("tiny", [override])
    assert message in str(err.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown recipe 'nope'; recipes: tiny, qwen3_4b_from_30b_a3b"):
        recipes.get("nope")


def test_gpu_recipes_take_locations_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOPD_CKPT_DIR", str(tmp_path / "ckpts"))
    monkeypatch.setenv("TOPD_OUT", str(tmp_path / "out"))
    cfg = recipes.get("topd_70b")
    assert cfg.student.path == str(tmp_path / "ckpts" / "Llama-3.3-70B-Instruct")
    assert cfg.teacher.path == str(tmp_path / "ckpts" / "Llama-3.1-405B-Instruct")
    assert cfg.run_dir == str(tmp_path / "out" / "topd_70b")
    assert apply_overrides(cfg, ["parallel.pp=4"]).parallel.pp == 4


def test_settings_that_only_make_sense_together_can_be_given_in_any_order():
    together = ["teacher_source=sglang", "rollout=sglang", "objective.teacher_signal=top_k", "sglang.teacher=default"]
    for order in (together, together[::-1]):
        cfg = recipes.get("tiny", order)
        assert (cfg.teacher_source, cfg.objective.teacher_signal, cfg.sglang.teacher.role) == (
            "sglang",
            "top_k",
            "teacher",
        )
    with pytest.raises(ValueError, match="teacher_source=sglang needs rollout=sglang"):
        recipes.get("tiny", together[2:] + ["teacher_source=sglang"])  # the final state is checked, not each step
    base = recipes.get("tiny")
    recipes.get("tiny", ["train.steps=5"])
    assert base.train.steps == recipes.get("tiny").train.steps, "overrides never modify the recipe's own objects"
