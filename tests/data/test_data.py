"""Tests for ``sapo.data``: every input shape and file type, the error messages, tokenization and length limits.

Everything is offline: data files are written to ``tmp_path`` and the tokenizer is the character-level one of
:mod:`sapo.tiny`, where every character is one token, so expected ids can be written down character by character
instead of being recomputed with the code under test.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import real_tokenizers

from sapo.data import (
    CHATML_TEMPLATE,
    PARALLEL_MIN_EXAMPLES,
    DataError,
    Example,
    Message,
    TokenizedExample,
    default_num_proc,
    examples_from_records,
    fit_lengths,
    load_examples,
    normalize_record,
    plain_text_prompt,
    prepare_tokenizer,
    read_records,
    require_chat_template,
    resolve_chat_template,
    tokenize_example,
    tokenize_examples,
)
from sapo.tiny import CHAT_TEMPLATE, build_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
WRONG = {"role": "assistant", "content": "5"}

# The same demonstration in every supported record shape; all must normalise to EXPECTED (TEXT_EXPECTED: the
# string-only shapes, trained as raw text).
EXPECTED = Example(prompt=[USER], response=ANSWER)
TEXT_EXPECTED = dataclasses.replace(EXPECTED, text=True)
SHAPES: dict[str, dict[str, Any]] = {
    "messages": {"messages": [USER, ANSWER]},
    "prompt_completion_text": {"prompt": USER["content"], "completion": ANSWER["content"]},
    "prompt_completion_messages": {"prompt": [USER], "completion": [ANSWER]},
    "preference_text": {"prompt": USER["content"], "chosen": "4", "rejected": "5"},
    "preference_assistant_list": {"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]},
    # argilla/distilabel-capybara-dpo-7k-binarized: prompt is a string duplicate of the first user turn.
    "preference_conversation": {"prompt": USER["content"], "chosen": [USER, ANSWER], "rejected": [USER, WRONG]},
}


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the hub is a test bug (and there is no network anyway)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"test tried to load a hub dataset: {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.fixture
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def char_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` looked up one character at a time (independent of how the tokenizer is called)."""
    ids = [tokenizer.convert_tokens_to_ids(character) for character in text]
    assert tokenizer.unk_token_id not in ids
    return ids


# ---------------------------------------------------------------------------------------------------------
# Normalising records
# ---------------------------------------------------------------------------------------------------------


PLAIN_TEXT_SHAPES = {"prompt_completion_text", "preference_text"}  # strings only: TRL's "standard" format


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_record_shape_normalises_to_the_same_example(shape: str) -> None:
    """The same prompt and response from every shape; string-only records are marked plain text (rendered raw)."""
    assert normalize_record(SHAPES[shape], "x") == dataclasses.replace(EXPECTED, text=shape in PLAIN_TEXT_SHAPES)


def test_multi_turn_messages_split_at_the_last_assistant_turn() -> None:
    turns = [SYSTEM, USER, ANSWER, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    example = normalize_record({"messages": turns}, "x")
    assert example.prompt == turns[:4]
    assert example.response == {"role": "assistant", "content": "6"}


def test_prompt_and_completion_message_lists_keep_system_turn() -> None:
    example = normalize_record({"prompt": [SYSTEM, USER], "completion": [ANSWER]}, "x")
    assert example == Example([SYSTEM, USER], ANSWER)


def test_capybara_multi_turn_chosen_conversation_ignores_the_prompt_string() -> None:
    later_user = {"role": "user", "content": "And 3+3?"}
    final = {"role": "assistant", "content": "6"}
    record = {
        "source": "capybara",
        "prompt": USER["content"],
        "chosen": [USER, ANSWER, later_user, final],
        "rejected": [USER, ANSWER, later_user, WRONG],
        "chosen_rating": 5,
    }
    assert normalize_record(record, "x") == Example([USER, ANSWER, later_user], final)


def test_rejected_side_is_ignored_even_when_malformed() -> None:
    assert normalize_record({"prompt": "What is 2+2?", "chosen": "4", "rejected": 17}, "x") == TEXT_EXPECTED


def test_extra_message_keys_are_dropped() -> None:
    example = normalize_record({"messages": [{**USER, "name": "bob"}, {**ANSWER, "weight": 1}]}, "x")
    assert example == EXPECTED


def test_null_fields_count_as_absent() -> None:
    """Columnar sources (Parquet, datasets) give every record every column, missing ones as None."""
    record = {"messages": None, "prompt": "What is 2+2?", "completion": "4", "chosen": None}
    assert normalize_record(record, "x") == TEXT_EXPECTED


# ---------------------------------------------------------------------------------------------------------
# Reading files and directories
# ---------------------------------------------------------------------------------------------------------

RECORDS = [SHAPES["messages"], SHAPES["prompt_completion_messages"], SHAPES["preference_conversation"]]


def test_jsonl_keeps_line_locations_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n  \n" + json.dumps(RECORDS[1]) + "\n", encoding="utf-8")
    raws = read_records(path)
    assert [raw.data for raw in raws] == RECORDS[:2]
    assert [raw.location for raw in raws] == [f"{path}:1", f"{path}:4"]
    assert load_examples(path) == [EXPECTED, EXPECTED]


@pytest.mark.parametrize(
    "content",
    [
        json.dumps(RECORDS),
        json.dumps({"data": RECORDS, "meta": {"version": 1}}),
        "".join(json.dumps(record) + "\n" for record in RECORDS),  # JSON Lines stored as .json
    ],
    ids=["array", "data_object", "json_lines"],
)
def test_json_file_variants(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    assert [raw.data for raw in read_records(path)] == RECORDS
    assert load_examples(str(path)) == [EXPECTED] * 3


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_byte_order_mark_is_accepted(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS[0]).encode() + b"\n" + json.dumps(RECORDS[1]).encode())
    assert load_examples(path) == [EXPECTED, EXPECTED]


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    rows = [
        {"messages": [SYSTEM, USER, ANSWER], "id": 0},
        {"messages": [USER, {"role": "assistant", "content": "four"}], "id": 1},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    raws = read_records(path)
    assert [raw.location for raw in raws] == [f"{path}: row 0", f"{path}: row 1"]
    assert load_examples(path) == [
        Example([SYSTEM, USER], ANSWER),
        Example([USER], {"role": "assistant", "content": "four"}),
    ]


def test_parquet_preference_file_with_null_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "completion": None},
        {"prompt": "What is 2+2?", "chosen": None, "completion": "4"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_examples(path) == [TEXT_EXPECTED, TEXT_EXPECTED]


def test_directory_prefers_the_split_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [SHAPES["messages"]])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "hi", "completion": "hello"}])
    (tmp_path / "README.md").write_text("not data")
    assert load_examples(tmp_path) == [EXPECTED]
    assert load_examples(tmp_path, split="test") == [
        Example([{"role": "user", "content": "hi"}], {"role": "assistant", "content": "hello"}, text=True)
    ]


def test_directory_without_split_file_reads_all_data_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [SHAPES["messages"]])
    (tmp_path / "b.json").write_text(json.dumps([SHAPES["preference_assistant_list"]]))
    (tmp_path / "c.json").mkdir()  # a folder with a data suffix is not a data file
    raws = read_records(tmp_path)
    assert [raw.location for raw in raws] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'b.json'}: record 0"]
    assert load_examples(tmp_path) == [EXPECTED, EXPECTED]


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    datasets.Dataset.from_list([SHAPES["preference_conversation"]] * 2).save_to_disk(str(tmp_path / "ds"))
    assert load_examples(tmp_path / "ds") == [EXPECTED, EXPECTED]


def test_save_to_disk_dataset_dict_selects_split(tmp_path: Path) -> None:
    other = {"messages": [USER, {"role": "assistant", "content": "four"}]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([SHAPES["messages"]]),
         "test": datasets.Dataset.from_list([other, other])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == [EXPECTED]
    assert load_examples(tmp_path / "dd", split="test") == [Example([USER], other["messages"][1])] * 2
    with pytest.raises(DataError, match=r"no split 'validation'; available: (train, test|test, train)"):
        load_examples(tmp_path / "dd", split="validation")


def test_empty_saved_dataset_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"messages": []}).save_to_disk(str(path))
    with pytest.raises(DataError, match=rf"^{path}: (cannot load|the saved dataset has no records)"):
        load_examples(path)


def test_broken_saved_dataset_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text("{}")  # looks like save_to_disk output, holds nothing
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot load the dataset saved there"):
        load_examples(tmp_path)


def test_examples_from_records_accepts_lists_and_datasets() -> None:
    assert examples_from_records([SHAPES["messages"], SHAPES["prompt_completion_messages"]]) == [EXPECTED] * 2
    assert examples_from_records(datasets.Dataset.from_list([SHAPES["preference_text"]])) == [TEXT_EXPECTED]
    with pytest.raises(DataError, match=r"^my_data: row 1: field 'prompt' is missing"):
        examples_from_records([SHAPES["messages"], {"completion": "4"}], origin="my_data")


# ---------------------------------------------------------------------------------------------------------
# Errors: always DataError (a ValueError), naming file, line and field
# ---------------------------------------------------------------------------------------------------------


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def jsonl_error(tmp_path: Path, bad: Any) -> str:
    """Write two good records then ``bad`` (a record, or raw bytes) on line 3; return the error message."""
    path = tmp_path / "d.jsonl"
    line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    good = json.dumps(SHAPES["messages"]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + line + b"\n")
    with pytest.raises(DataError) as caught:
        load_examples(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    return message


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (b'{"messages": [', "invalid JSON"),
        (b'{"prompt": "caf\xe9", "completion": "x"}', "not valid UTF-8"),
        ({"text": "hi", "label": 1}, "none of the supported fields .*found: text, label"),
        ({"messages": None}, "none of the supported fields .*found: messages"),
        ({"prompt": "hi"}, "none of the supported fields"),
        ([USER, ANSWER], "expected a JSON object, got list"),
        ({"messages": "hi"}, "field 'messages' must be a list of messages, got str"),
        ({"messages": []}, "field 'messages' is an empty list"),
        ({"messages": [USER, "4"]}, r"field 'messages\[1\]' must be an object"),
        ({"messages": [USER, {**ANSWER, "content": 4}]}, r"'messages\[1\].content' must be a string, got int"),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, r"'messages\[1\].content' must be a string"),
        ({"messages": [USER, {"content": "4"}]}, r"field 'messages\[1\].role' is missing"),
        ({"messages": [USER, {"role": "bot", "content": "4"}]}, r"'messages\[1\].role' has unknown role 'bot'"),
        ({"messages": [SYSTEM, USER]}, "field 'messages' has no assistant turn"),
        ({"messages": [USER, ANSWER, USER]}, r"field 'messages\[2\]' ends the conversation with a 'user' turn"),
        ({"messages": [ANSWER]}, "field 'messages' has no prompt before the assistant turn"),
        ({"messages": [USER, {"role": "assistant", "content": ""}]}, r"'messages\[1\].content' is an empty response"),
        ({"messages": [USER, {"role": "assistant", "content": " \n\t"}]}, "is an empty response"),
        ({"prompt": "hi", "completion": ""}, "field 'completion' is an empty response"),
        ({"prompt": "hi", "completion": "   "}, "field 'completion' is an empty response"),
        ({"prompt": "hi", "completion": [{"role": "assistant", "content": " "}]}, "'completion' is an empty response"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "x"}, "field 'chosen' is an empty response"),
        ({"prompt": "hi", "completion": 4}, "field 'completion' must be a list of messages, got int"),
        ({"prompt": "hi", "completion": [USER]}, "'completion' must be text or a single assistant message"),
        ({"prompt": "hi", "completion": [ANSWER, ANSWER]}, "'completion' must be text or a single assistant"),
        ({"prompt": " ", "completion": "x"}, "field 'prompt' is empty"),
        ({"prompt": 3, "completion": "x"}, "field 'prompt' must be a list of messages, got int"),
        ({"prompt": [USER, ANSWER], "completion": "x"}, "field 'prompt' ends with an assistant turn"),
        ({"completion": "x"}, "field 'prompt' is missing"),
        ({"chosen": "x"}, "field 'prompt' is missing .*this record has no 'rejected'"),
        ({"chosen": "x", "rejected": "y"}, "'chosen' and 'rejected' share, .* here they share no beginning, so the "
                                           "prompt is empty"),
        ({"prompt": "hi", "chosen": [USER, {"role": "critic", "content": "x"}]}, r"'chosen\[1\].role' has unknown"),
        ({"prompt": "hi", "chosen": [USER]}, "field 'chosen' has no assistant turn"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, bad: Any, expected: str) -> None:
    message = jsonl_error(tmp_path, bad)
    assert re.search(expected, message), message


def test_invalid_json_document_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": ]\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON"):
        read_records(path)


def test_json_record_error_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [SHAPES["messages"], {"messages": [USER]}]}))
    with pytest.raises(DataError, match=rf"^{path}: record 1: field 'messages' has no assistant turn"):
        load_examples(path)


def test_non_utf8_json_document_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "hi", "completion": "ok"},\n{"prompt": "caf\xe9", "completion": "x"}\n]')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_records(path)


def test_parquet_record_error_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "completion": "ok"}, {"prompt": "hi", "completion": ""}]),
                   path)
    with pytest.raises(DataError, match=rf"^{path}: row 1: field 'completion' is an empty response"):
        load_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.jsonl", b"", "the file is empty"),
        ("d.json", b"", "the file is empty"),
        ("d.parquet", b"", "the file is empty"),
        ("d.jsonl", b"\n  \n\n", "the file has no records"),
        ("d.json", b"[]", "the file has no records"),
        ("d.json", b'{"data": []}', "the file has no records"),
        ("d.json", b'{"messages": 3}', "expected a JSON array of records"),
        ("d.json", b"42", "expected a JSON array of records"),
        ("d.parquet", b"PAR1 not really parquet", "cannot read as Parquet"),
        ("d.csv", b"prompt,completion\nhi,ok\n", "unsupported file type '.csv'"),
        ("d", b'{"prompt": "hi", "completion": "ok"}\n', "unsupported file type ''"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_empty_parquet_table_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=rf"^{path}: the file has no records"):
        load_examples(path)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "missing_dir", "nested/missing.json"])
def test_missing_paths_are_data_errors_without_touching_the_hub(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(DataError, match=rf"^{path}: no such file or directory"):
        load_examples(str(path))


def test_missing_relative_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="^missing.jsonl: no such file or directory"):
        load_examples("missing.jsonl")


def test_directory_without_data(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=rf"^{tmp_path}: directory holds no dataset"):
        load_examples(tmp_path)


def test_error_in_second_file_of_a_directory_names_that_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train-0.jsonl", [SHAPES["messages"]])
    write_jsonl(tmp_path / "train-1.jsonl", [SHAPES["messages"], {"messages": [USER, USER]}])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train-1.jsonl'}:2: "):
        load_examples(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Chat templates and tokenizer preparation
# ---------------------------------------------------------------------------------------------------------


def test_resolve_chat_template(tmp_path: Path) -> None:
    assert resolve_chat_template(None) is None
    assert resolve_chat_template("chatml") == CHATML_TEMPLATE
    file = tmp_path / "template.jinja"
    file.write_text(CHAT_TEMPLATE, encoding="utf-8")
    assert resolve_chat_template(str(file)) == CHAT_TEMPLATE
    assert resolve_chat_template(CHAT_TEMPLATE) == CHAT_TEMPLATE
    with pytest.raises(DataError, match="'no_such_template' is neither a file, a built-in name"):
        resolve_chat_template("no_such_template")


def test_a_chat_template_is_required_for_conversational_data_only(tok, tmp_path) -> None:
    tok.chat_template = None
    assert prepare_tokenizer(tok).chat_template is None  # a base model's tokenizer: fine for plain text
    text = load_examples(write_jsonl(tmp_path / "text.jsonl", [SHAPES["prompt_completion_text"]]))
    require_chat_template(tok, text)
    assert tokenize_examples(tok, text, max_length=64, max_prompt_length=32)
    chat_file = write_jsonl(tmp_path / "chat.jsonl", [SHAPES["prompt_completion_messages"]])
    chat = load_examples(chat_file)
    expected = (rf"^{chat_file}:1: the record is conversational \(field 'prompt' holds chat messages\) and the "
                r"tokenizer has no chat template to render it: pass --chat_template chatml")
    with pytest.raises(DataError, match=expected):
        require_chat_template(tok, chat)
    with pytest.raises(DataError, match=expected):  # not transformers' error from inside apply_chat_template
        tokenize_examples(tok, chat, max_length=64, max_prompt_length=32)
    assert prepare_tokenizer(tok, "chatml").chat_template == CHATML_TEMPLATE
    require_chat_template(tok, chat)


@pytest.mark.parametrize("second", ["messages", "prompt_completion_messages", "preference_conversation"])
def test_a_dataset_mixing_plain_text_and_conversational_records_names_both(tmp_path, second) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [SHAPES["prompt_completion_text"], SHAPES["preference_text"],
                                               SHAPES[second]])
    field = {"preference_conversation": "chosen", "prompt_completion_messages": "prompt"}.get(second, second)
    with pytest.raises(DataError, match=rf"^{path}:3: record is conversational \(field '{field}' holds chat "
                                        rf"messages\) but {path}:1 is plain text \(field 'prompt' holds text\); "
                                        "a dataset must use one format"):
        load_examples(path)
    with pytest.raises(DataError, match=r"^train_dataset: row 1: record is plain text .* but train_dataset: row 0 "
                                        "is conversational"):
        examples_from_records([SHAPES[second], SHAPES["prompt_completion_text"]])


PLAIN_RECORDS = [  # boundaries that merge or not, a completion already ending with EOS, non-ASCII text
    {"prompt": "Question: what is 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5, I think"},
    {"prompt": "Say hi ", "chosen": "hi there", "rejected": "\nno"},
    {"prompt": "Translate 'café' to Japanese:", "chosen": " カフェ 😀", "rejected": " 喫茶店"},
    {"prompt": "End:", "chosen": " done{eos}", "rejected": " no"},
]


def trl_dpo_ids(tok, records: list[dict[str, str]]) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids from TRL's own DPOTrainer dataset preparation (EOS added, tokenized, split),
    run unbound: it reads only the tokenizer and these three settings."""
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    settings = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(records), tok,
                                           settings, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in prepared]


@pytest.mark.parametrize("name", ["tiny", "zephyr"])
def test_plain_text_records_tokenize_as_trl_tokenizes_standard_data(name) -> None:
    """TRL trains a "standard" (string) record as raw text: prompt + completion + EOS, with the tokenizer's own BOS,
    no chat template. sapo's prompt, response and rejected ids are TRL's, for the tiny tokenizer (no template at
    all) and a real SentencePiece one whose chat template must not be used."""
    if name == "tiny":
        tok = build_tokenizer()
        tok.chat_template = None
    else:
        tok = real_tokenizer(name)
    records = [{key: value.format(eos=tok.eos_token) for key, value in record.items()} for record in PLAIN_RECORDS]
    expected = trl_dpo_ids(tok, records)
    examples = examples_from_records(records, with_rejected=True)
    assert all(example.text for example in examples)
    got = tokenize_examples(tok, examples, max_length=4096, max_prompt_length=2048)
    assert [(t.prompt_ids, t.response_ids, t.rejected_ids) for t in got] == expected
    completions = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in records]  # SFT's prompt-completion
    got = tokenize_examples(tok, examples_from_records(completions), max_length=4096, max_prompt_length=2048)
    assert [(t.prompt_ids, t.response_ids) for t in got] == [(p, c) for p, c, _ in expected]
    assert tok.decode(got[0].prompt_ids + got[0].response_ids, skip_special_tokens=True) == records[0]["prompt"] + " 4"


# Preference records with an implicit prompt: no `prompt`, the beginning `chosen` and `rejected` share (TRL's
# `extract_prompt`, as DPOTrainer and `maybe_extract_prompt` apply it)

LATER_USER = {"role": "user", "content": "And 3+3?"}
IMPLICIT_TEXT_RECORDS = [  # where the two part: after a space, inside a word, after a newline, inside whitespace
    {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4",
     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5, I think"},
    {"chosen": "The sky is blue", "rejected": "The sky is black"},
    {"chosen": "Say hi\nhi there", "rejected": "Say hi\n\nno"},
    {"chosen": "Q: hi\nA:   yes", "rejected": "Q: hi\nA:   no"},
    {"chosen": "Count: 1 2 3", "rejected": "Count: 1 2 3 4"},  # no difference before the shorter ends
    {"chosen": "Translate 'café': カフェ 😀", "rejected": "Translate 'café': 喫茶店"},
    {"chosen": "End: done{eos}", "rejected": "End: no"},
]
IMPLICIT_CHAT_RECORDS = [
    {"chosen": [USER, ANSWER], "rejected": [USER, WRONG]},
    {"chosen": [SYSTEM, USER, ANSWER, LATER_USER, {"role": "assistant", "content": "6"}],
     "rejected": [SYSTEM, USER, ANSWER, LATER_USER, WRONG]},
    {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]},  # identical: TRL keeps the last turn as the response
    {"prompt": USER["content"], "chosen": [USER, ANSWER], "rejected": [USER, WRONG]},  # capybara's text prompt
]


def test_implicit_prompt_length_is_trl_extract_prompt_on_every_short_string_and_list() -> None:
    """Every pair of strings of up to 3 characters over 'a', 'b', ' ' (and the same as message lists): sapo's
    prompt length slices out exactly TRL's prompt, chosen and rejected, its quirks included (a space before the
    first difference goes to the responses; with no difference the shorter's last element is its response)."""
    import itertools

    from trl.data_utils import extract_prompt

    from sapo.data.implicit import trl_prompt_length

    strings = ["".join(chars) for size in (1, 2, 3) for chars in itertools.product("ab ", repeat=size)]
    lists = [[{"role": "user", "content": char} for char in text] for text in strings]
    for chosen, rejected in [*itertools.product(strings, repeat=2), *itertools.product(lists, repeat=2)]:
        length = trl_prompt_length(chosen, rejected)
        expected = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert (chosen[:length], chosen[length:], rejected[length:]) == tuple(expected.values()), (chosen, rejected)


@pytest.mark.parametrize("record", IMPLICIT_TEXT_RECORDS + IMPLICIT_CHAT_RECORDS)
def test_implicit_prompt_record_splits_as_trl_maybe_extract_prompt(record) -> None:
    """The prompt, chosen and rejected TRL reads from a record without `prompt` (or with capybara's text one beside
    chat lists); plain text stays plain text. The sapo recipes, which ignore `rejected`, get the same prompt, and
    `sapo eval` the same prompt string."""
    from trl.data_utils import maybe_extract_prompt

    expected = maybe_extract_prompt(dict(record))
    example = normalize_record(record, "x", with_rejected=True)
    if isinstance(record["chosen"], str):
        assert example == Example([{"role": "user", "content": expected["prompt"]}],
                                  {"role": "assistant", "content": expected["chosen"]},
                                  {"role": "assistant", "content": expected["rejected"]}, text=True)
    else:
        assert not example.text
        assert (example.prompt, [example.response], [example.rejected]) == (
            expected["prompt"], expected["chosen"], expected["rejected"])
    assert normalize_record(record, "x") == dataclasses.replace(example, rejected=None)
    assert plain_text_prompt(record, "x") == (expected["prompt"] if example.text else None)  # what `sapo eval` asks


@pytest.mark.parametrize("name", ["tiny", "zephyr"])
def test_implicit_prompt_records_tokenize_as_trl_dpo_trains_them(name) -> None:
    """TRL's DPOTrainer, given records without `prompt`, extracts it and tokenizes the result; sapo's prompt,
    response and rejected ids are the same, for plain text (tiny tokenizer, and a real SentencePiece one where the
    mid-word boundaries merge) and for conversations (the tiny chat template)."""
    tok = build_tokenizer() if name == "tiny" else real_tokenizer(name)  # (a shared instance: not modified)
    records = [{key: value.format(eos=tok.eos_token) for key, value in r.items()} for r in IMPLICIT_TEXT_RECORDS]
    batches = [records, [r for r in IMPLICIT_CHAT_RECORDS if "prompt" not in r]] if name == "tiny" else [records]
    for batch in batches:
        expected = trl_dpo_ids(tok, batch)
        got = tokenize_examples(tok, examples_from_records(batch, with_rejected=True), max_length=4096,
                                max_prompt_length=2048)
        assert [(t.prompt_ids, t.response_ids, t.rejected_ids) for t in got] == expected
        sapo_only = tokenize_examples(tok, examples_from_records(batch), max_length=4096, max_prompt_length=2048)
        assert [(t.prompt_ids, t.response_ids) for t in sapo_only] == [(p, c) for p, c, _ in expected]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"chosen": " yes", "rejected": " no"}, "here they share only ' ', so the prompt is empty"),
        ({"chosen": "Q: A: ", "rejected": "Q: A: no"}, r"field 'chosen' is an empty response once the implicit "
                                                      r"prompt \(the first 5 characters"),
        ({"chosen": [USER, ANSWER], "rejected": [SYSTEM, USER, WRONG]}, "here they share no beginning"),
        ({"chosen": [USER], "rejected": [USER, WRONG]}, r"share only the 1 message\(s\) of the shorter"),
        ({"chosen": [USER, ANSWER, LATER_USER, ANSWER], "rejected": [USER, WRONG]},
         r"field 'chosen' continues after the implicit prompt \(its first 1 message\(s\), the beginning 'chosen' "
         r"and 'rejected' share, split as TRL's extract_prompt splits it\) with 3 message\(s\) \(assistant, user, "
         r"assistant\); the response must be a single assistant message"),
        ({"chosen": "x", "rejected": [USER, WRONG]}, "'chosen' holds text and 'rejected' messages"),
        ({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "bot", "content": "5"}]},
         r"'rejected\[1\].role' has unknown role"),
    ],
)
def test_implicit_prompt_errors_name_file_line_and_field(tmp_path: Path, bad: Any, expected: str) -> None:
    message = jsonl_error(tmp_path, bad)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:3: ") and re.search(expected, message), message


def test_implicit_prompt_empty_rejected_response_is_refused_only_where_rejected_is_read(tmp_path: Path) -> None:
    """'Q: y' is the prompt and ' ' rejected's response: nothing for dpo/orpo to score, but the sapo recipes,
    which ignore `rejected`, train on the chosen 'es'."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "Q: yes", "rejected": "Q: y "}])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'rejected' is an empty response once the implicit"):
        load_examples(path, with_rejected=True)
    assert load_examples(path)[0].response == {"role": "assistant", "content": "es"}


def test_sapo_train_on_implicit_prompt_records_trains_on_the_chosen_completions(tmp_path, model_dir) -> None:
    """`sapo train` on a JSONL file of HH-RLHF-style plain-text records: the run trains, and every real response in
    the replay buffer is a record's chosen completion (+ EOS) after the prompt TRL would extract."""
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_extract_prompt

    from sapo.cli import main
    from sapo.cli.inspect import load_entries
    from sapo.demo_kit import tasks

    rows = []
    for record in tasks.make_suite(8, 0, seed=2)["train"]:
        question = f"Human: {record['messages'][0]['content']}\nAssistant:"
        rows.append({"chosen": f"{question} {record['messages'][1]['content']}",
                     "rejected": f"{question} {record['rejected']}"})
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(model_dir), "--dataset_name",
                 str(write_jsonl(tmp_path / "hh.jsonl", rows)), "--output_dir", str(out), "--max_steps", "3",
                 "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--token_generate_length", "4",
                 "--max_length", "96", "--max_prompt_length", "64", "--use_cpu", "true", "--report_to", "none",
                 "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
                 "--disable_tqdm", "true"]) == 0
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([loss for loss in losses if loss is not None]) == 3
    tokenizer = AutoTokenizer.from_pretrained(out)
    extracted = [maybe_extract_prompt(row) for row in rows]
    chosen = {row["prompt"]: row["chosen"] + tokenizer.eos_token for row in extracted}
    entries = load_entries(out)
    assert entries
    for entry in entries:
        assert chosen[tokenizer.decode(entry.prompt)] == tokenizer.decode(entry.real)


def test_prepare_tokenizer_keeps_an_existing_template(tok) -> None:
    assert prepare_tokenizer(tok).chat_template == CHAT_TEMPLATE


def test_prepare_tokenizer_uses_eos_for_padding(tok) -> None:
    tok.pad_token = None
    assert tok.pad_token_id is None
    prepared = prepare_tokenizer(tok)
    assert prepared.pad_token == "</s>"
    assert prepared.pad_token_id == prepared.eos_token_id == 2


def test_prepare_tokenizer_requires_eos(tok) -> None:
    tok.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        prepare_tokenizer(tok)


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------

MULTI_TURN = Example(
    prompt=[SYSTEM, USER, ANSWER, {"role": "user", "content": "And 3+3?"}],
    response={"role": "assistant", "content": "6, of course."},
)


def test_tokenize_with_the_tiny_template(tok) -> None:
    tokenized = tokenize_example(tok, MULTI_TURN)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    sys_id, user_id, asst_id = tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    expected_prompt = (
        [bos, sys_id, *char_ids(tok, "You are terse."), user_id, *char_ids(tok, "What is 2+2?"),
         asst_id, *char_ids(tok, "4"), eos, user_id, *char_ids(tok, "And 3+3?"), asst_id]
    )
    assert tokenized.prompt_ids == expected_prompt
    templated = tok.apply_chat_template(MULTI_TURN.prompt, tokenize=False, add_generation_prompt=True)
    assert tokenized.prompt_ids == tok(templated, add_special_tokens=False)["input_ids"]
    assert tokenized.response_ids == [*char_ids(tok, "6, of course."), eos]
    assert tokenized.response_ids.count(eos) == 1
    assert bos not in tokenized.response_ids


@pytest.mark.parametrize("how", ["name", "file", "text"])
def test_tokenize_with_chatml_on_the_tiny_tokenizer(tok, tmp_path: Path, how: str) -> None:
    file = tmp_path / "chatml.jinja"
    file.write_text(CHATML_TEMPLATE, encoding="utf-8")
    template = {"name": "chatml", "file": str(file), "text": CHATML_TEMPLATE}[how]
    prepare_tokenizer(tok, template)
    assert tok.chat_template == CHATML_TEMPLATE
    tokenized = tokenize_example(tok, Example([SYSTEM, USER], ANSWER))
    prompt_text = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenized.prompt_ids == char_ids(tok, prompt_text)
    # The tiny EOS is </s>, not <|im_end|>: the end-of-turn text is kept and EOS appended once.
    assert tokenized.response_ids == [*char_ids(tok, "4<|im_end|>\n"), tok.eos_token_id]
    assert tokenized.response_ids.count(tok.eos_token_id) == 1


def test_eos_followed_by_template_whitespace_is_not_duplicated(tok) -> None:
    """ChatML with an EOS end-of-turn (as in Qwen: eos == <|im_end|>) writes a newline after EOS."""
    prepare_tokenizer(tok, CHATML_TEMPLATE.replace("<|im_end|>", "</s>"))
    tokenized = tokenize_example(tok, EXPECTED)
    assert tokenized.response_ids == [*char_ids(tok, "4"), tok.eos_token_id]
    assert tokenized.prompt_ids == char_ids(tok, "<|im_start|>user\nWhat is 2+2?") + [tok.eos_token_id] + char_ids(
        tok, "\n<|im_start|>assistant\n"
    )


def test_template_that_changes_the_prompt_is_rejected(tok) -> None:
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(DataError, match="renders the prompt differently"):
        tokenize_example(tok, EXPECTED)


# ---------------------------------------------------------------------------------------------------------
# Length limits
# ---------------------------------------------------------------------------------------------------------


def tex(prompt_length: int, response_length: int) -> TokenizedExample:
    return TokenizedExample(list(range(prompt_length)), list(range(100, 100 + response_length)))


def test_left_truncation_keeps_the_last_prompt_tokens_and_cuts_responses() -> None:
    fitted, report = fit_lengths(
        [tex(10, 6), tex(4, 3), tex(2, 9)], max_length=7, max_prompt_length=4, prompt_truncation="left"
    )
    assert fitted == [
        TokenizedExample([6, 7, 8, 9], [100, 101, 102]),  # prompt cut to its last 4, response to 7 - 4
        TokenizedExample([0, 1, 2, 3], [100, 101, 102]),  # both exactly at their limits: untouched
        TokenizedExample([0, 1], [100, 101, 102, 103, 104]),  # response cut to 7 - 2
    ]
    assert (report.kept, report.prompts_truncated, report.prompts_dropped, report.responses_truncated) == (3, 1, 0, 2)
    assert all(len(f.prompt_ids) + len(f.response_ids) <= 7 for f in fitted)


def test_drop_removes_long_prompts_and_counts_them() -> None:
    fitted, report = fit_lengths(
        [tex(5, 1), tex(4, 1), tex(9, 1), tex(1, 8)], max_length=6, max_prompt_length=4, prompt_truncation="drop"
    )
    assert fitted == [tex(4, 1), TokenizedExample([0], [100, 101, 102, 103, 104])]
    assert (report.kept, report.prompts_truncated, report.prompts_dropped, report.responses_truncated) == (2, 0, 2, 1)


def test_fit_lengths_does_not_modify_its_input() -> None:
    examples = [tex(10, 10)]
    fit_lengths(examples, max_length=8, max_prompt_length=4, prompt_truncation="left")
    assert examples == [tex(10, 10)]


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "mode"), [(4, 4, "left"), (4, 6, "left"), (4, 0, "left"), (8, 4, "right")]
)
def test_fit_lengths_rejects_bad_limits(max_length: int, max_prompt_length: int, mode: str) -> None:
    with pytest.raises(ValueError):
        fit_lengths([tex(5, 5)], max_length=max_length, max_prompt_length=max_prompt_length, prompt_truncation=mode)


def test_tokenize_examples_applies_limits_and_logs(tok, caplog: pytest.LogCaptureFixture) -> None:
    short = Example([{"role": "user", "content": "hi"}], {"role": "assistant", "content": "hello there"})
    long = Example([{"role": "user", "content": "x" * 50}], ANSWER)
    with caplog.at_level(logging.WARNING, logger="sapo.data"):
        fitted = tokenize_examples(tok, [short, long], max_length=12, max_prompt_length=6, prompt_truncation="drop")
    # prompt of `short` is <s><|user|>hi<|assistant|> = 5 tokens; its response is cut to 12 - 5 tokens.
    assert fitted == [TokenizedExample(tokenize_example(tok, short).prompt_ids, char_ids(tok, "hello t"))]
    assert "1 prompts dropped" in caplog.text and "1 responses truncated" in caplog.text


def test_tokenize_examples_fails_when_nothing_is_left(tok) -> None:
    long = Example([{"role": "user", "content": "x" * 50}], ANSWER)
    with pytest.raises(DataError, match="no training example is left"):
        tokenize_examples(tok, [long, long], max_length=32, max_prompt_length=8, prompt_truncation="drop")
    kept = tokenize_examples(tok, [long], max_length=32, max_prompt_length=8)  # default: left truncation
    assert kept[0].prompt_ids == char_ids(tok, "xxxxxxx") + [tok.convert_tokens_to_ids("<|assistant|>")]


def test_directory_with_split_named_files_refuses_a_missing_split(tmp_path: Path) -> None:
    record = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match="no data file for split 'test' \\(found train.jsonl\\)"):
        read_records(tmp_path, split="test")
    assert len(read_records(tmp_path, split="train")) == 1


# ---------------------------------------------------------------------------------------------------------
# Real tokenizers and chat templates (tests/real_tokenizers.py: files shipped in PyPI packages, offline)
# ---------------------------------------------------------------------------------------------------------


REAL = [name for name, _ in real_tokenizers.REGISTRY]


@functools.cache
def real_tokenizer(name: str):
    return real_tokenizers.FACTORIES[name]()


def end_ids(name: str, tok) -> set[int]:
    return {tok.eos_token_id, *tok.convert_tokens_to_ids(list(real_tokenizers.GENERATION_EOS_TOKENS.get(name, ())))}


def msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


RESPONSES = {
    "words": "Hello there!",
    "digits": "42 apples, 7 pears.",
    "newlines": "\n\nFirst line.\nSecond line.",
    "space": " an answer that starts with a space",
    "punctuation": "...well, (maybe) -- yes!",
    "non_ascii": "Ça va très bien, merci. 谢谢！🙂 Über straße.",
    "code": "```python\nprint('hi')\n```",
}


def conversations(name: str) -> dict[str, Example]:
    cases = {kind: Example([msg("user", "Say something.")], msg("assistant", text)) for kind, text in RESPONSES.items()}
    turns = [msg("user", "What is 2+2?"), msg("assistant", "4."), msg("user", "And 3+3?")]
    cases["multi_turn"] = Example(turns, msg("assistant", "6, of course."))
    if name not in real_tokenizers.NO_SYSTEM_ROLE:
        cases["system_multi_turn"] = Example([msg("system", "You are terse."), *turns], msg("assistant", "6."))
    return cases


def rendered_ids(tok, messages, generation_prompt: bool = False) -> list[int]:
    """The spec, computed without sapo: the rendered chat's ids, BOS first when the tokenizer puts it before every
    text it encodes (zephyr's template does not write it; Llama/Mistral models are trained with it)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and ids[0] != bos and tok("a")["input_ids"][0] == bos:
        ids = [bos, *ids]
    return ids


def conversation_ids(tok, example: Example, ends: set[int]) -> list[int]:
    """The whole conversation's ids through its last end token (EOS appended when there is none)."""
    ids = rendered_ids(tok, [*example.prompt, example.response])
    last = max((i for i, token in enumerate(ids) if token in ends), default=None)
    return ids + [tok.eos_token_id] if last is None else ids[: last + 1]


@pytest.mark.parametrize("name", REAL)
def test_prompt_and_response_ids_are_the_whole_conversations_ids(name) -> None:
    tok = real_tokenizer(name)
    ends = end_ids(name, tok)
    for kind, example in conversations(name).items():
        tokenized = tokenize_example(tok, example, ends)
        assert tokenized.prompt_ids + tokenized.response_ids == conversation_ids(tok, example, ends), kind
        prompt_alone = rendered_ids(tok, example.prompt, generation_prompt=True)
        assert prompt_alone[: len(tokenized.prompt_ids)] == tokenized.prompt_ids, kind
        assert len(prompt_alone) - len(tokenized.prompt_ids) <= 1, kind  # only a merged boundary token moves
        assert tokenized.response_ids[-1] in ends and sum(t in ends for t in tokenized.response_ids) == 1, kind
        assert tok.bos_token_id is None or tokenized.prompt_ids.count(tok.bos_token_id) == 1, kind


@pytest.mark.parametrize("name", ["zephyr", "zephyr-nonlegacy", "mistral-instruct-v0.1"])
def test_sentencepiece_response_starts_with_the_token_the_model_sees(name) -> None:
    """Tokenized alone, 'Hello' would be '▁Hello', a token the model never produces after the prompt."""
    tok = real_tokenizer(name)
    tokenized = tokenize_example(tok, Example([msg("user", "Say hi.")], msg("assistant", "Hello there!")))
    assert tok.convert_ids_to_tokens(tokenized.response_ids) == ["Hello", "▁there", "!", "</s>"]
    assert tok("Hello there!", add_special_tokens=False)["input_ids"][0] != tokenized.response_ids[0]


@pytest.mark.parametrize("name", ["zephyr", "openhermes-chatml", "qwen2-chatml", "gemma"])
def test_text_after_the_end_token_is_not_scored(name) -> None:
    """zephyr, ChatML and Gemma write '\\n' after the final end token; decoding stops at that token."""
    tok = real_tokenizer(name)
    example = Example([msg("user", "Say hi.")], msg("assistant", "Hello."))
    text = tok.apply_chat_template([*example.prompt, example.response], tokenize=False)
    assert text.endswith("\n")
    tokenized = tokenize_example(tok, example, end_ids(name, tok))
    assert tok.decode(tokenized.response_ids[-1:]) in ("</s>", "<|im_end|>", "<end_of_turn>")


def test_byte_level_merge_at_the_boundary_warns_and_names_the_record(caplog) -> None:
    name = "qwen2-chatml"  # ChatML ends the prompt with a newline; a newline-first response merges into it
    tok = real_tokenizer(name)
    merged = Example([msg("user", "Poem?")], msg("assistant", "\nRoses are red."), location="poems.jsonl:7")
    plain = Example([msg("user", "Poem?")], msg("assistant", "Roses are red."), location="poems.jsonl:8")
    with caplog.at_level(logging.WARNING, logger="sapo.data"):
        tokenized = tokenize_examples(tok, [plain, merged], max_length=512, max_prompt_length=256,
                                      end_token_ids=end_ids(name, tok))
    assert "1 record(s) (first: poems.jsonl:7)" in caplog.text
    assert tokenized[1].prompt_ids == tokenized[0].prompt_ids[:-1]  # the prompt's last newline merged away
    assert tok.decode(tokenized[1].response_ids).startswith(tok.decode(tokenized[0].prompt_ids[-1:]) + "\n")


