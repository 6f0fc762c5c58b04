"""The bad-input corpus: each case ends in a one-paragraph error (file, line, field; or option and value; or path),
exit status 2, no traceback, and nothing written: the files under the test's directory are exactly as they were
(names, sizes, modification times, so a file or directory created and removed again also shows), and output_dir
does not exist afterwards.

Cases are tables per category (data, configuration, YAML, model and tokenizer directories, chat templates, LoRA,
output directories and filesystems, launchers, resuming, `sapo eval`/`plot`/`inspect`); a case builds its inputs
in a `Scene` and returns the command line. Most fail before any model is loaded, so the whole corpus takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sapo import tasks
from sapo.cli import main

GOOD = {"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}
USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def run_failing(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sapo: error: ")]
    assert len(errors) == 1, err  # one paragraph, after at most progress output
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under `root`: kind, size, mtime (a directory's mtime changes when an entry is added or removed)."""
    entries = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory, name)
            info = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            entries[str(path.relative_to(root))] = (kind, info.st_size if kind == "file" else 0, info.st_mtime_ns)
    return entries


class Scene:
    """One case's inputs under tmp_path: a valid data file, copies of the tiny model to break, and the options of a
    `sapo train` run that would succeed, so each case differs from a good run by exactly what it breaks."""

    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.out = tmp / "out"
        self.data = self.file("data.jsonl", jsonl(GOOD, GOOD, GOOD, GOOD))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def model(self, mutate: Callable[[Path], object] | None = None, name: str = "model") -> Path:
        path = self.tmp / name
        shutil.copytree(self.model_dir, path)
        if mutate is not None:
            mutate(path)
        return path

    def train(self, *extra: str, data: Path | str | None = None, model: Path | str | None = None) -> list[str]:
        return ["train", "--dataset_name", str(data or self.data), "--model_name_or_path", str(model or self.model_dir),
                "--output_dir", str(self.out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48", "--use_cpu",
                "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *extra]

    def yaml(self, text: str, name: str = "run.yaml") -> list[str]:
        return self.train("--config", str(self.file(name, text)))

    def names(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "out": str(self.out), "data": str(self.data), "model": str(self.model_dir)}


@pytest.fixture()
def scene(tmp_path, model_dir):
    return Scene(tmp_path, model_dir)


def refused(capsys, scene: Scene, build: Callable[[Scene], list[str]], *fragments: str) -> str:
    argv = build(scene)
    before = snapshot(scene.tmp)
    out_existed = scene.out.exists()
    err = run_failing(capsys, argv)
    for fragment in fragments:
        for name, value in scene.names().items():
            fragment = fragment.replace("{" + name + "}", value)
        assert fragment in err
    assert snapshot(scene.tmp) == before
    assert scene.out.exists() == out_existed
    return err


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

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
    "blank_lines_only": ("\n \n\n", "data.jsonl: the file has no records"),
    "nested_100k_deep": (jsonl(GOOD) + "[" * 100_000 + "]" * 100_000 + "\n",
                         "data.jsonl:2: invalid JSON (arrays or objects nested too deeply"),
    "integer_5000_digits": (jsonl(GOOD) + '{"prompt": "a", "completion": "b", "n": ' + "7" * 5000 + "}\n",
                            "data.jsonl:2: invalid JSON (an integer with more digits than Python converts"),
    "lone_surrogate_in_content": (jsonl(GOOD) + '{"messages": [{"role": "user", "content": "a\\udc80"}, '
                                  '{"role": "assistant", "content": "b"}]}\n',
                                  "data.jsonl:2: field 'messages[0].content' is not valid Unicode text"),
    "lone_surrogate_in_prompt": (jsonl(GOOD) + '{"prompt": "\\ud800x", "completion": "b"}\n',
                                 "data.jsonl:2: field 'prompt' is not valid Unicode text: a lone surrogate"),
    "lone_surrogate_in_completion": (jsonl(GOOD) + '{"prompt": "a", "completion": "b\\ud83d"}\n',
                                     "data.jsonl:2: field 'completion' is not valid Unicode text"),
    "two_assistant_turns_at_the_end": (jsonl(GOOD, GOOD, GOOD, GOOD, {"messages": [USER, ANSWER, ANSWER]}),
                                       "data.jsonl:5: field 'messages[2]' is a second assistant turn in a row "
                                       "(after 'messages[1]')"),
    "chosen_ending_in_two_assistant_turns": (
        jsonl({"chosen": [USER, ANSWER, ANSWER], "rejected": [USER, ANSWER, {"role": "assistant", "content": "x"}]}),
        "data.jsonl:1: field 'chosen[1]' is an assistant turn that ends the implicit prompt"),
    "chosen_messages_rejected_text": (jsonl({"chosen": [USER, ANSWER], "rejected": "x"}),
                                      "data.jsonl:1: the record's prompt is implicit"),
    "record_is_a_list": (jsonl(GOOD, [1, 2]), "data.jsonl:2: expected a JSON object, got list"),
    "record_is_a_string": (jsonl(GOOD, '"just text"'), "data.jsonl:2: expected a JSON object, got str"),
    "message_without_content": (jsonl({"messages": [{"role": "user"}, ANSWER]}),
                                "data.jsonl:1: field 'messages[0].content' is missing"),
    "message_not_an_object": (jsonl({"messages": ["hi", ANSWER]}),
                              "data.jsonl:1: field 'messages[0]' must be an object with 'role' and 'content'"),
    "role_not_a_string": (jsonl({"messages": [{"role": 1, "content": "a"}, ANSWER]}),
                          "data.jsonl:1: field 'messages[0].role' must be a string, got int"),
    "empty_messages": (jsonl({"messages": []}), "data.jsonl:1: field 'messages' is an empty list"),
    "assistant_only": (jsonl({"messages": [ANSWER]}),
                       "data.jsonl:1: field 'messages' has no prompt before the assistant turn"),
    "null_messages": (jsonl({"messages": None}), "data.jsonl:1: record has none of the supported fields"),
    "completion_without_prompt": (jsonl({"completion": "x"}), "data.jsonl:1: field 'prompt' is missing"),
    "empty_prompt": (jsonl({"prompt": "  ", "completion": "x"}), "data.jsonl:1: field 'prompt' is empty"),
    "prompt_ending_with_assistant": (jsonl({"prompt": [USER, ANSWER], "completion": "x"}),
                                     "data.jsonl:1: field 'prompt' ends with an assistant turn"),
    "completion_of_two_messages": (jsonl({"prompt": "a", "completion": [ANSWER, ANSWER]}),
                                   "data.jsonl:1: field 'completion' must be text or a single assistant message"),
    "messages_disagreeing_with_prompt_and_completion": (
        jsonl(GOOD, {**GOOD, "prompt": "1+2=", "completion": "4"}),
        "data.jsonl:2: record has both 'messages' and 'prompt' and 'completion', and they disagree"),
    "messages_disagreeing_with_prompt": (jsonl({**GOOD, "prompt": "2+2="}),
                                         "data.jsonl:1: record has both 'messages' and 'prompt', and they disagree"),
    "chosen_and_completion": (jsonl({"prompt": "a", "completion": "b", "chosen": "c"}),
                              "data.jsonl:1: record has both 'chosen' and 'completion'"),
    "prompt_only": (jsonl({"prompt": "a"}), "data.jsonl:1: record has none of the supported fields"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(capsys, scene, case):
    content, message = DATA_CASES[case]

    def build(s):
        if content is None:
            s.file("data.jsonl", jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
        else:
            s.file("data.jsonl", content)
        return s.train()

    err = refused(capsys, scene, build, message)
    assert str(scene.data) in err


def saved_dataset_without_train_split(s):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(s.tmp / "saved"))
    return s.train(data=s.tmp / "saved")


DATA_SOURCE_CASES = {
    "missing_file": (lambda s: s.train(data=s.tmp / "nope.jsonl"), "{tmp}/nope.jsonl: no such file or directory"),
    "missing_directory_path": (lambda s: s.train(data=s.tmp / "no" / "such" / "dir"), "no such file or directory"),
    "dev_null": (lambda s: s.train(data="/dev/null"), "/dev/null: is a character device, not a data file"),
    "named_pipe": (lambda s: os.mkfifo(s.tmp / "pipe.jsonl") or s.train(data=s.tmp / "pipe.jsonl"),
                   "{tmp}/pipe.jsonl: is a named pipe (FIFO), not a data file"),
    "symlink_loop": (lambda s: (os.symlink(s.tmp / "b.jsonl", s.tmp / "a.jsonl"),
                                os.symlink(s.tmp / "a.jsonl", s.tmp / "b.jsonl"), s.train(data=s.tmp / "a.jsonl"))[2],
                     "{tmp}/a.jsonl: is a symbolic link loop, not a data file"),
    "broken_symlink": (lambda s: os.symlink(s.tmp / "gone.jsonl", s.tmp / "a.jsonl") or s.train(data=s.tmp / "a.jsonl"),
                       "{tmp}/a.jsonl: is a broken symbolic link (to {tmp}/gone.jsonl)"),
    "json_not_an_array": (lambda s: s.train(data=s.file("d.json", '{"a": 1}')),
                          "{tmp}/d.json: expected a JSON array of records"),
    "json_syntax_error": (lambda s: s.train(data=s.file("d.json", '[\n{"messages": 1},\n{oops}\n]')),
                          "{tmp}/d.json:3: invalid JSON"),
    "json_nested_too_deep": (lambda s: s.train(data=s.file("d.json", "[" * 100_000 + "]" * 100_000)),
                             "{tmp}/d.json: invalid JSON (arrays or objects nested too deeply"),
    "json_empty_array": (lambda s: s.train(data=s.file("d.json", "[]")), "{tmp}/d.json: the file has no records"),
    "json_record_not_an_object": (lambda s: s.train(data=s.file("d.json", json.dumps([GOOD, 5]))),
                                  "{tmp}/d.json: record 1: expected a JSON object, got int"),
    "unsupported_suffix": (lambda s: s.train(data=s.file("d.txt", "hello")),
                           "{tmp}/d.txt: unsupported file type '.txt'"),
    "corrupt_parquet": (lambda s: s.train(data=s.file("d.parquet", b"PAR1 not really")),
                        "{tmp}/d.parquet: cannot read as Parquet"),
    "directory_without_data": (lambda s: (s.file("dir/readme.md", "x"), s.train(data=s.tmp / "dir"))[1],
                               "{tmp}/dir: directory holds no dataset"),
    "directory_without_the_split": (lambda s: (s.file("dir/test.jsonl", jsonl(GOOD)), s.train(data=s.tmp / "dir"))[1],
                                    "{tmp}/dir: no data file for split 'train' (found test.jsonl)"),
    "saved_dataset_without_the_split": (saved_dataset_without_train_split, "{tmp}/saved: no split 'train'; "
                                        "available: test"),
    "every_record_invalid_with_skip_invalid": (
        lambda s: s.train("--skip_invalid", data=s.file("bad.jsonl", jsonl({"text": 1}, "{x"))),
        "{tmp}/bad.jsonl: every record is invalid (2)"),
    "dpo_recipe_without_rejected": (lambda s: s.train("--recipe", "dpo"),
                                    "{data}:1: field 'rejected' is missing (offline preference recipes need pairs)"),
    "every_prompt_too_long_with_drop": (
        lambda s: s.train("--max_length", "16", "--max_prompt_length", "2", "--prompt_truncation", "drop"),
        "no training example is left after the length limits (max_prompt_length=2, prompt_truncation='drop')"),
}


@pytest.mark.parametrize("case", sorted(DATA_SOURCE_CASES))
def test_bad_data_source(capsys, scene, case):
    build, message = DATA_SOURCE_CASES[case]
    refused(capsys, scene, build, message)


def test_hub_dataset_name_while_offline_fails_at_once(capsys, scene, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(scene.tmp / "no_cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    refused(capsys, scene, lambda s: s.train(data="someorg/somedata"),
            "someorg/somedata: no such file or directory, and as a hub dataset: not in the local Hugging Face cache, "
            "and 127.0.0.1 cannot be reached")


# ------------------------------------------------------------------------------------------------
# Configuration (command-line options)
# ------------------------------------------------------------------------------------------------

CONFIG_CASES = {
    "max_prompt_length_not_below_max_length": (["--max_prompt_length", "64"],
                                               "max_prompt_length (64) must be smaller than max_length (64)"),
    "ema_beta_above_one": (["--ema_beta", "1.5"], "ema_beta must be in [0, 1]"),
    "unknown_ref_update_mode": (["--ref_update_mode", "sometimes"],
                                "ref_update_mode must be one of ema, policy, fixed"),
    "unknown_option": (["--bogus_option", "1"], "unknown option(s): --bogus_option 1"),
    "negative_learning_rate": (["--learning_rate", "-1"], "learning_rate must be >= 0, got -1.0"),
    "nan_learning_rate": (["--learning_rate", "nan"], "learning_rate must be a finite number, got nan"),
    "infinite_learning_rate": (["--learning_rate", "inf"], "learning_rate must be a finite number, got inf"),
    "batch_size_zero": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
    "gradient_accumulation_zero": (["--gradient_accumulation_steps", "0"],
                                   "gradient_accumulation_steps must be >= 1, got 0"),
    "negative_beta": (["--beta", "-0.1"], "beta must be > 0, got -0.1"),
    "nan_beta": (["--beta", "nan"], "beta must be a finite number, got nan"),
    "unknown_recipe": (["--recipe", "sapo-ppo"], "recipe must be one of sapo, "),
    "unknown_loss_type": (["--loss_type", "hinged"], "loss_type must be one of"),
    "recipe_fixes_another_loss": (["--recipe", "sapo-orpo", "--loss_type", "sigmoid"],
                                  "recipe 'sapo-orpo' fixes loss_type 'orpo'; got loss_type 'sigmoid'"),
    "recipe_needs_a_reference_loss": (["--recipe", "sapo-dpo", "--loss_type", "orpo"],
                                      "recipe 'sapo-dpo' needs a reference loss"),
    "zero_temperature": (["--temperature", "0"], "temperature must be > 0, got 0.0"),
    "top_p_above_one": (["--top_p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    "negative_top_k": (["--top_k", "-1"], "top_k must be >= 0, got -1"),
    "zero_token_generate_length": (["--token_generate_length", "0"], "token_generate_length must be >= 1, got 0"),
    "zero_replay_buffer": (["--max_replay_buffer_size", "0"], "max_replay_buffer_size must be >= 1, got 0"),
    "zero_generation_batch_size": (["--generation_batch_size", "0"], "generation_batch_size must be >= 1 or unset"),
    "label_smoothing_too_large": (["--label_smoothing", "0.9"], "label_smoothing must be in [0, 0.5], got 0.9"),
    "label_smoothing_with_ipo": (["--loss_type", "ipo", "--label_smoothing", "0.1"],
                                 "label_smoothing is only defined for loss_type 'sigmoid', not 'ipo'"),
    "nll_weight_with_orpo": (["--recipe", "sapo-orpo", "--nll_weight", "1"],
                             "nll_weight must be >= 0 and only added to a loss without its own NLL term"),
    "negative_nll_weight": (["--nll_weight", "-0.5"], "nll_weight must be >= 0"),
    "nll_weight_with_sft": (["--recipe", "sft", "--nll_weight", "1"],
                            "nll_weight adds an NLL term to a preference loss; recipe 'sft'"),
    "unknown_generation_engine": (["--generation_engine", "vllm"], "generation_engine must be one of"),
    "unknown_copies_dtype": (["--copies_dtype", "int8"], "copies_dtype must be one of auto, bfloat16"),
    "unknown_prompt_truncation": (["--prompt_truncation", "right"], "prompt_truncation must be one of left, drop"),
    "negative_seed": (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
    "adam_beta1_above_one": (["--adam_beta1", "1.5"], "adam_beta1 must be in [0, 1), got 1.5"),
    "negative_adam_epsilon": (["--adam_epsilon", "-1"], "adam_epsilon must be >= 0, got -1.0"),
    "negative_weight_decay": (["--weight_decay", "-0.1"], "weight_decay must be >= 0, got -0.1"),
    "max_steps_minus_five": (["--max_steps", "-5"],
                             "max_steps must be > 0, or -1 to train num_train_epochs epochs; got -5"),
    "negative_max_grad_norm": (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0 (0 disables clipping), got -1.0"),
    "token_generate_length_above_max_length": (["--token_generate_length", "65"],
                                               "token_generate_length (65) must be at most max_length (64)"),
    "token_generate_length_of_a_billion": (["--token_generate_length", "1000000000"],
                                           "token_generate_length (1000000000) must be at most max_length (64)"),
    "zero_epochs": (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0 when max_steps"),
    "zero_save_steps": (["--save_strategy", "steps", "--save_steps", "0"],
                        "save_steps must be > 0 with save_strategy 'steps', got 0.0"),
    "zero_logging_steps": (["--logging_steps", "0"], "requires non-zero --logging_steps"),
    "negative_warmup": (["--warmup_steps", "-1"], "warmup_steps >= 0"),
    "negative_dataloader_workers": (["--dataloader_num_workers", "-1"], "dataloader_num_workers must be >= 0"),
    "unknown_dtype": (["--dtype", "foo"], "--dtype 'foo': must be one of auto, float32, bfloat16, float16"),
    "mistyped_float": (["--beta", "abc"], "sapo train: argument --beta: invalid float value: 'abc'"),
    "float_for_an_integer": (["--max_steps", "2.5"], "argument --max_steps/--max-steps: invalid int value: '2.5'"),
    "unknown_optimizer": (["--optim", "adamw_magic"], "argument --optim: invalid choice: 'adamw_magic'"),
    "unknown_scheduler": (["--lr_scheduler_type", "zigzag"], "invalid choice: 'zigzag'"),
    "not_a_boolean": (["--skip_invalid", "maybe"],
                      "argument --skip_invalid/--skip-invalid: Truthy value expected: got maybe"),
    "empty_output_dir": (["--output_dir", ""], "--output_dir is empty"),
    "eval_strategy_without_eval_data": (["--eval_strategy", "steps", "--eval_steps", "1"],
                                        "eval_strategy 'steps' evaluates on held-out data, but no eval data was "
                                        "given: pass eval_dataset= to SAPOTrainer (--eval_dataset_name FILE"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configuration(capsys, scene, case):
    extra, message = CONFIG_CASES[case]
    refused(capsys, scene, lambda s: s.train(*extra), message)


COMMAND_CASES = {
    "no_model": (lambda s: [a for a in s.train() if a != str(s.model_dir) and a != "--model_name_or_path"],
                 "--model_name_or_path is required"),
    "no_dataset": (lambda s: [a for a in s.train() if a != str(s.data) and a != "--dataset_name"],
                   "--dataset_name is required"),
    "unknown_command": (lambda s: ["trian", *s.train()[1:]], "unknown command 'trian'; did you mean 'train'?"),
    "report_to_an_unknown_integration": (lambda s: s.train("--report_to", "carrier_pigeon"),
                                         "carrier_pigeon"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_CASES))
def test_bad_command(capsys, scene, case):
    build, message = COMMAND_CASES[case]
    refused(capsys, scene, build, message)


def test_report_to_an_integration_that_is_not_installed(capsys, scene):
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    missing = sorted(set(INTEGRATION_TO_CALLBACK) - set(get_available_reporting_integrations()) - {"kubeflow"})
    if not missing:
        pytest.skip("every reporting integration is installed here")
    refused(capsys, scene, lambda s: s.train("--report_to", missing[0]),
            f"--report_to {missing[0]}: the {missing[0]} package is not installed")


# ------------------------------------------------------------------------------------------------
# YAML config files
# ------------------------------------------------------------------------------------------------

YAML_CASES = {
    "list_for_a_number": ("learning_rate: [1, 2]\n", "run.yaml: option 'learning_rate' expects a number, got [1, 2]"),
    "mapping_for_a_number": ("max_steps: {a: 1}\n", "run.yaml: option 'max_steps' expects an integer, got {'a': 1}"),
    "fraction_for_an_integer": ("seed: 2.5\n", "run.yaml: option 'seed' expects an integer, got 2.5"),
    "token_generate_length_8_7": ("token_generate_length: 8.7\n",
                                  "run.yaml: option 'token_generate_length' expects an integer or null, got 8.7"),
    "text_for_a_number": ("beta: high\n", "run.yaml: option 'beta' expects a number or null, got 'high'"),
    "boolean_for_an_integer": ("max_steps: true\n", "run.yaml: option 'max_steps' expects an integer, got True"),
    "null_for_a_number": ("learning_rate:\n", "run.yaml: option 'learning_rate' expects a number, got None"),
    "list_for_a_boolean": ("use_cpu: [yes]\n", "run.yaml: option 'use_cpu' expects true/false, got [True]"),
    "text_for_a_boolean": ("skip_invalid: maybe\n", "run.yaml: option 'skip_invalid' expects true/false, got 'maybe'"),
    "number_for_lora_targets": ("lora_target_modules: [q_proj, 5]\n",
                                "run.yaml: option 'lora_target_modules' expects a list of strings or null"),
    "mapping_for_a_string": ("recipe: {name: sapo}\n", "run.yaml: option 'recipe' expects a string"),
    "unknown_choice": ("optim: adamw_magic\n", "run.yaml: option 'optim': 'adamw_magic' is not one of"),
    "nan_learning_rate": ("learning_rate: .nan\n",
                          "learning_rate must be a finite number, got nan (set in {tmp}/run.yaml: learning_rate)"),
    "quoted_negative_learning_rate": ("learning_rate: '-1'\n",
                                      "learning_rate must be >= 0, got -1.0 (set in {tmp}/run.yaml: learning_rate)"),
    "misspelled_option": ("bta: 0.1\n", "run.yaml: unknown option 'bta'; did you mean 'beta'?"),
    "config_inside_config": ("config: other.yaml\n", "run.yaml: option 'config' cannot be set inside a config file"),
    "empty_file": ("", "run.yaml: the file sets no options"),
    "comments_only": ("# nothing here\n", "run.yaml: the file sets no options"),
    "a_list": ("- beta: 0.1\n", "run.yaml: expected a mapping of option: value, got a YAML list"),
    "a_scalar": ("beta\n", "run.yaml: expected a mapping of option: value, got a YAML string"),
    "syntax_error": ("beta: [0.1\n", "run.yaml: invalid YAML"),
    "tab_indentation": ("beta:\n\t0.1\n", "run.yaml: invalid YAML"),
    "deeply_nested": ("beta: " + "[" * 5000 + "]" * 5000 + "\n", "run.yaml: invalid YAML (nested too deeply)"),
    "value_out_of_range": ("ema_beta: 2\n", "ema_beta must be in [0, 1], got 2 (set in {tmp}/run.yaml: ema_beta)"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_bad_yaml_config(capsys, scene, case):
    text, message = YAML_CASES[case]
    err = refused(capsys, scene, lambda s: s.yaml(text), message)
    if "run.yaml" in message:
        assert str(scene.tmp / "run.yaml") in err


YAML_FILE_CASES = {
    "missing": (lambda s: s.train("--config", str(s.tmp / "nope.yaml")), "--config {tmp}/nope.yaml: no such file"),
    "a_directory": (lambda s: s.train("--config", str(s.tmp)), "is a directory, not a YAML file"),
    "not_utf8": (lambda s: s.train("--config", str(s.file("run.yaml", b"beta: 0.1\nrun_name: caf\xe9\n"))),
                 "{tmp}/run.yaml:2: not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(YAML_FILE_CASES))
def test_bad_yaml_file(capsys, scene, case):
    build, message = YAML_FILE_CASES[case]
    refused(capsys, scene, build, message)


# ------------------------------------------------------------------------------------------------
# Model and tokenizer directories
# ------------------------------------------------------------------------------------------------


def pickle_weights(path: Path) -> None:
    import torch

    (path / "model.safetensors").unlink()

    class Payload:  # what a malicious pickle would run on loading
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model.embed_tokens.weight": Payload()}, path / "pytorch_model.bin")


def custom_code(path: Path) -> None:
    edit_json(path / "config.json", model_type="my_custom_lm",
              auto_map={"AutoConfig": "modeling.MyConfig", "AutoModelForCausalLM": "modeling.MyModel"})


def shard_missing(path: Path) -> None:
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


MODEL_CASES = {
    "missing_directory": (lambda s: s.train(model=s.tmp / "nope"),
                          "--model_name_or_path {tmp}/nope: no such directory"),
    "a_file": (lambda s: s.train(model=s.data), "--model_name_or_path {data}: is a file; expected a model directory"),
    "empty_directory": (lambda s: (s.tmp / "empty").mkdir() or s.train(model=s.tmp / "empty"),
                        "{tmp}/empty: directory has no model (config.json missing)"),
    "invalid_config_json": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_text('{"a": 1,\n}'))),
                            "{tmp}/model/config.json:2: invalid JSON"),
    "config_json_not_an_object": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_text("[]"))),
                                  "{tmp}/model/config.json: expected a JSON object, got list"),
    "config_json_not_utf8": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_bytes(
        b'{"\xff": 1}'))),
                             "{tmp}/model/config.json: not valid UTF-8"),
    "config_without_model_type": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_text("{}"))),
                                  "{tmp}/model/config.json: no 'model_type' key"),
    "unknown_model_type": (lambda s: s.train(model=s.model(lambda p: edit_json(p / "config.json", model_type="zork"))),
                           "{tmp}/model: cannot read the model's configuration"),
    "truncated_safetensors": (lambda s: s.train(model=s.model(lambda p: truncate(p / "model.safetensors"))),
                              "{tmp}/model: cannot load the model's weights (SafetensorError"),
    "garbage_safetensors": (lambda s: s.train(model=s.model(lambda p: (p / "model.safetensors").write_bytes(
        b"\0" * 64))),
                            "the weights file is truncated or corrupt"),
    "no_weights": (lambda s: s.train(model=s.model(lambda p: (p / "model.safetensors").unlink())),
                   "{tmp}/model: has config.json but no weights"),
    "index_lists_a_missing_shard": (lambda s: s.train(model=s.model(shard_missing)),
                                    "model.safetensors.index.json: lists 1 shard file(s) that are missing: "
                                    "model-00002-of-00002.safetensors"),
    "custom_code_without_trust": (lambda s: s.train(model=s.model(custom_code)),
                                  "{tmp}/model: the model's code ships with the checkpoint (config.json 'auto_map'"),
    "custom_code_trusted_but_absent": (lambda s: s.train("--trust_remote_code", model=s.model(custom_code)),
                                       "{tmp}/model: cannot read the model's configuration"),
    "pickle_refused_by_the_safe_loader": (lambda s: s.train(model=s.model(pickle_weights)),
                                          "pytorch_model.bin is a pickle that torch's safe loader (weights_only) "
                                          "refuses"),
    "weights_of_another_size": (lambda s: s.train(model=s.model(lambda p: edit_json(p / "config.json",
                                                                                    vocab_size=200))),
                                "{tmp}/model: cannot load the model's weights"),
    "weights_missing_layers": (lambda s: s.train(model=s.model(lambda p: edit_json(p / "config.json",
                                                                                   num_hidden_layers=3))),
                               "{tmp}/model: the weights lack 9 parameter(s) the config.json architecture needs"),
    "bert_encoder": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_text(json.dumps(
        {"model_type": "bert", "vocab_size": 107, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 64})))), "model_type 'bert' (BertConfig) is a bidirectional encoder"),
    "t5_encoder_decoder": (lambda s: s.train(model=s.model(lambda p: (p / "config.json").write_text(json.dumps(
        {"model_type": "t5", "vocab_size": 107, "d_model": 32})))),
        "model_type 't5' (T5Config) is not a causal language model"),
    "lora_adapters_only": (lambda s: s.train(model=s.model(lambda p: ((p / "config.json").unlink(),
                                                                       (p / "adapter_config.json").write_text("{}")))),
                           "directory holds LoRA adapters only (adapter_config.json, no config.json)"),
    "empty_chat_template_file": (lambda s: s.train(model=s.model(lambda p: (p / "chat_template.jinja").write_text(""))),
                                 "{tmp}/model/chat_template.jinja: the tokenizer's chat template is empty"),
    "weights_file_is_a_directory": (lambda s: s.train(model=s.model(lambda p: ((p / "model.safetensors").unlink(),
                                                                             (p / "model.safetensors").mkdir()))),
                                    "{tmp}/model/model.safetensors: is a directory, not a weights file"),
    "corrupt_generation_config": (lambda s: s.train(model=s.model(lambda p: (p / "generation_config.json").write_text(
        '{"eos_token_id": 2,'))), "{tmp}/model/generation_config.json:1: invalid JSON"),
    "corrupt_tokenizer_config": (lambda s: s.train(model=s.model(lambda p: (p / "tokenizer_config.json").write_text(
        "{oops"))), "{tmp}/model/tokenizer_config.json:1: invalid JSON"),
    "eos_outside_the_vocabulary": (lambda s: s.train(model=s.model(lambda p: edit_json(p / "config.json",
                                                                                      eos_token_id=107))),
                                   "config.json eos_token_id 107 is not a token of the model ({tmp}/model)"),
    "model_directory_is_a_symlink_loop": (lambda s: (os.symlink(s.tmp / "m2", s.tmp / "m1"),
                                                     os.symlink(s.tmp / "m1", s.tmp / "m2"),
                                                     s.train(model=s.tmp / "m1"))[2],
                                          "--model_name_or_path {tmp}/m1: is a symbolic link loop"),
    "max_length_beyond_the_positions": (lambda s: s.train(model=s.model(lambda p: edit_json(
        p / "config.json", max_position_embeddings=32))), "max_length 64 is longer than the model ({tmp}/model) was "
                                        "built for: its max_position_embeddings is 32"),
    "tokenizer_missing": (lambda s: s.train("--tokenizer_name_or_path", str(s.tmp / "tok")),
                          "--tokenizer_name_or_path {tmp}/tok: no such directory"),
    "tokenizer_a_file": (lambda s: s.train("--tokenizer_name_or_path", str(s.data)), "is a file; expected a directory"),
    "tokenizer_directory_without_files": (lambda s: (s.tmp / "tok").mkdir() or s.train(
        "--tokenizer_name_or_path", str(s.tmp / "tok")), "directory holds no tokenizer (none of tokenizer.json"),
    "corrupt_tokenizer_json": (lambda s: s.train(model=s.model(lambda p: (p / "tokenizer.json").write_text("{nope"))),
                               "{tmp}/model: cannot load the tokenizer"),
    "tokenizer_without_eos": (lambda s: s.train(model=s.model(lambda p: edit_json(p / "tokenizer_config.json",
                                                                                  eos_token=None))),
                              "the tokenizer ({tmp}/model) has no EOS token"),
    "tokenizer_larger_than_the_embedding": (lambda s: s.train("--tokenizer_name_or_path", str(bigger_tokenizer(s))),
                                            "tokens but the model ({model}) embeds only 107"),
}


