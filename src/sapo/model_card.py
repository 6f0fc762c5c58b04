"""The README.md written next to a trained model: what it came from and how to reproduce it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

# TrainingArguments fields worth repeating in a card; SAPO's own fields are always listed.
TRAINER_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                  "per_device_train_batch_size", "gradient_accumulation_steps", "optim", "weight_decay",
                  "max_grad_norm", "bf16", "fp16", "seed")


def card_settings(config: Any, sapo_field_names: Sequence[str]) -> dict[str, Any]:
    """The settings shown in the card: every SAPO field plus the main Trainer ones."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    names = [*sapo_field_names, *TRAINER_FIELDS]
    return {name: values[name] for name in names if name in values}


def final_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last logged training row (the one with a loss), without bookkeeping keys."""
    rows = [row for row in log_history if "loss" in row]
    if not rows:
        return {}
    return {key: value for key, value in rows[-1].items() if key not in ("epoch",)}


def render_model_card(*, base_model: str | None, data: str | None, recipe: str, settings: Mapping[str, Any],
                      metrics: Mapping[str, Any], command: str | None) -> str:
    """Markdown model card; values are JSON-formatted so the card can be read back by tools."""
    lines = [
        "---", "library_name: transformers", "tags: [sapo, preference-optimization]", "---", "",
        f"# Trained with sapo ({recipe})", "",
        "Self-Augmented Preference Optimization (Yin et al., arXiv 2405.20830) with the `sapo` package.",
        "",
        f"- **Base model:** `{base_model or 'unknown'}`",
        f"- **Training data:** `{data or 'in-memory dataset'}`",
        f"- **Recipe:** `{recipe}`",
        "- **EMA model:** `ema/` beside this file (when the recipe keeps one)" if recipe.startswith("sapo") else "",
        "", "## Reproduce", "",
    ]
    lines += (["```bash", command, "```"] if command else ["Trained from Python with `SAPOTrainer`; settings below."])
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{name}` | `{json.dumps(value, default=str)}` |" for name, value in settings.items()]
    lines += ["", "## Final training metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{name}` | {value:.4g} |" if isinstance(value, float) else f"| `{name}` | {value} |"
                  for name, value in metrics.items()]
    else:
        lines.append("No training step was logged.")
    return "\n".join(lines) + "\n"
