"""Recipes without generation: `Supervised` (sft, NLL on the real responses) and `OfflinePairs` (dpo, orpo: the
data's own chosen/rejected pairs)."""

from __future__ import annotations

from typing import Any

import torch

from sapo.batching import pad_sequences
from sapo.buffer import ReplayEntry
from sapo.losses import REFERENCE_LOSS_TYPES
from sapo.recipes.base import Recipe


class Supervised(Recipe):
    """SFT: NLL of the real responses; no reference, no generation."""

    name = "sft"
    supervised = True
    eval_rejected = None

    def batch(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> dict[str, torch.Tensor]:
        pairs = list(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True))
        return pad_sequences(pairs, self.services.pad_token_id)


class OfflinePairs(Recipe):
    """DPO on the data's own chosen/rejected pairs, against the fixed starting model."""

    name = "dpo"
    needs_rejected_data = True
    eval_rejected = "data"
    allowed_loss_types = REFERENCE_LOSS_TYPES
    fixed_reference = True

    def pairs(self, inputs: dict[str, list[Any]], step: int, max_steps: int) -> list[ReplayEntry]:
        return [ReplayEntry(list(p), list(y), list(r), 0, len(r))
                for p, y, r in zip(inputs["prompt_ids"], inputs["response_ids"], inputs["rejected_ids"], strict=True)]


class OfflineORPO(OfflinePairs):
    """ORPO on the data's own pairs (no reference)."""

    name = "orpo"
    fixed_loss_type = "orpo"
    allowed_loss_types = None
