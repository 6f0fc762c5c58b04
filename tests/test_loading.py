"""`sapo.loading`, the one loader: `sapo train`, `sapo eval` (evaluation.load_model) and `SAPOTrainer(model=...)`
refuse the same broken model directories with the same message, and check model instances passed in as well."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import pytest

from sapo import evaluation, tiny
from sapo.cli import main
from sapo.config import SAPOConfig
from sapo.errors import DataError, UsageError
from sapo.trainer import SAPOTrainer

RECORDS = [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}] * 4


def config(tmp_path: Path, **overrides) -> SAPOConfig:
    return helpers.config(tmp_path / "out", **{"max_steps": 1, "per_device_train_batch_size": 2, **overrides})


def copy_model(model_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def train_argv(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return ["train", "--dataset_name", str(data), "--model_name_or_path", str(model), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48", "--use_cpu",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


@pytest.fixture()
def small_embedding_dir(tmp_path, tokenizer) -> Path:
    """A model that embeds 87 rows beside the 107-token tokenizer it is saved with (issue 22 item 11)."""
    model = tiny.build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    model.resize_token_embeddings(87)
    directory = tmp_path / "small"
    tiny.save_pair(model, tokenizer, directory)
    return directory


def test_every_loader_refuses_a_model_smaller_than_its_tokenizer(capsys, tmp_path, tokenizer, small_embedding_dir):
    expected = f"has {len(tokenizer)} tokens but the model ({small_embedding_dir}) embeds only 87"
    assert expected in cli_error(capsys, train_argv(tmp_path, small_embedding_dir))
    with pytest.raises(UsageError, match=r"embeds only 87"):
        evaluation.load_model(str(small_embedding_dir))
    with pytest.raises(UsageError, match=r"embeds only 87"):
        SAPOTrainer(model=str(small_embedding_dir), args=config(tmp_path), train_dataset=RECORDS)
    assert not (tmp_path / "out").exists()


def test_a_model_instance_is_checked_against_its_tokenizer(tmp_path, tokenizer):
    model = tiny.build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2)
    model.resize_token_embeddings(87)
    with pytest.raises(UsageError, match=r"the model \(the model passed in\) embeds only 87"):
        SAPOTrainer(model=model, args=config(tmp_path), train_dataset=RECORDS, processing_class=tokenizer)


def test_a_reference_of_another_vocabulary_is_refused(tmp_path, tokenizer, model_dir, small_embedding_dir):
    with pytest.raises(UsageError, match=r"embeds only 87"):
        SAPOTrainer(model=str(model_dir), ref_model=str(small_embedding_dir), train_dataset=RECORDS,
                    args=config(tmp_path, recipe="sapo-dpo", ref_update_mode="fixed"))


def test_an_out_of_vocabulary_eos_in_generation_config_is_refused(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    edit_json(model / "generation_config.json", eos_token_id=[2, 500])
    err = cli_error(capsys, train_argv(tmp_path, model))
    assert "generation_config eos_token_id [2, 500] is not a token of the model" in err
    assert "embeds ids 0..106" in err
    with pytest.raises(UsageError, match="generation_config eos_token_id"):
        SAPOTrainer(model=str(model), args=config(tmp_path), train_dataset=RECORDS)


def test_max_length_beyond_the_models_positions_is_refused(capsys, tmp_path, tokenizer):
    directory = tmp_path / "short"
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2,
                                    max_position_embeddings=32), tokenizer, directory)
    err = cli_error(capsys, train_argv(tmp_path, directory))
    assert "max_length 64 is longer than the model" in err and "max_position_embeddings is 32" in err
    with pytest.raises(UsageError, match="max_position_embeddings is 32"):
        SAPOTrainer(model=str(directory), args=config(tmp_path), train_dataset=RECORDS)


def test_an_empty_chat_template_file_is_refused_before_the_weights_load(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    (model / "chat_template.jinja").write_text("\n")
    (model / "model.safetensors").write_bytes(b"\0" * 64)  # would fail if the weights were read first
    err = cli_error(capsys, train_argv(tmp_path, model))
    assert f"{model}/chat_template.jinja: the tokenizer's chat template is empty" in err
    with pytest.raises(UsageError, match="chat template is empty"):
        SAPOTrainer(model=str(model), args=config(tmp_path), train_dataset=RECORDS)
    with pytest.raises(UsageError, match="chat template is empty"):
        evaluation.load_model(str(model))
    assert not (tmp_path / "out").exists()


def test_an_empty_chat_template_file_is_fine_when_replaced(tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    (model / "chat_template.jinja").write_text("")
    trainer = SAPOTrainer(model=str(model), args=config(tmp_path), train_dataset=RECORDS, chat_template="chatml")
    assert trainer.processing_class.chat_template.startswith("{%")


def test_a_tokenizer_instance_with_an_empty_template_is_refused(tmp_path, tiny_model, tokenizer):
    import copy

    blank = copy.deepcopy(tokenizer)
    blank.chat_template = "  "
    with pytest.raises(DataError, match="the tokenizer's chat template is empty"):
        SAPOTrainer(model=tiny_model, args=config(tmp_path), train_dataset=RECORDS, processing_class=blank)


def test_a_template_rendering_the_prompt_as_no_tokens_names_the_record(capsys, tmp_path, model_dir):
    err = cli_error(capsys, train_argv(tmp_path, model_dir, "--chat_template",
                                       "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}"
                                       "{% endif %}{% endfor %}"))
    assert "data.jsonl:1: the chat template renders the prompt as no tokens" in err


@pytest.mark.parametrize(("name", "content", "message"), [
    ("generation_config.json", "{oops", "generation_config.json:1: invalid JSON"),
    ("generation_config.json", '{"temperature": "hot"}', "generation_config.json: not a valid generation config"),
    ("tokenizer_config.json", '{"eos_token": "</s>",\n}', "tokenizer_config.json:2: invalid JSON"),
    ("tokenizer_config.json", "[]", "tokenizer_config.json: expected a JSON object, got list"),
])
def test_corrupt_side_files_are_refused_with_file_and_reason(capsys, tmp_path, model_dir, name, content, message):
    model = copy_model(model_dir, tmp_path)
    (model / name).write_text(content)
    assert message in cli_error(capsys, train_argv(tmp_path, model))
    with pytest.raises(UsageError, match=message.split(":")[0]):
        evaluation.load_model(str(model))


def test_weights_file_that_is_a_directory_is_named_so(capsys, tmp_path, model_dir):
    model = copy_model(model_dir, tmp_path)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").mkdir()
    err = cli_error(capsys, train_argv(tmp_path, model))
    assert f"{model}/model.safetensors: is a directory, not a weights file" in err
    assert "without an index" not in err


def test_python_api_path_gets_the_cli_checks(tmp_path, model_dir):
    """What only the CLI checked before (weights that do not fit config.json) now holds for model=path too."""
    model = copy_model(model_dir, tmp_path)
    edit_json(model / "config.json", num_hidden_layers=3)
    with pytest.raises(UsageError, match="the weights lack 9 parameter"):
        SAPOTrainer(model=str(model), args=config(tmp_path), train_dataset=RECORDS)
    edit_json(model / "config.json", num_hidden_layers=2, model_type=None)
    (model / "config.json").write_text(json.dumps({k: v for k, v in json.loads((model / "config.json").read_text())
                                                   .items() if k != "model_type"}))
    with pytest.raises(UsageError, match="no 'model_type' key"):
        SAPOTrainer(model=str(model), args=config(tmp_path), train_dataset=RECORDS)


def test_a_model_instance_without_processing_class_gets_the_tokenizer_it_was_loaded_with(tmp_path, model_dir):
    """TRL's habit: SAPOTrainer(model=<loaded model>) looks the tokenizer up from the model's name_or_path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SAPOTrainer(model=model, args=config(tmp_path), train_dataset=RECORDS)
    assert trainer.processing_class.name_or_path == str(model_dir)
    assert trainer.processing_class.pad_token_id is not None  # prepared like a tokenizer loaded by sapo train


def test_a_model_built_in_memory_without_processing_class_is_refused_with_why(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="pass processing_class .*name_or_path is empty"):
        SAPOTrainer(model=tiny_model, args=config(tmp_path), train_dataset=RECORDS)


def test_a_looked_up_tokenizer_that_is_missing_is_named(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config._name_or_path = str(tmp_path / "gone")
    with pytest.raises(UsageError, match=r"processing_class \(looked up from the model's name_or_path\) .*gone"):
        SAPOTrainer(model=model, args=config(tmp_path), train_dataset=RECORDS)
