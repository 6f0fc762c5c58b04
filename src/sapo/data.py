"""Loading, validating and tokenizing demonstration data.

SAPO only needs (prompt, real response) pairs. Users arrive with chat `messages`, with
`prompt`/`completion`, or with preference records whose `chosen` side is the demonstration; all are
normalised to (prompt messages, final assistant message) here, with errors that name the file, the
line and the field, because a traceback from deep inside `datasets` tells a user nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import sys
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sapo.errors import DataError
from sapo.packing import common_prefix_length

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval", "heldout")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}

Message = dict[str, str]


@dataclass(frozen=True)
class RawRecord:
    """One record as read from its source, with a human-readable location for error messages."""

    data: Any
    location: str
    error: str | None = None  # a line that could not be decoded; raised or skipped by `load_examples`


@dataclass(frozen=True)
class Example:
    """A demonstration normalised to chat form: everything before the last assistant turn, and that turn."""

    prompt: list[Message]
    response: Message
    rejected: Message | None = None  # only read for the offline preference baselines (dpo, orpo)
    location: str = field(default="", compare=False)  # where the record came from, for messages about it
    record: Any = field(default=None, compare=False, repr=False)  # the raw record, for a judge that reads its fields


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]
    rejected_ids: list[int] | None = None
    origin: Example | None = field(default=None, compare=False, repr=False)  # kept only for `rejected_judge`


# ------------------------------------------------------------------------------------------------
# Reading sources
# ------------------------------------------------------------------------------------------------


def read_records(source: str | os.PathLike, split: str = "train") -> list[RawRecord]:
    """Read every record of a file, a local dataset directory or a hub dataset, keeping locations."""
    path = Path(source)
    if path.is_file():
        return list(_read_file(path))
    if path.is_dir():
        return _read_directory(path, split)
    if str(source).endswith(DATA_FILE_SUFFIXES) or os.sep in str(source) and not _looks_like_hub_id(str(source)):
        raise DataError(f"{source}: no such file or directory")
    reason = hub_unreachable(str(source), "dataset")
    if reason:
        raise DataError(f"{source}: no such file or directory, and as a hub dataset: {reason}")
    return _read_hub_dataset(str(source), split)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def hub_unreachable(repo_id: str, repo_type: str = "model", timeout: float = 3.0) -> str | None:
    """Why `repo_id` cannot come from the Hugging Face hub right now, or None when it may: it is in the local cache,
    or the hub's host answers. Without this an offline machine spends about half a minute in retries per file before
    the library gives up. With HF_HUB_OFFLINE set, or behind a proxy, the library decides (it fails fast offline)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if cached.is_dir():
        return None
    if constants.HF_HUB_OFFLINE:  # `datasets` also keeps its own cache: let it answer (offline, it does so at once)
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" if repo_type == "model" else None
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"not in the local Hugging Face cache, and {endpoint.hostname} cannot be reached ({reason})"


def _read_file(path: Path) -> Iterator[RawRecord]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_FILE_SUFFIXES)}")


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    found = False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            location = f"{path}:{line_number}"
            try:
                # utf-8-sig on the first line: editors on Windows often start files with a byte-order mark
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                found = True
                yield RawRecord(None, location, f"{location}: not valid UTF-8 (byte {error.start} of the line)")
                continue
            if not text.strip():
                continue
            found = True
            try:
                yield RawRecord(json.loads(text), location)
            except (ValueError, RecursionError) as error:
                yield RawRecord(None, location, f"{location}: invalid JSON ({_json_problem(error)})")
    if not found:
        raise DataError(f"{path}: the file has no records")


def _read_json(path: Path) -> Iterator[RawRecord]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {error.start} of the file)") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines stored with a .json suffix
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}: invalid JSON ({_json_problem(error)})") from None
    if isinstance(document, Mapping) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of records (or an object with a 'data' array)")
    if not document:
        raise DataError(f"{path}: the file has no records")
    for index, record in enumerate(document):
        yield RawRecord(record, f"{path}: record {index}")


