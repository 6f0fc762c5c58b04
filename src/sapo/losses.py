"""Preference losses for SAPO as pure tensor functions.

SAPO (arXiv 2405.20830) trains on pairs whose "real" side is the dataset response and whose "rejected" side is
a segment the model generated itself, so the losses are the usual offline preference objectives (DPO, IPO,
hinge/SLiC, ORPO). They live here, free of any model or trainer, so that each one can be checked number for
number against TRL's implementation (see ``tests/test_losses.py``) and reused by any training loop.

Every function takes already-reduced log-probabilities, shape ``(batch,)``, and returns per-example losses;
the caller decides how to reduce them (mean over the batch, gradient accumulation, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sapo import metrics as m
from sapo.logprobs import sequence_logps


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the trainer, so the training step is one call whatever the loss."""

    needs_reference: bool  # compares the policy with a reference model
    length_normalised: bool  # takes mean per-token log-probs instead of sums
    adds_nll: bool  # adds the NLL of the real response (ORPO)


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(needs_reference=True, length_normalised=False, adds_nll=False),  # DPO
    "ipo": LossSpec(needs_reference=True, length_normalised=True, adds_nll=False),
    "hinge": LossSpec(needs_reference=True, length_normalised=False, adds_nll=False),
    "orpo": LossSpec(needs_reference=False, length_normalised=True, adds_nll=True),
}
"""Every loss a SAPO run can use, with its needs; :func:`pair_loss` computes any of them."""

LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
"""Every loss a SAPO run can use; ``sigmoid`` is DPO."""

REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = tuple(name for name, spec in LOSSES.items() if not spec.needs_reference)
"""Losses that never look at a reference model, so the trainer can skip building one."""

REFERENCE_LOSS_TYPES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if t not in REFERENCE_FREE_LOSS_TYPES)
"""The loss types :func:`preference_loss` computes (those that compare the policy with a reference)."""

ORPO_MAX_MEAN_LOGP: float = -1e-6
"""Upper clamp for ORPO's mean log-prob ``s``.

``log_odds(s) = s - log(1 - exp(s))`` diverges as ``s -> 0`` (a response the model is certain of), and at
``s == 0`` exactly it is ``+inf``, which turns the odds-ratio difference into ``inf - inf = nan`` and poisons
the step; just below 0 (``s > ~-6e-8`` in float32) the value is finite but the gradient is NaN (see
:func:`log1mexp`). TRL's ``ORPOTrainer`` has both problems. Clamping ``s`` to at most ``-1e-6`` (a per-token
probability of 0.999999) keeps everything finite; the clamped examples simply get no gradient through the
odds term, which is harmless because their odds are already ~1e6. The NLL term, computed separately, is
unaffected.
"""

_LOG_HALF = -0.6931471805599453  # log(1/2): branch point of the stable log(1 - exp(x)) (Maechler, 2012).


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-example loss plus the detached implicit rewards that trainers log (``rewards/chosen`` etc.).

    ``log_odds_ratio`` is only set by :func:`orpo_loss`: the per-example (detached) difference of log-odds
    ``log_odds(real) - log_odds(rejected)``, TRL's ``log_odds_chosen`` metric before averaging.
    """

    losses: Tensor
    real_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor | None = None


def check_loss_type(loss_type: str, valid: tuple[str, ...] = LOSS_TYPES) -> str:
    """Return ``loss_type`` if it is one of ``valid``; otherwise fail with a message listing the choices.

    A typo in a config should stop the run before any compute is spent, with a message that says what to use.
    """
    if loss_type not in valid:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {', '.join(map(repr, valid))}")
    return loss_type


def _check_same_shape(**tensors: Tensor) -> None:
    """Refuse mismatched shapes: broadcasting (B,) against (B, 1) would silently build a (B, B) loss."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob tensors must all have the same shape, got {shapes}")


