import pytest
import torch

from sapo.ema import ShadowWeights, copy_weights_, ema_update_, trainable_parameters


def test_ema_update_matches_formula_after_n_steps():
    torch.manual_seed(0)
    ema = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    expected = [t.clone() for t in ema]
    beta = 0.5
    for _ in range(6):
        params = [torch.randn_like(t) for t in ema]
        ema_update_(ema, params, beta)
        expected = [beta * e + (1 - beta) * p for e, p in zip(expected, params, strict=True)]
    for got, want in zip(ema, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.9])
def test_ema_update_edge_betas(beta):
    ema, param = [torch.zeros(4)], [torch.ones(4)]
    ema_update_(ema, param, beta)
    torch.testing.assert_close(ema[0], torch.full((4,), 1 - beta))


def test_ema_update_mixed_dtype_casts():
    ema = [torch.zeros(8, dtype=torch.bfloat16)]
    ema_update_(ema, [torch.full((8,), 2.0)], 0.75)
    assert ema[0].dtype == torch.bfloat16
    torch.testing.assert_close(ema[0].float(), torch.full((8,), 0.5))


def test_ema_update_length_mismatch():
    with pytest.raises(ValueError, match="2 EMA tensors but 1"):
        ema_update_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.5)


def test_copy_weights():
    targets, sources = [torch.zeros(3)], [torch.arange(3.0)]
    copy_weights_(targets, sources)
    torch.testing.assert_close(targets[0], sources[0])


def test_shadow_clone_is_independent_and_swaps_back():
    layer = torch.nn.Linear(3, 2)
    names, params = trainable_parameters(layer)
    shadow = ShadowWeights.clone_of(names, params)
    original = [p.detach().clone() for p in params]
    shadow.tensors[0].fill_(7.0)
    assert not torch.equal(params[0], shadow.tensors[0])
    with shadow.swapped_into(params):
        assert torch.all(layer.weight == 7.0)
        out = layer(torch.ones(1, 3))
    torch.testing.assert_close(params[0].detach(), original[0])
    torch.testing.assert_close(out, torch.full((1, 2), 21.0) + layer.bias.detach())
    assert torch.all(shadow.tensors[0] == 7.0)


def test_shadow_parameters_of_updates_module_in_place():
    policy, copy = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    names, params = trainable_parameters(policy)
    shadow = ShadowWeights.parameters_of(copy, names)
    shadow.update_ema_(params, 0.0)
    torch.testing.assert_close(copy.weight, policy.weight.detach())


def test_shadow_state_round_trip_and_mismatch():
    layer = torch.nn.Linear(3, 2)
    names, params = trainable_parameters(layer)
    shadow = ShadowWeights.clone_of(names, params)
    state = {k: v + 1 for k, v in shadow.state_dict().items()}
    shadow.load_state_dict(state)
    torch.testing.assert_close(shadow.tensors[0], params[0].detach() + 1)
    with pytest.raises(ValueError, match="lacks"):
        shadow.load_state_dict({"other": torch.zeros(1)})


def test_mixed_dtype_update_equals_casting_each_tensor_before_its_lerp():
    torch.manual_seed(0)
    params = [torch.randn(s) for s in [(5, 3), (7,), (2, 2, 2), (1,)]]
    ema = [torch.randn_like(p).to(torch.bfloat16) for p in params]
    want = [e.clone().lerp_(p.to(torch.bfloat16), 1 - 0.9) for e, p in zip(ema, params, strict=True)]
    ema_update_(ema, params, 0.9)
    assert all(torch.equal(g, w) for g, w in zip(ema, want, strict=True))


def test_cast_chunks_bound_the_scratch_and_cover_every_tensor():
    from sapo.ema import _chunks

    assert _chunks([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert _chunks([10, 1, 1], 4) == [(0, 1), (1, 3)]  # a tensor larger than the budget is a chunk of its own
    assert _chunks([1], 4) == [(0, 1)]
