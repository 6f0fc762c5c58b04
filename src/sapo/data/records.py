"""The record types (`RawRecord` as read, `Example` in chat form, `TokenizedExample`) and normalising a record of
any accepted format (chat `messages`, `prompt`/`completion`, preference `chosen`/`rejected`, with or without a
`prompt`: see `sapo.data.implicit`) into an `Example`.

As in TRL, a record is *conversational* when its fields hold lists of `{role, content}` messages (rendered with the
chat template) and *plain text* ("standard" in TRL) when they hold strings (trained as the raw text, no template)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sapo.data import implicit
from sapo.errors import DataError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, str]


@dataclass(frozen=True)
class RawRecord:
    """One record as read from its source, with a human-readable location for error messages."""

    data: Any
    location: str
    error: str | None = None  # a line that could not be decoded; raised or skipped by `load_examples`


@dataclass(frozen=True)
class Example:
    """A demonstration normalised to chat form: everything before the last assistant turn, and that turn.

    `text`: the record was plain text (TRL's "standard" format: `prompt` and `completion`/`chosen`/`rejected` are
    strings). Its prompt is then one user message holding the prompt string, and it is tokenized as TRL does, as the
    raw text `prompt + response + EOS` with no chat template."""

    prompt: list[Message]
    response: Message
    rejected: Message | None = None  # only read for the offline preference baselines (dpo, orpo)
    location: str = field(default="", compare=False)  # where the record came from, for messages about it
    record: Any = field(default=None, compare=False, repr=False)  # the raw record, for a judge that reads its fields
    text: bool = False


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]
    rejected_ids: list[int] | None = None
    origin: Example | None = field(default=None, compare=False, repr=False)  # kept only for `rejected_judge`




# Normalising records
# ------------------------------------------------------------------------------------------------


def normalize_record(record: Any, location: str, with_rejected: bool = False) -> Example:
    """Turn any supported record shape into an `Example`; raise `DataError` naming the bad field.

    `rejected` is only parsed (and required) with `with_rejected`: SAPO itself ignores it, except to find the
    prompt of a record that has none (the beginning `chosen` and `rejected` share, as TRL reads it).
    """
    example = _normalize_chosen(record, location, with_rejected)
    rejected = example.rejected
    if with_rejected and rejected is None:
        if record.get("rejected") is None:
            raise DataError(f"{location}: field 'rejected' is missing (offline preference recipes need pairs)")
        rejected = _rejected(record["rejected"], location)
    text = example.text and (rejected is None or isinstance(record["rejected"], str))
    return Example(example.prompt, example.response, rejected, location, record=record, text=text)


def format_field(example: Example) -> str:
    """The field whose value gives a record its format (for messages): 'messages' or the first field holding a list
    of messages (conversational), or 'prompt' (plain text)."""
    record = example.record if isinstance(example.record, Mapping) else {}
    if "messages" in record and record["messages"] is not None:
        return "messages"
    if example.text:
        return "prompt" if record.get("prompt") is not None else "chosen"
    return next((name for name in ("prompt", "completion", "chosen", "rejected")
                 if isinstance(record.get(name), list)), "prompt")


def format_name(example: Example) -> str:
    return "plain text" if example.text else "conversational"


def check_one_format(examples: Sequence[Example], origin: str) -> None:
    """Refuse a dataset that mixes plain-text and conversational records: they are rendered differently (raw text vs
    the chat template), so the model would learn two prompt formats, and TRL decides the format from the first
    record alone. The message names the first record of each format."""
    if not examples:
        return
    first = examples[0]
    other = next((e for e in examples if e.text != first.text), None)
    if other is None:
        return
    raise DataError(
        f"{other.location or origin}: record is {_described(other)} but {first.location or 'the first record'} is "
        f"{_described(first)}; a dataset must use one format (plain-text records train on the raw text, "
        "conversational ones through the chat template): write every record's fields as strings, or every one's as "
        "lists of {role, content} messages")


def _described(example: Example) -> str:
    holds = "text" if example.text else "chat messages"
    return f"{format_name(example)} (field '{format_field(example)}' holds {holds})"


def prompt_of_record(record: Any, location: str) -> list[Message]:
    """The prompt of a record: of any training record, or of a prompt-only one (`messages` ending with a user turn,
    or `prompt` alone), since evaluating a model needs prompts and a judge, not reference answers."""
    if isinstance(record, Mapping):
        fields = {key: value for key, value in record.items() if value is not None}
        if "messages" in fields:
            messages = _messages(fields["messages"], location, "messages")
            if messages[-1]["role"] == "user":
                return messages
        elif "prompt" in fields and not {"completion", "chosen"} & set(fields):
            return _prompt(fields, location)
    return normalize_record(record, location).prompt


def plain_text_prompt(record: Any, location: str) -> str | None:
    """The prompt string of a plain-text record (or of a prompt-only one: `prompt` alone, a string), as it is
    rendered (raw, no chat template); None for a conversational record. Refuses what `prompt_of_record` refuses."""
    prompt = prompt_of_record(record, location)
    fields = {key: value for key, value in record.items() if value is not None}
    if "messages" in fields:
        return None
    if "completion" in fields or "chosen" in fields:
        return prompt[-1]["content"] if normalize_record(record, location).text else None
    return prompt[-1]["content"] if isinstance(fields["prompt"], str) else None


def _rejected(value: Any, location: str) -> Message:
    if isinstance(value, list) and any(isinstance(m, Mapping) and m.get("role") != "assistant" for m in value):
        return _split_conversation(_messages(value, location, "rejected"), location, "rejected").response
    return _completion(value, location, "rejected")


def _normalize_chosen(record: Any, location: str, with_rejected: bool = False) -> Example:
    if not isinstance(record, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    # Parquet and `datasets` store a column for every field, so a record lacking a field reads back with None.
    fields = list(record)
    record = {key: value for key, value in record.items() if value is not None}
    if "messages" in record:
        messages = _messages(record["messages"], location, "messages")
        example = _split_conversation(messages, location, "messages")
        _check_other_fields_agree(record, location, example)
        return example
    if "chosen" in record and "completion" in record:
        raise DataError(f"{location}: record has both 'chosen' and 'completion', two responses to train on; keep "
                        "one of them")
    if "chosen" in record:
        return _from_preference(record, location, with_rejected)
    if "completion" in record:
        prompt = _prompt(record, location)
        text = isinstance(record["prompt"], str) and isinstance(record["completion"], str)
        return Example(prompt, _completion(record["completion"], location, "completion"), text=text)
    raise DataError(
        f"{location}: record has none of the supported fields 'messages', 'prompt'+'completion', "
        f"'prompt'+'chosen' with a non-null value (found: {', '.join(map(str, fields)) or 'nothing'})"
    )


def _check_other_fields_agree(record: Mapping[str, Any], location: str, example: Example) -> None:
    """A record with `messages` and also `prompt`/`completion`/`chosen` is trained on its `messages`; refuse it when
    the other fields say something else (which one was meant cannot be known). Datasets that carry both forms of the
    same conversation (ultrachat_200k's `prompt` is the first user turn, ultrafeedback_binarized's `chosen` equals
    its `messages`) agree and pass."""
    others = [name for name in ("prompt", "completion", "chosen") if name in record]
    if not others:
        return
    if "completion" in record or "chosen" in record:
        if "completion" in record:
            other = Example(_prompt(record, location), _completion(record["completion"], location, "completion"))
        else:
            other = _from_preference(record, location)
        agrees = (other.prompt, other.response) == (example.prompt, example.response)
    else:
        value = record["prompt"]
        users = [m["content"].strip() for m in example.prompt if m["role"] == "user"]
        agrees = (isinstance(value, str) and value.strip() in users) or (
            isinstance(value, list) and _messages(value, location, "prompt") == example.prompt)
    if not agrees:
        raise DataError(f"{location}: record has both 'messages' and {' and '.join(repr(o) for o in others)}, and "
                        "they disagree about the conversation to train on; keep one format")


def _from_preference(record: Mapping[str, Any], location: str, with_rejected: bool = False) -> Example:
    chosen = record["chosen"]
    if implicit.has_implicit_prompt(record):
        return _from_implicit_prompt(record, location, with_rejected)
    if implicit.is_conversation(chosen):
        return _split_conversation(_messages(chosen, location, "chosen"), location, "chosen")
    if "prompt" not in record:
        raise DataError(f"{location}: field 'prompt' is missing (without it, the prompt is the beginning 'chosen' "
                        "shares with 'rejected', as in TRL, and this record has no 'rejected')")
    text = isinstance(record.get("prompt"), str) and isinstance(chosen, str)
    return Example(_prompt(record, location), _completion(chosen, location, "chosen"), text=text)


def _from_implicit_prompt(record: Mapping[str, Any], location: str, with_rejected: bool) -> Example:
    """A record whose prompt is the beginning `chosen` and `rejected` share (`sapo.data.implicit`): both are read,
    as text or as message lists, and split where TRL splits them."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        _check_text(chosen, location, "chosen")
        _check_text(rejected, location, "rejected")
        prompt, response, other = implicit.split_text(chosen, rejected, location, with_rejected)
        return Example([{"role": "user", "content": prompt}], {"role": "assistant", "content": response},
                       {"role": "assistant", "content": other} if with_rejected else None, text=True)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{location}: the record's prompt is implicit (the beginning 'chosen' and 'rejected' share, "
                        f"as in TRL), but 'chosen' holds {_kind(chosen)} and 'rejected' {_kind(rejected)}; write "
                        "both as text or both as lists of messages")
    chosen_messages = _messages(chosen, location, "chosen")
    rejected_messages = _messages(rejected, location, "rejected")
    length = implicit.conversation_prompt_length(chosen, rejected, location, with_rejected)
    return Example(chosen_messages[:length], chosen_messages[length],
                   rejected_messages[length] if with_rejected else None)