def _json_problem(error: Exception) -> str:
    """What `json.loads` objected to, in words: syntax (with the column), nesting too deep for Python's parser, or an
    integer longer than Python converts (both raise other exceptions than JSONDecodeError)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "arrays or objects nested too deeply to parse"
    if "digits" in str(error):
        return f"an integer with more digits than Python converts ({sys.get_int_max_str_digits()})"
    return " ".join(str(error).split())


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no records")
    for index, record in enumerate(table.to_pylist()):
        yield RawRecord(record, f"{path}: row {index}")


def _read_directory(path: Path, split: str) -> list[RawRecord]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _read_saved_dataset(path, split)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_SUFFIXES)
    preferred = [p for p in files if p.stem.startswith(split)]
    split_named = [p for p in files if p.stem.startswith(SPLIT_NAMES)]
    if not preferred and split_named:  # files are named by split, just not this one: never train on another split
        raise DataError(f"{path}: no data file for split {split!r} (found {', '.join(p.name for p in split_named)})")
    chosen = preferred or files
    if not chosen:
        raise DataError(
            f"{path}: directory holds no dataset (no {', '.join(DATA_FILE_SUFFIXES)} files and no "
            "datasets.save_to_disk output)"
        )
    records: list[RawRecord] = []
    for file in chosen:
        records.extend(_read_file(file))
    return records


def _read_saved_dataset(path: Path, split: str) -> list[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # corrupt, partial or empty save_to_disk output fails deep inside datasets
        raise DataError(f"{path}: cannot load the dataset saved there ({type(error).__name__}: {error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; available: {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise DataError(f"{path}: the saved dataset has no records")
    return [RawRecord(record, f"{path}: row {index}") for index, record in enumerate(loaded)]


def _read_hub_dataset(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # hub/network/format errors come in many types
        raise DataError(f"{name}: cannot load dataset (not a local file or directory; hub said: {error})") from None
    return [RawRecord(record, f"{name}[{split}] row {index}") for index, record in enumerate(loaded)]


# ------------------------------------------------------------------------------------------------
# Normalising records
# ------------------------------------------------------------------------------------------------


def normalize_record(record: Any, location: str, with_rejected: bool = False) -> Example:
    """Turn any supported record shape into an `Example`; raise `DataError` naming the bad field.

    `rejected` is only parsed (and required) with `with_rejected`: SAPO itself ignores it.
    """
    example = _normalize_chosen(record, location)
    rejected = None
    if with_rejected:
        if record.get("rejected") is None:
            raise DataError(f"{location}: field 'rejected' is missing (offline preference recipes need pairs)")
        rejected = _rejected(record["rejected"], location)
    return Example(example.prompt, example.response, rejected, location)


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


def _rejected(value: Any, location: str) -> Message:
    if isinstance(value, list) and any(isinstance(m, Mapping) and m.get("role") != "assistant" for m in value):
        return _split_conversation(_messages(value, location, "rejected"), location, "rejected").response
    return _completion(value, location, "rejected")


def _normalize_chosen(record: Any, location: str) -> Example:
    if not isinstance(record, Mapping):
        raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
    # Parquet and `datasets` store a column for every field, so a record lacking a field reads back with None.
    fields = list(record)
    record = {key: value for key, value in record.items() if value is not None}
    if "messages" in record:
        messages = _messages(record["messages"], location, "messages")
        return _split_conversation(messages, location, "messages")
    if "chosen" in record:
        return _from_preference(record, location)
    if "completion" in record:
        prompt = _prompt(record, location)
        return Example(prompt, _completion(record["completion"], location, "completion"))
    raise DataError(
        f"{location}: record has none of the supported fields 'messages', 'prompt'+'completion', "
        f"'prompt'+'chosen' with a non-null value (found: {', '.join(map(str, fields)) or 'nothing'})"
    )


def _from_preference(record: Mapping[str, Any], location: str) -> Example:
    chosen = record["chosen"]
    is_conversation = isinstance(chosen, list) and any(
        isinstance(m, Mapping) and m.get("role") != "assistant" for m in chosen
    )
    if is_conversation:
        return _split_conversation(_messages(chosen, location, "chosen"), location, "chosen")
    return Example(_prompt(record, location), _completion(chosen, location, "chosen"))


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


def load_examples(source: str | os.PathLike, split: str = "train", *, skip_invalid: bool = False,
                  with_rejected: bool = False) -> list[Example]:
    """Read and normalise every record of `source` (file, directory or hub dataset name).

    The first invalid record raises `DataError`; with `skip_invalid` invalid records are dropped and
    counted in a warning instead (with the first few reasons), and only an all-invalid source fails.
    """
    return _normalise_all(read_records(source, split), skip_invalid, str(source), with_rejected)


def examples_from_records(records: Iterable[Any], origin: str = "train_dataset", *,
                          skip_invalid: bool = False, with_rejected: bool = False) -> list[Example]:
    """Normalise in-memory records (a list of dicts or a `datasets.Dataset`).

    `Example`s (what `load_examples` returns) pass through unchanged, so data read by the CLI is read and
    normalised once and its errors keep naming the file and line.
    """
    if isinstance(records, Sequence) and records and all(isinstance(r, Example) for r in records):
        return _checked_examples(records, with_rejected)
    if _is_dataset_dict(records):
        raise DataError(f"{origin}: a DatasetDict with splits {', '.join(map(repr, records))}; pass one split, "
                        f"e.g. dataset[{next(iter(records))!r}] (load_dataset(..., split=...))")
    raws = (RawRecord(record, f"{origin}: row {index}") for index, record in enumerate(records))
    return _normalise_all(raws, skip_invalid, origin, with_rejected)


def _is_dataset_dict(records: Any) -> bool:
    """A `datasets.DatasetDict` (a forgotten `split=`): iterating it yields split names, not records."""
    return isinstance(records, Mapping) and bool(records) and all(
        hasattr(split, "column_names") for split in records.values())


def _checked_examples(examples: Sequence[Example], with_rejected: bool) -> list[Example]:
    if with_rejected:
        unpaired = next((e for e in examples if e.rejected is None), None)
        if unpaired is not None:
            raise DataError(f"{unpaired.location or 'an example'}: field 'rejected' is missing (offline preference "
                            "recipes need pairs; load the data with with_rejected=True)")
    return list(examples)


def _normalise_all(raws: Iterable[RawRecord], skip_invalid: bool, origin: str,
                   with_rejected: bool = False) -> list[Example]:
    examples: list[Example] = []
    problems: list[str] = []
    for raw in raws:
        try:
            if raw.error is not None:
                raise DataError(raw.error)
            examples.append(dataclasses.replace(normalize_record(raw.data, raw.location, with_rejected),
                                                record=raw.data))
        except DataError as error:
            if not skip_invalid:
                raise
            problems.append(str(error))
    if problems:
        logger.warning("skip_invalid: dropped %d invalid record(s) of %s, kept %d; first: %s", len(problems),
                       origin, len(examples), " | ".join(problems[:3]))
        if not examples:
            raise DataError(f"{origin}: every record is invalid ({len(problems)}); first: {problems[0]}")
    return examples


# ------------------------------------------------------------------------------------------------
# Tokenizer preparation and tokenization
# ------------------------------------------------------------------------------------------------


def resolve_chat_template(value: str | None) -> str | None:
    """Accept a built-in name ('chatml'), a path to a Jinja file, or the template text itself."""
    if value is None:
        return None
    if value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise DataError(f"chat_template: {value!r} is neither a file, a built-in name "
                        f"({', '.join(NAMED_CHAT_TEMPLATES)}) nor a Jinja template")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"chat_template: {value}: not valid UTF-8 (byte {error.start})") from None
    except OSError as error:
        raise DataError(f"chat_template: {value}: cannot read ({error.strerror})") from None


def check_chat_template(template: str, origin: str) -> None:
    """Compile `template` as transformers will, so a Jinja syntax error is reported now, with its line, instead of
    as a traceback from the first `apply_chat_template`."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without this helper: compile with a plain sandbox
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def _compile_jinja_template(text: str) -> Any:
            return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(text)
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"{origin}: Jinja syntax error at line {error.lineno} of the template: {error.message}") \
            from None
    except jinja2.TemplateError as error:
        raise DataError(f"{origin}: the Jinja template does not compile ({error})") from None


