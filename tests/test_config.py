"""`SAPOConfig`'s generation settings: the engine choice and the default size and shapes of generation rounds."""

import pytest

from sapo import SAPOConfig
from sapo.config import DEFAULT_GENERATION_ROWS


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
