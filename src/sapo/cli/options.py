"""`sapo train`'s options: every `SAPOConfig`/`TrainingArguments` field as a flag of the same name, the model
and data arguments (`ModelArguments`), a YAML config file checked against them, and the model loading options."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import errno
import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sapo.errors import USER_ERRORS, UsageError, describe_unusable_path
from sapo.errors import one_paragraph as _one_paragraph
from sapo.trl_compat import TRL_FIELDS, refusal, translate_options

EXIT_USAGE = 2
DTYPES = ("auto", "float32", "bfloat16", "float16")
FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                     errno.ENAMETOOLONG}


@dataclass
class ModelArguments:
    """Where the model and data come from; everything else lives in SAPOConfig."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "SFT checkpoint: a local directory or a hub id (required)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub id; default: model_name_or_path."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Demonstrations: a .jsonl/.json/.parquet file, a local directory or a hub dataset "
                  "name (required)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out demonstrations for evaluation during training (eval_strategy, eval_steps): a "
                  "file, directory or hub dataset name, in any format of dataset_name."},
    )
    eval_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template: a Jinja string, a file holding one, or 'chatml'; needed for "
                  "conversational data (message lists) when the tokenizer has none. Plain-text data (strings) trains "
                  "on the raw text and uses no template."},
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype when loading: auto, float32, bfloat16 or float16."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation to load the model with (eager, sdpa, flash_attention_2, ...); "
                  "default: transformers' choice. Goes into model_init_kwargs."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the checkpoint directory/hub (off by default)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: all linear layers)."}
    )


def build_train_parser():
    """`HfArgumentParser` over (ModelArguments, SAPOConfig), plus `--config` and `--debug`."""
    from transformers import HfArgumentParser

    from sapo.config import SAPOConfig

    parser = HfArgumentParser((ModelArguments, SAPOConfig), prog="sapo train",
                              description="Train a causal LM with SAPO on demonstrations. Errors are reported in one "
                              "paragraph; add --debug (before or after `train`) to see Python tracebacks.")
    parser.add_argument("--config", default=None, help="YAML file of any options below; flags override it.")
    return parser


def known_option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions}