def bigger_tokenizer(s: Scene) -> Path:
    from sapo import tiny

    tiny.build_tokenizer(extra_text="äöüßéèêëàáâãåæçìíîïñòóôõø").save_pretrained(s.tmp / "tok")
    return s.tmp / "tok"


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_or_tokenizer(capsys, scene, case):
    build, message = MODEL_CASES[case]
    err = refused(capsys, scene, build, message)
    assert "code ran" not in err


@pytest.fixture()
def unreachable_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no_cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_hub_id_with_no_network_fails_at_once(capsys, scene, unreachable_hub):
    refused(capsys, scene, lambda s: s.train(model="someorg/somemodel"),
            "--model_name_or_path someorg/somemodel: no such local directory, and as a hub id: not in the local "
            "Hugging Face cache, and 127.0.0.1 cannot be reached")


def test_hub_id_while_offline(capsys, scene, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(scene.tmp / "no_cache"))
    refused(capsys, scene, lambda s: s.train("--tokenizer_name_or_path", "someorg/sometokenizer"),
            "--tokenizer_name_or_path someorg/sometokenizer: no such local directory, and as a hub id: not in the "
            "local Hugging Face cache, and HF_HUB_OFFLINE is set")


# ------------------------------------------------------------------------------------------------
# Chat templates and LoRA
# ------------------------------------------------------------------------------------------------

