"""Oracle tests: every loss in ``sapo.losses`` must equal TRL's own code on the same tensors.

TRL's implementations are called, never re-typed, so that either a TRL refactor or a bug here fails a test.
TRL 1.16 has no free loss functions: DPO lives inside ``DPOTrainer._compute_loss`` (which also runs the
model), CPO/ORPO in ``trl.experimental``. We call those unbound methods with a minimal stand-in ``self``
that carries exactly the attributes they read and, for DPO, a fake model whose per-token log-probs we set.

Where TRL 1.16 lacks a formula (conservative-DPO label smoothing was dropped from ``DPOTrainer``'s "sigmoid"),
the oracle is another TRL trainer implementing the same formula, with a comment saying so.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sapo.losses import (
    LOSS_TYPES,
    ORPO_MAX_MEAN_LOGP,
    REFERENCE_FREE_LOSS_TYPES,
    REFERENCE_LOSS_TYPES,
    check_loss_type,
    nll_from_logps,
    orpo_loss,
    preference_loss,
)

pytest.importorskip("trl")

BATCH_SIZES = (1, 3, 8)
BETAS = (0.01, 0.1, 0.5, 2.0)


def _seed(*parts: object) -> int:
    """Deterministic per-case seed (``hash`` of a str changes between processes)."""
    return zlib.crc32(repr(parts).encode())


# ---------------------------------------------------------------------------------------------------------
# Stand-ins for the trainer state TRL's methods read
# ---------------------------------------------------------------------------------------------------------


class _IdentityAccelerator:
    """Single-process accelerator: gathers are identities, everything lives on the CPU."""

    device = torch.device("cpu")

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather_for_metrics(self, tensor: Tensor) -> Tensor:
        return tensor


class _FakeCausalLM:
    """Returns preset per-token log-probs in the fields ``DPOTrainer._compute_loss`` reads off the LM head."""

    training = True

    def __init__(self, per_token_logps: Tensor) -> None:
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs: object) -> SimpleNamespace:
        logps = self.per_token_logps
        return SimpleNamespace(
            log_probs=logps,
            entropy=torch.zeros_like(logps),
            mean_logits=torch.zeros_like(logps),
            is_top1=torch.zeros(logps.shape, dtype=torch.bool),
        )


def _trl_dpo_compute_loss(
    loss_type: str,
    beta: float,
    per_token_logps: Tensor,
    completion_mask: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    loss_weights: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Run TRL's ``DPOTrainer._compute_loss`` on a ``[chosen; rejected]`` batch; return (loss, train metrics).
    ``loss_weights`` (loss type -> weight) combines several losses as TRL's ``loss_type`` list does; default
    ``loss_type`` alone at weight 1.

    ``per_token_logps`` is what the model "returns": shape ``(2B, T - 1)``, aligned with
    ``completion_mask[:, 1:]``. Reference log-probs go through the precomputed-reference path.
    """
    from trl import DPOTrainer

    stand_in = SimpleNamespace(
        model=_FakeCausalLM(per_token_logps),
        accelerator=_IdentityAccelerator(),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=list(loss_weights or {loss_type: 1.0}),
        loss_weights=list((loss_weights or {loss_type: 1.0}).values()),
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    loss = DPOTrainer._compute_loss(stand_in, stand_in.model, inputs, return_outputs=False)
    return loss, stand_in._metrics["train"]


def _trl_cpo_loss(loss_type: str, beta: float, label_smoothing: float, chosen: Tensor, rejected: Tensor):
    """TRL's ``CPOTrainer.cpo_loss`` (reference-free: its logits are ``chosen - rejected``)."""
    from trl.experimental.cpo import CPOTrainer

    stand_in = SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=0.0,
        accelerator=_IdentityAccelerator(),
    )
    return CPOTrainer.cpo_loss(stand_in, chosen, rejected)


def _trl_odds_ratio_loss(beta: float, chosen_mean_logps: Tensor, rejected_mean_logps: Tensor):
    """TRL's ``ORPOTrainer.odds_ratio_loss``: (beta * logsigmoid(lor), rewards..., mean ratio, mean lor)."""
    from trl.experimental.orpo import ORPOTrainer

    stand_in = SimpleNamespace(beta=beta, accelerator=_IdentityAccelerator())
    return ORPOTrainer.odds_ratio_loss(stand_in, chosen_mean_logps, rejected_mean_logps)


