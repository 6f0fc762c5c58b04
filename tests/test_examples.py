"""Every examples/*.yaml is a valid `sapo train --config` file (keys and values), without downloading anything."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest import mock

import pytest
import transformers.training_args

from sapo.cli import build_train_parser, known_option_names, parse_train_args, read_yaml_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))

# Settings each example promises in its name and comments (the paper's, for the 7B/8B ones).
EXPECTED = {
    "mistral-7b-sapo-dpo.yaml": {
        "model_name_or_path": "wandb/mistral-7b-zephyr-sft",
        "dataset_name": "argilla/distilabel-capybara-dpo-7k-binarized",
        "learning_rate": 5e-7, "optim": "rmsprop", "lr_scheduler_type": "linear", "warmup_steps": 0.1,
        "num_train_epochs": 4, "per_device_train_batch_size": 8, "max_length": 2048, "max_prompt_length": 1792,
        "beta": 0.1, "loss_type": "sigmoid", "token_generate_length": 256, "ema_beta": 0.5,
        "max_replay_buffer_size": 2000, "bf16": True, "activation_checkpointing": True, "ref_update_mode": "ema",
    },
    "llama3-8b-sapo-orpo.yaml": {
        "model_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "dataset_name": "argilla/distilabel-capybara-dpo-7k-binarized",
        "learning_rate": 5e-6, "optim": "adamw_bnb_8bit", "lr_scheduler_type": "inverse_sqrt", "warmup_steps": 100,
        "loss_type": "orpo", "beta": 0.05, "chat_template": "chatml", "num_train_epochs": 4,
        "per_device_train_batch_size": 8, "max_length": 2048, "max_prompt_length": 1792,
        "token_generate_length": 256, "ema_beta": 0.5, "max_replay_buffer_size": 2000, "bf16": True,
        "activation_checkpointing": True,
    },
    "lora-single-gpu.yaml": {"use_peft": True, "lora_r": 16, "ref_update_mode": "fixed", "bf16": True,
                             "activation_checkpointing": True},
    "demo.yaml": {"model_name_or_path": "runs/demo/sft", "use_cpu": True, "bf16": False},
}


def _value(model_args, config, name: str):
    value = getattr(model_args, name) if hasattr(model_args, name) else getattr(config, name)
    return getattr(value, "value", value)  # enums (optim, lr_scheduler_type) compare by their string


def test_examples_are_present() -> None:
    assert {p.name for p in CONFIGS} >= set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_is_a_valid_config(path: Path) -> None:
    parser = build_train_parser()
    values = read_yaml_config(str(path), known_option_names(parser))  # unknown keys raise
    assert values, f"{path.name} sets nothing"
    # bf16 is validated against the local hardware; the GPU examples are checked here on any machine.
    with mock.patch.object(transformers.training_args, "is_torch_bf16_gpu_available", return_value=True), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_args, config = parse_train_args(["--config", str(path)])
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not deprecated, f"{path.name} uses a deprecated option: {deprecated}"
    assert model_args.model_name_or_path and model_args.dataset_name and config.output_dir
    for name, value in values.items():  # every key in the file reaches the parsed configuration
        expected = [] if (name, value) == ("report_to", "none") else value  # TrainingArguments' normal form
        assert _value(model_args, config, name) == expected, name
    for name, value in EXPECTED.get(path.name, {}).items():
        assert _value(model_args, config, name) == value, name


ACCELERATE_CONFIGS = {  # file: (engine flags accelerate launch derives, ZeRO stage or FSDP version)
    "ddp-8gpu.yaml": {"use_deepspeed": False, "use_fsdp": False},
    "zero2-8gpu.yaml": {"use_deepspeed": True, "use_fsdp": False, "zero_stage": 2},
    "zero3-8gpu.yaml": {"use_deepspeed": True, "use_fsdp": False, "zero_stage": 3},
    "fsdp2-8gpu.yaml": {"use_deepspeed": False, "use_fsdp": True, "fsdp_version": 2},
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_launches_eight_processes_with_its_engine(name: str, monkeypatch) -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = EXAMPLES / "accelerate" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "sapo.cli", "train"])
    args = _validate_launch_command(args)[0]
    assert args.num_processes == 8 and args.num_machines == 1 and args.mixed_precision == "bf16"
    for field, value in ACCELERATE_CONFIGS[name].items():
        assert getattr(args, field) == value, field
    if args.use_fsdp:  # what the launched processes' accelerate will read
        env = prepare_multi_gpu_env(args)
        assert env["FSDP_VERSION"] == "2" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert "sapo.cli train" in path.read_text()  # the file says how to launch sapo with it


def test_paper_example_points_at_the_zero3_config() -> None:
    text = (EXAMPLES / "mistral-7b-sapo-dpo.yaml").read_text()
    assert "examples/accelerate/zero3-8gpu.yaml" in text


# Hub-sized settings each example needs changed to train a tiny local model on a CPU (besides helpers'
# TINY_TRAIN_FLAGS): bitsandbytes' 8-bit AdamW is a GPU optimizer.
CPU_STAND_INS = {"llama3-8b-sapo-orpo.yaml": ["--optim", "adamw_torch"]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_trains_on_a_cpu_with_tiny_sizes(path: Path, tmp_path, model_dir, capsys) -> None:
    """Each example as documented (`sapo train --config examples/X.yaml`), only its model, data and sizes
    swapped for a tiny local model and 2 CPU steps: every other setting of the file (loss, LoRA, schedule,
    activation checkpointing, chat template) runs."""
    from helpers import TINY_TRAIN_FLAGS, write_preference_records

    from sapo.cli import main

    settings = read_yaml_config(str(path), known_option_names(build_train_parser()))
    if settings.get("use_peft"):
        pytest.importorskip("peft")
    data = write_preference_records(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = ["train", "--config", str(path), "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
            "--output_dir", str(out), *TINY_TRAIN_FLAGS, *CPU_STAND_INS.get(path.name, [])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]  # no deprecated spelling
    weights = "adapter_model.safetensors" if settings.get("use_peft") else "model.safetensors"
    assert (out / weights).exists() and (out / "ema").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
