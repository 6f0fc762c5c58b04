"""Command line: `sapo train` (YAML config + flags, like TRL's scripts) and `sapo demo`.

Every `SAPOConfig`/`TrainingArguments` field is a flag of the same name, so `--help` documents all of
them and a YAML file may set any of them; flags given on the command line override the file.
Expected failures (bad data, bad config) print one paragraph and exit with status 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import errno
import json
import logging
import math
import numbers
import os
import shlex
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sapo.errors import USER_ERRORS, TrainingStopped, UsageError, describe_unusable_path
from sapo.errors import one_paragraph as _one_paragraph
from sapo.loading import (  # noqa: F401  (re-exported: these lived here before sapo.loading)
    TOKENIZER_FILES,
    WEIGHT_FILES,
    check_model_source,
    check_tokenizer_source,
)

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
        metadata={"help": "Chat template: a Jinja string, a file holding one, or 'chatml'; needed when the "
                  "tokenizer has none."},
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
                             max_length: int | None = None):
    """`sapo train`'s model and prepared tokenizer, loaded by `sapo.loading` (the one loader) with `init_kwargs`
    (see `model_init_kwargs`) and the --trust_remote_code, --tokenizer_name_or_path and --chat_template options."""
    from sapo import loading

    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required")
    init_kwargs = model_init_kwargs(model_args, None) if init_kwargs is None else init_kwargs
    return loading.load_model_and_tokenizer(
        model_args.model_name_or_path, tokenizer_path=model_args.tokenizer_name_or_path,
        chat_template=model_args.chat_template, max_length=max_length,
        init_kwargs={**init_kwargs, "trust_remote_code": model_args.trust_remote_code})


def apply_lora(model: Any, model_args: ModelArguments) -> Any:
    """The model wrapped with LoRA adapters, a LoRA target that matches nothing (or a layer peft cannot adapt)
    reported with the option, the value and the model's linear layers."""
    from peft import get_peft_model
    from torch import nn

    try:
        return get_peft_model(model, lora_config(model_args))
    except (ValueError, TypeError) as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, nn.Linear)})
        raise UsageError(f"--lora_target_modules {' '.join(model_args.lora_target_modules or ['all-linear'])}: "
                         f"{_one_paragraph(error, 300)} (the model's linear layers: {', '.join(linear)})") \
            from error


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=model_args.lora_target_modules or "all-linear", task_type="CAUSAL_LM")


# ------------------------------------------------------------------------------------------------
# Output directory
# ------------------------------------------------------------------------------------------------


def check_output_location(out: Path, *, needed_bytes: int = 0, largest_file: int = 0) -> None:
    """Refuse, before anything is created, an output_dir that is a file, lies under a file, sits on a read-only
    filesystem or one without room for the final model (`needed_bytes`), or where this process may not write a file
    as large as `largest_file` (ulimit -f: the write would kill the run with SIGXFSZ)."""
    if str(out) in ("", "."):
        raise UsageError("--output_dir is empty; name the directory to train into")
    try:
        os.lstat(out)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise UsageError(f"output_dir {out}: too long for its file system (a name in it, or the whole path; "
                             "ENAMETOOLONG); choose a shorter --output_dir") from None
        if error.errno == errno.ELOOP:
            raise UsageError(f"output_dir {out}: its path runs into a loop of symbolic links") from None
    if os.path.lexists(out) and not out.is_dir():
        kind = "a broken symbolic link" if out.is_symlink() and not out.exists() else "a file"
        raise UsageError(f"output_dir {out}: is {kind}, not a directory")
    existing = out
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output_dir {out}: cannot be created, {existing} is a file")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UsageError(f"output_dir {out}: {existing} is on a read-only filesystem")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output_dir {out}: {existing} is not writable (permission denied)")
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        raise UsageError(f"output_dir {out}: its filesystem has {_size(free)} free, and the final model alone needs "
                         f"about {_size(needed_bytes)}; free some space or choose another --output_dir")
    try:
        import resource
    except ImportError:  # not on Unix
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < largest_file:
        raise UsageError(f"output_dir {out}: this process may write files of at most {_size(limit)} (ulimit -f), "
                         f"and the model's weights file needs {_size(largest_file)}; raise the limit")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _check_report_to(config: Any) -> None:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    for name in config.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise UsageError(f"--report_to {name}: unknown integration; use none or one of "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in available:
            raise UsageError(f"--report_to {name}: the {name} package is not installed (pip install it, or pass "
                             "--report_to none)")


def _check_resume_path(resume: str | None) -> None:
    if not resume or resume.lower() in ("true", "false"):
        return
    path = Path(resume)
    if not path.exists():
        raise UsageError(f"{resume}: checkpoint directory not found")
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume}: is a file, not a checkpoint directory")