def renders_with_mistral_common(tokenizer: Any) -> bool:
    """What `AutoTokenizer` gives for a checkpoint with `tekken.json` when mistral-common is installed: it renders
    chats with mistral-common itself (no Jinja template) and is only safe to use with `tokenize=True`."""
    return type(tokenizer).__name__ == "MistralCommonBackend"


def prepare_tokenizer(tokenizer: Any, chat_template: str | None = None) -> Any:
    """Make a tokenizer usable for SAPO: a chat template and a pad token are required."""
    template = resolve_chat_template(chat_template)
    if template is not None and renders_with_mistral_common(tokenizer):
        raise DataError("chat_template: this tokenizer (MistralCommonBackend, from tekken.json) renders chats with "
                        "mistral-common and takes no Jinja template; drop --chat_template")
    if template is not None:
        check_chat_template(template, "chat_template")
        tokenizer.chat_template = template
    elif isinstance(getattr(tokenizer, "chat_template", None), str):
        check_chat_template(tokenizer.chat_template, "the tokenizer's own chat template (pass --chat_template to "
                                                     "replace it)")
    source = getattr(tokenizer, "name_or_path", None)
    which = f"the tokenizer ({source})" if source else "the tokenizer"
    if getattr(tokenizer, "chat_template", None) is None and not renders_with_mistral_common(tokenizer):
        raise DataError(
            f"{which} has no chat template: pass chat_template (CLI: --chat_template) as a Jinja string, "
            "a file holding one, or the built-in name 'chatml'"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"{which} has no EOS token: set tokenizer.eos_token (CLI: use a tokenizer that has one, "
                        "e.g. set eos_token in its tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> None:
    """`save_pretrained`, keeping the `legacy` flag that transformers 5 drops from tokenizer_config.json: without it
    a legacy SentencePiece `LlamaTokenizer` (Llama-2/Mistral style) reloads non-legacy and tokenizes text after
    special tokens differently from the model it was trained with."""
    tokenizer.save_pretrained(directory)
    keep_legacy_flag(tokenizer, directory)


def keep_legacy_flag(tokenizer: Any, directory: str | os.PathLike) -> None:
    """Write `tokenizer.legacy` back into a saved tokenizer_config.json (see `save_tokenizer`)."""
    legacy = getattr(tokenizer, "legacy", None)
    config_file = Path(directory) / "tokenizer_config.json"
    if isinstance(legacy, bool) and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("legacy") != legacy:
            config["legacy"] = legacy
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenize_example(tokenizer: Any, example: Example,
                     end_token_ids: Collection[int] | None = None) -> TokenizedExample:
    """Token ids of the whole rendered conversation, split at the prompt boundary.

    Tokenizing the response on its own gives other ids than the model sees after the prompt
    (SentencePiece adds a word-start marker, byte-level BPE merges a leading newline with the template's),
    so the conversation is tokenized once and split where its ids stop agreeing with the prompt's: prompt
    ids + response ids are exactly the conversation's ids, up to and including the final turn's end token.
    Use `tokenize_examples` to also get the warning about records whose boundary token merged.
    """
    return _tokenize_with_boundary(tokenizer, example, end_token_ids)[0]


def _tokenize_with_boundary(tokenizer: Any, example: Example,
                            end_token_ids: Collection[int] | None) -> tuple[TokenizedExample, bool]:
    """The tokenized example, and whether the prompt's own ids differ from the conversation's prefix."""
    import jinja2

    ends = set(end_token_ids) if end_token_ids else {tokenizer.eos_token_id}
    answers = [example.response] if example.rejected is None else [example.response, example.rejected]
    try:
        if renders_with_mistral_common(tokenizer):
            prompt_alone = chat_ids(tokenizer, example.prompt, generation_prompt=True)
            conversations = [chat_ids(tokenizer, [*example.prompt, answer]) for answer in answers]
        else:
            prompt_alone, conversations = _rendered_ids(tokenizer, example, answers)
    except jinja2.TemplateError as error:  # raise_exception('...') in the template, or an undefined name
        raise DataError(f"{example.location or 'a record'}: the chat template refuses this record "
                        f"({' '.join(str(error).split())})") from None
    boundary = common_prefix_length(prompt_alone, *conversations)
    responses = [_through_end_token(ids[boundary:], ends, tokenizer.eos_token_id) for ids in conversations]
    rejected = responses[1] if len(responses) > 1 else None
    tokenized = TokenizedExample(conversations[0][:boundary], responses[0], rejected)
    return tokenized, boundary != len(prompt_alone)


def chat_ids(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> list[int]:
    """Ids of a chat as `apply_chat_template(tokenize=True)` gives them (the template writes the special tokens, so
    the tokenizer adds none and BOS is never doubled), with BOS put first where the template omits it although
    the tokenizer adds it to every text it encodes."""
    if not renders_with_mistral_common(tokenizer):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
        return text_ids(tokenizer, text)
    # mistral-common renders only to ids, and refuses a chat that ends with the assistant unless told to keep it open
    options = {"add_generation_prompt": True} if generation_prompt else {"continue_final_message": True}
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **options)["input_ids"]
    return _bos_first(tokenizer, list(ids))


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a rendered chat (what `apply_chat_template(tokenize=True)` does with it), BOS first as in `chat_ids`."""
    return _bos_first(tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _rendered_ids(tokenizer: Any, example: Example,
                  answers: Sequence[Message]) -> tuple[list[int], list[list[int]]]:
    """Ids of the prompt alone and of each conversation, each rendered once; refuses a template that renders the
    prompt differently when an answer follows it (the response could not be separated from it)."""
    prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    texts = [tokenizer.apply_chat_template([*example.prompt, answer], tokenize=False) for answer in answers]
    if not all(text.startswith(prompt_text) for text in texts):
        raise DataError(
            f"{example.location or 'a record'}: the chat template renders the prompt differently when the "
            "response follows it (e.g. it drops earlier reasoning or changes the last prompt turn), so the "
            "response cannot be separated from the prompt; pass a chat_template that renders earlier turns the "
            "same way in both cases")
    return text_ids(tokenizer, prompt_text), [text_ids(tokenizer, text) for text in texts]


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bos_first(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and _adds_bos_when_encoding(tokenizer):
        ids.insert(0, bos)
    return ids


def _adds_bos_when_encoding(tokenizer: Any) -> bool:
    """Whether the model was trained with BOS before every text, as Llama/Mistral tokenizers add it: templates
    such as zephyr's do not write it, and the model must still see it (as TRL's DPO and the SAPO code ensure).
    Asked once per tokenizer (and BOS token), not for every text."""
    key = tokenizer.bos_token_id
    cached = _ADDS_BOS.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = (key, tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [key])
        _ADDS_BOS[tokenizer] = cached
    return cached[1]


def _through_end_token(response: list[int], end_token_ids: Collection[int], eos_token_id: int) -> list[int]:
    """The response up to and including its last end-of-turn token (text a template writes after it, such as
    ChatML's or zephyr's newline, is never generated: decoding stops at that token); EOS appended if it has none."""
    last_end = max((i for i, token in enumerate(response) if token in end_token_ids), default=None)
    if last_end is None:
        return [*response, eos_token_id]
    return response[: last_end + 1]


@dataclass
class TruncationReport:
    kept: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0
    responses_truncated: int = 0


def fit_lengths(
    examples: Sequence[TokenizedExample], *, max_length: int, max_prompt_length: int, prompt_truncation: str
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Apply the length limits: long prompts lose their beginning (or are dropped), long responses their end."""
    if prompt_truncation not in ("left", "drop"):
        raise ValueError(f"prompt_truncation must be 'left' or 'drop', got {prompt_truncation!r}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length}) to leave room for a response"
        )
    report = TruncationReport()
    fitted: list[TokenizedExample] = []
    for example in examples:
        prompt = example.prompt_ids
        if len(prompt) > max_prompt_length:
            if prompt_truncation == "drop":
                report.prompts_dropped += 1
                continue
            prompt = prompt[-max_prompt_length:]
            report.prompts_truncated += 1
        room = max_length - len(prompt)
        response, rejected = example.response_ids, example.rejected_ids
        if len(response) > room:
            response = response[:room]
            report.responses_truncated += 1
        if rejected is not None:
            rejected = rejected[:room]
        fitted.append(dataclasses.replace(example, prompt_ids=prompt, response_ids=response, rejected_ids=rejected))
    report.kept = len(fitted)
    return fitted, report


