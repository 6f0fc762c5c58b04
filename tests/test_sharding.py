"""Single-process behaviour of sapo.sharding (the multi-process engines are in test_distributed.py)."""

import copy

import pytest
import torch

from sapo import tiny
from sapo.sharding import (
    any_rank,
    detect_sharding,
    empty_like_model,
    gather_full,
    loaded_into,
    local_shard,
    materialized,
)


def perturbed(model, seed=1):
    """Weights of `model` with noise, by name (what an EMA or reference holds)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
            for name, p in model.named_parameters()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_plain_model_is_replicated_and_its_shard_is_the_parameter_itself(tiny_model):
    assert detect_sharding(tiny_model) == "replicated"
    param = next(tiny_model.parameters())
    shard = local_shard(param, "replicated")
    assert shard.data_ptr() == param.data_ptr()
    assert gather_full(param, shard, "replicated") is shard


def test_empty_like_model_rebuilds_class_config_dtype_and_tied_weights(tiny_model):
    tiny_model.generation_config.top_k = 7
    rebuilt = empty_like_model(tiny_model, torch.bfloat16, "cpu")
    assert type(rebuilt) is type(tiny_model) and not rebuilt.training
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight  # tied again after to_empty
    assert {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in rebuilt.parameters())
    assert rebuilt.generation_config.top_k == 7
    assert [n for n, _ in rebuilt.named_parameters()] == [n for n, _ in tiny_model.named_parameters()]


def test_materialized_module_holds_the_given_weights_and_the_models_buffers(tiny_model):
    weights = perturbed(tiny_model)
    expected_model = copy.deepcopy(tiny_model)
    expected_model.load_state_dict(weights, strict=False)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with materialized(tiny_model, "replicated", weights, torch.float32, "cpu") as plain:
        assert plain is not tiny_model
        torch.testing.assert_close(logits(plain, ids), logits(expected_model, ids))
        for name, buffer in tiny_model.named_buffers():
            torch.testing.assert_close(plain.get_buffer(name), buffer)
        stored = dict(plain.named_parameters())
        assert all(stored[n].data_ptr() != w.data_ptr() for n, w in weights.items())  # copies, not views


def test_materialized_fills_names_it_is_not_given_from_the_model(tiny_model):
    name = "model.norm.weight"
    weights = {name: torch.full_like(dict(tiny_model.named_parameters())[name], 3.0)}
    with materialized(tiny_model, "replicated", weights, torch.float32, "cpu") as plain:
        params = dict(plain.named_parameters())
        assert torch.equal(params[name], weights[name])
        torch.testing.assert_close(params["model.embed_tokens.weight"], tiny_model.model.embed_tokens.weight)


def test_loaded_into_swaps_weights_for_the_duration_and_restores_after_an_error(tiny_model):
    params = [p.data for p in tiny_model.parameters()]
    original = [p.clone() for p in params]
    others = [p + 1.0 for p in original]
    ids = torch.tensor([[1, 5, 9]])
    before = logits(tiny_model, ids)
    with pytest.raises(RuntimeError, match="inside"), loaded_into(params, others):
        assert all(torch.equal(p, o) for p, o in zip(params, others, strict=True))
        assert not torch.allclose(logits(tiny_model, ids), before)
        raise RuntimeError("inside")
    assert all(torch.equal(p, o) for p, o in zip(params, original, strict=True))
    torch.testing.assert_close(logits(tiny_model, ids), before)


def test_loaded_into_casts_lower_precision_weights_into_the_targets():
    target = [torch.zeros(4)]
    with loaded_into(target, [torch.full((4,), 1.5, dtype=torch.bfloat16)]):
        assert target[0].dtype == torch.float32 and torch.equal(target[0], torch.full((4,), 1.5))
    assert torch.equal(target[0], torch.zeros(4))


def test_loaded_into_rejects_mismatched_lists():
    targets, weights = [torch.zeros(1), torch.zeros(1)], [torch.zeros(1)]
    with pytest.raises(ValueError, match="2 targets but 1 weights"), loaded_into(targets, weights):
        pass


def test_any_rank_without_a_process_group_is_the_local_flag():
    assert any_rank(True, "cpu") is True and any_rank(False, "cpu") is False


def test_an_untied_model_keeps_separate_head_weights(tokenizer):
    model = tiny.build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=4, seed=0)
    model.config.tie_word_embeddings = False
    rebuilt = empty_like_model(model, torch.float32, "cpu")
    assert rebuilt.lm_head.weight is not rebuilt.model.embed_tokens.weight
