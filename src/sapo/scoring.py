"""How a batch of pairs is scored: the per-token log-probs of the policy and the reference, and the loss.

Three choices are made once per run. Each gives the same numbers up to float rounding, and each is cheaper than
the plain way:

- **the head**: log-probs from the decoder's last hidden state through a chunked vocabulary projection
  (`sapo.logprobs`), or through ordinary logits where that is not exact (soft-capped heads) or not possible
  (sharded engines apply their head only inside their forward);
- **the layout**: one packed row per pair around its shared prefix (`sapo.packing`), or two separate rows, decided
  by a probe on the model (sharded engines probe at their first scoring, all ranks together);
- **the reference**: a replay pair drawn again before the reference moves reuses the scores of its first draw
  (`cache_reference_logps`), kept by the recipe's buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from sapo.batching import pad_pairs, pair_rows
from sapo.buffer import ReplayEntry
from sapo.copies import ModelCopies
from sapo.logprobs import (
    hidden_state_scoring_is_exact,
    inner_model,
    output_projection,
    packed_response_token_scores,
    packing_unsupported_reason,
    response_token_scores,
    shared_prefix_scoring_is_exact,
)
from sapo.losses import LOSSES, PairLoss, nll_from_logps, pair_loss, token_metrics
from sapo.metrics import NLL_LOSS, REFERENCE_CACHED_FRACTION
from sapo.pair_attention import attend_pairs_densely, attend_pairs_with_flex, attends_pairs_with_flex, flex_wanted
from sapo.recipes import Recipe
from sapo.sharding import any_rank, global_shape

logger = logging.getLogger(__name__)

PROBE_LENGTH = 48
"""Tokens in the packing probe's longest sequences."""