PARALLEL_MIN_EXAMPLES = 20_000
"""Below this many examples a second process costs more (starting it, sending it the tokenizer) than it saves."""


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_length: int,
    max_prompt_length: int,
    prompt_truncation: str = "left",
    end_token_ids: Collection[int] | None = None,
    progress: bool = False,
    num_proc: int | None = None,
    keep_origin: bool = False,
) -> list[TokenizedExample]:
    """Tokenize and fit every example; log what was truncated or dropped, fail if nothing is left.

    `end_token_ids` are the ids at which generation stops (the tokenizer's EOS and the model's
    generation_config EOS ids): each response ends at its last one, as the model's own answers do.
    `keep_origin`: each tokenized example keeps its `Example` (and so its raw record), for `rejected_judge`.
    `num_proc` processes share the work (None: one per CPU core of this rank for large datasets, see
    `default_num_proc`); the result is the same list, and an error names the first bad record, as without them.
    """
    workers = default_num_proc(len(examples)) if num_proc is None else num_proc
    if workers > 1:
        results = _tokenize_in_processes(tokenizer, examples, end_token_ids, workers, progress)
    else:
        results = _tokenize_here(tokenizer, examples, end_token_ids, progress)
    tokenized, merged_at = [], []
    for example, (result, merged) in zip(examples, results, strict=True):
        tokenized.append(dataclasses.replace(result, origin=example) if keep_origin else result)
        if merged:
            merged_at.append(example.location or f"example {len(tokenized) - 1}")
    if merged_at:
        logger.warning(
            "%d record(s) (first: %s): the last prompt token merges with the response's first characters when the "
            "whole conversation is tokenized; their prompt ends before that token and the merged token is scored as "
            "part of the response, so training sees exactly the conversation's tokens",
            len(merged_at), ", ".join(merged_at[:3]))
    fitted, report = fit_lengths(
        tokenized, max_length=max_length, max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation
    )
    if report.prompts_dropped or report.prompts_truncated or report.responses_truncated:
        logger.warning(
            "length limits: %d prompts dropped and %d truncated (max_prompt_length=%d), %d responses truncated "
            "(max_length=%d); %d examples kept",
            report.prompts_dropped, report.prompts_truncated, max_prompt_length,
            report.responses_truncated, max_length, report.kept,
        )
    if not fitted:
        raise DataError(
            f"no training example is left after the length limits (max_prompt_length={max_prompt_length}, "
            f"prompt_truncation={prompt_truncation!r})"
        )
    return fitted