def _check_hyperparameters(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Reject settings that would divide by zero (IPO's ``1/(2 beta)``) or be silently ignored."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for loss_type 'sigmoid', not {loss_type!r}")


def sigmoid_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al., 2023), with the conservative-DPO label smoothing of Mitchell (2023).

    ``label_smoothing`` is the assumed probability that a preference is flipped; for SAPO, where the rejected
    side is the model's own sample, a little smoothing hedges against samples that are actually fine.
    """
    real_wins = -F.logsigmoid(beta * logits) * (1 - label_smoothing)
    return real_wins - F.logsigmoid(-beta * logits) * label_smoothing


def ipo_loss(logits: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al., 2023, Eq. 17): regress the log-ratio margin onto ``1 / (2 beta)`` instead of pushing
    it to infinity, which keeps the policy from drifting arbitrarily far on deterministic preferences."""
    return (logits - 1 / (2 * beta)) ** 2


def hinge_loss(logits: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge (Zhao et al., 2023): no loss, hence no gradient, once the margin exceeds 1/beta."""
    return torch.relu(1 - beta * logits)


def preference_loss(
    policy_real_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_real_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Reference-based preference loss on the margin ``(pi_real - pi_rej) - (ref_real - ref_rej)``.

    Inputs are sequence log-probs of shape ``(batch,)``: summed over response tokens for ``sigmoid`` and
    ``hinge``, but **length-averaged** (sum / number of response tokens) for ``ipo``. IPO's squared loss would
    otherwise scale with response length and make ``beta`` meaningless across lengths; TRL's ``DPOTrainer``
    normalizes the same way and notes the IPO authors confirmed it. Rewards are ``beta * (policy -
    reference)`` on whatever the caller passed (so per-token for ``ipo``), detached because they are only
    logged.
    """
    check_loss_type(loss_type, REFERENCE_LOSS_TYPES)
    _check_hyperparameters(beta, loss_type, label_smoothing)
    _check_same_shape(
        policy_real_logps=policy_real_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_real_logps=ref_real_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    real_logratios = policy_real_logps - ref_real_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = real_logratios - rejected_logratios
    margin_losses = {"sigmoid": lambda: sigmoid_loss(logits, beta, label_smoothing),
                     "ipo": lambda: ipo_loss(logits, beta), "hinge": lambda: hinge_loss(logits, beta)}
    losses = margin_losses[loss_type]()  # a reference loss without an entry here is a KeyError, never a fallback
    return PreferenceLossOutput(
        losses=losses,
        real_rewards=beta * real_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0`` without cancellation: ``log1p(-exp(x))`` is accurate far from 0 and
    ``log(-expm1(x))`` near 0, so switch at ``log(1/2)`` (Maechler, 2012).

    ``torch.where`` backpropagates through the unused branch too, and in float32 ``log1p(-exp(x))`` is
    ``-inf`` once ``exp(x)`` rounds to 1 (``x > ~-6e-8``), which gives NaN gradients even where the value is
    finite (TRL's identical helper does this). Callers must keep ``x <= -1e-6`` or so, as :func:`log_odds`
    does."""
    return torch.where(x < _LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logps: Tensor) -> Tensor:
    """ORPO's ``log(p / (1 - p))`` with ``p = exp(mean_logps)``, with ``mean_logps`` clamped to at most
    :data:`ORPO_MAX_MEAN_LOGP` so it stays finite (see there for why)."""
    s = mean_logps.clamp(max=ORPO_MAX_MEAN_LOGP)
    return s - log1mexp(s)


def orpo_loss(
    policy_real_mean_logps: Tensor,
    policy_rejected_mean_logps: Tensor,
    *,
    beta: float,
) -> PreferenceLossOutput:
    """ORPO's odds-ratio term (Hong et al., 2024): ``-beta * logsigmoid(log_odds(real) - log_odds(rej))``.

    Inputs are **mean** per-token log-probs of the responses, shape ``(batch,)``; ORPO defines the odds on the
    length-normalized likelihood. ``beta`` is the paper's ``lambda``. The caller adds the NLL of the real
    response (:func:`nll_from_logps`) itself, because it needs token-level inputs. Computed in float32 since
    ``exp``/``log1p`` near 0 lose everything in bf16. Rewards are ``beta * mean_logps``, detached, as in TRL.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(
        policy_real_mean_logps=policy_real_mean_logps, policy_rejected_mean_logps=policy_rejected_mean_logps
    )
    real = policy_real_mean_logps.float()
    rejected = policy_rejected_mean_logps.float()
    log_odds_ratio = log_odds(real) - log_odds(rejected)
    return PreferenceLossOutput(
        losses=-beta * F.logsigmoid(log_odds_ratio),
        real_rewards=beta * real.detach(),
        rejected_rewards=beta * rejected.detach(),
        log_odds_ratio=log_odds_ratio.detach(),
    )


def nll_from_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over every masked token of the batch: ``(batch, seq)`` in, scalar out.

    Token-level (not per-sequence) mean, which is what ``cross_entropy(..., ignore_index=-100)`` gives, so
    long responses weigh more, as in ordinary SFT. Unmasked positions are dropped with ``where`` rather than
    multiplied by 0 so padding log-probs of ``-inf`` cannot leak a NaN; a batch with no masked token gives 0
    (not NaN as ``cross_entropy`` would) so a fully truncated batch cannot poison training.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must match")
    keep = mask.bool()
    total = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum()
    return -total / keep.sum().clamp(min=1)


def nll_term_weight(loss_type: str, nll_weight: float = 0.0) -> float:
    """The weight of the real responses' NLL in a loss: 1 for ORPO (part of its definition), ``nll_weight``
    for the reference losses (RPO), 0 when absent. An identical pair still trains through this term."""
    spec = LOSSES[check_loss_type(loss_type)]
    if nll_weight < 0 or (nll_weight and spec.adds_nll):
        raise ValueError(f"nll_weight must be >= 0 and only added to a loss without its own NLL term; got "
                         f"{nll_weight} with loss_type {loss_type!r}")
    return 1.0 if spec.adds_nll else float(nll_weight)


@dataclass(frozen=True)
class PairLoss:
    """The loss of a batch of pairs and what is logged with it."""

    loss: Tensor  # scalar: mean over pairs, plus the NLL where the loss adds it
    output: PreferenceLossOutput  # per-pair losses and rewards
    nll: Tensor | None  # the real responses' NLL where the loss adds it (ORPO, nll_weight), unweighted; else None
    sums: Tensor  # summed response log-probs of every row (real rows, then rejected rows)
    means: Tensor | None = None  # mean per-token response log-probs of every row
    token_statistics: Tensor | None = None  # the policy's `sapo.logprobs.token_statistics`, (2 * pairs, seq, 3)


def pair_loss(
    loss_type: str,
    token_logps: Tensor,
    mask: Tensor,
    ref_token_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    token_statistics: Tensor | None = None,
) -> PairLoss:
    """The loss of a batch of pairs, laid out as the trainer scores them: ``(2 * pairs, seq)`` per-token log-probs,
    real rows first, then the rejected rows in the same order; ``mask`` marks response tokens.

    ``nll_weight`` adds that multiple of the real responses' NLL to a reference loss (RPO, Pang et al. 2024;
    TRL's ``loss_type=[sigmoid, sft]``): a pure margin loss can lower both sides' likelihood, and the NLL term
    keeps the real answers' likelihood rising. ORPO already carries its own NLL at weight 1.
    ``token_statistics`` (the policy's, for the logged metrics) is only passed through."""
    spec = LOSSES[check_loss_type(loss_type)]
    weight = nll_term_weight(loss_type, nll_weight)
    if spec.needs_reference and ref_token_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference model's log-probs")
    sums, means = sequence_logps(token_logps, mask)
    half = sums.shape[0] // 2
    policy = means if spec.length_normalised else sums
    if spec.needs_reference:
        ref_sums, ref_means = sequence_logps(ref_token_logps, mask)
        ref = ref_means if spec.length_normalised else ref_sums
        output = preference_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=beta,
                                 loss_type=loss_type, label_smoothing=label_smoothing)
    else:
        output = orpo_loss(policy[:half], policy[half:], beta=beta)
    loss = output.losses.mean()
    nll = nll_from_logps(token_logps[:half], mask[:half]) if weight else None
    return PairLoss(loss if nll is None else weight * nll + loss, output, nll, sums, means, token_statistics)


def pair_metrics(result: PairLoss, mask: Tensor, identical: Sequence[bool] | None = None) -> dict[str, Tensor]:
    """What TRL's preference trainers log for a batch of pairs (see :func:`pair_loss`), under TRL's names: implicit
    rewards, their margin and accuracy, the log-probs of each side (summed, as DPOTrainer logs them; per-token means
    for ORPO, as ORPOTrainer does), and with the policy's token statistics the token-level ones
    (:func:`token_metrics`); plus SAPO's own: response lengths, ties, and ORPO's log-odds.

    `identical` (host-side, one flag per pair): pairs whose rejected response is the real one. Such a tie has a zero
    margin whatever the weights, so it is reported apart (`rewards/ties`) and `rewards/accuracies` is the fraction
    of the other pairs ranked right (absent when every pair is a tie); without flags, every pair counts (TRL's)."""
    sums = result.sums.detach()
    half = sums.shape[0] // 2
    log_odds_difference = result.output.log_odds_ratio  # set by ORPO only
    logged = result.means.detach() if log_odds_difference is not None and result.means is not None else sums
    real, rejected = result.output.real_rewards.float(), result.output.rejected_rewards.float()
    lengths = mask.sum(-1).float()
    metrics = {
        m.REWARDS_CHOSEN: real.mean(), m.REWARDS_REJECTED: rejected.mean(), m.REWARD_MARGINS: (real - rejected).mean(),
        m.LOGPS_CHOSEN: logged[:half].mean(), m.LOGPS_REJECTED: logged[half:].mean(),
        m.LENGTH_CHOSEN: lengths[:half].mean(), m.LENGTH_REJECTED: lengths[half:].mean(),
    }
    if log_odds_difference is not None:  # TRL's ORPOTrainer: the mean log-odds difference, and of its logsigmoid
        metrics[m.LOG_ODDS_CHOSEN] = log_odds_difference.float().mean()
        metrics[m.LOG_ODDS_RATIO] = F.logsigmoid(log_odds_difference.float()).mean()
    if result.token_statistics is not None:
        metrics.update(token_metrics(result.token_statistics, mask, pairs=True))
    ties = [False] * half if identical is None else list(identical)
    decided = [i for i, tie in enumerate(ties) if not tie]
    metrics[m.REWARD_TIES] = torch.tensor(1.0 - len(decided) / max(1, half))
    if len(decided) == half:
        metrics[m.REWARD_ACCURACIES] = (real > rejected).float().mean()
    elif decided:
        index = torch.tensor(decided, device=real.device)
        metrics[m.REWARD_ACCURACIES] = (real[index] > rejected[index]).float().mean()
    return metrics


def token_metrics(token_statistics: Tensor, mask: Tensor, *, pairs: bool) -> dict[str, Tensor]:
    """TRL's token-level metrics from per-token `sapo.logprobs.token_statistics` (rows, seq, 3) over the response
    tokens `mask` (rows, seq), each a mean over tokens (not over sequences), as TRL's DPOTrainer computes them:
    `entropy` over every response token, `mean_token_accuracy` (label = argmax) over the chosen ones, and for
    `pairs` (real rows, then rejected rows) `logits/chosen` and `logits/rejected`, the mean logit over the
    vocabulary averaged over each side's tokens. Without pairs (sft) every row is a chosen row, as in SFTTrainer."""
    weights = mask.to(token_statistics.dtype)
    entropy, mean_logit, top1 = token_statistics.detach().unbind(-1)
    chosen = weights[: weights.shape[0] // 2] if pairs else weights
    half = chosen.shape[0]

    def mean(values: Tensor, w: Tensor) -> Tensor:
        return (values * w).sum() / w.sum().clamp(min=1)

    metrics = {m.ENTROPY: mean(entropy, weights), m.MEAN_TOKEN_ACCURACY: mean(top1[:half], chosen)}
    if pairs:
        metrics[m.LOGITS_CHOSEN] = mean(mean_logit[:half], chosen)
        metrics[m.LOGITS_REJECTED] = mean(mean_logit[half:], weights[half:])
    return metrics
