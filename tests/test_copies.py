"""`ModelCopies` on its own: each mode builds, generates from, scores with, updates and saves the right weights."""

import pytest
import torch
from helpers import clones

from sapo import tiny
from sapo.copies import ADAPTERS, MODULE, SHARDS, ModelCopies
from sapo.logprobs import response_token_logps


def make(policy, **overrides):
    settings = dict(need_ema=True, need_reference=True, reference_moves=True, is_peft=False, sharded=False,
                    offload=False, dtype="auto", device="cpu")
    settings.update(overrides)
    copies = ModelCopies(policy, **settings)
    copies.bind(policy, policy)  # what the trainer does once the engine has prepared the policy
    return copies


def score(model, ids):
    mask = torch.ones_like(ids, dtype=torch.bool)
    return response_token_logps(model, ids, torch.ones_like(ids), mask, use_hidden_states=False)


def step_policy(policy):
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.01)


@pytest.fixture()
def policy(tokenizer):
    return tiny.build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)


@pytest.mark.parametrize("offload", [False, True])
def test_module_and_offloaded_modes_follow_the_formulas(policy, offload):
    copies = make(policy, offload=offload)
    assert copies.mode == (SHARDS if offload else MODULE)
    start = clones(copies.params)
    step_policy(policy)
    copies.update_ema(0.5)
    for ema, before, now in zip(copies.ema.tensors, start, copies.params, strict=True):
        torch.testing.assert_close(ema, 0.5 * before + 0.5 * now.detach())
    assert all(torch.equal(r, s) for r, s in zip(copies.reference.tensors, start, strict=True))
    copies.refresh_reference("ema")
    assert all(torch.equal(r, e) for r, e in zip(copies.reference.tensors, copies.ema.tensors, strict=True))
    copies.refresh_reference("policy")
    assert all(torch.equal(r, p) for r, p in zip(copies.reference.tensors, copies.params, strict=True))


@pytest.mark.parametrize("offload", [False, True])  # a module of its own, or shards swapped into the policy
def test_reference_forward_scores_the_reference_and_leaves_the_policy_alone(policy, offload):
    copies = make(policy, offload=offload)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    starting = score(policy, ids)
    step_policy(policy)
    before = clones(copies.params)
    torch.testing.assert_close(copies.reference_forward(lambda m: score(m, ids), policy), starting)
    assert all(torch.equal(a, b) for a, b in zip(copies.params, before, strict=True))
    with copies.as_model("reference") as reference:
        torch.testing.assert_close(score(reference, ids), starting)


def test_persistent_decode_module_is_refreshed_in_place_and_freed_when_not_asked_for(policy):
    """Shards (here: offloaded copies): with `persistent`, generation gets one module whose storage never moves, so a
    compiled decode step recorded on it stays valid, holding the EMA's current weights each round."""
    copies = make(policy, offload=True)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with copies.as_model("ema", persistent=True) as first:
        pointers = [p.data_ptr() for p in first.parameters()]
        before = score(first, ids)
    step_policy(policy)
    copies.update_ema(0.5)
    with copies.as_model("ema", persistent=True) as second:
        assert second is first and [p.data_ptr() for p in second.parameters()] == pointers
        weights = dict(second.named_parameters())
        for name, tensor in zip(copies.ema.names, copies.ema.tensors, strict=True):
            assert torch.equal(weights[name], tensor), name
        assert not torch.allclose(score(second, ids), before)  # the new weights are the ones used
    with copies.as_model("ema") as temporary:  # eager decoding: a module for the call only
        assert temporary is not first
    copies.release_decode_modules()  # what the trainer does once decoding is no longer compiled
    assert copies._decode_modules == {}


def test_adapter_mode_holds_adapter_weights_only(policy):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(policy, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    copies = make(lora, is_peft=True, reference_moves=False)
    assert copies.mode == ADAPTERS and copies.ema_module is None and copies.reference is None
    assert all("lora_" in name for name in copies.ema.names)
    ids = torch.tensor([[1, 5, 6, 7]])
    with lora.disable_adapter():
        base = score(lora, ids)
    torch.testing.assert_close(copies.reference_forward(lambda m: score(m, ids), lora), base)


def test_state_files_and_round_trip(policy, tmp_path):
    copies = make(policy)
    assert copies.state_files(0) == ["ema.safetensors", "reference.safetensors"]
    assert make(policy, reference_moves=False).state_files(0) == ["ema.safetensors"]  # rebuilt from the start
    assert make(policy, sharded=True).state_files(1) == ["ema_rank1.safetensors", "reference_rank1.safetensors"]
    step_policy(policy)
    copies.update_ema(0.5)
    copies.save(tmp_path, 0, is_main=True)
    restored = make(policy)
    restored.load(tmp_path, 0)
    assert all(torch.equal(a, b) for a, b in zip(restored.ema.tensors, copies.ema.tensors, strict=True))


def test_bad_combinations_are_refused(policy):
    with pytest.raises(ValueError, match="LoRA/peft models with FSDP"):
        ModelCopies(policy, need_ema=True, need_reference=False, reference_moves=False, is_peft=True, sharded=True,
                    offload=False, dtype="auto", device="cpu")
    with pytest.raises(ValueError, match="ref_model= cannot be combined"):
        ModelCopies(policy, need_ema=True, need_reference=True, reference_moves=False, is_peft=False, sharded=False,
                    offload=True, dtype="auto", device="cpu", ref_model=policy)