REFUSING_TEMPLATE = "{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('no users here') }}" \
                    "{% endif %}{{ m.content }}{% endfor %}"

TEMPLATE_CASES = {
    "jinja_syntax_error": (lambda s: s.train("--chat_template", "{% for m in messages %}{{ m.content }"),
                           "chat_template: Jinja syntax error at line 1 of the template: unexpected '}'"),
    "unclosed_block": (lambda s: s.train("--chat_template", "{% for m in messages %}{{ m.content }}"),
                       "chat_template: Jinja syntax error at line 1"),
    "syntax_error_in_a_file": (lambda s: s.train("--chat_template", str(s.file("t.jinja", "{{ messages }}\n{% if %}"))),
                               "chat_template: Jinja syntax error at line 2"),
    "unknown_name_or_missing_file": (lambda s: s.train("--chat_template", "chatml2"),
                                     "chat_template: 'chatml2' is neither a file, a built-in name (chatml) nor"),
    "template_file_not_utf8": (lambda s: s.train("--chat_template", str(s.file("t.jinja", b"{{ m }}\xff"))),
                               "chat_template: {tmp}/t.jinja: not valid UTF-8"),
    "template_refusing_a_record": (lambda s: s.train("--chat_template", REFUSING_TEMPLATE),
                                   "{data}:1: the chat template refuses this record (no users here)"),
    "broken_template_of_the_tokenizer": (
        lambda s: s.train(model=s.model(lambda p: (p / "chat_template.jinja").write_text("{% if messages %}"))),
        "the tokenizer's own chat template (pass --chat_template to replace it): Jinja syntax error"),
    "tokenizer_without_a_template": (lambda s: s.train(model=s.model(lambda p: (p / "chat_template.jinja").unlink())),
                                     ("{data}:1: the record is conversational (field 'messages' holds chat "
                                      "messages) and the tokenizer (",
                                      "has no chat template to render it: pass --chat_template chatml")),
    "template_rendering_the_prompt_differently": (
        lambda s: s.train("--chat_template", "{% for m in messages %}{% if loop.last %}LAST{% endif %}{{ m.content }}"
                                             "{% endfor %}{% if add_generation_prompt %}>{% endif %}"),
        "{data}:1: the chat template renders the prompt differently when the response follows it"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
def test_bad_chat_template(capsys, scene, case):
    build, message = TEMPLATE_CASES[case]
    refused(capsys, scene, build, *([message] if isinstance(message, str) else message))


LORA_CASES = {
    "target_that_does_not_exist": (["--lora_target_modules", "attention_qkv"],
                                   "--lora_target_modules attention_qkv: Target modules {'attention_qkv'} not found"),
    "target_peft_cannot_adapt": (["--lora_target_modules", "input_layernorm"],
                                 "--lora_target_modules input_layernorm: Target module LlamaRMSNorm"),
    "zero_rank": (["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
    "dropout_of_one": (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1), got 1.0"),
    "zero_alpha": (["--lora_alpha", "0"], "--lora_alpha must be > 0, got 0"),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_bad_lora_settings(capsys, scene, case):
    extra, message = LORA_CASES[case]
    err = refused(capsys, scene, lambda s: s.train("--use_peft", *extra), message)
    if "Target" in message:
        assert "the model's linear layers: down_proj, gate_proj, k_proj" in err


# ------------------------------------------------------------------------------------------------
# Output directories and filesystems
# ------------------------------------------------------------------------------------------------

OUTPUT_CASES = {
    "output_dir_is_a_file": (lambda s: s.train("--output_dir", str(s.data)), "output_dir {data}: is a file, not a"),
    "output_dir_under_a_file": (lambda s: s.train("--output_dir", str(s.data / "run")),
                                "output_dir {data}/run: cannot be created, {data} is a file"),
    "output_dir_deep_under_a_file": (lambda s: s.train("--output_dir", str(s.data / "a" / "b")),
                                     "cannot be created, {data} is a file"),
    "output_dir_a_broken_symlink": (lambda s: (os.symlink(s.tmp / "gone", s.tmp / "link"),
                                               s.train("--output_dir", str(s.tmp / "link")))[1],
                                    "output_dir {tmp}/link: is a broken symbolic link, not a directory"),
    "output_dir_name_too_long": (lambda s: s.train("--output_dir", str(s.tmp / ("a" * 300))),
                                 "output_dir {tmp}/" + "a" * 300 + ": too long for its file system"),
    "output_dir_in_a_symlink_loop": (lambda s: (os.symlink(s.tmp / "loop", s.tmp / "loop"),
                                                s.train("--output_dir", str(s.tmp / "loop" / "run")))[1],
                                     "output_dir {tmp}/loop/run: its path runs into a loop of symbolic links"),
    "output_dir_not_empty": (lambda s: (s.file("out/old.txt", "x"), s.train())[1],
                             "output_dir {out} is not empty; pass --overwrite_output_dir"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_bad_output_dir(capsys, scene, case):
    build, message = OUTPUT_CASES[case]
    refused(capsys, scene, build, message)


@pytest.fixture()
def tmpfs(tmp_path):
    """`mount(size, read_only)`: a small tmpfs under tmp_path (needs root; skips where mounting is not allowed)."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            point.rmdir()
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip() or result.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def fill(directory: Path) -> None:
    """Write until the filesystem is full."""
    handle = open(directory / "filler", "wb")  # noqa: SIM115 (closing a file on a full disk raises too)
    try:
        while True:
            handle.write(b"\0" * 4096)
            handle.flush()
    except OSError:
        pass
    with contextlib.suppress(OSError):
        handle.close()


def test_read_only_filesystem(capsys, scene, tmpfs):
    read_only = tmpfs("64k", read_only=True)
    refused(capsys, scene, lambda s: s.train("--output_dir", str(read_only / "run")),
            f"output_dir {read_only}/run: {read_only} is on a read-only filesystem")


def test_full_filesystem(capsys, scene, tmpfs):
    full = tmpfs("1m")
    fill(full)
    refused(capsys, scene, lambda s: s.train("--output_dir", str(full / "run")),
            f"output_dir {full}/run: its filesystem has ", "the final model alone needs about 288.0 KiB")


def test_filesystem_too_small_for_the_model(capsys, scene, tmpfs):
    small = tmpfs("200k")
    refused(capsys, scene, lambda s: s.train("--output_dir", str(small / "run")),
            f"output_dir {small}/run: its filesystem has 200.0 KiB free")


def test_directory_without_write_permission(capsys, scene):
    if os.geteuid() == 0:
        pytest.skip("root writes regardless of permissions (the read-only filesystem case covers root)")
    locked = scene.tmp / "locked"
    locked.mkdir(mode=0o555)
    try:
        refused(capsys, scene, lambda s: s.train("--output_dir", str(locked / "run")),
                f"output_dir {locked}/run: {locked} is not writable")
    finally:
        locked.chmod(0o755)


def test_file_size_limit_below_the_weights(tmp_path, model_dir):
    """A full disk simulated another way (for machines where mounting a tmpfs is not allowed): a file size limit
    (ulimit -f) smaller than the weights file, in a child process so the limit cannot touch the test runner."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY)); "
            "from sapo.cli import main; sys.exit(main(sys.argv[1:]))")
    argv = Scene(tmp_path, model_dir).train()
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sapo: error: ")]
    assert len(errors) == 1
    assert f"output_dir {tmp_path}/out: this process may write files of at most 64.0 KiB (ulimit -f)" in errors[0]
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Launchers and resuming (input validation only)
# ------------------------------------------------------------------------------------------------

LAUNCHER_CASES = {
    "fsdp_in_a_single_process": (lambda s: s.train("--fsdp", "full_shard"),
                                 "cannot set up training: Using fsdp only works in distributed training"),
    "fsdp_config_missing": (lambda s: s.train("--fsdp_config", str(s.tmp / "fsdp.json")),
                            "--fsdp_config {tmp}/fsdp.json: no such file"),
    "fsdp_config_invalid": (lambda s: s.train("--fsdp_config", str(s.file("fsdp.json", "{\n'v': 2}"))),
                            "--fsdp_config {tmp}/fsdp.json:2: invalid JSON"),
    "deepspeed_config_missing": (lambda s: s.train("--deepspeed", str(s.tmp / "ds.json")),
                                 "--deepspeed {tmp}/ds.json: no such file"),
    "deepspeed_config_invalid": (lambda s: s.train("--deepspeed", str(s.file("ds.json", "{oops"))),
                                 "--deepspeed {tmp}/ds.json:1: invalid JSON"),
    "accelerator_config_missing": (lambda s: s.train("--accelerator_config", str(s.tmp / "acc.json")),
                                   "--accelerator_config {tmp}/acc.json: no such file"),
    "unknown_ddp_backend": (lambda s: s.train("--ddp_backend", "carrier"),
                            "argument --ddp_backend/--ddp-backend: invalid choice: 'carrier'"),
}

RESUME_CASES = {
    "checkpoint_missing": (lambda s: s.train("--resume_from_checkpoint", str(s.tmp / "checkpoint-9")),
                           "{tmp}/checkpoint-9: checkpoint directory not found"),
    "checkpoint_is_a_file": (lambda s: s.train("--resume_from_checkpoint", str(s.data)),
                             "--resume_from_checkpoint {data}: is a file, not a checkpoint directory"),
    "resume_true_without_checkpoints": (lambda s: s.train("--resume_from_checkpoint", "true"),
                                        "resume_from_checkpoint=true but {out} has no checkpoint"),
    "not_a_sapo_checkpoint": (lambda s: (s.file("checkpoint-3/readme.txt", "x"),
                                         s.train("--resume_from_checkpoint", str(s.tmp / "checkpoint-3")))[1],
                              "{tmp}/checkpoint-3: not a complete sapo checkpoint"),
}


@pytest.mark.parametrize("case", sorted(LAUNCHER_CASES))
def test_bad_launcher_settings(capsys, scene, case):
    build, message = LAUNCHER_CASES[case]
    refused(capsys, scene, build, message)


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_bad_resume_input(capsys, scene, case):
    build, message = RESUME_CASES[case]
    refused(capsys, scene, build, message)


# ------------------------------------------------------------------------------------------------
# sapo eval, sapo plot, sapo inspect
# ------------------------------------------------------------------------------------------------

JUDGE = "def judge(prompt, response, record):\n    return 1.0\n"

EVAL_CASES = {
    "no_arguments": (lambda s: ["eval"], "sapo eval: the following arguments are required: MODEL_DIR"),
    "missing_model_dir": (lambda s: ["eval", str(s.tmp / "nope"), "--suite", "heldout"], "{tmp}/nope: no such model"),
    "model_dir_is_a_file": (lambda s: ["eval", str(s.data), "--suite", "heldout"], "{data}: is a file, not a model"),
    "directory_without_a_model": (lambda s: ["eval", str(s.tmp), "--suite", "heldout"],
                                  "{tmp}: directory has no model (config.json missing)"),
    "same_model_twice": (lambda s: ["eval", str(s.model_dir), str(s.model_dir), "--suite", "heldout"],
                         "the same MODEL_DIR is given twice"),
    "neither_data_nor_suite": (lambda s: ["eval", str(s.model_dir)], "give exactly one of --data FILE and --suite"),
    "both_data_and_suite": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--data", str(s.data)],
                            "give exactly one of --data FILE and --suite"),
    "unknown_suite": (lambda s: ["eval", str(s.model_dir), "--suite", "hard"], "argument --suite: invalid choice"),
    "zero_prompts": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--n", "0"], "--n must be >= 1, got 0"),
    "zero_batch_size": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--batch_size", "0"],
                        "--batch_size must be >= 1, got 0"),
    "sampling_at_zero_temperature": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--sample",
                                                "--temperature", "0"], "--sample needs --temperature > 0"),
    "missing_data_file": (lambda s: ["eval", str(s.model_dir), "--data", str(s.tmp / "nope.jsonl")],
                          "{tmp}/nope.jsonl: no such file or directory"),
    "bad_record": (lambda s: ["eval", str(s.model_dir), "--data", str(s.file("e.jsonl", jsonl(GOOD, {"x": 1})))],
                   "{tmp}/e.jsonl:2: record has none of the supported fields"),
    "judge_without_function": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge", "sapo.tasks"],
                               "--judge 'sapo.tasks': expected module:function"),
    "judge_module_missing": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge", "nomodule_x:f"],
                             "--judge 'nomodule_x:f': cannot import module 'nomodule_x'"),
    "judge_file_missing": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge",
                                      f"{s.tmp}/judge.py:judge"], "no such file"),
    "judge_file_failing_on_import": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge",
                                                f"{s.file('judge.py', 'import no_such_helper_x')}:judge"],
                                     "importing", "failed (ModuleNotFoundError: No module named 'no_such_helper_x')"),
    "judge_not_callable": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge",
                                      f"{s.file('judge.py', JUDGE + 'SCALE = 2')}:SCALE"], "'SCALE' is a int"),
    "judge_attribute_missing": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--judge",
                                           f"{s.file('judge.py', JUDGE)}:score"], "has no attribute 'score'"),
    "output_under_a_file": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--output",
                                       str(s.data / "report.json")], "--output {data}/report.json: cannot be created"),
    "output_is_a_directory": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--output", str(s.tmp)],
                              "--output {tmp}: is a directory"),
    "unknown_device": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--n", "2", "--device", "gpu0"],
                       "--device 'gpu0': not a device name"),
    "truncated_weights": (lambda s: ["eval", str(s.model(lambda p: truncate(p / "model.safetensors"))), "--suite",
                                     "heldout", "--n", "2", "--quiet"], "{tmp}/model: cannot load the model"),
    "broken_chat_template": (lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--n", "2", "--quiet",
                                        "--chat_template", "{% if x %}"], "chat_template: Jinja syntax error"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_bad_eval_input(capsys, scene, case):
    build, *messages = EVAL_CASES[case]
    refused(capsys, scene, build, *messages)


