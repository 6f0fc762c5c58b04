"""The one loader of models, tokenizers and reference models, with one set of checks.

`sapo train`, `sapo eval` and `SAPOTrainer(model=..., ref_model=...)` all load through here, so a model directory
that one of them refuses, all of them refuse, with the same message. Checks run as early as they can: the
directory's files (config.json, the weights' presence, generation_config.json, tokenizer_config.json,
chat_template.jinja) before anything is loaded, the tokenizer and the config against each other and against the
run's max_length before the weights are read, and the loaded model (or a model instance passed in) against its
tokenizer last: a mismatch found here would otherwise surface mid-run as an `IndexError` in the embedding or a
sampler that has nothing to start from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sapo.errors import USER_ERRORS, UsageError, describe_unusable_path, one_paragraph

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
# JSON files beside a tokenizer that transformers reads (a corrupt one fails deep inside it, or is ignored)
TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# ------------------------------------------------------------------------------------------------
# Sources: what is in a directory, before anything is loaded
# ------------------------------------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))
            and "\\" not in name and not name.endswith((".json", ".safetensors", ".bin")))


def _shown(option: str) -> str:
    """How a message names where a path came from: a `sapo train` flag, or an argument (model=, MODEL_DIR)."""
    return f"--{option}" if option.endswith("_name_or_path") else option


def _local_directory(path: str, option: str, expected: str) -> Path | None:
    """`path` as an existing directory; None for a hub id the hub can answer (an offline machine fails at once)."""
    directory = Path(path)
    unusable = describe_unusable_path(directory)
    if unusable:
        raise UsageError(f"{_shown(option)} {path}: {unusable}; expected {expected}")
    if not directory.exists():
        if _is_hub_id(path):
            from sapo.data import hub_unreachable

            reason = hub_unreachable(path, "model")
            if reason:
                raise UsageError(f"{_shown(option)} {path}: no such local directory, and as a hub id: {reason}")
            return None
        raise UsageError(f"{_shown(option)} {path}: no such directory")
    if not directory.is_dir():
        raise UsageError(f"{_shown(option)} {path}: is a file; expected {expected}")
    return directory


def check_model_source(path: str, option: str, *, trust_remote_code: bool) -> list[Path] | None:
    """Check a model directory before anything is loaded or written: it exists, its config.json is valid JSON of a
    known or (trusted) custom architecture, its generation_config.json (if any) is valid, and its weights are all
    there. Returns the weight files; None for a hub id (after making sure the hub can answer)."""
    directory = _local_directory(path, option, "a model directory (config.json and weights)")
    if directory is None:
        return None
    config_file = directory / "config.json"
    if not config_file.is_file():
        if (directory / "adapter_config.json").is_file():
            raise UsageError(f"{path}: directory holds LoRA adapters only (adapter_config.json, no config.json); "
                             "pass the full model it was trained from, or merge the adapters into it first")
        raise UsageError(f"{path}: directory has no model (config.json missing)")
    config = read_json_object(config_file)
    if "model_type" not in config and "auto_map" not in config:
        raise UsageError(f"{config_file}: no 'model_type' key, so the architecture is unknown")
    if "auto_map" in config and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise UsageError(
                f"{path}: the model's code ships with the checkpoint (config.json 'auto_map', model_type "
                f"{config.get('model_type')!r} is not built into transformers); pass --trust_remote_code to run it, "
                "only for a checkpoint you trust")
    _check_generation_config(directory)
    return _weight_files(directory)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object file, or a refusal naming the file, the line and what is wrong."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UsageError(f"{file}: not valid UTF-8 (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{file}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    except (RecursionError, ValueError) as error:
        raise UsageError(f"{file}: invalid JSON ({one_paragraph(error, 120)})") from None
    except OSError as error:
        raise UsageError(f"{file}: cannot read ({error.strerror or type(error).__name__})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_generation_config(directory: Path) -> None:
    """transformers ignores a generation_config.json it cannot read (with a log line) and samples with defaults
    built from config.json instead: the checkpoint's own eos ids and sampling settings would be silently lost. One it
    reads but finds inconsistent it keeps, and then refuses to save with the trained model, after the run."""
    file = directory / "generation_config.json"
    if not file.exists() and not file.is_symlink():
        return
    if not file.is_file():
        raise UsageError(f"{file}: {describe_unusable_path(file) or 'is a directory'}, not a JSON file")
    read_json_object(file)
    from transformers import GenerationConfig

    with library_errors(f"{file}: not a valid generation config (the final save_pretrained would refuse it)"):
        GenerationConfig.from_pretrained(directory).validate(strict=True)


def _weight_files(directory: Path) -> list[Path]:
    """The directory's weight files; refuses a directory without any, or with shards its index lists missing."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = directory / index_name
        if index_file.is_file():
            weight_map = read_json_object(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UsageError(f"{index_file}: no 'weight_map' of parameter names to shard files")
            shards = sorted(set(map(str, weight_map.values())))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise UsageError(f"{index_file}: lists {len(missing)} shard file(s) that are missing: "
                                 f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = directory / name
        if file.is_file():
            return [file]
        if file.is_dir() or describe_unusable_path(file):
            what = "a directory" if file.is_dir() else describe_unusable_path(file)
            raise UsageError(f"{file}: is {what.removeprefix('is ')}, not a weights file")
    others = sorted(p.name for p in directory.glob("*.safetensors")) + sorted(p.name for p in directory.glob("*.bin"))
    hint = f" (found {', '.join(others[:3])}, which transformers does not load without an index)" if others else ""
    raise UsageError(f"{directory}: has config.json but no weights: none of {', '.join(WEIGHT_FILES)}{hint}")


def check_tokenizer_source(path: str, option: str, *, chat_template: str | None = None) -> None:
    """A tokenizer directory holds a tokenizer, its JSON side files parse, and its own chat template (when no
    `chat_template` replaces it) is not empty: an empty one renders every prompt as no tokens."""
    directory = _local_directory(path, option, "a directory holding a tokenizer")
    if directory is None:
        return
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{_shown(option)} {path}: directory holds no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)})")
    settings: dict[str, Any] = {}
    for name in TOKENIZER_JSON_FILES:
        if (directory / name).exists() or (directory / name).is_symlink():
            values = read_json_object(directory / name)
            settings = values if name == "tokenizer_config.json" else settings
    if chat_template is not None:
        return
    template_file = directory / "chat_template.jinja"
    if template_file.is_file() and not template_file.read_text(encoding="utf-8", errors="replace").strip():
        raise UsageError(f"{template_file}: the tokenizer's chat template is empty, so every prompt would render as "
                         "no tokens; delete the file or write a template in it (or pass --chat_template)")
    inline = settings.get("chat_template")
    if isinstance(inline, str) and not inline.strip() and not template_file.is_file():
        raise UsageError(f"{directory / 'tokenizer_config.json'}: 'chat_template' is empty, so every prompt would "
                         "render as no tokens; remove the key or pass --chat_template")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def library_errors(what: str) -> Iterator[None]:
    """Turn a loading library's exception (transformers, safetensors, torch's safe unpickler, tokenizers, jinja)
    into one paragraph that says what was being loaded; `--debug` still shows the original traceback."""
    try:
        yield
    except USER_ERRORS:
        raise
    except Exception as error:
        kind = type(error).__name__
        text = one_paragraph(error)
        if kind == "UnpicklingError" or "weights only load failed" in text.lower():
            raise UsageError(f"{what}: pytorch_model.bin is a pickle that torch's safe loader (weights_only) refuses "
                             f"({one_paragraph(text.split('.')[0], 120)}); it could run code on loading: convert the "
                             "weights to safetensors with code you trust, or use a safetensors checkpoint") from error
        hint = ""
        if "custom code" in text or "trust_remote_code" in text:
            hint = "; pass --trust_remote_code to run the checkpoint's own code, only for a checkpoint you trust"
        elif kind == "SafetensorError" or "deserializ" in text:
            hint = "; the weights file is truncated or corrupt: copy or download it again"
        raise UsageError(f"{what} ({kind}: {text}){hint}") from error


def load_tokenizer(path: str, *, option: str = "model_name_or_path", chat_template: str | None = None,
                   init_kwargs: dict[str, Any] | None = None) -> Any:
    """The checked, prepared tokenizer (chat template, EOS and pad token; see `sapo.data.prepare_tokenizer`), loaded
    at the model's revision and with its trust_remote_code when `init_kwargs` (model_init_kwargs) name them."""
    from transformers import AutoTokenizer

    from sapo.data import prepare_tokenizer

    check_tokenizer_source(path, option, chat_template=chat_template)
    shared = {k: v for k, v in (init_kwargs or {}).items() if k in ("revision", "trust_remote_code")}
    with library_errors(f"{path}: cannot load the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, **shared)
    return prepare_tokenizer(tokenizer, chat_template)


def load_model(path: str, init_kwargs: dict[str, Any] | None = None, *, option: str = "model_name_or_path",
               kwargs_option: str = "model_init_kwargs", tokenizer: Any = None,
               max_length: int | None = None) -> nn.Module:
    """A causal LM from a directory or hub id, with `init_kwargs` passed to `from_pretrained`. With `tokenizer` and
    `max_length` the config is checked against them before the weights are read, and the model after."""
    from transformers import AutoConfig, AutoModelForCausalLM

    init_kwargs = dict(init_kwargs or {})
    trust = bool(init_kwargs.get("trust_remote_code", False))
    check_model_source(path, option, trust_remote_code=trust)
    config_kwargs = {k: v for k, v in init_kwargs.items() if k in ("revision", "trust_remote_code")}
    with library_errors(f"{path}: cannot read the model's configuration"):
        config = AutoConfig.from_pretrained(path, **config_kwargs)
    _check_causal_lm(config, path, trust)
    if tokenizer is not None:
        check_fits(config, tokenizer, model_name=path, max_length=max_length,
                   rows=getattr(_text_config(config), "vocab_size", None))
    kwargs = {"dtype": "auto", **init_kwargs, "config": config, "output_loading_info": True}
    given = {k: v for k, v in init_kwargs.items() if not (k == "trust_remote_code" and not v)}
    shown = f" with {kwargs_option} {json.dumps(given, default=str)}" if given else ""
    with library_errors(f"{path}: cannot load the model's weights{shown}"):
        model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UsageError(f"{path}: the weights lack {len(missing)} parameter(s) the config.json architecture needs "
                         f"(e.g. {', '.join(missing[:3])}): they would start random; the weights do not belong to "
                         "this config.json")
    if tokenizer is not None:
        check_model(model, tokenizer, model_name=path, max_length=max_length)
    return model


def load_model_and_tokenizer(path: str, *, tokenizer_path: str | None = None, chat_template: str | None = None,
                             init_kwargs: dict[str, Any] | None = None, max_length: int | None = None,
                             option: str = "model_name_or_path",
                             tokenizer_option: str = "tokenizer_name_or_path",
                             check_tokenizer: Callable[[Any], None] | None = None) -> tuple[nn.Module, Any]:
    """The checked model and its prepared tokenizer. The tokenizer is loaded first: its problems (an empty chat
    template, too many tokens for the model's vocabulary) and `check_tokenizer`'s (the data against it, e.g. chat
    records for a tokenizer without a chat template) are reported before any weights are read."""
    trust = bool((init_kwargs or {}).get("trust_remote_code", False))
    check_model_source(path, option, trust_remote_code=trust)
    tokenizer = load_tokenizer(tokenizer_path or path, option=tokenizer_option if tokenizer_path else option,
                               chat_template=chat_template, init_kwargs=init_kwargs)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    return load_model(path, init_kwargs, option=option, tokenizer=tokenizer, max_length=max_length), tokenizer


def load_policy(model: nn.Module | str, tokenizer: Any, *, chat_template: str | None,
                init_kwargs: dict[str, Any] | None, max_length: int | None,
                check_tokenizer: Callable[[Any], None] | None = None) -> tuple[nn.Module, Any]:
    """`SAPOTrainer`'s policy and tokenizer: a path is loaded like `sapo train` loads it (tokenizer from the same
    path unless given, `check_tokenizer` run on it before the weights); an instance is checked against its tokenizer
    the same way."""
    if tokenizer is None and not isinstance(model, str):
        tokenizer = tokenizer_of_instance(model, init_kwargs, chat_template)
    if isinstance(model, str):
        if tokenizer is None:
            return load_model_and_tokenizer(model, chat_template=chat_template, init_kwargs=init_kwargs,
                                            max_length=max_length, option="model", check_tokenizer=check_tokenizer)
        from sapo.data import prepare_tokenizer

        tokenizer = prepare_tokenizer(tokenizer, chat_template)
        if check_tokenizer is not None:
            check_tokenizer(tokenizer)
        return load_model(model, init_kwargs, option="model", tokenizer=tokenizer, max_length=max_length), tokenizer
    from sapo.data import prepare_tokenizer

    if init_kwargs:
        warn_unless_loaded_with(model, init_kwargs, "model_init_kwargs", "model")
    tokenizer = prepare_tokenizer(tokenizer, chat_template)
    check_model(model, tokenizer, model_name="the model passed in", max_length=max_length)
    return model, tokenizer


def tokenizer_of_instance(model: nn.Module, init_kwargs: dict[str, Any] | None, chat_template: str | None) -> Any:
    """The tokenizer of a model instance passed without `processing_class`, loaded from where the model was loaded
    (`config._name_or_path`), as TRL's trainers look it up; a model built in memory has no such place."""
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not source:
        raise ValueError("pass processing_class (the tokenizer): the model instance was not loaded from a directory "
                         "or hub id (its config's name_or_path is empty), so there is nowhere to load its tokenizer "
                         "from")
    return load_tokenizer(str(source), option="processing_class (looked up from the model's name_or_path)",
                          chat_template=chat_template, init_kwargs=init_kwargs)


def load_reference(ref_model: nn.Module | str | None, init_kwargs: dict[str, Any] | None, kwargs_option: str,
                   tokenizer: Any, max_length: int | None) -> nn.Module | None:
    """A reference model given by path, loaded and checked like the policy (against the policy's tokenizer, which
    scores its sequences); an instance is checked the same way."""
    if isinstance(ref_model, str):
        return load_model(ref_model, init_kwargs, option="ref_model", kwargs_option=kwargs_option,
                          tokenizer=tokenizer, max_length=max_length)
    if ref_model is not None:
        check_model(ref_model, tokenizer, model_name="ref_model", max_length=max_length)
    return ref_model


def warn_unless_loaded_with(model: nn.Module, init_kwargs: dict[str, Any], option: str, argument: str) -> None:
    """`option` only applies when `argument` is a path; say so when the instance given was loaded otherwise."""
    config = getattr(model, "config", None)
    found = {"dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
             "attn_implementation": getattr(config, "_attn_implementation", None)}
    differ = [f"{key} {init_kwargs[key]!r} (the instance has {found[key]!r})" for key in found
              if init_kwargs.get(key) not in (None, "auto") and found[key] and init_kwargs[key] != found[key]]
    if differ:
        logger.warning("%s applies only when %s is a path; the %s instance passed in is used as it is, not with %s",
                       option, argument, argument, ", ".join(differ))


# ------------------------------------------------------------------------------------------------
# Checks of a model against its tokenizer and the run
# ------------------------------------------------------------------------------------------------


def _check_causal_lm(config: Any, path: str, trust_remote_code: bool) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    custom = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    name = f"model_type {model_type!r} ({type(config).__name__})"
    if not custom and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"{path}: {name} is not a causal language model (AutoModelForCausalLM cannot load it); "
                         "SAPO trains decoder-only models")
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"{path}: {name} is an encoder-decoder model; SAPO trains decoder-only models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and getattr(config, "is_decoder", None) is False:
        raise UsageError(f"{path}: {name} is a bidirectional encoder (is_decoder is false in config.json), not a "
                         "causal language model; SAPO trains decoder-only models")


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def check_model(model: nn.Module, tokenizer: Any, *, model_name: str, max_length: int | None) -> None:
    """A loaded model (or one passed in) against its tokenizer: every token id the run will feed it has an
    embedding row, and it was built for sequences of max_length."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    check_fits(getattr(model, "config", None), tokenizer, model_name=model_name, max_length=max_length, rows=rows,
               generation_config=getattr(model, "generation_config", None))


def check_fits(config: Any, tokenizer: Any, *, model_name: str, max_length: int | None, rows: Any,
               generation_config: Any = None) -> None:
    """The tokenizer's vocabulary and every special id (tokenizer, config.json, generation_config) lie within the
    `rows` the model embeds; `max_length` within the positions it was built for."""
    source = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
    if isinstance(rows, int):
        if len(tokenizer) > rows:
            raise UsageError(f"the tokenizer ({source}) has {len(tokenizer)} tokens but the model ({model_name}) "
                             f"embeds only {rows}: they do not belong together")
        for where, name, value in _special_ids(tokenizer, config, generation_config):
            bad = [i for i in (value if isinstance(value, (list, tuple)) else [value])
                   if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
            if bad:
                raise UsageError(f"{where} {name} {value!r} is not a token of the model ({model_name}), which embeds "
                                 f"ids 0..{rows - 1}: {where} does not belong to this model")
    limit = getattr(_text_config(config), "max_position_embeddings", None) if config is not None else None
    if max_length is not None and isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < max_length:
        raise UsageError(f"max_length {max_length} is longer than the model ({model_name}) was built for: its "
                         f"max_position_embeddings is {limit}; pass --max_length {limit} or less")


# The special ids the run feeds the model or stops on: the tokenizer's, and those `generate` takes from the model's
# generation_config and config.json (config.json's pad is left out: old checkpoints carry pad_token_id -1 there,
# which nothing of SAPO's uses).
_SPECIAL_IDS = {"tokenizer": ("eos_token_id", "pad_token_id", "bos_token_id"),
                "generation_config": ("eos_token_id", "pad_token_id"), "config.json": ("eos_token_id",)}


def _special_ids(tokenizer: Any, config: Any, generation_config: Any) -> Iterator[tuple[str, str, Any]]:
    source = getattr(tokenizer, "name_or_path", None)
    holders = {"tokenizer": tokenizer, "generation_config": generation_config,
               "config.json": _text_config(config) if config is not None else None}
    for where, names in _SPECIAL_IDS.items():
        for name in names:
            value = getattr(holders[where], name, None)
            if value is not None and value != []:
                yield (f"the tokenizer ({source})" if where == "tokenizer" and source else where), name, value


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft-wrapped model (LoRA adapters): its saved form and card differ."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def load_policy_for_training(model: nn.Module | str, tokenizer: Any, chat_template: str | None, peft_config: Any,
                             model_init_kwargs: dict[str, Any] | None, max_length: int | None = None,
                             check_tokenizer: Callable[[Any], None] | None = None) -> tuple[nn.Module, Any]:
    """The policy and its prepared tokenizer, loaded and checked by `load_policy` (the loader `sapo train` and
    `sapo eval` use), then wrapped with LoRA when asked."""
    model, tokenizer = load_policy(model, tokenizer, chat_template=chat_template, init_kwargs=model_init_kwargs,
                                   max_length=max_length, check_tokenizer=check_tokenizer)
    if peft_config is not None:
        model = with_lora(model, peft_config)
    return model, tokenizer


def with_lora(model: nn.Module, peft_config: Any) -> nn.Module:
    """`peft.get_peft_model`, without the deprecation warning it triggers on every run: peft reads the model's
    `is_gradient_checkpointing`, which transformers 5.23 renamed (a FutureWarning the user cannot act on)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, peft_config)


def load_run_reference(args: Any, ref_model: nn.Module | str | None, tokenizer: Any) -> nn.Module | None:
    """A run's reference (`args`: its SAPOConfig). Given by path it is loaded with `ref_model_init_kwargs` (default:
    the policy's `model_init_kwargs`, so both load alike, as TRL does); either way it is checked like the policy."""
    init_kwargs = args.ref_model_init_kwargs
    if isinstance(ref_model, str):
        name = "model_init_kwargs" if init_kwargs is None else "ref_model_init_kwargs"
        chosen = args.model_init_kwargs if init_kwargs is None else init_kwargs
        return load_reference(ref_model, chosen, name, tokenizer, args.max_length)
    if ref_model is not None and init_kwargs:
        warn_unless_loaded_with(ref_model, init_kwargs, "ref_model_init_kwargs", "ref_model")
    elif ref_model is None and init_kwargs is not None:
        logger.warning("ref_model_init_kwargs is unused: it applies to a ref_model given by path, and this run %s",
                       "has none" if args.uses_reference else f"(recipe {args.recipe!r}, loss "
                       f"{args.loss_type!r}) uses no reference model")
    return load_reference(ref_model, None, "ref_model_init_kwargs", tokenizer, args.max_length)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (`disable_dropout`, as TRL does): the policy and its copies score pairs alike."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
