"""A tiny character-level tokenizer and Llama model, built entirely offline.

The demo, the tests and the benchmarks need a real ``transformers`` causal LM but cannot reach the model hub.
A character-level vocabulary keeps the tokenizer trivially correct (every printable ASCII character is one
token, so ``decode(encode(text)) == text``) and lets a few-hundred-thousand-parameter model learn the built-in
tasks of :mod:`sapo.tasks` on a CPU in minutes.

Special-token policy: encoding plain text never adds ``<s>``/``</s>`` (there is no post-processor), whatever
``add_special_tokens`` says. Only :data:`CHAT_TEMPLATE` writes ``<s>`` (once, at the very start) and ``</s>``
(after each assistant message), so a rendered conversation is never given a second BOS by the tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values())

# Role markers are written as literals (not built as '<|' + role + '|>') so that transformers'
# `sanitize_control_tokens` can tell template-written control tokens from user-supplied text.
CHAT_TEMPLATE: str = (
    "{{- '<s>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' + message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' + message['content'] + '</s>' -}}"
    "{%- else -%}{{- raise_exception('Unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""Renders ``<s>`` + ``<|role|>content`` per message, with ``</s>`` right after assistant content.

With ``add_generation_prompt=True`` it ends with ``<|assistant|>``. Hence the prompt of a conversation is
everything up to and including its final ``<|assistant|>`` and the completion is the content plus ``</s>``.
"""


def _character_vocab(extra_text: str) -> dict[str, int]:
    """Special tokens first (so pad=0, bos=1, eos=2, unk=3 are stable), then one entry per character."""
    characters = sorted(set(string.printable) | set(extra_text))
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *characters))}


def build_tokenizer(extra_text: str = "") -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer; characters of ``extra_text`` join the printable-ASCII vocabulary.

    A BPE model with an empty merge list splits any input into single characters, and the ``Fuse`` decoder
    joins them back without inserting spaces, so text round-trips exactly. Characters outside the vocabulary
    become ``<unk>``. The tokenizer has no post-processor: see the module docstring for the BOS/EOS policy.
    """
    backend = Tokenizer(models.BPE(vocab=_character_vocab(extra_text), merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        # Cleanup would delete spaces before punctuation and break the exact round-trip.
        clean_up_tokenization_spaces=False,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,  # SAPOConfig's default max_length: runs with defaults fit
    seed: int = 0,
) -> LlamaForCausalLM:
    """Build a small, randomly initialised Llama whose vocabulary and special ids match ``tokenizer``.

    Weights depend only on ``seed`` (the global torch RNG is forked, so the caller's RNG stream is left
    untouched). Dropout is zero, so train and eval mode compute the same function.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make ``generate`` stop at ``</s>`` and pad with ``<pad>`` without per-call arguments or warnings."""
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id


def save_pair(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Save model and tokenizer side by side so ``Auto*.from_pretrained(directory)`` restores both."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
