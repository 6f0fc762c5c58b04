"""SAPOConfig: the model-loading fields (accepted forms, refusals, how they serialise) and the generation settings
(the engine choice and the default size and shapes of generation rounds)."""

import json

import pytest
import torch

from sapo import SAPOConfig
from sapo.config import DEFAULT_GENERATION_ROWS, sapo_fields
from sapo.run.resume import run_settings, settings_differences


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


def config(**overrides):
    settings = dict(output_dir="unused", report_to="none", use_cpu=True, per_device_train_batch_size=8,
                    max_length=1024, max_prompt_length=512, token_generate_length=256)
    settings.update(overrides)
    return SAPOConfig(**settings)


def test_generation_engine_defaults_to_auto_and_refuses_unknown_names():
    assert config().generation_engine == "auto"
    for name in ("auto", "hf", "static"):
        assert config(generation_engine=name).generation_engine == name
    with pytest.raises(ValueError, match="generation_engine must be one of auto, hf, static; got 'vllm'"):
        config(generation_engine="vllm")


@pytest.mark.parametrize("batch,responses,round_size", [(8, 1, 64), (4, 3, 24), (5, 1, 65), (64, 1, 64), (100, 2, 100)])
def test_default_round_is_the_fewest_whole_batches_decoding_at_least_64_rows(batch, responses, round_size):
    args = config(per_device_train_batch_size=batch, responses_per_prompt=responses)
    assert DEFAULT_GENERATION_ROWS == 64
    assert args.generation_round_size == round_size
    assert args.generation_rows == round_size * responses >= 64


def test_explicit_generation_batch_size_wins_and_rows_round_up_to_whole_batches():
    assert config(generation_batch_size=8).generation_round_size == 8  # the paper's per-step flow
    args = config(generation_batch_size=20)
    assert args.generation_round_size == 20 and args.generation_rows == 24  # pending grows by whole batches
    assert config(recipe="spin", generation_batch_size=20).generation_rows == 8  # SPIN decodes one batch at a time


def test_cache_len_bounds_context_plus_new_tokens():
    assert config().generation_cache_len == 1024 + 256
    assert config(recipe="spin", spin_max_new_tokens=300).generation_cache_len == 512 + 300


def test_loss_type_takes_trls_list_of_one_loss_and_refuses_a_mix(tmp_path):
    """TRL 1.16's DPOConfig.loss_type is a list (default ["sigmoid"]); sapo trains with one loss."""
    assert SAPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type=["ipo"]).loss_type == "ipo"
    assert SAPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type=["orpo"], recipe="sapo-orpo").beta == 0.05
    with pytest.raises(ValueError, match=r"sapo trains with one loss, got loss_type \['sigmoid', 'sft'\]"):
        SAPOConfig(output_dir=str(tmp_path), use_cpu=True, loss_type=["sigmoid", "sft"])