# ---------------------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------------------


def _random_pair_batch(batch_size: int, seed: int) -> dict[str, Tensor]:
    """Summed sequence log-probs (float64), response lengths, and a ``[chosen; rejected]`` completion mask.

    Policy and reference differ by a few nats so margins land on both sides of every beta's thresholds
    (hinge active and inactive, sigmoid in and out of saturation).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (2 * batch_size,), generator=g)
    prompt_len, seq_len = 3, 3 + 12 + 2
    pos = torch.arange(seq_len)
    completion_mask = ((pos >= prompt_len) & (pos < prompt_len + lengths[:, None])).long()

    def reference() -> Tensor:
        return -torch.rand(batch_size, generator=g, dtype=torch.float64) * 60

    def policy(ref: Tensor) -> Tensor:
        return (ref + torch.randn(batch_size, generator=g, dtype=torch.float64) * 8).clamp(max=-0.1)

    ref_real, ref_rejected = reference(), reference()
    return {
        "lengths": lengths.to(torch.float64),
        "completion_mask": completion_mask,
        "policy_real": policy(ref_real),
        "policy_rejected": policy(ref_rejected),
        "ref_real": ref_real,
        "ref_rejected": ref_rejected,
    }


def _spread_on_first_response_token(seq_logps: Tensor, completion_mask: Tensor) -> Tensor:
    """Per-token log-probs whose row sums are exactly ``seq_logps``: the whole value sits on the first
    response token, zeros elsewhere (the fused LM head returns 0 for label -100). Keeps the autograd graph."""
    shift_mask = completion_mask[:, 1:]
    first = (shift_mask.cumsum(dim=1) == 1) & shift_mask.bool()
    return first.to(seq_logps.dtype) * seq_logps[:, None]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------
# preference_loss vs DPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------------------


def _sapo_and_trl_dpo(loss_type: str, beta: float, batch: dict[str, Tensor]) -> SimpleNamespace:
    """Evaluate both implementations on copies of the same policy leaves.

    For IPO, ours receives length-averaged log-probs and TRL the corresponding sums (it divides by the
    response length itself); the leaves hold the averaged values in both cases so gradients are comparable.
    TRL's logged rewards are always ``beta * (summed log-ratio)``, so ``*_reward_scale`` maps ours onto TRL's.
    """
    n_real, n_rejected = batch["lengths"].chunk(2)
    if loss_type != "ipo":
        n_real, n_rejected = torch.ones_like(n_real), torch.ones_like(n_rejected)

    ours_in = [_leaf(batch["policy_real"] / n_real), _leaf(batch["policy_rejected"] / n_rejected)]
    trl_in = [_leaf(t) for t in ours_in]
    ref_real, ref_rejected = batch["ref_real"] / n_real, batch["ref_rejected"] / n_rejected

    ours = preference_loss(ours_in[0], ours_in[1], ref_real, ref_rejected, beta=beta, loss_type=loss_type)
    seq_logps = torch.cat([trl_in[0] * n_real, trl_in[1] * n_rejected])
    trl_loss, metrics = _trl_dpo_compute_loss(
        loss_type,
        beta,
        _spread_on_first_response_token(seq_logps, batch["completion_mask"]),
        batch["completion_mask"],
        ref_real * n_real,
        ref_rejected * n_rejected,
    )
    return SimpleNamespace(
        ours=ours, trl_loss=trl_loss, metrics=metrics, ours_in=ours_in, trl_in=trl_in,
        real_reward_scale=n_real, rejected_reward_scale=n_rejected,
    )


@pytest.mark.parametrize("loss_type", REFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_preference_loss_matches_trl_dpo_trainer(loss_type: str, beta: float, batch_size: int) -> None:
    batch = _random_pair_batch(batch_size, seed=_seed(loss_type, beta, batch_size))
    r = _sapo_and_trl_dpo(loss_type, beta, batch)

    torch.testing.assert_close(r.ours.losses.mean(), r.trl_loss)
    real_rewards = (r.ours.real_rewards * r.real_reward_scale).mean().item()
    rejected_rewards = (r.ours.rejected_rewards * r.rejected_reward_scale).mean().item()
    assert r.metrics["rewards/chosen"][-1] == pytest.approx(real_rewards, rel=1e-9, abs=1e-12)
    assert r.metrics["rewards/rejected"][-1] == pytest.approx(rejected_rewards, rel=1e-9, abs=1e-12)

    # Same gradient w.r.t. the policy log-probs: the loss is the same function, not just the same number.
    r.ours.losses.mean().backward()
    r.trl_loss.backward()
    for mine, theirs in zip(r.ours_in, r.trl_in, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("loss_type", REFERENCE_LOSS_TYPES)
@pytest.mark.parametrize("beta", (0.1, 2.0))
def test_preference_loss_per_example_matches_trl(loss_type: str, beta: float) -> None:
    """TRL only returns the batch mean, so compare per-example losses and rewards one example at a time."""
    batch_size = 6
    batch = _random_pair_batch(batch_size, seed=7)
    ours = _sapo_and_trl_dpo(loss_type, beta, batch)
    for i in range(batch_size):
        rows = torch.tensor([i, batch_size + i])
        per_row = ("lengths", "completion_mask")  # indexed over the [chosen; rejected] rows
        single = {k: v[rows] if k in per_row else v[i : i + 1] for k, v in batch.items()}
        trl = _sapo_and_trl_dpo(loss_type, beta, single)
        torch.testing.assert_close(ours.ours.losses[i], trl.trl_loss)
        real_reward = (ours.ours.real_rewards * ours.real_reward_scale)[i].item()
        rejected_reward = (ours.ours.rejected_rewards * ours.rejected_reward_scale)[i].item()
        assert trl.metrics["rewards/chosen"][-1] == pytest.approx(real_reward, rel=1e-9, abs=1e-12)
        assert trl.metrics["rewards/rejected"][-1] == pytest.approx(rejected_reward, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# preference_loss vs CPOTrainer.cpo_loss (covers label smoothing)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("sigmoid", 0.5), ("ipo", 0.0), ("hinge", 0.0)],
)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_preference_loss_matches_trl_cpo_loss(
    loss_type: str, label_smoothing: float, beta: float, batch_size: int
) -> None:
    """Conservative-DPO label smoothing is not in TRL 1.16's ``DPOTrainer``: its "sigmoid" ignores
    ``label_smoothing`` (used only by "robust"/"exo_pair"/"aot"). TRL's ``CPOTrainer.cpo_loss`` still applies
    ``-(1-ls) logsigmoid(beta z) - ls logsigmoid(-beta z)`` to ``z = chosen - rejected``; fed the log-ratios
    ``policy - reference``, its ``z`` is exactly DPO's margin and its rewards ``beta * input`` are DPO's.
    """
    batch = _random_pair_batch(batch_size, seed=_seed(loss_type, label_smoothing, beta, batch_size))
    policy_real, policy_rejected = _leaf(batch["policy_real"]), _leaf(batch["policy_rejected"])
    ours = preference_loss(
        policy_real, policy_rejected, batch["ref_real"], batch["ref_rejected"],
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
    )
    trl_losses, trl_real_rewards, trl_rejected_rewards = _trl_cpo_loss(
        loss_type, beta, label_smoothing,
        batch["policy_real"] - batch["ref_real"], batch["policy_rejected"] - batch["ref_rejected"],
    )
    torch.testing.assert_close(ours.losses, trl_losses)
    torch.testing.assert_close(ours.real_rewards, trl_real_rewards)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected_rewards)


# ---------------------------------------------------------------------------------------------------------
# orpo_loss vs ORPOTrainer.odds_ratio_loss
# ---------------------------------------------------------------------------------------------------------


def _random_mean_logps(batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Mean per-token log-probs spanning both branches of log1mexp (around log(1/2)) and values near 0."""
    g = torch.Generator().manual_seed(seed)
    near_branch_and_zero = torch.tensor([1e-5, 1e-3, 0.69, 0.7])
    magnitudes = torch.cat([torch.rand(2 * batch_size, generator=g) * 4, near_branch_and_zero])
    magnitudes = magnitudes[torch.randperm(magnitudes.numel(), generator=g)][: 2 * batch_size]
    return (-magnitudes.clamp(min=1e-5)).chunk(2)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_orpo_loss_matches_trl_odds_ratio_loss(beta: float, batch_size: int) -> None:
    """TRL returns ``beta * logsigmoid(log_odds_ratio)`` and *subtracts* its mean (``nll - losses.mean()``);
    we return the positive per-example loss ``-beta * logsigmoid(...)`` to be added, hence the sign flip."""
    real, rejected = _random_mean_logps(batch_size, seed=_seed(beta, batch_size))
    ours_in, trl_in = [_leaf(real), _leaf(rejected)], [_leaf(real), _leaf(rejected)]

    ours = orpo_loss(*ours_in, beta=beta)
    trl_out = _trl_odds_ratio_loss(beta, *trl_in)
    trl_losses, trl_real_rewards, trl_rejected_rewards, trl_mean_ratio, trl_mean_log_odds = trl_out
    torch.testing.assert_close(ours.losses, -trl_losses)
    torch.testing.assert_close(ours.real_rewards, trl_real_rewards)
    torch.testing.assert_close(ours.rejected_rewards, trl_rejected_rewards)
    assert ours.log_odds_ratio is not None
    torch.testing.assert_close(ours.log_odds_ratio.mean(), trl_mean_log_odds)
    torch.testing.assert_close(F.logsigmoid(ours.log_odds_ratio).mean(), trl_mean_ratio)

    ours.losses.mean().backward()
    (-trl_losses.mean()).backward()
    for mine, theirs in zip(ours_in, trl_in, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_orpo_loss_finite_at_and_near_zero(dtype: torch.dtype) -> None:
    """A response the model is certain of has mean log-prob ~0, where log(1 - exp(s)) is -inf."""
    real = torch.tensor([0.0, -1e-12, -1e-7, 0.0, -0.5, -1e-9], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, -1e-8, -2.0, -1e-10, -0.0], dtype=dtype, requires_grad=True)
    out = orpo_loss(real, rejected, beta=0.1)
    assert torch.isfinite(out.losses).all()
    assert out.log_odds_ratio is not None and torch.isfinite(out.log_odds_ratio).all()
    out.losses.sum().backward()
    assert real.grad is not None and torch.isfinite(real.grad).all()
    assert rejected.grad is not None and torch.isfinite(rejected.grad).all()
    # Both clamped to the same value: no preference either way, loss = beta * log 2.
    assert out.losses[0].item() == pytest.approx(0.1 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)


