"""The model cards written beside a trained model (`README.md`) and its EMA model (`ema/README.md`).

Each is a `huggingface_hub.ModelCard`: front matter the Hub indexes (base model, datasets, library, pipeline tag,
tags) and a body that says what the model is, how to load it, how it was trained and what to cite. The Hub refuses
a push whose `base_model` or `datasets` is not a Hub id, so local paths are named in the body only. For LoRA outputs
PEFT writes its own card first (`library_name: peft`, its tags); its metadata is kept and merged, its placeholder
body is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from sapo import metrics as m
from sapo.run.paths import EMA_DIR

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PAPER_TITLE = "Self-Augmented Preference Optimization: Off-Policy Paradigms for Language Model Alignment"
PAPER_ID = "2405.20830"  # arXiv, as in SPEC.md and the paper's abstract
CITATION = """@article{yin2024sapo,
  title   = {Self-Augmented Preference Optimization: Off-Policy Paradigms for Language Model Alignment},
  author  = {Yin, Yueqin and Wang, Zhendong and Xie, Yujia and Chen, Weizhu and Zhou, Mingyuan},
  journal = {arXiv preprint arXiv:2405.20830},
  year    = {2024}
}"""
# TrainingArguments fields worth repeating in a card; SAPO's own fields are always listed.
TRAINER_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "weight_decay",
                  "max_grad_norm", "bf16", "fp16", "seed")
REFERENCE_SETTINGS = ("ref_update_mode", "ref_update_steps", "cache_reference_logps", "ref_model_init_kwargs")
LOSS_SETTINGS = ("loss_type", "beta", "label_smoothing")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
EXAMPLE_PROMPT = "Write a haiku about the sea."


@dataclass(frozen=True)
class CardFacts:
    """What a card says about one run; `location` is where readers load the outputs from (a directory or a Hub
    repo id: the snippets load `ema/` with `subfolder="ema"`, which works for both)."""

    location: str
    recipe: str
    loss_type: str
    base_model: str | None = None
    data: str | None = None
    adapter: bool = False
    has_ema: bool = False
    ema_beta: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    eval_metrics: Mapping[str, Any] = field(default_factory=dict)
    command: str | None = None
    model_name: str | None = None
    tags: Sequence[str] = ()
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)  # e.g. license, language from push_to_hub
    chat: bool = True  # the tokenizer has a chat template (else the model was trained on raw text, and is prompted so)


def hub_id(name: str | None) -> str | None:
    """`name` when it can be a Hub repo id (not a local file or directory, not a data file name), else None."""
    if not name or Path(name).expanduser().exists() or name.lower().endswith(DATA_FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def card_settings(config: Any, sapo_field_names: Sequence[str]) -> dict[str, Any]:
    """The settings shown in the card: the SAPO fields that matter to the run (`run_settings`) plus the main
    Trainer ones."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    names = [*run_settings(config, sapo_field_names), *TRAINER_FIELDS]
    return {name: values[name] for name in names if name in values}


def run_settings(config: Any, names: Sequence[str]) -> list[str]:
    """`names` without the settings the run cannot have used: those another recipe declares as its own
    (`Recipe.settings`: no `spin_*` on a sapo run, no EMA or buffer settings on a dpo run), the reference's when
    the run has none (orpo, sft), and the loss's for sft."""
    from sapo.recipes import RECIPES

    recipe = getattr(config, "recipe_class", None)
    if recipe is None:
        return list(names)
    unused = {name for other in RECIPES.values() for name in other.settings} - set(recipe.settings)
    if not config.uses_reference:
        unused |= set(REFERENCE_SETTINGS)
    if recipe.supervised:
        unused |= set(LOSS_SETTINGS)
    return [name for name in names if name not in unused]


def describe_data(dataset: Any) -> str | None:
    """What a card says of a training set passed in memory (no name to give): its kind, size, columns and, for a
    `datasets.Dataset`, its fingerprint (which changes with its content)."""
    if dataset is None:
        return None
    package = type(dataset).__module__.split(".")[0]
    kind = type(dataset).__name__ if package == "builtins" else f"{package}.{type(dataset).__name__}"
    try:
        rows = len(dataset)
    except TypeError:
        return f"in-memory {kind}"
    columns = getattr(dataset, "column_names", None)
    if columns is None and rows and isinstance(dataset[0], Mapping):
        columns = list(dataset[0])
    shown = f"in-memory {kind}, {rows} rows"
    if columns:
        shown += f", columns: {', '.join(map(str, columns))}"
    fingerprint = getattr(dataset, "_fingerprint", None)
    return shown + (f", fingerprint {fingerprint}" if fingerprint else "")


def final_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last logged training row (the one with a loss), without bookkeeping keys."""
    rows = [row for row in log_history if m.LOSS in row]
    if not rows:
        return {}
    return {key: value for key, value in rows[-1].items() if key != m.EPOCH}


def final_eval_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last evaluation row (keys `eval_*`), when the run evaluated."""
    rows = [row for row in log_history if any(key.startswith(m.EVAL_PREFIX) for key in row)]
    if not rows:
        return {}
    return {key: value for key, value in rows[-1].items() if key.startswith(m.EVAL_PREFIX) or key == m.STEP}


