"""The implicit prompt of a preference record: `chosen` and `rejected` with no `prompt` field (Anthropic HH-RLHF's
layout), whose prompt is the beginning the two share. TRL 1.16 reads such records with
`trl.data_utils.extract_prompt` (through `maybe_extract_prompt`, or directly in `DPOTrainer` when the first record
has no `prompt`); sapo splits them at the same place, so a dataset a TRL user already has trains on the same
prompt and responses. Where that place leaves an empty prompt or an empty response, the record is refused."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sapo.errors import DataError

logger = logging.getLogger(__name__)

RULE = "the beginning 'chosen' and 'rejected' share, split as TRL's extract_prompt splits it"


def has_implicit_prompt(record: Mapping[str, Any]) -> bool:
    """Whether the prompt must be taken from the shared beginning of `chosen` and `rejected`, as TRL's
    `maybe_extract_prompt` decides: no `prompt` field, or a text `prompt` beside a `chosen` conversation (argilla's
    capybara: the prompt string only repeats the first user turn). A text `prompt` beside assistant-only message
    lists stays that prompt's user turn, as sapo has always read it (TRL would find no shared beginning there)."""
    if "chosen" not in record or "rejected" not in record:
        return False
    return "prompt" not in record or (isinstance(record["prompt"], str) and is_conversation(record["chosen"]))


def is_conversation(value: Any) -> bool:
    """A message list holding more than the response: some turn is not the assistant's."""
    return isinstance(value, list) and any(isinstance(m, Mapping) and m.get("role") != "assistant" for m in value)


def trl_prompt_length(chosen: Sequence[Any], rejected: Sequence[Any]) -> int:
    """How much of `chosen` is the prompt, exactly as `trl.data_utils.extract_prompt` computes it (characters of a
    string, messages of a list): up to the first position where the two differ, minus one when the character
    before it is a space (the space then starts both responses). Where neither differs before the shorter ends,
    TRL's loop stops one short of its end, so the last element of the shorter is its response. -1 or 0: empty."""
    first = _first_difference(chosen, rejected)
    if first is None:
        return min(len(chosen), len(rejected)) - 1
    return first - 1 if chosen[first - 1] == " " else first


def _first_difference(chosen: Sequence[Any], rejected: Sequence[Any]) -> int | None:
    return next((index for index in range(min(len(chosen), len(rejected))) if chosen[index] != rejected[index]), None)


def split_text(chosen: str, rejected: str, location: str, with_rejected: bool) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of a plain-text record without `prompt`, as TRL splits it,
    checked to leave a response (`rejected`'s only with `with_rejected`)."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value:
            raise DataError(f"{location}: field '{name}' is empty")
    length = trl_prompt_length(chosen, rejected)
    if length <= 0 or not chosen[:length].strip():
        _refuse_empty_prompt(location, chosen, rejected)
    for name, value in (("chosen", chosen), ("rejected", rejected))[:2 if with_rejected else 1]:
        if not value[length:].strip():
            raise DataError(f"{location}: field '{name}' is an empty response once the implicit prompt (the first "
                            f"{length} characters, {RULE}) is taken off: {value[length:]!r}")
    if chosen[:len(rejected)] == rejected[:len(chosen)]:
        logger.warning("%s: 'chosen' and 'rejected' agree until the shorter ends, so (as in TRL) the prompt stops "
                       "one character before its end: prompt %r, chosen %r, rejected %r", location,
                       chosen[:length], chosen[length:], rejected[length:])
    return chosen[:length], chosen[length:], rejected[length:]


def conversation_prompt_length(chosen: list[Mapping[str, Any]], rejected: list[Mapping[str, Any]], location: str,
                               with_rejected: bool) -> int:
    """How many leading messages of a conversational record without `prompt` are its prompt (TRL's rule), checked
    to leave one assistant response after it (`rejected`'s only read with `with_rejected`)."""
    length = trl_prompt_length(chosen, rejected)
    if length <= 0:
        _refuse_empty_prompt(location, chosen, rejected)
    if chosen[length - 1]["role"] == "assistant":
        raise DataError(f"{location}: field 'chosen[{length - 1}]' is an assistant turn that ends the implicit prompt "
                        f"({RULE}), so the response would be a second assistant turn in a row")
    for name, messages in (("chosen", chosen), ("rejected", rejected))[:2 if with_rejected else 1]:
        rest = messages[length:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest)
            raise DataError(f"{location}: field '{name}' continues after the implicit prompt (its first {length} "
                            f"message(s), {RULE}) with {len(rest)} message(s) ({roles}); the response must be a "
                            "single assistant message")
        if not rest[0]["content"].strip():
            raise DataError(f"{location}: field '{name}[{length}].content' is an empty response")
    return length


def _refuse_empty_prompt(location: str, chosen: Sequence[Any], rejected: Sequence[Any]) -> None:
    first = _first_difference(chosen, rejected)
    shared = chosen[:min(len(chosen), len(rejected)) if first is None else first]
    if not shared:
        what = "share no beginning"
    elif isinstance(shared, str):
        what = f"share only {shared!r}"
    else:
        what = f"share only the {len(shared)} message(s) of the shorter, which leave it no response"
    raise DataError(f"{location}: the record's prompt is implicit (no 'prompt' field, or a text one beside a 'chosen' "
                    f"conversation), i.e. {RULE}; here they {what}, so the prompt is empty; add a 'prompt' field or "
                    "begin both with the prompt")