def default_num_proc(count: int) -> int:
    """Processes for tokenizing `count` examples: this rank's share of the CPU cores (ranks launched on one machine
    split them, so eight ranks do not start eight processes per core), and one below `PARALLEL_MIN_EXAMPLES`."""
    if count < PARALLEL_MIN_EXAMPLES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(cores // max(ranks_here, 1), count // (PARALLEL_MIN_EXAMPLES // 2)))


def _tokenize_here(tokenizer: Any, examples: Sequence[Example], end_token_ids: Collection[int] | None,
                   progress: bool) -> Iterator[tuple[TokenizedExample, bool]]:
    from tqdm.auto import tqdm

    for example in tqdm(examples, desc="tokenizing", unit="example", disable=not progress):
        yield _tokenize_with_boundary(tokenizer, example, end_token_ids)


def _tokenize_in_processes(tokenizer: Any, examples: Sequence[Example], end_token_ids: Collection[int] | None,
                           num_proc: int, progress: bool) -> list[tuple[TokenizedExample, bool]]:
    """`datasets.Dataset.map` over `num_proc` processes, each running `_tokenize_with_boundary` on its shard.

    Workers return a record's error instead of raising it, so the error reported is the first bad record's in
    the data's order (as without processes), not whichever worker failed first."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint

    columns = {"prompt": [e.prompt for e in examples], "response": [e.response for e in examples],
               "rejected": [e.rejected for e in examples], "location": [e.location for e in examples]}
    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"prompt_ids": ids, "response_ids": ids, "rejected_ids": ids,
                                  "merged": datasets.Value("bool"), "error": datasets.Value("string")})
    shown = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        table = datasets.Dataset.from_dict(columns)
        # a random fingerprint: hashing the tokenizer for datasets' cache would take seconds and the result is
        # not cached (the table lives in memory)
        mapped = table.map(_tokenize_batch, batched=True, num_proc=num_proc, remove_columns=table.column_names,
                           features=features, desc="tokenizing", new_fingerprint=generate_random_fingerprint(),
                           fn_kwargs={"tokenizer_pickle": pickle.dumps(tokenizer),
                                      "end_token_ids": sorted(end_token_ids) if end_token_ids else None})
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()
    table = mapped.with_format("arrow")[:]  # whole Arrow columns to lists: several times faster than row by row
    first_error = next((error for error in table.column("error").to_pylist() if error is not None), None)
    if first_error is not None:
        raise DataError(first_error)
    prompts, responses, rejected, merged = (table.column(name).to_pylist()
                                            for name in ("prompt_ids", "response_ids", "rejected_ids", "merged"))
    return [(TokenizedExample(prompt, response, refused), joined) for prompt, response, refused, joined
            in zip(prompts, responses, rejected, merged, strict=True)]


_WORKER_TOKENIZER: list[Any] = [None, None]  # (the pickle it came from, the tokenizer), one per worker process


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer_pickle: bytes,
                    end_token_ids: list[int] | None) -> dict[str, list[Any]]:
    """One `datasets.map` batch: the columns of `_tokenize_in_processes`, a record's DataError as its `error`.

    The tokenizer comes as `pickle` bytes and is unpickled once per worker: `datasets` sends arguments with `dill`,
    which takes several seconds per job for a 150k-token vocabulary where `pickle` takes one."""
    if _WORKER_TOKENIZER[0] is not tokenizer_pickle:
        _WORKER_TOKENIZER[:] = [tokenizer_pickle, pickle.loads(tokenizer_pickle)]
    tokenizer = _WORKER_TOKENIZER[1]
    out: dict[str, list[Any]] = {"prompt_ids": [], "response_ids": [], "rejected_ids": [], "merged": [], "error": []}
    for prompt, response, rejected, location in zip(batch["prompt"], batch["response"], batch["rejected"],
                                                    batch["location"], strict=True):
        try:
            result, merged = _tokenize_with_boundary(tokenizer, Example(prompt, response, rejected, location),
                                                     end_token_ids)
            error = None
        except DataError as refused:
            result, merged, error = TokenizedExample([], []), False, str(refused)
        out["prompt_ids"].append(result.prompt_ids)
        out["response_ids"].append(result.response_ids)
        out["rejected_ids"].append(result.rejected_ids)
        out["merged"].append(merged)
        out["error"].append(error)
    return out


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized (prompt, real response) pairs; items are plain lists so no padding happens here."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"index": index, "prompt_ids": example.prompt_ids, "response_ids": example.response_ids,
                "rejected_ids": example.rejected_ids}


def collate_examples(items: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keep ragged token lists: each recipe builds its own padded batch from them."""
    return {key: [item[key] for item in items] for key in ("index", "prompt_ids", "response_ids", "rejected_ids")}


def tokenized_dataset(train_dataset: Any, tokenizer: Any, args: Any, eos_token_ids: set[int]) -> TokenizedDataset:
    """Records, `Example`s or an already tokenized dataset, as the dataset the trainer iterates (`args`: a
    `SAPOConfig`, read for the length limits, `skip_invalid` and whether the recipe needs rejected responses)."""
    if isinstance(train_dataset, TokenizedDataset):
        return train_dataset
    examples = examples_from_records(train_dataset, skip_invalid=args.skip_invalid,
                                     with_rejected=args.needs_rejected_data)
    tokenized = tokenize_examples(tokenizer, examples, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
                                  end_token_ids=eos_token_ids, keep_origin=args.rejected_judge is not None,
                                  progress=not args.disable_tqdm and args.process_index == 0)
    return TokenizedDataset(tokenized)