# ------------------------------------------------------------------------------------------------
# Front matter
# ------------------------------------------------------------------------------------------------


def card_metadata(facts: CardFacts, existing: Mapping[str, Any] | None = None, *, ema: bool = False) -> ModelCardData:
    """Our metadata over what a card already holds (PEFT's, or a user's license): keys we do not set are kept, tags
    are merged, and a `base_model` that is no Hub id (PEFT writes the local path) is dropped with its tags."""
    merged = {key: value for key, value in (existing or {}).items() if key not in ("base_model", "datasets")}
    base = hub_id(facts.base_model) or _hub_ids((existing or {}).get("base_model"))
    datasets = [hub_id(facts.data)] if hub_id(facts.data) else _hub_ids((existing or {}).get("datasets"))
    merged.update(facts.extra_metadata)
    merged.update({"library_name": "peft" if facts.adapter else "transformers", "pipeline_tag": "text-generation",
                   "tags": _merged_tags(facts, (existing or {}).get("tags"), ema)})
    if base:
        merged["base_model"] = base
    if datasets:
        merged["datasets"] = datasets
    if facts.model_name:
        merged["model_name"] = facts.model_name + ("-ema" if ema else "")
    return ModelCardData(**merged)


def _hub_ids(value: Any) -> str | list[str] | None:
    """The Hub ids of an existing card's `base_model`/`datasets` (a string or a list), without local paths."""
    if isinstance(value, str):
        return hub_id(value)
    kept = [item for item in value or [] if isinstance(item, str) and hub_id(item)]
    return kept or None


def _merged_tags(facts: CardFacts, existing: Any, ema: bool) -> list[str]:
    ours = ["sapo", facts.recipe, facts.loss_type, "preference-optimization", *(["ema"] if ema else []), *facts.tags]
    theirs = [existing] if isinstance(existing, str) else list(existing or [])
    kept = [tag for tag in theirs if isinstance(tag, str) and not _local_base_model_tag(tag)]
    return list(dict.fromkeys([*ours, *kept]))


def _local_base_model_tag(tag: str) -> bool:
    """PEFT's `base_model:adapter:<name>` tag, when <name> is a local path (it means nothing on the Hub)."""
    parts = tag.split(":", 2)
    return len(parts) == 3 and parts[0] == "base_model" and hub_id(parts[2]) is None


# ------------------------------------------------------------------------------------------------
# Body
# ------------------------------------------------------------------------------------------------