def test_eval_on_a_machine_without_cuda(capsys, scene):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, scene, lambda s: ["eval", str(s.model_dir), "--suite", "heldout", "--device", "cuda"],
            "--device cuda: CUDA is not available on this machine")


METRICS_ROW = {"step": 1, "loss": 0.5}

PLOT_CASES = {
    "no_arguments": (lambda s: ["plot"], "sapo plot: the following arguments are required: RUN_DIR"),
    "missing_run": (lambda s: ["plot", str(s.tmp / "run")], "{tmp}/run/metrics.jsonl: no such file"),
    "empty_metrics": (lambda s: ["plot", str(s.file("run/metrics.jsonl", "").parent)], "metrics.jsonl: is empty"),
    "no_training_rows": (lambda s: ["plot", str(s.file("run/metrics.jsonl", jsonl({"step": 1})).parent)],
                         "has no training rows"),
    # a damaged line is not refused: sapo.metrics.read_metrics drops it with a warning (tests/test_metrics.py)
    "out_is_a_file": (lambda s: ["plot", str(s.file("run/metrics.jsonl", jsonl(METRICS_ROW)).parent), "--out",
                                 str(s.data)], "--out {data}: is a file"),
    "out_under_a_file": (lambda s: ["plot", str(s.file("run/metrics.jsonl", jsonl(METRICS_ROW)).parent), "--out",
                                    str(s.data / "plots")], "--out {data}/plots: cannot be created"),
}

