"""SAPOConfig's model-loading fields: accepted forms, refusals, and how they serialise."""

import json

import pytest
import torch

from sapo import SAPOConfig
from sapo.checkpoint import run_settings, settings_differences
from sapo.config import sapo_fields


def make(tmp_path, **overrides):
    return SAPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **overrides)


@pytest.mark.parametrize("given", [
    {"dtype": "bfloat16", "attn_implementation": "eager"},
    '{"dtype": "bfloat16", "attn_implementation": "eager"}',  # the command line's JSON object
    {"torch_dtype": torch.bfloat16, "attn_implementation": "eager"},  # a torch dtype, under its older name
])
def test_model_init_kwargs_are_a_plain_json_mapping(tmp_path, given):
    config = make(tmp_path, model_init_kwargs=given, ref_model_init_kwargs='{"revision": "main"}')
    assert config.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}
    assert config.ref_model_init_kwargs == {"revision": "main"}
    assert json.loads(config.to_json_string())["model_init_kwargs"] == config.model_init_kwargs
    assert config.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}  # to_dict left it alone


def test_model_init_kwargs_default_to_none(tmp_path):
    config = make(tmp_path)
    assert config.model_init_kwargs is None and config.ref_model_init_kwargs is None


@pytest.mark.parametrize("given,message", [
    ('{"dtype": "bfloat16",}', r"SAPOConfig.model_init_kwargs: not valid JSON \(.* at column \d+\)"),
    ("bfloat16", "SAPOConfig.model_init_kwargs: not valid JSON"),
    ('["dtype"]', "SAPOConfig.model_init_kwargs must be a mapping of from_pretrained keyword arguments"),
    ({"dtype": "bf16"}, r"SAPOConfig.model_init_kwargs\['dtype'\]: 'bf16' is not a torch dtype"),
    ({"dtype": "float32", "torch_dtype": "float32"}, "sets both 'dtype' and 'torch_dtype'"),
    ({1: "x"}, "keys must be argument names"),
])
def test_bad_model_init_kwargs_are_named(tmp_path, given, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, model_init_kwargs=given)


def test_model_init_kwargs_are_a_run_setting_compared_on_resume(tmp_path):
    names = [f.name for f in sapo_fields()]
    saved = run_settings(make(tmp_path, model_init_kwargs={"dtype": "bfloat16"}), names, world_size=1, data="d")
    same = run_settings(make(tmp_path, model_init_kwargs={"torch_dtype": torch.bfloat16}), names, world_size=1,
                        data="d")
    other = run_settings(make(tmp_path, model_init_kwargs={"dtype": "float32"}), names, world_size=1, data="d")
    assert json.loads(json.dumps(saved)) == saved and settings_differences(saved, same) == []
    assert settings_differences(saved, other) == [
        'model_init_kwargs (checkpoint {"dtype": "bfloat16"}, this run {"dtype": "float32"})']
    assert settings_differences(saved, other, ["model_init_kwargs"]) == []
