"""`sapo.trl_compat`: every field of TRL's installed DPOConfig/ORPOConfig (and its scripts' ModelConfig and
ScriptArguments) is taken, mapped or refused by name, and a TRL user's YAML goes through `sapo train`'s parsing."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import warnings

import pytest
import yaml
from transformers import TrainingArguments

from sapo import tasks
from sapo.cli import build_train_parser, known_option_names, main, parse_train_args
from sapo.errors import UsageError
from sapo.trl_compat import MAPPED, REFUSED, TAKEN, TRL_CLASSES, TRL_FIELDS, translate_options

INHERITED = {f.name for f in dataclasses.fields(TrainingArguments)}


def trl_class(module: str, name: str) -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(importlib.import_module(module), name)


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a TRL class adds to TrainingArguments (SAPOConfig inherits the rest as TRL's configs do)."""
    return [f for f in dataclasses.fields(cls) if f.name not in INHERITED]


def default_of(item: dataclasses.Field):
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


@pytest.fixture(scope="module")
def sapo_options() -> set[str]:
    return known_option_names(build_train_parser())


@pytest.mark.parametrize(("module", "name"), TRL_CLASSES)
def test_every_field_of_the_installed_trl_class_is_classified(module, name):
    """Fails when TRL adds a field the table does not classify (or the class moves)."""
    missing = [f.name for f in own_fields(trl_class(module, name)) if f.name not in TRL_FIELDS]
    assert not missing, f"{module}.{name} fields missing from sapo.trl_compat.TRL_FIELDS: {missing}"


def test_the_table_agrees_with_sapos_options(sapo_options):
    """Taken fields are sapo options of the same name; mapped and refused ones are not (or the table is stale)."""
    for name, entry in TRL_FIELDS.items():
        assert entry.kind in (TAKEN, MAPPED, REFUSED)
        if entry.kind == TAKEN:
            assert name in sapo_options, name
        elif name != "loss_type":  # loss_type is sapo's name too; only TRL's list form is mapped
            assert name not in sapo_options, f"{name} is a sapo option now: classify it as taken"
        if entry.kind == REFUSED:
            assert entry.note, name


@pytest.mark.parametrize(("module", "name"), TRL_CLASSES)
def test_trls_defaults_of_refused_fields_mean_off_and_are_accepted(module, name):
    for item in own_fields(trl_class(module, name)):
        entry = TRL_FIELDS[item.name]
        if entry.kind == REFUSED:
            assert translate_options({item.name: default_of(item)}) == {}, item.name


@pytest.mark.parametrize("name", sorted(n for n, e in TRL_FIELDS.items() if e.kind == REFUSED))
def test_a_refused_field_set_to_something_else_names_the_field_and_what_to_do(name):
    with pytest.raises(ValueError) as error:
        translate_options({name: "on"})
    assert str(error.value).startswith(f"{name} 'on' is a TRL setting sapo does not take: ")
    assert TRL_FIELDS[name].note in str(error.value)


def write_config(tmp_path, values: dict) -> str:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n"
                            for r in tasks.make_suite(8, 0, seed=1)["train"]))
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path), "dataset_name": str(data),
                                    "output_dir": str(tmp_path / "out"), "use_cpu": True, **values}))
    return str(path)


def trl_defaults() -> dict:
    """What a TRL user's YAML holds for the non-TrainingArguments fields, at TRL's own defaults: DPOConfig's and
    ORPOConfig's as `to_dict()` writes them, and the scripts' ModelConfig and ScriptArguments."""
    values: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, name in TRL_CLASSES:
            cls = trl_class(module, name)
            if issubclass(cls, TrainingArguments):
                written = cls(use_cpu=True, bf16=False).to_dict()
                values.update({f.name: written[f.name] for f in own_fields(cls)})
            else:
                values.update({f.name: default_of(f) for f in own_fields(cls)})
    return {key: value for key, value in values.items() if key not in ("model_name_or_path", "dataset_name")}