INSPECT_CASES = {
    "no_arguments": (lambda s: ["inspect"], "sapo inspect: the following arguments are required: path"),
    "missing_path": (lambda s: ["inspect", str(s.tmp / "run")], "{tmp}/run: no such file"),
    "negative_limit": (lambda s: ["inspect", str(s.tmp), "--limit", "-1"], "argument --limit"),
    "directory_without_a_buffer": (lambda s: ["inspect", str(s.file("run/sapo_state/x.txt", "x").parent)],
                                   "no replay buffer for rank 0 (no replay buffer files there)"),
    "corrupt_buffer_file": (lambda s: ["inspect", str(s.file("replay_buffer_rank0.safetensors", b"\0" * 32))],
                            "replay_buffer_rank0.safetensors: not a readable SAPO replay buffer"),
    "html_under_a_file": (lambda s: ["inspect", str(s.tmp), "--html", str(s.data / "page.html")],
                          "--html {data}/page.html: cannot be created"),
}


@pytest.mark.parametrize("case", sorted(PLOT_CASES))
def test_bad_plot_input(capsys, scene, case):
    build, message = PLOT_CASES[case]
    refused(capsys, scene, build, message)


@pytest.mark.parametrize("case", sorted(INSPECT_CASES))
def test_bad_inspect_input(capsys, scene, case):
    build, message = INSPECT_CASES[case]
    refused(capsys, scene, build, message)