def run_train(argv: Sequence[str]) -> int:
    from sapo.data import load_examples
    from sapo.heldout import check_eval_data, read_eval_records
    from sapo.run.lock import check_output_dir, first_missing, remove_if_created_empty
    from sapo.run.outdir import refuse_inputs_in_output_dir
    from sapo.trainer import SAPOTrainer

    model_args, config = parse_train_args(argv)
    resume = config.resume_from_checkpoint
    _check_resume_path(resume)
    out = Path(config.output_dir)
    check_output_location(out)
    refuse_inputs_in_output_dir(out, {name: getattr(model_args, name) for name in (
        "model_name_or_path", "tokenizer_name_or_path", "dataset_name", "eval_dataset_name", "chat_template")})
    check_output_dir(out, resuming=bool(resume) and resume.lower() != "false",
                     overwrite=config.overwrite_output_dir)
    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required")
    if model_args.dataset_name is None:
        raise UsageError("--dataset_name is required (a .jsonl/.json/.parquet file, directory or hub name)")
    check_eval_data(config, model_args.eval_dataset_name)
    weights = check_model_source(model_args.model_name_or_path, "model_name_or_path",
                                 trust_remote_code=model_args.trust_remote_code)
    config.model_init_kwargs = model_init_kwargs(model_args, config.model_init_kwargs)
    if weights and not model_args.use_peft:  # the final save writes the policy and the EMA model beside it
        halved = config.model_init_kwargs.get("dtype") in ("bfloat16", "float16")
        sizes = [file.stat().st_size // (2 if halved else 1) for file in weights]
        check_output_location(out, needed_bytes=sum(sizes) * (2 if config.self_augmenting else 1),
                              largest_file=max(sizes))
    _check_report_to(config)
    examples = load_examples(model_args.dataset_name, model_args.dataset_split, skip_invalid=config.skip_invalid,
                             with_rejected=config.needs_rejected_data)
    eval_records = None if model_args.eval_dataset_name is None else read_eval_records(
        model_args.eval_dataset_name, model_args.eval_split, skip_invalid=config.skip_invalid,
        with_rejected=config.needs_rejected_data)
    model, tokenizer = load_model_and_tokenizer(model_args, config.model_init_kwargs, config.max_length)
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    created = first_missing(out)
    try:
        try:
            trainer = SAPOTrainer(model=model, args=config, train_dataset=examples, processing_class=tokenizer,
                                  chat_template=model_args.chat_template, eval_dataset=eval_records)
        except (ValueError, ImportError, RuntimeError) as error:  # refusals of this setup by Trainer, accelerate
            if isinstance(error, USER_ERRORS):
                raise
            raise UsageError(f"cannot set up training: {_one_paragraph(error)}") from error
        trainer.data_source = model_args.dataset_name
        trainer.command = shlex.join(["sapo", "train", *argv])
        show_bar_and_summary(trainer)
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except USER_ERRORS:
        remove_if_created_empty(out, created)
        raise
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(run_summary(trainer.state.log_history, Path(config.output_dir), trainer.copies.ema is not None))
    return 0


SUMMARY_METRICS = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "accuracy",
                   "logps/real": "log p(real)", "nll_loss": "nll"}
EVAL_METRICS = {"eval_loss": "loss", "eval_rewards/margins": "margin", "eval_rewards/accuracies": "accuracy",
                "eval_logps/real_per_token": "log p(real)/token", "eval_judge/score": "judge"}


def _brief(row: Mapping[str, Any], names: Mapping[str, str]) -> str:
    return ", ".join(f"{short} {row[key]:.4g}" for key, short in names.items() if isinstance(row.get(key), float | int))


def show_bar_and_summary(trainer: Any) -> None:
    """`sapo train` shows the progress bar (with the latest loss, margin and accuracy on it) and one short line per
    evaluation, instead of the Trainer's raw dictionary of every metric at each logging step; metrics.jsonl and
    report_to integrations still get every value. transformers' own bars ("Writing model shards" at every save) are
    turned off; the hub's upload bars stay."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers import ProgressCallback
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    enable_progress_bars()

    class BarAndEvaluations(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "eval_loss" in logs:
                self.training_bar.write(f"step {state.global_step} eval: {_brief(logs, EVAL_METRICS)}")

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarAndEvaluations)


def run_summary(log_history: Sequence[Mapping[str, Any]], out: Path, has_ema: bool) -> str:
    """What a finished `sapo train` prints: steps and time, the last logged training (and evaluation) metrics, and
    where the outputs are."""
    train_rows = [row for row in log_history if "loss" in row and "eval_loss" not in row]
    eval_rows = [row for row in log_history if "eval_loss" in row]
    end = next((row for row in reversed(log_history) if "train_runtime" in row), {})
    lines = [f"sapo: trained {log_history[-1].get('step', 0) if log_history else 0} steps"
             + (f" in {end['train_runtime']:.1f} s" if "train_runtime" in end else "")]
    if train_rows:
        last = train_rows[-1]
        lines.append(f"  last training row (step {last.get('step')}): {_brief(last, SUMMARY_METRICS)}")
    if eval_rows:
        lines.append(f"  last evaluation (step {eval_rows[-1].get('step')}): {_brief(eval_rows[-1], EVAL_METRICS)}")
    lines.append(f"  policy: {out}" + (f"   EMA model: {out / 'ema'}" if has_ema else ""))
    lines.append(f"  every logged value: {out / 'metrics.jsonl'} (curves: sapo plot {out})")
    return "\n".join(lines)


def run_demo(argv: Sequence[str]) -> int:
    from sapo.demo import main as demo_main

    return demo_main(argv)


def run_plot(argv: Sequence[str]) -> int:
    from sapo.plots import main as plot_main

    return plot_main(argv)


def run_inspect(argv: Sequence[str]) -> int:
    from sapo.inspection import main as inspect_main

    return inspect_main(argv)


def run_eval(argv: Sequence[str]) -> int:
    from sapo.evaluation import main as eval_main

    return eval_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": run_train, "demo": run_demo, "plot": run_plot, "inspect": run_inspect, "eval": run_eval}
    debug = "--debug" in argv  # sapo's own flag; TrainingArguments' `debug` stays reachable from YAML
    argv = [arg for arg in argv if arg != "--debug"]
    if argv and argv[0] not in commands and argv[0] not in ("-h", "--help"):
        import difflib

        close = difflib.get_close_matches(argv[0], list(commands), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"sapo: error: unknown command {argv[0]!r}; {hint}commands: {', '.join(commands)} (see `sapo --help`)",
              file=sys.stderr)
        return EXIT_USAGE
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sapo {train,demo,plot,inspect,eval} [options]\n\n"
              "  train    train a model (sapo train --help lists every option)\n"
              "  demo     run the whole pipeline on a built-in task with a tiny model, no downloads\n"
              "  plot     plot training curves of runs from their metrics.jsonl (sapo plot RUN_DIR... [--out DIR])\n"
              "  inspect  show replay-buffer entries with the rewritten segment highlighted (sapo inspect PATH)\n"
              "  eval     compare model dirs on prompts with a judge: scores, per-family means, pairwise win rates\n"
              "           (sapo eval MODEL_DIR... --suite heldout | --data FILE [--judge module:function])",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_deepspeed_probe()
    return _run_guarded(commands[argv[0]], argv[1:], debug)


def quiet_deepspeed_probe() -> None:
    """accelerate imports deepspeed whenever it is installed (to unwrap models), and deepspeed then warns "Setting
    accelerator to CPU" on every machine without CUDA, though nothing uses it. Naming the CPU accelerator, which it
    would pick anyway, keeps that line out of a CPU run; a GPU machine, or a choice the user made, is left alone."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _run_guarded(command, argv: Sequence[str], debug: bool) -> int:
    try:
        with _argparse_errors_raise():
            return command(argv)
    except TrainingStopped as stopped:
        print(f"sapo: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"sapo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a full or read-only disk met after the checks (another process filled it, quota)
        if debug or error.errno not in FILESYSTEM_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        partial = " (the run stopped there; what it had written is kept)" \
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
        print(f"sapo: error: {where}{error.strerror or error}{partial}", file=sys.stderr)
        return EXIT_USAGE


class _ArgumentError(UsageError):
    """An argparse refusal (unknown choice, mistyped value, missing argument), reported as one paragraph."""


@contextlib.contextmanager
def _argparse_errors_raise() -> Iterator[None]:
    """While a command runs, argparse's errors raise instead of printing the whole usage (hundreds of options for
    `sapo train`) and exiting; `--help` still prints and exits 0."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str):
        raise _ArgumentError(f"{parser.prog}: {message} (see `{parser.prog} --help`)")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def config_reference_markdown() -> str:
    """The README's option tables, generated from the dataclasses so the docs cannot drift from the code."""
    from sapo.config import sapo_fields

    sections = [("Model and data (`ModelArguments`)", dataclasses.fields(ModelArguments)),
                ("SAPO settings (`SAPOConfig`, beyond `transformers.TrainingArguments`)", sapo_fields()),
                ("`TrainingArguments` options whose default SAPO changes", changed_trainer_defaults())]
    lines: list[str] = []
    for title, fields in sections:
        lines += [f"**{title}**", "", "| option | default | meaning |", "|---|---|---|"]
        for item in fields:
            default = item.default if item.default is not dataclasses.MISSING else "required"
            help_text = item.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `--{item.name}` | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def changed_trainer_defaults() -> list[dataclasses.Field]:
    """Inherited Trainer options that SAPOConfig gives another default (e.g. the paper's learning rate)."""
    from transformers import TrainingArguments

    from sapo.config import SAPOConfig

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(SAPOConfig) if f.name in base and f.default != base[f.name]]


if __name__ == "__main__":
    raise SystemExit(main())