class PairScoring:
    """The scoring choices of one run (`use_hidden_states`, `shared_prefix`: None until a sharded engine has probed)
    and the forwards that follow them."""

    def __init__(self, args: Any, policy: nn.Module, copies: ModelCopies, recipe: Recipe, pad_token_id: int,
                 probe_token_id: int, autocast: Callable[[], AbstractContextManager[Any]],
                 record: Callable[[str, float], None], checks_reference: bool) -> None:
        """`autocast`: the accelerator's, so the policy, its reference and the head projection that runs outside the
        prepared forward share one precision policy. `record`: a metric value for the next log.
        `checks_reference`: a `ref_model=` was given, which is probed like the policy."""
        self.args, self.policy, self.copies, self.recipe = args, policy, copies, recipe
        self.pad_token_id, self.autocast, self.record = pad_token_id, autocast, record
        self.use_hidden_states = not copies.sharded and self._hidden_state_scoring_works(policy, probe_token_id)
        self.shared_prefix: bool | None = self._check_shared_prefix(policy, checks_reference)
        logger.info("pair scoring: %s", self.layout)

    # -- the choices ----------------------------------------------------------------------------

    def _hidden_state_scoring_works(self, policy: nn.Module, token_id: int) -> bool:
        probe = torch.tensor([[token_id] * 4], device=self.args.device)
        try:
            exact = hidden_state_scoring_is_exact(policy, probe)
        except Exception as error:  # unusual heads: fall back to ordinary logits
            logger.info("hidden-state scoring unavailable (%s); using full logits", error)
            return False
        if not exact:
            logger.info("the model's logits are not lm_head(hidden state); scoring with full logits")
        return exact

    def _check_shared_prefix(self, policy: nn.Module, checks_reference: bool) -> bool | None:
        """Whether pairs are scored packed around their shared prefix (`pair_scoring`): probed once on the policy
        (and on a `ref_model=` given), falling back to separate rows, with one info log, where it is not exact.
        Sharded engines (FSDP2, ZeRO-3) can run the policy only inside their forward, which exists once the engine
        is prepared: here they get the checks that need no forward, and None, so that the probe runs at their first
        scoring (`_probe_in_engine`)."""
        if self.args.pair_scoring != "shared_prefix" or self.recipe.supervised:
            return False
        models = [policy] + ([self.copies.reference_module] if checks_reference else [])
        switched = [policy, self.copies.reference_module]
        self._choose_pair_attention(switched)
        for model in models:
            reason = packing_unsupported_reason(model) if self.copies.sharded else self._shared_prefix_refusal(model)
            if reason is not None:
                logger.info("pair_scoring shared_prefix: %s (%s); scoring pairs as separate rows", reason,
                            type(model).__name__)
                for other in filter(None, switched):  # no packed rows: no block masks
                    attend_pairs_densely(inner_model(other))
                return False
        return None if self.copies.sharded else True

    def _choose_pair_attention(self, models: list[nn.Module | None]) -> None:
        """Packed pairs attend through FlexAttention's block mask where `pair_attention` asks for it and the model
        can switch to it (`sapo.pair_attention`); the packing probe then checks that path."""
        if not flex_wanted(self.args.pair_attention, self.args.device):
            return
        for model in filter(None, models):
            reason = attend_pairs_with_flex(inner_model(model))
            if reason is not None:
                logger.info("pair_attention flex: %s; packed pairs attend through a dense mask", reason)

    def _shared_prefix_refusal(self, model: nn.Module) -> str | None:
        """`shared_prefix_refusal`, where a failing FlexAttention path is first replaced by the dense mask."""
        reason = shared_prefix_refusal(model, self.pad_token_id, use_hidden_states=self.use_hidden_states)
        if reason is None and attends_pairs_with_flex(inner_model(model)) and self.args.device.type != "cpu":
            with self.autocast():  # the kernels training compiles: its precision
                reason = flex_backward_failure(model, self.pad_token_id, use_hidden_states=self.use_hidden_states)
        if reason is not None and attends_pairs_with_flex(inner_model(model)):
            attend_pairs_densely(inner_model(model))
            logger.info("pair_attention flex: %s; packed pairs attend through a dense mask", reason)
            reason = shared_prefix_refusal(model, self.pad_token_id, use_hidden_states=self.use_hidden_states)
        return reason

    @property
    def layout(self) -> str:
        """How pairs are scored, in words (logged at the start, reported by the speed benchmark)."""
        if self.shared_prefix is None:
            return "decided at the first scoring (a sharded engine probes packing there)"
        if not self.shared_prefix:
            return "separate rows"
        if not attends_pairs_with_flex(inner_model(self.policy)):
            return "packed pairs, dense mask"
        if self.args.device.type == "cpu":  # torch has no FlexAttention backward on a CPU
            return "packed pairs, FlexAttention without gradients, dense mask with them"
        return "packed pairs, FlexAttention"

    def _packing_probe_failure(self, model: nn.Module, half_precision: bool = False) -> str | None:
        return packing_probe_failure(model, self.pad_token_id, use_hidden_states=self.use_hidden_states,
                                     half_precision=half_precision)

    def _probe_in_engine(self, model: nn.Module) -> bool:
        """The packing probe for sharded engines, at their first scoring forward through `model` (the engine's
        wrapper). Every rank runs it at the same point (each forward is a collective) on the same probe pairs, and
        all take one decision, since they must run the same forwards from then on."""
        models = [model] + ([self.copies.reference_module] if self.copies.reference_module is not None else [])
        half = bool(self.args.bf16 or self.args.fp16)  # the engine computes in half precision: its tolerance
        # Every model is probed on every rank, whatever an earlier one gave: each probe forward is a collective.
        failure = next((f for f in [self._packing_probe_failure(m, half) for m in models] if f), None)
        exact = not any_rank(failure is not None, self.args.device)
        if not exact:
            logger.info("pair_scoring shared_prefix: %s under %s; scoring pairs as separate rows",
                        failure or "another rank's packed rows do not reproduce its separate rows' log-probs",
                        self.copies.sharding)
        return exact

    # -- scoring --------------------------------------------------------------------------------

    def token_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token log-probs of the batch's response tokens (real rows, then rejected rows for pairs)."""
        return self.token_scores(model, batch, with_statistics=False)[0]

    def token_scores(self, model: nn.Module, batch: dict[str, Any], *, with_statistics: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_logps` and, for the policy's logged metrics, the same tokens' `sapo.logprobs.token_statistics`
        (entropy, mean logit, argmax hit), from the logits of the same forward."""
        with self.autocast():
            if self.shared_prefix and "packed_input_ids" in batch:
                return packed_response_token_scores(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                                    batch["attention_mask"], batch["loss_mask"],
                                                    chunk_size=self.args.logprob_chunk_size,
                                                    use_hidden_states=self.use_hidden_states,
                                                    with_statistics=with_statistics)
            return response_token_scores(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                         chunk_size=self.args.logprob_chunk_size,
                                         use_hidden_states=self.use_hidden_states, with_statistics=with_statistics)

    def nll_loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The supervised loss (sft): the token-level NLL of the real responses, and what is logged with it."""
        mask = batch["loss_mask"][:, 1:]
        token_logps, statistics = self.token_scores(model, batch)
        loss = nll_from_logps(token_logps, mask)
        logged = {NLL_LOSS: loss.detach()}
        if statistics is not None:
            logged.update(token_metrics(statistics, mask, pairs=False))
        return loss, logged

    def pair_loss(self, model: nn.Module, batch: dict[str, Any]) -> PairLoss:
        """The run's preference loss of a batch of pairs (real rows, then rejected rows), for training and eval."""
        if self.shared_prefix is None:  # a sharded engine's first scoring
            self.shared_prefix = self._probe_in_engine(model)
        # The reference goes first: with sharded copies its forward borrows the policy's parameter storage.
        ref_token_logps = None
        if LOSSES[self.args.loss_type].needs_reference:
            ref_token_logps = self.reference_token_logps(model, batch)
        token_logps, statistics = self.token_scores(model, batch)
        return pair_loss(self.args.loss_type, token_logps, batch["loss_mask"][:, 1:], ref_token_logps,
                         beta=self.recipe.beta, label_smoothing=self.args.label_smoothing,
                         nll_weight=self.args.nll_weight, token_statistics=statistics)

    def reference_token_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's per-token log-probs of a batch of pairs. Replay-buffer pairs (`entry_ids`) whose scores
        the recipe remembers since the reference last moved are not run again (`cache_reference_logps`); the others
        are, and are remembered. Where the reference forward is collective (it runs through the engine's wrapper)
        and several processes train, a rank runs it whenever any rank must."""
        def forward(rows: dict[str, Any]) -> torch.Tensor:
            return self.copies.reference_forward(lambda m: self.token_logps(m, rows), model)

        entry_ids = batch.get("entry_ids")
        if entry_ids is None or not self.args.cache_reference_logps or max(entry_ids) < 0:  # not buffer pairs
            return forward(batch)
        cached = self.recipe.cached_reference_logps(entry_ids)
        missing = [i for i, scores in enumerate(cached) if scores is None]
        self.record(REFERENCE_CACHED_FRACTION, 1.0 - len(missing) / len(entry_ids))
        run = bool(missing)
        if self.copies.reference_forward_is_collective and self.args.world_size > 1:
            run = any_rank(run, self.args.device)
        if len(missing) == len(entry_ids):
            fresh, rows = forward(batch), missing
        elif run:
            rows = missing or [0]  # this rank joins another's forward; one row is the least it can run
            fresh = forward(pair_rows(batch, rows))
        else:
            rows, fresh = [], None
        out = self._place_remembered(batch, cached)
        if fresh is not None:
            self._place_and_remember(batch, out, rows, fresh)
        return out

    @staticmethod
    def _place_remembered(batch: dict[str, Any], cached: list[tuple[torch.Tensor, torch.Tensor] | None]
                          ) -> torch.Tensor:
        """The batch's (2B, W-1) layout with the remembered scores in their pairs' response positions, zeros
        elsewhere (host-side lengths: no device read)."""
        mask = batch["loss_mask"]
        out = torch.zeros((mask.shape[0], mask.shape[1] - 1), dtype=torch.float32, device=mask.device)
        pairs = len(cached)
        for i, scores in enumerate(cached):
            if scores is not None:
                real, rejected = _response_slices(batch["pair_lengths"][i])
                out[i, real], out[pairs + i, rejected] = scores
        return out

    def _place_and_remember(self, batch: dict[str, Any], out: torch.Tensor, rows: list[int],
                            fresh: torch.Tensor) -> None:
        """Put freshly scored pairs (`rows` of the batch, as `pair_rows` laid them out) into `out`, and have the
        recipe remember them."""
        pairs = len(batch["entry_ids"])
        index = torch.tensor([*rows, *(pairs + i for i in rows)], device=out.device)
        out.index_copy_(0, index, fresh.float())
        for j, i in enumerate(rows):
            real, rejected = _response_slices(batch["pair_lengths"][i])
            self.recipe.remember_reference_logps(batch["entry_ids"][i], fresh[j, real].clone(),
                                                 fresh[len(rows) + j, rejected].clone())


def _response_slices(lengths: tuple[int, int, int]) -> tuple[slice, slice]:
    """Where a pair's real and rejected response tokens sit in its rows of the shifted (W-1) layout, from its
    (prompt, real, rejected) lengths: position t-1 predicts token t, so both responses start at prompt - 1."""
    prompt, real, rejected = lengths
    return slice(prompt - 1, prompt - 1 + real), slice(prompt - 1, prompt - 1 + rejected)


def packing_probe(model: nn.Module, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pairs with a long, a prompt-only and a whole-sequence shared prefix, on the model's device. Sequences of
    up to `PROBE_LENGTH` tokens: a limit on attention that the config does not declare (`limited_attention`)
    fails the probe if it is shorter than that."""
    vocab = global_shape(output_projection(model).weight)[0]  # a ZeRO-3 partition is empty
    ids = [(7 * i + 3) % vocab for i in range(PROBE_LENGTH + 16)]
    half = PROBE_LENGTH // 2
    entries = [ReplayEntry(ids[:half], ids[half:PROBE_LENGTH], ids[half:half + 6] + ids[PROBE_LENGTH:], 6, 16),
               ReplayEntry(ids[:5], ids[5:PROBE_LENGTH], ids[PROBE_LENGTH - 8:], 0, 24),
               ReplayEntry(ids[:4], ids[4:12], ids[4:12], 0, 0)]
    device = next(model.parameters()).device
    return {name: t.to(device) for name, t in pad_pairs(entries, pad_token_id).items()}


def _error_line(error: Exception) -> str:
    """`Type: first line` of an error, for a one-line log of why a probe failed."""
    return f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"


def packing_probe_failure(model: nn.Module, pad_token_id: int, *, use_hidden_states: bool,
                          half_precision: bool = False) -> str | None:
    """Why packed pair rows do not score like separate rows on `model` (None when they do): the probe pairs differ,
    or cannot run at all (a model whose attention cannot take the block mask, as Bloom's ALiBi), which means packing
    is not exact just the same."""
    try:
        exact = shared_prefix_scoring_is_exact(model, packing_probe(model, pad_token_id),
                                               half_precision=half_precision, use_hidden_states=use_hidden_states)
    except Exception as error:  # any model code may fail on a packed row: that is the answer, not a crash
        return f"the packing probe cannot run ({_error_line(error)})"
    return None if exact else "packed rows do not reproduce the separate rows' log-probs"


def flex_backward_failure(model: nn.Module, pad_token_id: int, *, use_hidden_states: bool) -> str | None:
    """Why a backward through the packing probe's packed rows fails (None when it runs): FlexAttention's backward
    kernel is compiled at the first training step, which the no-grad probe never reaches, so a kernel that cannot
    compile is found here, at the start (and the dense mask taken), rather than as a crash at step one. Frozen
    models (a reference) never run a backward and are not checked."""
    if not any(parameter.requires_grad for parameter in model.parameters()):
        return None
    batch = packing_probe(model, pad_token_id)
    try:
        logps = packed_response_token_scores(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                             batch["attention_mask"], batch["loss_mask"],
                                             use_hidden_states=use_hidden_states)[0]
        logps.sum().backward()
    except Exception as error:  # a kernel that fails to compile or run: the answer, not a crash
        return f"a backward through packed rows fails ({_error_line(error)})"
    finally:
        model.zero_grad(set_to_none=True)  # the probe's gradients must not reach the first optimizer step
    return None


def shared_prefix_refusal(model: nn.Module, pad_token_id: int, *, use_hidden_states: bool) -> str | None:
    """Why a (not sharded) model's pairs are scored as separate rows, or None where they are packed: what its
    config says (`packing_unsupported_reason`), then the probe."""
    return packing_unsupported_reason(model) or packing_probe_failure(model, pad_token_id,
                                                                      use_hidden_states=use_hidden_states)
