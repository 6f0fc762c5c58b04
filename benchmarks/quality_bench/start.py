"""The shared start: the SFT checkpoint on the start's demonstrations, its census of the new ones (before
anything long runs), and its held-out score."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sapo import metrics as m

from .diagnostics import census_mean, fixed_pair_scores, rewrite_census, tokenized_pairs, trained_prompts
from .evaluation import curve_callback, judged
from .runs import config_of
from .settings import BASE, CENSUS_KEYS, SFT_KEYS, SUITE_SEED, RunSpec, Settings, key_of
from .suite import diagnostic_records, start_dev


def census_trainer(settings: Settings, root: Path, records: Sequence[dict], temperature: float) -> Any:
    """A sapo-dpo trainer on the start, built only for its generator (nothing is trained)."""
    from sapo.trainer import SAPOTrainer

    spec = RunSpec("start", "census", BASE, SUITE_SEED, settings.grid_learning_rates[0], settings.grid_betas[0],
                   "dev", (("temperature", temperature),))
    return SAPOTrainer(model=str(root / "sft"), args=config_of(spec, settings, root / spec.directory),
                       train_dataset=list(records))


def start_census(settings: Settings, suite: dict[str, list[dict]], root: Path) -> dict[str, Any]:
    """The start on the new demonstrations: its rewrites' census at each census temperature, the fixed pairs
    (its rewrites at the base temperature) and their log-probabilities under it; cached in `start.json`."""
    path = root / "sft" / "start.json"
    key = {"sft": key_of(settings, SFT_KEYS), "census": key_of(settings, CENSUS_KEYS)}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved
    records = diagnostic_records(settings, suite)
    result: dict[str, Any] = {"key": key, "census": {}}
    for temperature in sorted({*settings.census_temperatures, settings.temperature}):
        trainer = census_trainer(settings, root, records, temperature)
        census = rewrite_census(trainer, tokenized_pairs(trainer, records), SUITE_SEED)
        result["census"][f"{temperature:g}"] = census["families"]
        if temperature == settings.temperature:
            result["pairs"] = census["pairs"]
            result["scores"] = fixed_pair_scores(trainer.policy, census["pairs"])
    path.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return result


def train_start(settings: Settings, suite: dict[str, list[dict]], directory: Path, log=print) -> dict[str, Any]:
    """The shared SFT checkpoint, trained on the start's demonstrations only, with its dev curves (its own side
    and the new side); reused from `directory` when trained with the same settings."""
    from sapo import tiny
    from sapo.callbacks import LogLines
    from sapo.config import SAPOConfig
    from sapo.trainer import SAPOTrainer

    meta_file = directory / "sft.json"
    key = key_of(settings, SFT_KEYS)
    if meta_file.exists() and (directory / "model.safetensors").exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("key") == key:
            log(f"SFT checkpoint: reusing {directory} (same settings)")
            return meta
    log(f"SFT checkpoint: {settings.sft_steps} steps on the start's {len(suite['start'])} demonstrations, dev "
        f"curves every {settings.sft_eval_every} steps")
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                             max_position_embeddings=max(512, settings.max_length), seed=SUITE_SEED)
    args = SAPOConfig(
        output_dir=str(directory), overwrite_output_dir=True, recipe="sft", seed=SUITE_SEED,
        max_steps=settings.sft_steps, per_device_train_batch_size=settings.sft_batch_size,
        learning_rate=settings.sft_learning_rate, warmup_steps=min(50, settings.sft_steps),
        lr_scheduler_type="cosine", weight_decay=0.0, max_length=settings.max_length,
        max_prompt_length=settings.max_prompt_length, logging_steps=50, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True)
    own = curve_callback(start_dev(settings), settings, settings.sft_eval_every, lambda: model, lambda: tokenizer)
    new = curve_callback(suite["dev"], settings, settings.sft_eval_every, lambda: model, lambda: tokenizer)
    trainer = SAPOTrainer(model=model, args=args, train_dataset=suite["start"], processing_class=tokenizer,
                          callbacks=[own, new])
    trainer.remove_callback(LogLines)
    trainer.train()
    trainer.save_model()
    losses = [row[m.LOSS] for row in trainer.state.log_history if m.LOSS in row]
    meta = {"key": key, "dir": str(directory), "dev_curve": own.points, "new_dev_curve": new.points,
            "loss_first": losses[0], "loss_last": losses[-1], "seconds": own.training_seconds() - new.judging,
            "parameters": sum(p.numel() for p in model.parameters())}
    meta_file.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (directory / "trained_prompts.json").write_text(json.dumps(trained_prompts(trainer)) + "\n", encoding="utf-8")
    return meta


def check_signal(census: dict[str, Any], settings: Settings) -> None:
    """Nothing long runs when the start reproduces the new demonstrations: SAPO would learn from identical pairs."""
    identical = census_mean(census["census"][f"{settings.temperature:g}"], "identical")
    if identical > settings.max_start_identical:
        raise RuntimeError(
            f"the start rewrites {identical:.0%} of the new demonstrations into themselves at temperature "
            f"{settings.temperature:g} (max_start_identical {settings.max_start_identical:g}): the recipes would "
            "have little to learn from; train the start less (--sft_steps), use --split_rule harder, or raise "
            "--max_start_identical to run anyway")


def start_scores(settings: Settings, suite: dict[str, list[dict]], directory: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory)
    return judged(model, AutoTokenizer.from_pretrained(directory), suite["heldout"], settings)