# ------------------------------------------------------------------------------------------------
# Beyond the tables
# ------------------------------------------------------------------------------------------------


def test_checkpoint_from_another_run_and_existing_output_untouched(tmp_path, capsys, model_dir):
    from sapo import tiny

    scene = Scene(tmp_path, model_dir)
    other = tmp_path / "other_model"
    tokenizer = tiny.build_tokenizer()
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=48), tokenizer, other)
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl(*[{"messages": r["messages"]} for r in tasks.make_suite(8, 0)["train"]]))
    first = tmp_path / "first"
    assert main([*scene.train("--output_dir", str(first), "--save_strategy", "steps", "--save_steps", "2",
                              model=other)]) == 0
    capsys.readouterr()
    err = run_failing(capsys, scene.train("--resume_from_checkpoint", str(first / "checkpoint-2")))
    assert "written by another run: parameter" in err
    assert not (tmp_path / "out").exists()
    before = snapshot(first)
    err = run_failing(capsys, scene.train("--output_dir", str(first)))
    assert "is not empty; pass --overwrite_output_dir" in err
    assert snapshot(first) == before


def test_debug_shows_the_exception(tmp_path, model_dir):
    from sapo.data import DataError

    with pytest.raises(DataError):
        main(["train", "--debug", "--dataset_name", str(tmp_path / "missing.jsonl"), "--model_name_or_path",
              str(model_dir), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(DataError):  # --debug before the command works too
        main(["--debug", "train", "--dataset_name", str(tmp_path / "missing.jsonl"), "--model_name_or_path",
              str(model_dir), "--output_dir", str(tmp_path / "o")])


def test_skip_invalid_drops_and_counts(tmp_path, model_dir, caplog):
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(8, 0)["train"]]
    scene = Scene(tmp_path, model_dir)
    data = scene.file("data.jsonl", jsonl(rows[0], "{broken", {"text": "no fields"}, "[" * 100_000, *rows[1:]))
    with caplog.at_level(logging.WARNING):
        assert main(scene.train("--skip_invalid", data=data)) == 0
    assert "dropped 3 invalid record(s)" in caplog.text and "kept 8" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_static_engine_refuses_unsupported_generation_config_before_training(capsys, scene):
    from transformers import GenerationConfig

    def no_repeat_ngram(path):
        config = GenerationConfig.from_pretrained(path)
        config.no_repeat_ngram_size = 3
        config.save_pretrained(path)

    refused(capsys, scene, lambda s: s.train("--generation_engine", "static", model=s.model(no_repeat_ngram)),
            "generation_engine 'static'", "no_repeat_ngram_size=3")


def test_judge_file_runs_with_its_folder_on_sys_path(tmp_path, monkeypatch):
    """`--judge file.py:fn` executes the file (docs/guides/faq.md), with its folder importable for helpers beside it."""
    from sapo.judging import load_judge

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "judge_helpers_x.py").write_text("def score():\n    return 0.5\n")
    (tmp_path / "my_judge.py").write_text("from judge_helpers_x import score\n\n"
                                          "def judge(prompt, response, record):\n    return score()\n")
    assert load_judge(f"{tmp_path / 'my_judge.py'}:judge")("p", "r", {}) == 0.5
    assert not (tmp_path / "__pycache__").exists()
    monkeypatch.delitem(sys.modules, "judge_helpers_x")


def test_corpus_size():
    tables = (DATA_CASES, DATA_SOURCE_CASES, CONFIG_CASES, COMMAND_CASES, YAML_CASES, YAML_FILE_CASES, MODEL_CASES,
              TEMPLATE_CASES, LORA_CASES, OUTPUT_CASES, LAUNCHER_CASES, RESUME_CASES, EVAL_CASES, PLOT_CASES,
              INSPECT_CASES)
    assert sum(map(len, tables)) >= 100