def read_yaml_config(path: str, known: set[str], parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Load a YAML mapping of options, rejecting unknown keys with the closest known name and values of the wrong
    type (checked against the options' dataclass types, naming the file, the option and the value)."""
    import difflib

    file = Path(path)
    if describe_unusable_path(file):
        raise UsageError(f"--config {path}: {describe_unusable_path(file)}, not a YAML file")
    if file.is_dir():
        raise UsageError(f"--config {path}: is a directory, not a YAML file")
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = file.read_bytes()[: error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 (byte {error.start} of the file)") from None
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read ({error.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
    except RecursionError:
        raise UsageError(f"{path}: invalid YAML (nested too deeply)") from None
    if values is None:
        raise UsageError(f"{path}: the file sets no options (expected a mapping of option: value)")
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got a YAML {_yaml_kind(values)}")
    try:  # a TRL config: its names and forms become sapo's, or are refused by name (sapo.trl_compat)
        values = translate_options(values)
    except ValueError as error:
        raise UsageError(f"{path}: {error}") from None
    for key in values:
        if key in ("config", "help"):
            raise UsageError(f"{path}: option {key!r} cannot be set inside a config file")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{path}: unknown option {key!r}{hint}")
    if parser is None:
        return values
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    hints = option_types()
    return {key: _typed_yaml_value(path, key, value, hints.get(key), actions.get(key))
            for key, value in values.items()}


def _yaml_kind(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def option_types() -> dict[str, Any]:
    """Every option's declared type, from the dataclasses `sapo train` parses."""
    from sapo.config import SAPOConfig

    hints: dict[str, Any] = {}
    for cls in (ModelArguments, SAPOConfig):
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in dataclasses.fields(cls) if f.init})
    return hints


_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


def _typed_yaml_value(path: str, key: str, value: Any, hint: Any, action: argparse.Action | None) -> Any:
    """`value` checked against the option's type `hint` and converted where YAML's reading differs (a quoted number,
    `no` read as false for a strategy); anything else raises `UsageError` with the file, the option and the value."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    members = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    expected: list[str] = []
    for member in members:
        ok, converted, description = _fits(value, member)
        if ok:
            if action is not None and action.choices and isinstance(converted, str) \
                    and converted not in {str(getattr(c, "value", c)) for c in action.choices}:
                choices = ", ".join(str(getattr(c, "value", c)) for c in action.choices)
                raise UsageError(f"{path}: option {key!r}: {converted!r} is not one of {choices}")
            return converted
        if description and description not in expected:
            expected.append(description)
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise UsageError(f"{path}: option {key!r} expects {' or '.join(expected)}, got {shown} "
                     f"(a YAML {_yaml_kind(value)})")


def _fits(value: Any, member: Any) -> tuple[bool, Any, str]:
    """(whether `value` is acceptable as type `member`, the value to use, what `member` accepts in words)."""
    origin = typing.get_origin(member) or member
    if member is type(None):
        return value is None, None, "null"
    if member is bool:
        if isinstance(value, bool):
            return True, value, "true/false"
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return True, value.lower() in _TRUE, "true/false"
        return False, None, "true/false"
    if member is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return True, int(value), "an integer"
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return True, int(value.strip()), "an integer"
        return False, None, "an integer"
    if member is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return True, value, "a number"
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return True, float(value), "a number"
        return False, None, "a number"
    if member is str or (isinstance(member, type) and issubclass(member, enum.Enum)):
        if isinstance(value, str):
            return True, value, "a string"
        if isinstance(value, bool):  # YAML 1.1 reads `no`/`yes`/`on`/`off` as booleans
            is_strategy = isinstance(member, type) and issubclass(member, enum.Enum) and \
                "no" in {m.value for m in member}
            if is_strategy and value is False:
                return True, "no", "a string"
            return member is str, "true" if value else "false", "a string"
        if isinstance(value, (int, float)) and member is str:
            return True, str(value), "a string"
        return False, None, "a string"
    if origin is typing.Literal:
        allowed = typing.get_args(member)
        return value in allowed and type(value) in {type(a) for a in allowed}, value, \
            " or ".join(repr(a) for a in allowed)
    if origin is list:
        (item_type,) = typing.get_args(member) or (str,)
        if isinstance(value, str):
            return True, [value], "a list"
        if isinstance(value, list):
            item_is_str = item_type is str or (isinstance(item_type, type) and issubclass(item_type, enum.Enum))
            if all(isinstance(item, str) for item in value) or not item_is_str:
                return True, value, "a list of strings" if item_is_str else "a list"
        return False, None, "a list of strings" if item_type is str else "a list"
    if origin is dict:
        return isinstance(value, Mapping), value, "a mapping"
    if isinstance(member, type):
        return isinstance(value, member), value, ""
    return True, value, ""


def parse_train_args(argv: Sequence[str]) -> tuple[Any, Any]:
    import re

    parser = build_train_parser()
    pre, _ = parser.parse_known_args(argv)
    from_yaml: dict[str, Any] = {}
    if pre.config:
        from_yaml = read_yaml_config(pre.config, known_option_names(parser), parser)
        parser.set_defaults(**from_yaml)
        pre, _ = parser.parse_known_args(argv)
    _check_config_files(pre)
    try:
        model_args, config, _, rest = parser.parse_args_into_dataclasses(args=list(argv),
                                                                         return_remaining_strings=True)
    except USER_ERRORS:
        raise
    except Exception as error:  # SAPOConfig/TrainingArguments validation (ValueError mostly; accelerate's checks)
        message = _one_paragraph(error)
        flags = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
        named = [name for name in from_yaml if name not in flags and re.search(rf"\b{name}\b", message)]
        where = f" (set in {pre.config}: {', '.join(named)})" if named else ""
        raise UsageError(f"invalid configuration: {message}{where}") from error
    if rest:
        trl = [name for name in (arg.split("=")[0].lstrip("-") for arg in rest if arg.startswith("--"))
               if name in TRL_FIELDS]
        if trl:
            raise UsageError(f"unknown option --{trl[0]}: {refusal(trl[0])}")
        raise UsageError(f"unknown option(s): {' '.join(rest)} (see `sapo train --help`)")
    check_model_arguments(model_args)
    return model_args, config


def _check_config_files(namespace: argparse.Namespace) -> None:
    """Options that name a JSON file (or take inline JSON): a missing or unreadable file is named here, with the
    option, instead of surfacing as a bare FileNotFoundError from inside TrainingArguments."""
    for name in ("deepspeed", "fsdp_config", "accelerator_config"):
        value = getattr(namespace, name, None)
        if not isinstance(value, str) or value.lstrip().startswith("{") or not value:
            continue
        file = Path(value)
        if not file.exists() and name == "deepspeed" and not value.endswith(".json"):
            continue  # TrainingArguments also takes a base64-encoded config here
        if not file.is_file():
            raise UsageError(f"--{name} {value}: no such file" + (" (it is a directory)" if file.is_dir() else ""))
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, RecursionError) as error:
            raise UsageError(f"--{name} {value}: not a JSON file ({type(error).__name__})") from None
        except json.JSONDecodeError as error:
            raise UsageError(f"--{name} {value}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") \
                from None


def check_model_arguments(model_args: ModelArguments) -> None:
    """ModelArguments' own values (SAPOConfig checks its fields itself)."""
    if model_args.dtype not in DTYPES:
        raise UsageError(f"--dtype {model_args.dtype!r}: must be one of {', '.join(DTYPES)}")
    for name in ("model_name_or_path", "tokenizer_name_or_path", "dataset_name", "eval_dataset_name", "chat_template"):
        if getattr(model_args, name) is not None and not str(getattr(model_args, name)).strip():
            raise UsageError(f"--{name} is empty")
    for name in ("dataset_split", "eval_split"):
        if not getattr(model_args, name).strip():
            raise UsageError(f"--{name} is empty")
    if model_args.lora_r < 1:
        raise UsageError(f"--lora_r must be >= 1, got {model_args.lora_r}")
    if not (math.isfinite(model_args.lora_alpha) and model_args.lora_alpha > 0):
        raise UsageError(f"--lora_alpha must be > 0, got {model_args.lora_alpha}")
    if not 0.0 <= model_args.lora_dropout < 1.0:
        raise UsageError(f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    targets = model_args.lora_target_modules
    if targets is not None and (not targets or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise UsageError(f"--lora_target_modules must name one or more modules, got {targets!r}")


# ------------------------------------------------------------------------------------------------
# Model and tokenizer sources
# ------------------------------------------------------------------------------------------------


# from_pretrained arguments `sapo train` passes itself: set through its own options, not model_init_kwargs
_LOADER_OWNED = {"trust_remote_code": "--trust_remote_code", "config": None, "output_loading_info": None}


def model_init_kwargs(model_args: ModelArguments, from_config: dict[str, Any] | None) -> dict[str, Any]:
    """`model_init_kwargs` (YAML or flag) with --dtype and --attn_implementation added, as TRL's scripts build them.
    A key given both ways is refused, naming both, rather than one silently winning."""
    merged = dict(from_config or {})
    for key, option in _LOADER_OWNED.items():
        if key in merged:
            instead = f"; use {option}" if option else ""
            raise UsageError(f"model_init_kwargs {key!r}: `sapo train` sets it itself{instead}")
    options = {"dtype": None if model_args.dtype == "auto" else model_args.dtype,
               "attn_implementation": model_args.attn_implementation}
    for key, value in options.items():
        if value is None:
            continue
        if key in merged:
            raise UsageError(f"--{key} {value} and model_init_kwargs {{{key!r}: {merged[key]!r}}} both set the "
                             f"model's {key}; set it in one place")
        merged[key] = value
    return merged


def load_model_and_tokenizer(model_args: ModelArguments, init_kwargs: dict[str, Any] | None = None,
                             max_length: int | None = None, check_tokenizer: Callable[[Any], None] | None = None):
    """`sapo train`'s model and prepared tokenizer, loaded by `sapo.loading` (the one loader) with `init_kwargs`
    (see `model_init_kwargs`) and the --trust_remote_code, --tokenizer_name_or_path and --chat_template options."""
    from sapo import loading

    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required")
    init_kwargs = model_init_kwargs(model_args, None) if init_kwargs is None else init_kwargs
    return loading.load_model_and_tokenizer(
        model_args.model_name_or_path, tokenizer_path=model_args.tokenizer_name_or_path,
        chat_template=model_args.chat_template, max_length=max_length,
        init_kwargs={**init_kwargs, "trust_remote_code": model_args.trust_remote_code}, check_tokenizer=check_tokenizer)


def apply_lora(model: Any, model_args: ModelArguments) -> Any:
    """The model wrapped with LoRA adapters, a LoRA target that matches nothing (or a layer peft cannot adapt)
    reported with the option, the value and the model's linear layers."""
    from torch import nn

    from sapo.loading import with_lora

    try:
        return with_lora(model, lora_config(model_args))
    except (ValueError, TypeError) as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, nn.Linear)})
        raise UsageError(f"--lora_target_modules {' '.join(model_args.lora_target_modules or ['all-linear'])}: "
                         f"{_one_paragraph(error, 300)} (the model's linear layers: {', '.join(linear)})") \
            from error


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules or "all-linear"
    if targets == ["all-linear"]:  # TRL's scripts' value; peft reads it only as a string (a list names modules)
        targets = "all-linear"
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------
# Output directory
# ------------------------------------------------------------------------------------------------
