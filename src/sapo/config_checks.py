"""Checks of `SAPOConfig` values made while it is built, so a bad value fails at once with the field's name rather
than mid-training: number kinds, finiteness, choices, model init kwargs, and inherited Trainer options."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


NUMBER_FIELDS = {
    **dict.fromkeys(("max_length", "max_prompt_length", "token_generate_length", "max_replay_buffer_size",
                     "sample_every_n_steps", "responses_per_prompt", "logprob_chunk_size", "max_nonfinite_steps",
                     "spin_iterations", "spin_max_new_tokens", "generation_batch_size", "ref_update_steps", "top_k",
                     "eval_judge_max_new_tokens",
                     "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_steps", "seed", "data_seed", "dataloader_num_workers", "save_total_limit"), int),
    **dict.fromkeys(("beta", "label_smoothing", "ema_beta", "temperature", "top_p", "spin_temperature",
                     "learning_rate", "num_train_epochs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "max_grad_norm", "logging_steps", "save_steps"), float),
}
"""Numeric options checked for their kind (and for NaN) before anything else reads them."""
FINITE_FIELDS = {"beta", "label_smoothing", "temperature", "spin_temperature", "learning_rate", "warmup_steps",
                  "weight_decay", "adam_epsilon", "logging_steps", "save_steps"}


def init_kwargs(name: str, value: Any) -> dict[str, Any] | None:
    """`from_pretrained` keyword arguments from a mapping or (command line) a JSON object string. A dtype is kept as
    its name ("bfloat16"), which `from_pretrained` takes, so the config stays JSON (checkpoint settings, the card,
    `to_json_string`); the older `torch_dtype` key becomes `dtype`."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"SAPOConfig.{name}: not valid JSON ({error.msg} at column {error.colno}): "
                             f"{value!r}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"SAPOConfig.{name} must be a mapping of from_pretrained keyword arguments (a JSON object "
                         f"on the command line), got {value!r}")
    kwargs = dict(value)
    odd = [key for key in kwargs if not isinstance(key, str)]
    if odd:
        raise ValueError(f"SAPOConfig.{name}: keys must be argument names (strings), got {odd[0]!r}")
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise ValueError(f"SAPOConfig.{name} sets both 'dtype' and 'torch_dtype' (its older name); keep 'dtype'")
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if "dtype" in kwargs:
        kwargs["dtype"] = dtype_name(name, kwargs["dtype"])
    return kwargs


def dtype_name(name: str, dtype: Any) -> str | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is None else str(dtype).removeprefix("torch.")
    if dtype == "auto" or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        return dtype
    raise ValueError(f"SAPOConfig.{name}['dtype']: {dtype!r} is not a torch dtype; use auto, bfloat16, float16 or "
                     "float32")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SAPOConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def validate_types(config: Any) -> None:
    """Numbers of the declared kind (a YAML `8.7` for an integer, or a string, would otherwise fail mid-training)
    and never NaN; the quantities in FINITE_FIELDS must also be finite."""
    for name, kind in NUMBER_FIELDS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if kind is int and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
            raise ValueError(f"SAPOConfig.{name} must be an integer, got {value!r}")
        if kind is float and (not isinstance(value, numbers.Real) or isinstance(value, bool)):
            raise ValueError(f"SAPOConfig.{name} must be a number, got {value!r}")
        if kind is float and (math.isnan(value) or (math.isinf(value) and name in FINITE_FIELDS)):
            raise ValueError(f"SAPOConfig.{name} must be a finite number, got {value}")

def validate_trainer_fields(config: Any) -> None:
    """Inherited Trainer options that would otherwise fail only once training has started (or never)."""
    if config.learning_rate < 0:
        raise ValueError(f"SAPOConfig.learning_rate must be >= 0, got {config.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"SAPOConfig.{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps < -1:  # transformers reads any max_steps <= 0 as "train num_train_epochs epochs"
        raise ValueError(f"SAPOConfig.max_steps must be > 0, or -1 to train num_train_epochs epochs; got "
                         f"{config.max_steps}")
    if config.max_grad_norm is not None and config.max_grad_norm < 0:  # a negative norm silently disables clipping
        raise ValueError(f"SAPOConfig.max_grad_norm must be >= 0 (0 disables clipping), got {config.max_grad_norm}")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ValueError(f"SAPOConfig.num_train_epochs must be > 0 when max_steps is not set, got "
                         f"{config.num_train_epochs}")
    for name in ("weight_decay", "adam_epsilon"):
        if getattr(config, name) < 0:
            raise ValueError(f"SAPOConfig.{name} must be >= 0, got {getattr(config, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"SAPOConfig.{name} must be in [0, 1), got {getattr(config, name)}")
    if config.dataloader_num_workers < 0:
        raise ValueError(f"SAPOConfig.dataloader_num_workers must be >= 0, got {config.dataloader_num_workers}")
    for name in ("seed", "data_seed"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < 2**32:
            raise ValueError(f"SAPOConfig.{name} must be in [0, 2**32), got {value}")
    if str(getattr(config.save_strategy, "value", config.save_strategy)) == "steps" and config.save_steps <= 0:
        raise ValueError(f"SAPOConfig.save_steps must be > 0 with save_strategy 'steps', got {config.save_steps}")
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) == "steps" and config.eval_steps is not None \
            and not config.eval_steps >= 0:
        raise ValueError(f"SAPOConfig.eval_steps must be > 0 with eval_strategy 'steps' (or unset: logging_steps), "
                         f"got {config.eval_steps}")
    if config.eval_judge is not None and not config.eval_judge.strip():
        raise ValueError("SAPOConfig.eval_judge is empty; give module:function or leave it unset")
    if config.rejected_judge is not None and not config.rejected_judge.strip():
        raise ValueError("SAPOConfig.rejected_judge is empty; give module:function or leave it unset")
