"""`HFGenerateSampler` ("hf"): `model.generate` with a dynamic KV cache."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from sapo.generation.protocol import SamplingSettings, cut_after_eos, left_pad

logger = logging.getLogger(__name__)

class HFGenerateSampler:
    """`model.generate` with a KV cache, in batches of `batch_size` contexts.

    The config passed to `generate` fixes what SAPO decides (greedy or sampled with `SamplingSettings`, one
    row per context, lengths, special tokens, a plain tensor back); `generate` takes every other field from
    the model's `generation_config`, e.g. a checkpoint's `repetition_penalty` (see `checkpoint_sampling`).
    """

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
            do_sample=s.do_sample, **sampling, num_beams=1, num_return_sequences=1, return_dict_in_generate=False,
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
            # The model is always whole here (sharded EMAs are gathered first), so ranks need not decode in
            # lock-step, which transformers would otherwise impose under ZeRO-3 with a collective per token.
            output = model.generate(input_ids=ids, attention_mask=mask, synced_gpus=False,
                                    generation_config=self._generation_config(max_new_tokens))
        finally:
            model.train(was_training)
        new_tokens = output[:, ids.shape[1]:].tolist()
        return [cut_after_eos(row, self.eos_token_ids) for row in new_tokens]
