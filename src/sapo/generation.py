"""Sampling continuations from the EMA model.

The trainer only needs "G new tokens after each of these contexts"; `SegmentSampler` is that
interface, so a faster engine (a static-cache decode loop, vLLM) can replace the Hugging Face
`generate` implementation here without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import GenerationConfig


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


class HFGenerateSampler:
    """`model.generate` with a KV cache, in batches of `batch_size` contexts."""

    def __init__(self, settings: SamplingSettings, *, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None) -> None:
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.batch_size = batch_size

    def sample(self, model: nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if not contexts:
            return []
        step = self.batch_size or len(contexts)
        results: list[list[int]] = []
        for start in range(0, len(contexts), step):
            results.extend(self._sample_batch(model, contexts[start:start + step], max_new_tokens))
        return results

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        s = self.settings
        sampling = {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p} if s.do_sample else {}
        return GenerationConfig(
            do_sample=s.do_sample, **sampling,
            max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids), use_cache=True,
        )

    @torch.no_grad()
    def _sample_batch(self, model: nn.Module, contexts: Sequence[Sequence[int]],
                      max_new_tokens: int) -> list[list[int]]:
        device = next(model.parameters()).device
        ids, mask = left_pad(contexts, self.pad_token_id, device)
        was_training = model.training
        model.eval()
        try:
            output = model.generate(input_ids=ids, attention_mask=mask,
                                    generation_config=self._generation_config(max_new_tokens))
        finally:
            model.train(was_training)
        new_tokens = output[:, ids.shape[1]:].tolist()
        return [cut_after_eos(row, self.eos_token_ids) for row in new_tokens]


def eos_token_ids_of(tokenizer, model: nn.Module | None = None) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids
