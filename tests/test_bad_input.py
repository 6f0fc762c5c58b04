"""The bad-input corpus: each case ends in a one-paragraph error (file, line, field), exit status 2, no
traceback, and nothing written to output_dir."""

import json
import logging
import shutil

import pytest

from sapo import tasks
from sapo.cli import main

GOOD = {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


DATA_CASES = {
    "invalid_json": (jsonl(GOOD, GOOD, "{oops"), "data.jsonl:3: invalid JSON"),
    "no_fields": (jsonl(GOOD, {"text": "hi"}), "data.jsonl:2: record has none of the supported fields"),
    "wrong_type": (jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}),
                   "data.jsonl:1: field 'messages[1].content' must be a string, got int"),
    "messages_not_list": (jsonl({"messages": "hello"}), "data.jsonl:1: field 'messages' must be a list"),
    "empty_response": (jsonl(GOOD, {"prompt": "a", "completion": ""}), "data.jsonl:2: field 'completion'"),
    "blank_response": (jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]}),
                       "data.jsonl:1: field 'messages[1].content' is an empty response"),
    "no_assistant": (jsonl({"messages": [{"role": "user", "content": "a"}]}),
                     "data.jsonl:1: field 'messages' has no assistant turn"),
    "ends_with_user": (jsonl({"messages": [*GOOD["messages"], {"role": "user", "content": "more"}]}),
                       "data.jsonl:1: field 'messages[2]' ends the conversation with a 'user' turn"),
    "unknown_role": (jsonl({"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                     "data.jsonl:1: field 'messages[0].role' has unknown role 'bot'"),
    "non_utf8": (None, "data.jsonl:2: not valid UTF-8"),
    "empty_file": ("", "data.jsonl: the file is empty"),
}


@pytest.fixture()
def base_args(tmp_path, model_dir):
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--token_generate_length", "4", "--max_length", "64",
            "--max_prompt_length", "48", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]


def run_failing(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sapo: error: ")]
    assert len(errors) == 1  # one paragraph, after at most progress output
    return errors[0]


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(tmp_path, capsys, base_args, case):
    content, message = DATA_CASES[case]
    path = tmp_path / "data.jsonl"
    if content is None:
        path.write_bytes(jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    else:
        path.write_text(content)
    err = run_failing(capsys, ["train", "--dataset_name", str(path), *base_args])
    assert message in err
    assert str(path) in err
    assert not (tmp_path / "out").exists()


def test_missing_file_and_dir_without_model(tmp_path, capsys, base_args, model_dir):
    err = run_failing(capsys, ["train", "--dataset_name", str(tmp_path / "nope.jsonl"), *base_args])
    assert "nope.jsonl: no such file or directory" in err
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(GOOD))
    (tmp_path / "empty_model").mkdir()
    args = [*base_args, "--model_name_or_path", str(tmp_path / "empty_model")]
    assert "empty_model: directory has no model" in run_failing(capsys, ["train", "--dataset_name", str(data), *args])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,message", [
    (["--max_prompt_length", "64"], "max_prompt_length (64) must be smaller than max_length (64)"),
    (["--ema_beta", "1.5"], "ema_beta must be in [0, 1]"),
    (["--ref_update_mode", "sometimes"], "ref_update_mode must be one of ema, policy, fixed"),
    (["--bogus_option", "1"], "unknown option(s): --bogus_option 1"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "/no/such/checkpoint: checkpoint directory not found"),
])
def test_bad_configuration(tmp_path, capsys, base_args, extra, message):
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(GOOD))
    assert message in run_failing(capsys, ["train", "--dataset_name", str(data), *base_args, *extra])
    assert not (tmp_path / "out").exists()


def test_mistyped_value_is_an_argparse_error(tmp_path, capsys, base_args):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset_name", "x.jsonl", *base_args, "--beta", "abc"])
    assert exit_info.value.code == 2
    assert "argument --beta: invalid float value: 'abc'" in capsys.readouterr().err


def test_tokenizer_without_chat_template_says_what_to_pass(tmp_path, capsys, base_args, model_dir):
    bare = tmp_path / "bare_model"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(GOOD))
    err = run_failing(capsys, ["train", "--dataset_name", str(data), *base_args, "--model_name_or_path", str(bare)])
    assert "no chat template: pass chat_template (CLI: --chat_template)" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_from_another_run_and_existing_output_untouched(tmp_path, capsys, base_args, model_dir):
    from sapo import tiny

    other = tmp_path / "other_model"
    tokenizer = tiny.build_tokenizer()
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=48), tokenizer, other)
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(*[{"messages": r["messages"]} for r in tasks.make_suite(8, 0)["train"]]))
    first = tmp_path / "first"
    assert main(["train", "--dataset_name", str(data), *base_args, "--output_dir", str(first),
                 "--model_name_or_path", str(other), "--save_strategy", "steps", "--save_steps", "2"]) == 0
    capsys.readouterr()
    err = run_failing(capsys, ["train", "--dataset_name", str(data), *base_args,
                               "--resume_from_checkpoint", str(first / "checkpoint-2")])
    assert "written by another run: parameter" in err
    assert not (tmp_path / "out").exists()
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    err = run_failing(capsys, ["train", "--dataset_name", str(data), *base_args, "--output_dir", str(first)])
    assert "is not empty; pass --overwrite_output_dir" in err
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == before


def test_debug_shows_the_exception(tmp_path):
    from sapo.data import DataError

    with pytest.raises(DataError):
        main(["train", "--debug", "--dataset_name", str(tmp_path / "missing.jsonl"), "--model_name_or_path", "x",
              "--output_dir", str(tmp_path / "o")])


def test_skip_invalid_drops_and_counts(tmp_path, base_args, caplog):
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(8, 0)["train"]]
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(rows[0], "{broken", {"text": "no fields"}, *rows[1:]))
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--dataset_name", str(data), *base_args, "--skip_invalid"]) == 0
    assert "dropped 2 invalid record(s)" in caplog.text and "kept 8" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_static_engine_refuses_unsupported_generation_config_before_training(tmp_path, capsys, base_args, model_dir):
    from transformers import GenerationConfig

    model = tmp_path / "ngram_model"
    shutil.copytree(model_dir, model)
    config = GenerationConfig.from_pretrained(model)
    config.no_repeat_ngram_size = 3
    config.save_pretrained(model)
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(GOOD, GOOD))
    err = run_failing(capsys, ["train", "--dataset_name", str(data), *base_args, "--model_name_or_path", str(model),
                               "--generation_engine", "static"])
    assert "generation_engine 'static'" in err and "no_repeat_ngram_size=3" in err
    assert not (tmp_path / "out").exists()
