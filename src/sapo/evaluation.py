"""Generating responses to held-out prompts and scoring them with a programmatic judge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from sapo.data import Message
from sapo.generation import HFGenerateSampler, SamplingSettings, eos_token_ids_of

Judge = Callable[[str, str, dict[str, Any]], float]


def prompt_ids(tokenizer: Any, prompt: Sequence[Message]) -> list[int]:
    """Token ids of a chat prompt ending with the generation prompt, as used in training."""
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_responses(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Message]], *,
                       max_new_tokens: int = 64, batch_size: int = 64,
                       settings: SamplingSettings | None = None) -> list[str]:
    """Decoded responses (greedy unless `settings` says otherwise), special tokens removed."""
    sampler = HFGenerateSampler(settings or SamplingSettings(do_sample=False), pad_token_id=tokenizer.pad_token_id,
                                eos_token_ids=eos_token_ids_of(tokenizer, model), batch_size=batch_size)
    tokens = sampler.sample(model, [prompt_ids(tokenizer, p) for p in prompts], max_new_tokens)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def last_user_turn(prompt: Sequence[Message]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def evaluate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], judge: Judge, *,
             max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, Any]:
    """Mean judge score and mean response length (characters) of `model` on chat `records`."""
    prompts = [record["messages"][:-1] for record in records]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [judge(last_user_turn(p), r, rec) for p, r, rec in zip(prompts, responses, records, strict=True)]
    return {"score": sum(scores) / max(1, len(scores)),
            "mean_length": sum(len(r) for r in responses) / max(1, len(responses)),
            "scores": scores, "responses": responses}