def loading_snippet(facts: CardFacts, generate_with: str = "model") -> str:
    """Python that loads the policy `model` (and the EMA model `ema`, when there is one) from `facts.location` and
    answers one prompt with `generate_with` (through the chat template, or as raw text for a model trained on raw
    text, whose tokenizer has none); it imports only transformers (and peft for adapters)."""
    where = json.dumps(facts.location)
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if facts.adapter:
        lines += ["from peft import AutoPeftModelForCausalLM, PeftModel", "",
                  f"tokenizer = AutoTokenizer.from_pretrained({where})",
                  f"model = AutoPeftModelForCausalLM.from_pretrained({where})  # base model + trained adapters"]
        if facts.has_ema:
            base = json.dumps(facts.base_model or "BASE_MODEL")
            lines += [f"ema = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base}), {where}, "
                      'subfolder="ema")']
    else:
        lines += ["", f"tokenizer = AutoTokenizer.from_pretrained({where})",
                  f"model = AutoModelForCausalLM.from_pretrained({where})"]
        if facts.has_ema:
            lines.append(f'ema = AutoModelForCausalLM.from_pretrained({where}, subfolder="ema")')
    if facts.chat:
        lines += ["",
                  f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(EXAMPLE_PROMPT)}}}]",
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True)"]
    else:
        lines += ["", f"inputs = tokenizer({json.dumps(EXAMPLE_PROMPT)}, return_tensors=\"pt\")  # raw text: no chat "
                  "template"]
    lines += [f"output = {generate_with}.generate(**inputs, max_new_tokens=64)",
              "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    return "\n".join(lines)


def policy_card_body(facts: CardFacts) -> str:
    title = facts.model_name or Path(facts.location).name or facts.location
    kind = "LoRA adapters" if facts.adapter else "a causal language model"
    lines = [f"# {title}", "",
             f"{kind[0].upper() + kind[1:]} trained with [sapo](https://arxiv.org/abs/{PAPER_ID}) (recipe "
             f"`{facts.recipe}`, loss `{facts.loss_type}`): Self-Augmented Preference Optimization, which makes its "
             "own rejected responses from demonstrations while it trains.", "",
             f"- **Base model:** `{facts.base_model or 'unknown'}`",
             f"- **Training data:** `{facts.data or 'in-memory dataset'}`",
             f"- **Recipe:** `{facts.recipe}`"]
    if facts.has_ema:
        lines.append(f"- **EMA model:** `{EMA_DIR}/` beside this file (see [its card]({EMA_DIR}/{CARD_FILE}))")
    lines += ["", "## How to load", "", "```python", loading_snippet(facts), "```", ""]
    if facts.adapter:
        lines += ["`AutoPeftModelForCausalLM` loads the base model named in `adapter_config.json` "
                  f"(`{facts.base_model or 'unknown'}`), which must be reachable from where you load.", ""]
    lines += _reproduce(facts) + _settings_table(facts.settings) + _metrics_sections(facts)
    lines += _framework_versions(facts.adapter) + _citation()
    return "\n".join(lines) + "\n"


def ema_card_body(facts: CardFacts) -> str:
    beta = "" if facts.ema_beta is None else f" with decay `ema_beta` = {facts.ema_beta}"
    snippet = dataclasses.replace(facts, has_ema=True)
    lines = [f"# EMA model of {facts.model_name or Path(facts.location).name or facts.location}", "",
             f"The exponential moving average of the policy's weights{beta}: after every optimizer step, "
             "`theta_ema <- ema_beta * theta_ema + (1 - ema_beta) * theta`. During SAPO training this model generated "
             "the rejected segments; it is a smoother copy of the policy and can be evaluated or served like it.", "",
             f"- **Policy:** the directory above (see [its card](../{CARD_FILE}))",
             f"- **Base model:** `{facts.base_model or 'unknown'}`",
             f"- **Recipe:** `{facts.recipe}`", "",
             "## How to load", "", "```python", loading_snippet(snippet, generate_with="ema"), "```", "",
             f"`ema` is this model; `model` is the policy. Loading this `{EMA_DIR}/` directory directly by its path "
             "works as well."]
    return "\n".join(lines + ["", *_framework_versions(facts.adapter), *_citation()]) + "\n"


def _reproduce(facts: CardFacts) -> list[str]:
    if facts.command:
        return ["## Reproduce", "", "```bash", facts.command, "```", ""]
    return ["## Reproduce", "", "Trained from Python with `SAPOTrainer`; settings below.", ""]


def _settings_table(settings: Mapping[str, Any]) -> list[str]:
    lines = ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | `{_cell(json.dumps(value, default=str))}` |" for name, value in settings.items()]
    return [*lines, ""]


def _metrics_sections(facts: CardFacts) -> list[str]:
    lines = ["## Final training metrics", ""]
    lines += _metrics_table(facts.metrics) if facts.metrics else ["No training step was logged."]
    if facts.eval_metrics:
        lines += ["", "## Final evaluation metrics", "", *_metrics_table(facts.eval_metrics)]
    return [*lines, ""]


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    return ["| metric | value |", "|---|---|"] + [
        f"| `{name}` | {value:.4g} |" if isinstance(value, float) else f"| `{name}` | {value} |"
        for name, value in metrics.items()]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _framework_versions(adapter: bool) -> list[str]:
    """The versions that made the files (PEFT's own line format, so PEFT's card update finds it and adds none)."""
    packages = [("sapo", "sapo-align"), ("Transformers", "transformers"), ("PyTorch", "torch"),
                ("huggingface_hub", "huggingface_hub"), *([("PEFT", "peft")] if adapter else [])]
    lines = ["### Framework versions", ""]
    for shown, distribution in packages:
        try:
            lines.append(f"- {shown} {version(distribution)}")
        except PackageNotFoundError:
            continue
    return [*lines, ""]


def _citation() -> list[str]:
    return ["## Citation", "", f"SAPO was introduced in [{PAPER_TITLE}](https://huggingface.co/papers/{PAPER_ID}):",
            "", "```bibtex", CITATION, "```"]


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The front matter of an existing card (PEFT's, or one written earlier); an unreadable one counts as none."""
    if not path.is_file():
        return {}
    try:
        return ModelCard.load(path).data.to_dict()
    except (ValueError, OSError) as error:
        logger.warning("%s: its metadata cannot be read (%s); a new card replaces it", path, error)
        return {}


def write_cards(directory: Path, facts: CardFacts) -> None:
    """`directory/README.md` and, when `directory/ema` exists, `ema/README.md`, each merged over the card already
    there (PEFT writes one with every adapter it saves). A card mentions the EMA model only when `ema/` is there
    (`push_to_hub` before the final save uploads the policy alone)."""
    has_ema = facts.has_ema and (directory / EMA_DIR).is_dir()
    facts = dataclasses.replace(facts, has_ema=has_ema)
    _write(directory / CARD_FILE, facts, ema=False)
    if has_ema:
        _write(directory / EMA_DIR / CARD_FILE, facts, ema=True)


def _write(path: Path, facts: CardFacts, *, ema: bool) -> None:
    metadata = card_metadata(facts, read_card_metadata(path), ema=ema)
    body = ema_card_body(facts) if ema else policy_card_body(facts)
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}").save(path)