def test_orpo_clamp_only_touches_values_above_threshold() -> None:
    """Just below the clamp the loss must still be TRL's: the stable near-0 branch is used, not bypassed."""
    real = torch.tensor([ORPO_MAX_MEAN_LOGP * 10, -1e-4, -0.3])
    rejected = torch.tensor([-1e-3, ORPO_MAX_MEAN_LOGP * 2, -0.2])
    trl_losses = _trl_odds_ratio_loss(1.0, real, rejected)[0]
    torch.testing.assert_close(orpo_loss(real, rejected, beta=1.0).losses, -trl_losses)


# ---------------------------------------------------------------------------------------------------------
# Gradients, NLL, errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_flow_into_policy_logps_only(loss_type: str) -> None:
    policy_real = torch.tensor([-5.0, -3.0, -0.8], requires_grad=True)
    policy_rejected = torch.tensor([-4.0, -6.0, -0.9], requires_grad=True)
    ref_real = torch.tensor([-5.5, -2.0, -0.7], requires_grad=True)
    ref_rejected = torch.tensor([-4.5, -5.0, -1.0], requires_grad=True)
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        out = orpo_loss(policy_real, policy_rejected, beta=0.5)
    else:
        out = preference_loss(
            policy_real, policy_rejected, ref_real, ref_rejected, beta=0.5, loss_type=loss_type
        )
    out.losses.sum().backward()
    for logps in (policy_real, policy_rejected):
        assert logps.grad is not None and torch.isfinite(logps.grad).all() and logps.grad.abs().sum() > 0
    # Raising the real log-prob must never increase the loss; raising the rejected one must never decrease it.
    assert (policy_real.grad <= 0).all() and (policy_rejected.grad >= 0).all()
    assert not out.real_rewards.requires_grad and not out.rejected_rewards.requires_grad


