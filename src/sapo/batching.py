"""Padding token lists into the batches the loss is computed on: (prompt, response) rows right-padded with a
`loss_mask` over response tokens, and pairs as real rows then rejected rows (packed around their shared prompt
where the model allows it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from sapo.buffer import ReplayEntry
from sapo.packing import packed_pair_ids


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """(prompt, response) token pairs as one right-padded batch; `loss_mask` marks response tokens."""
    width = max(len(p) + len(r) for p, r in sequences)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pad_pairs(entries: Sequence[ReplayEntry], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Real and rejected sequences of the pairs in one batch (real rows first): one forward scores both. The batch
    also carries each pair packed into one row around its shared prefix (`packed_input_ids`, `prefix_lengths`;
    see `sapo.packing`), which the trainer scores instead where the model allows it."""
    return pad_pair_sequences([(e.prompt, e.real, e.rejected) for e in entries], pad_token_id)


def pair_rows(batch: dict[str, Any], pairs: Sequence[int]) -> dict[str, Any]:
    """The tensors of a `pad_pairs` batch for some of its pairs only (real rows, then rejected rows, as in
    the batch; the same padded width)."""
    count = batch["loss_mask"].shape[0] // 2
    index = torch.tensor(list(pairs), device=batch["loss_mask"].device)
    both = torch.cat([index, index + count])
    rows = {name: batch[name][both] for name in ("input_ids", "attention_mask", "loss_mask")}
    for name in ("packed_input_ids", "prefix_lengths"):  # one row per pair
        if name in batch:
            rows[name] = batch[name][index]
    return rows


def pad_pair_sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                       pad_token_id: int) -> dict[str, torch.Tensor]:
    """`pad_pairs` of (prompt, real, rejected) token lists: replay entries, or the eval sets' pairs."""
    batch = pad_sequences([(p, real) for p, real, _ in pairs] + [(p, rejected) for p, _, rejected in pairs],
                          pad_token_id)
    full = [([*p, *real], [*p, *rejected]) for p, real, rejected in pairs]
    batch["packed_input_ids"], batch["prefix_lengths"] = packed_pair_ids(full, pad_token_id)
    return batch