def test_offline_pairs_share_the_prompt_ids_of_both_conversations() -> None:
    tok = real_tokenizer("qwen2-chatml")
    ends = end_ids("qwen2-chatml", tok)
    example = Example([msg("user", "Poem?")], msg("assistant", "Roses."), msg("assistant", "\nViolets."))
    tokenized = tokenize_example(tok, example, ends)
    assert tokenized.prompt_ids + tokenized.response_ids == conversation_ids(tok, example, ends)
    rejected = Example(example.prompt, example.rejected)
    assert tokenized.prompt_ids + tokenized.rejected_ids == conversation_ids(tok, rejected, ends)


def test_mistral_common_backend_tokenizes_through_mistral_common() -> None:
    """A Mistral-Nemo directory with tekken.json loads as MistralCommonBackend when mistral-common is installed."""
    tok = real_tokenizers.mistral_nemo_mistral_common()
    prepare_tokenizer(tok)  # no Jinja template needed: mistral-common renders the chat
    example = Example([msg("user", "Say hi.")], msg("assistant", "Hello there!"))
    tokenized = tokenize_example(tok, example)
    rendered = tok.apply_chat_template([*example.prompt, example.response], continue_final_message=True)
    assert tokenized.prompt_ids + tokenized.response_ids == [*rendered["input_ids"], tok.eos_token_id]
    assert tokenized.prompt_ids == tok.apply_chat_template(example.prompt, add_generation_prompt=True)["input_ids"]
    with pytest.raises(DataError, match="takes no Jinja template"):
        prepare_tokenizer(tok, "chatml")
    # plain text: the raw text, and the EOS id appended (mistral-common would spell "</s>" in text as characters)
    plain = tokenize_example(tok, Example([msg("user", "2+2=")], msg("assistant", " 4"), text=True))
    assert plain.prompt_ids + plain.response_ids == [*tok(text="2+2= 4")["input_ids"], tok.eos_token_id]


def test_a_dataset_dict_is_named_by_its_splits() -> None:
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]),
                                   "test": datasets.Dataset.from_list([{"prompt": "c", "completion": "d"}])})
    with pytest.raises(DataError, match=r"a DatasetDict with splits 'train', 'test'; pass one split, "
                                        r"e.g. dataset\['train'\]"):
        examples_from_records(splits)


# ---------------------------------------------------------------------------------------------------------
# Large datasets: tokenized in several processes, with the same result and the same messages
# ---------------------------------------------------------------------------------------------------------


def test_tokenizing_in_processes_gives_the_same_examples_and_warnings(caplog) -> None:
    tok = real_tokenizer("qwen2-chatml")
    examples = [Example([msg("user", f"Poem {i}?")], msg("assistant", ("\n" if i % 3 == 0 else "") + f"Roses {i}."),
                        msg("assistant", f"Violets {i} are blue.") if i % 2 else None, location=f"poems.jsonl:{i + 1}")
                for i in range(12)]
    runs, logs = {}, {}
    for num_proc in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sapo.data"):
            runs[num_proc] = tokenize_examples(tok, examples, max_length=14, max_prompt_length=12,
                                               end_token_ids=end_ids("qwen2-chatml", tok), num_proc=num_proc)
        logs[num_proc] = [record.getMessage() for record in caplog.records]
    assert runs[2] == runs[1]
    assert all(type(ids) is list for t in runs[2] for ids in (t.prompt_ids, t.response_ids))
    assert [t.rejected_ids is None for t in runs[2]] == [i % 2 == 0 for i in range(12)]
    assert logs[2] == logs[1]
    assert "4 record(s) (first: poems.jsonl:1, poems.jsonl:4, poems.jsonl:7)" in logs[2][0]
    assert "responses truncated" in logs[2][1]


def test_plain_text_records_stay_plain_text_in_processes(tok) -> None:
    """The workers get each record's format: plain text is not rendered through the tokenizer's chat template."""
    examples = examples_from_records([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(6)])
    runs = [tokenize_examples(tok, examples, max_length=64, max_prompt_length=32, num_proc=n) for n in (1, 2)]
    assert runs[1] == runs[0]
    assert tok.decode(runs[1][2].prompt_ids + runs[1][2].response_ids) == "2+1=3" + tok.eos_token


def test_in_processes_the_error_names_the_first_bad_record() -> None:
    tok = prepare_tokenizer(real_tokenizer("gemma"))  # Gemma's template raises on a system message
    examples = [Example([msg("user", "Hi")], msg("assistant", "Hello"), location=f"chats.jsonl:{i + 1}")
                for i in range(6)]
    for bad in (2, 3):  # one in each process's half; the second half may well finish first
        examples[bad] = dataclasses.replace(examples[bad], prompt=[msg("system", "Be brief."), msg("user", "Hi")])
    with pytest.raises(DataError, match=r"^chats.jsonl:3: the chat template refuses this record \(.*System role"):
        tokenize_examples(tok, examples, max_length=64, max_prompt_length=32, num_proc=2)


def test_large_datasets_use_this_ranks_share_of_the_cores(monkeypatch) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_proc(PARALLEL_MIN_EXAMPLES - 1) == 1
    assert default_num_proc(10**7) == cores
    assert default_num_proc(PARALLEL_MIN_EXAMPLES) == min(cores, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one rank per core: no extra processes
    assert default_num_proc(10**7) == 1


def test_records_carrying_both_forms_of_the_same_conversation_are_accepted():
    """ultrachat_200k (`prompt` = the first user turn beside `messages`) and ultrafeedback_binarized (`messages` equal
    to `chosen`, with `prompt` and `rejected`) carry the same conversation twice; only a disagreement is refused."""
    user, answer = {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}
    later = [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "Yes"}]
    ultrachat = {"prompt": "Hi there", "prompt_id": "x", "messages": [user, answer, *later]}
    assert normalize_record(ultrachat, "u:1").response == later[1]
    feedback = {"prompt": "Hi there", "messages": [user, answer], "chosen": [user, answer],
                "rejected": [user, {"role": "assistant", "content": "No"}]}
    assert normalize_record(feedback, "f:1", with_rejected=True).rejected["content"] == "No"
    with pytest.raises(DataError, match="f:1: record has both 'messages' and 'prompt' and 'chosen'"):
        normalize_record({**feedback, "chosen": [user, {"role": "assistant", "content": "Other"}]}, "f:1")