def _random_lm_batch(seed: int) -> tuple[Tensor, Tensor]:
    """Random logits (B, T, V) and labels with -100 on "prompt" and padding positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :2] = -100
    labels[1, :4] = -100
    labels[2, 5:] = -100
    return logits, labels


def _token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    mask = labels != -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logps, mask


def test_nll_from_logps_matches_cross_entropy() -> None:
    logits, labels = _random_lm_batch(0)
    logps, mask = _token_logps(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(nll_from_logps(logps, mask), expected)
    torch.testing.assert_close(nll_from_logps(logps, mask.long()), expected)


def test_nll_from_logps_matches_trl_dpo_sft_loss() -> None:
    """TRL's DPOTrainer "sft" loss is the same token-level mean over response tokens of the chosen rows."""
    logits, labels = _random_lm_batch(1)
    logps, mask = _token_logps(logits, labels)
    per_token = torch.cat([logps, torch.zeros_like(logps)])  # [chosen; rejected]; rejected rows are unused
    completion_mask = F.pad(torch.cat([mask, mask]).long(), (1, 0))  # shift: logps[:, t] scores token t + 1
    trl_loss, _ = _trl_dpo_compute_loss(
        "sft", 0.1, per_token, completion_mask, torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    torch.testing.assert_close(nll_from_logps(logps, mask), trl_loss)


def test_nll_from_logps_ignores_minus_inf_padding_and_empty_mask() -> None:
    inf = float("inf")
    logps = torch.tensor([[-1.0, -2.0, -inf], [-3.0, -inf, -inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nll = nll_from_logps(logps, mask)
    assert nll.item() == pytest.approx(2.0)
    nll.backward()
    assert logps.grad is not None and torch.isfinite(logps.grad).all()
    assert nll_from_logps(logps.detach(), torch.zeros_like(mask)).item() == 0.0


def test_bad_loss_type_names_it_and_the_valid_ones() -> None:
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match=r"'dpo'.*'sigmoid'.*'ipo'.*'hinge'"):
        preference_loss(logps, logps, logps, logps, beta=0.1, loss_type="dpo")
    with pytest.raises(ValueError, match=r"'orpo'.*'sigmoid'"):  # reference-free: use orpo_loss
        preference_loss(logps, logps, logps, logps, beta=0.1, loss_type="orpo")
    with pytest.raises(ValueError, match=r"'kto'.*'sigmoid'.*'ipo'.*'hinge'.*'orpo'"):
        check_loss_type("kto")
    assert all(check_loss_type(t) == t for t in LOSS_TYPES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 0.1, "label_smoothing": 0.6}, "label_smoothing"),
        ({"beta": 0.1, "label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing"),
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict, message: str) -> None:
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        preference_loss(logps, logps, logps, logps, **kwargs)


def test_mismatched_shapes_raise() -> None:
    """(B,) against (B, 1) would broadcast into a (B, B) loss without complaint."""
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(torch.zeros(3), torch.zeros(3, 1), torch.zeros(3), torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        orpo_loss(torch.zeros(3), torch.zeros(2), beta=0.1)


# ---------------------------------------------------------------------------------------------------------
# The loss table: one call for every loss, no silent fallback
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "orpo"])
def test_pair_loss_composes_the_table_row(loss_type):
    from sapo.logprobs import sequence_logps
    from sapo.losses import LOSSES, nll_from_logps, orpo_loss, pair_loss, preference_loss

    generator = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(4, 6, generator=generator) * 3
    ref_token_logps = -torch.rand(4, 6, generator=generator) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]).bool()
    result = pair_loss(loss_type, token_logps, mask, ref_token_logps, beta=0.1)
    sums, means = sequence_logps(token_logps, mask)
    ref_sums, ref_means = sequence_logps(ref_token_logps, mask)
    if loss_type == "orpo":
        expected = nll_from_logps(token_logps[:2], mask[:2]) + orpo_loss(means[:2], means[2:], beta=0.1).losses.mean()
    else:
        policy, ref = (means, ref_means) if LOSSES[loss_type].length_normalised else (sums, ref_sums)
        output = preference_loss(policy[:2], policy[2:], ref[:2], ref[2:], beta=0.1, loss_type=loss_type)
        expected = output.losses.mean()
    torch.testing.assert_close(result.loss, expected)
    assert (result.nll is not None) == (loss_type == "orpo")
    torch.testing.assert_close(result.sums, sums)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("nll_weight", [0.5, 1.0])
