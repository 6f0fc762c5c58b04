"""What the trainer asks of a sampler (`SegmentSampler`: G new tokens after each context), the sampling
settings every engine draws with, and the small helpers all engines share (left padding, cutting at EOS)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)

SAMPLER_NAMES = ("hf", "static")  # the keys of ENGINES (defined below the engines)
ENGINE_CHOICES = ("auto", *SAMPLER_NAMES)  # what `generation_engine` accepts


class SegmentSampler(Protocol):
    """Samples up to `max_new_tokens` tokens after each context; rows end at their first EOS."""

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        ...


@dataclass
class SamplingSettings:
    """Sampling of the EMA model (paper: 0.7 / 50 / 0.95); `do_sample=False` gives greedy decoding."""

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    do_sample: bool = True


def cut_after_eos(tokens: Sequence[int], eos_token_ids: Collection[int]) -> list[int]:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return list(tokens[: index + 1])
    return list(tokens)


def left_pad(contexts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: decoder-only generation appends on the right."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        if context:
            ids[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[row, width - len(context):] = 1
    return ids.to(device), mask.to(device)




def eos_token_ids_of(tokenizer, model: nn.Module | None = None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids
