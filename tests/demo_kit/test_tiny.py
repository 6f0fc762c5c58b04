"""Tests for the offline tiny tokenizer/model: exact round-trips, the chat-template contract, persistence."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import jinja2
import pytest
import torch

from sapo.tiny import CHAT_TEMPLATE, build_model, build_tokenizer, save_pair

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "12+35="},
    {"role": "assistant", "content": "47"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list in 4.x."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs))


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        string.printable,
        "Hello,  world!\n  x = 1 ;\t 'a' . , ?",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n",
        "don't , . ! ? split",  # spaces before punctuation must survive decoding
        "",
    ],
)
def test_round_trip_is_exact_and_one_token_per_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_plain_text_gets_no_automatic_bos_or_eos(tokenizer):
    # Documented choice: only the chat template writes <s>/</s>, so rendered chats never get a double BOS.
    assert (
        tokenizer("ab", add_special_tokens=True)["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]
    )
    assert len(tokenizer("ab")["input_ids"]) == 2


def test_special_tokens_are_single_ids_and_named(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert tokenizer.padding_side == "right"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    ids = [tokenizer(token, add_special_tokens=False)["input_ids"] for token in specials]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(specials)
    assert ids[:3] == [[tokenizer.pad_token_id], [tokenizer.bos_token_id], [tokenizer.eos_token_id]]
    decoded = tokenizer.decode(tokenizer("<s><|user|>hi</s>")["input_ids"], skip_special_tokens=True)
    assert decoded == "hi"


def test_unknown_characters_map_to_unk_unless_added(tokenizer):
    assert tokenizer("caf\u00e9", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id
    extended = build_tokenizer(extra_text="\u00e9\u00fc")
    assert len(extended) == len(tokenizer) + 2
    ids = extended("caf\u00e9 \u00fc", add_special_tokens=False)["input_ids"]
    assert extended.unk_token_id not in ids
    assert extended.decode(ids) == "caf\u00e9 \u00fc"


def test_build_tokenizer_is_deterministic(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()


# ------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------


def test_chat_template_renders_exact_strings(tokenizer):
    assert (
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        == "<s><|system|>Be brief.<|user|>12+35=<|assistant|>47</s>"
    )
    assert (
        tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        == "<s><|system|>Be brief.<|user|>12+35=<|assistant|>"
    )
    multi_turn = [*CONVERSATION, {"role": "user", "content": "again"}, {"role": "assistant", "content": "x"}]
    assert (
        tokenizer.apply_chat_template(multi_turn, tokenize=False)
        == "<s><|system|>Be brief.<|user|>12+35=<|assistant|>47</s><|user|>again<|assistant|>x</s>"
    )


def test_chat_template_prompt_and_completion_tokens(tokenizer):
    prompt_ids = _chat_ids(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, CONVERSATION)
    content_ids = tokenizer("47", add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[len(prompt_ids) :] == [*content_ids, tokenizer.eos_token_id]
    assert prompt_ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert full_ids.count(tokenizer.bos_token_id) == 1
    assert full_ids == tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(jinja2.TemplateError, match="Unsupported chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_init_is_seeded_and_leaves_global_rng_alone(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert _same_weights(first, build_model(tokenizer, seed=7))
    assert not _same_weights(first, build_model(tokenizer, seed=8))


def test_model_matches_tokenizer_and_options(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)
    config = model.config
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 1, 2)
    assert config.intermediate_size == 48
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    logits = model(torch.tensor([[tokenizer.bos_token_id, 40, 41]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


_LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, out = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory).eval()
encoded = tokenizer.apply_chat_template(json.loads(sys.argv[3]), tokenize=True, return_dict=True)
ids = list(encoded["input_ids"])
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({"ids": ids, "logits": logits, "decoded": tokenizer.decode(ids),
            "special": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]}, out)
"""


def test_save_pair_loads_in_fresh_process_with_plain_transformers(tokenizer, tmp_path: Path):
    model = build_model(tokenizer, seed=3).eval()
    save_pair(model, tokenizer, tmp_path / "pair")
    ids = _chat_ids(tokenizer, CONVERSATION)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits
    out = tmp_path / "out.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path / "pair"), str(out), json.dumps(CONVERSATION)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(out)
    assert loaded["ids"] == ids
    assert loaded["decoded"] == tokenizer.decode(ids)
    assert loaded["special"] == [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    torch.testing.assert_close(loaded["logits"], expected)