def test_nll_weight_is_trls_sft_loss_added_to_the_reference_loss(loss_type: str, nll_weight: float) -> None:
    """RPO: `nll_weight` w is TRL's loss_type [loss_type, sft] with loss_weights [1, w], value and gradient."""
    from sapo.losses import pair_loss

    generator = torch.Generator().manual_seed(3)
    token_logps = -torch.rand(4, 6, generator=generator, dtype=torch.float64) * 3
    ref_token_logps = -torch.rand(4, 6, generator=generator, dtype=torch.float64) * 3
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]).bool()
    token_logps = token_logps * mask  # TRL sums every position: its model output is zero outside the completion
    ours_in, trl_in = _leaf(token_logps), _leaf(token_logps)
    ours = pair_loss(loss_type, ours_in, mask, ref_token_logps, beta=0.1, nll_weight=nll_weight)
    ref_sums = (ref_token_logps * mask).sum(-1)
    completion_mask = torch.cat([torch.zeros(4, 1, dtype=torch.long), mask.long()], dim=1)
    trl_loss, _ = _trl_dpo_compute_loss(loss_type, 0.1, trl_in, completion_mask, ref_sums[:2], ref_sums[2:],
                                        loss_weights={loss_type: 1.0, "sft": nll_weight})
    torch.testing.assert_close(ours.loss, trl_loss)
    ours.loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_in.grad[mask], trl_in.grad[mask])  # TRL's sums also touch padding positions
    assert ours.nll is not None and ours.nll.item() > 0