def test_a_yaml_of_trls_defaults_goes_through_sapo_train_parsing(tmp_path):
    values = trl_defaults()
    assert values["loss_type"] == ["sigmoid"] and "lora_task_type" in values and "dtype" in values
    model_args, config = parse_train_args(["--config", write_config(tmp_path, values)])
    assert config.loss_type == "sigmoid" and config.beta == 0.1 and config.max_length == 1024
    assert model_args.dtype == "float32" and model_args.use_peft is False and model_args.lora_r == 16


def test_trl_habits_in_a_yaml_are_translated(tmp_path):
    values = {"loss_type": ["ipo"], "torch_dtype": "bfloat16", "lora_task_type": "CAUSAL_LM", "use_peft": True,
              "lora_r": 8, "dataset_train_split": "train", "model_revision": "v2", "dataset_num_proc": 4,
              "model_init_kwargs": {"attn_implementation": "eager"}}
    model_args, config = parse_train_args(["--config", write_config(tmp_path, values)])
    assert config.loss_type == "ipo" and model_args.dtype == "bfloat16" and model_args.use_peft
    assert model_args.dataset_split == "train" and model_args.lora_r == 8
    assert config.model_init_kwargs == {"attn_implementation": "eager", "revision": "v2"}


@pytest.mark.parametrize(("values", "weight"), [
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, 0.5),
    ({"loss_type": ["sft", "hinge"]}, 1.0),  # TRL's loss_weights default: every loss at 1
    ({"loss_type": "sigmoid", "rpo_alpha": 0.3}, 0.3),  # TRL < 1.0's name
])
def test_rpo_as_trl_writes_it_is_sapos_nll_weight(tmp_path, values, weight):
    _, config = parse_train_args(["--config", write_config(tmp_path, values)])
    assert config.nll_weight == weight and config.loss_type in ("sigmoid", "hinge")


@pytest.mark.parametrize(("values", "message"), [
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}, "give loss_weights with sigmoid at 1 "
                                                                    "(e.g. nll_weight 0.25 for the same ratio)"),
    ({"loss_type": ["sigmoid", "ipo"]}, "sapo trains with one loss, got loss_type"),
    ({"loss_type": ["orpo", "sft"]}, "nll_weight must be >= 0 and only added to a loss without its own NLL"),
    ({"lora_task_type": "SEQ_CLS"}, "lora_task_type 'SEQ_CLS' is a TRL setting sapo does not take: sapo trains "
                                    "causal LMs"),
    ({"sync_ref_model": True}, "sync_ref_model True is a TRL setting sapo does not take: TR-DPO"),
    ({"torch_dtype": "float16", "dtype": "bfloat16"}, "dtype and torch_dtype both set dtype"),
])
def test_trl_settings_sapo_cannot_take_are_refused_by_name(tmp_path, values, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_train_args(["--config", write_config(tmp_path, values)])


@pytest.mark.parametrize(("flag", "message"), [
    ("--torch_dtype", "unknown option --torch_dtype: torch_dtype is TRL's setting, in a config file read as dtype"),
    ("--lora_task_type", "unknown option --lora_task_type: lora_task_type is a TRL setting sapo does not take"),
])
def test_trl_flags_get_their_hint_not_a_close_name(tmp_path, capsys, flag, message):
    config = write_config(tmp_path, {})
    assert main(["train", "--config", config, flag, "float32"]) == 2
    err = capsys.readouterr().err
    assert message in err and "did you mean" not in err


def test_the_docs_table_of_trl_fields_is_current():
    from pathlib import Path

    from sapo.trl_compat import trl_fields_markdown

    page = (Path(__file__).parents[1] / "docs" / "coming-from-trl.md").read_text()
    start, end = "<!-- trl-fields:start -->\n", "<!-- trl-fields:end -->"
    section = page[page.index(start) + len(start):page.index(end)]
    assert section.strip() == trl_fields_markdown().strip(), (
        "docs/coming-from-trl.md is stale: run `.venv/bin/python scripts/update_config_reference.py`")