def _kind(value: Any) -> str:
    return "text" if isinstance(value, str) else "messages" if isinstance(value, list) else type(value).__name__


def _prompt(record: Mapping[str, Any], location: str) -> list[Message]:
    if "prompt" not in record:
        raise DataError(f"{location}: field 'prompt' is missing")
    value = record["prompt"]
    if isinstance(value, str):
        _check_text(value, location, "prompt")
        if not value.strip():
            raise DataError(f"{location}: field 'prompt' is empty")
        return [{"role": "user", "content": value}]
    messages = _messages(value, location, "prompt")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{location}: field 'prompt' ends with an assistant turn; the prompt must end before it")
    return messages


def _completion(value: Any, location: str, field_name: str) -> Message:
    if isinstance(value, str):
        _check_text(value, location, field_name)
        message = {"role": "assistant", "content": value}
    else:
        messages = _messages(value, location, field_name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{location}: field '{field_name}' must be text or a single assistant message")
        message = messages[0]
    if not message["content"].strip():
        raise DataError(f"{location}: field '{field_name}' is an empty response")
    return message


def _messages(value: Any, location: str, field_name: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{location}: field '{field_name}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{location}: field '{field_name}' is an empty list")
    return [_message(item, location, f"{field_name}[{index}]") for index, item in enumerate(value)]


def _message(item: Any, location: str, where: str) -> Message:
    if not isinstance(item, Mapping):
        raise DataError(f"{location}: field '{where}' must be an object with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in item:
            raise DataError(f"{location}: field '{where}.{key}' is missing")
        if not isinstance(item[key], str):
            raise DataError(
                f"{location}: field '{where}.{key}' must be a string, got {type(item[key]).__name__}"
            )
        _check_text(item[key], location, f"{where}.{key}")
    if item["role"] not in ROLES:
        raise DataError(f"{location}: field '{where}.role' has unknown role {item['role']!r} "
                        f"(expected one of {', '.join(ROLES)})")
    return {"role": item["role"], "content": item["content"]}


def _check_text(text: str, location: str, where: str) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer can encode: name it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{location}: field '{where}' is not valid Unicode text: a lone surrogate "
                        f"{text[error.start]!r} at character {error.start} (a broken \\u escape?)") from None


def _split_conversation(messages: list[Message], location: str, field_name: str) -> Example:
    last = messages[-1]
    if last["role"] != "assistant":
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{location}: field '{field_name}' has no assistant turn")
        raise DataError(
            f"{location}: field '{field_name}[{len(messages) - 1}]' ends the conversation with a "
            f"{last['role']!r} turn; the last turn must be the assistant's response"
        )
    if len(messages) < 2:
        raise DataError(f"{location}: field '{field_name}' has no prompt before the assistant turn")
    if messages[-2]["role"] == "assistant":
        last = len(messages) - 1
        raise DataError(f"{location}: field '{field_name}[{last}]' is a second assistant turn in a row (after "
                        f"'{field_name}[{last - 1}]'); the response must follow a user or tool turn: merge the two "
                        "turns or drop one")
    if not last["content"].strip():
        raise DataError(f"{location}: field '{field_name}[{len(messages) - 1}].content' is an empty response")
    return Example(messages[:-1], last)