def test_nll_weight_is_refused_where_it_has_no_meaning() -> None:
    from sapo.losses import nll_term_weight

    assert nll_term_weight("sigmoid") == 0.0 and nll_term_weight("orpo") == 1.0
    assert nll_term_weight("ipo", 0.25) == 0.25
    with pytest.raises(ValueError, match="only added to a loss without its own NLL"):
        nll_term_weight("orpo", 0.5)
    with pytest.raises(ValueError, match="must be >= 0"):
        nll_term_weight("sigmoid", -1.0)


def test_pair_loss_refuses_an_unknown_loss_and_a_missing_reference():
    from sapo.losses import pair_loss

    logps, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="Unknown loss_type 'kto'"):
        pair_loss("kto", logps, mask, logps, beta=0.1)
    with pytest.raises(ValueError, match="needs the reference model's log-probs"):
        pair_loss("sigmoid", logps, mask, None, beta=0.1)


def test_pair_metrics_report_ties_apart_from_accuracy() -> None:
    from sapo.losses import pair_loss, pair_metrics

    # pairs 0 and 2 are identical (the rejected rows repeat the real ones), pair 1 is ranked right, pair 3 wrong
    real = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]])
    rejected = torch.tensor([[-1.0, -1.0], [-4.0, -4.0], [-2.0, -2.0], [-1.0, -1.0]])
    mask = torch.ones(8, 2, dtype=torch.bool)
    result = pair_loss("sigmoid", torch.cat([real, rejected]), mask, torch.zeros(8, 2), beta=0.1)
    metrics = pair_metrics(result, mask, [True, False, True, False])
    assert metrics["rewards/ties"].item() == 0.5 and metrics["rewards/accuracies"].item() == 0.5
    assert pair_metrics(result, mask)["rewards/accuracies"].item() == 0.25  # without flags: TRL's definition
    assert "rewards/accuracies" not in pair_metrics(result, mask, [True] * 4)
