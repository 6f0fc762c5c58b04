"""The end of a run: the final policy, its EMA model and the model cards written into `.staging/` and published
as one set under the output-dir lock (`SAPOTrainer.save_model`), and the cards themselves (`sapo.model_card`)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer

from sapo.config import sapo_fields
from sapo.copies import EMA
from sapo.data import save_tokenizer
from sapo.errors import TrainingStopped
from sapo.loading import is_peft_model
from sapo.model_card import CardFacts, card_settings, final_eval_metrics, final_metrics, write_cards
from sapo.run.fserrors import filesystem_error
from sapo.run.paths import EMA_DIR, FINAL_PARTIAL, STAGING_DIR
from sapo.run.publish import publish_final
from sapo.run.signals import on_stop_signals
from sapo.run.start import release_output_dir, take_output_lock
from sapo.run.state import check_output_dir_still_ours
from sapo.sharding import materialized


def save_model(trainer: Any, output_dir: str | None = None, _internal_call: bool = False) -> None:
    """The policy as Trainer saves it; a final save also writes the EMA model to `ema/` beside it, and the card.

    The final outputs are written into `.staging/` and published as one set (`checkpoint.publish_final`), under
    the output-dir lock, which is released afterwards. A signal meanwhile lets the save finish, then raises
    `TrainingStopped` (as does a signal received during the last step). Under FSDP2/ZeRO-3 the final policy is
    gathered here into an ordinary model directory, whatever the engine's state_dict_type or 16-bit-gather
    settings (checkpoints keep the engine's own sharded format).
    """
    if _internal_call:  # a checkpoint's weights, in the Trainer's (engine's) format
        Trainer.save_model(trainer, output_dir, _internal_call)
        return
    directory = Path(output_dir or trainer.args.output_dir)
    staged = directory / STAGING_DIR / FINAL_PARTIAL
    main = trainer.args.should_save
    owns_lock = directory.resolve() == Path(trainer.args.output_dir).resolve()
    try:
        with on_stop_signals(lambda reason, code: setattr(trainer, "_stop_reason", (reason, code)),
                             "finishing the final save first", armed=trainer._stop_reason is None):
            if owns_lock:
                check_output_dir_still_ours(trainer)
                take_output_lock(trainer, directory)  # held since train(), unless save_model is called alone
            if main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            trainer.accelerator.wait_for_everyone()
            if trainer.copies.sharding == "replicated":  # internal: a push waits for the published set, below
                Trainer.save_model(trainer, str(staged), _internal_call=True)
            else:
                policy = materialized(trainer.policy, trainer.copies.sharding, {}, trainer.copies.params[0].dtype,
                                      "cpu")
                write_model_directory(trainer, policy, str(staged))
            if trainer.copies.ema is not None:  # every rank: sharded copies are gathered
                write_model_directory(trainer, trainer.copies.as_model(EMA, device="cpu"), str(staged / EMA_DIR))
            if main:
                trainer.write_model_card(str(staged))
            trainer.accelerator.wait_for_everyone()
            if main:
                publish_final(staged, directory, trainer.state.global_step)
            trainer.accelerator.wait_for_everyone()
    except Exception as error:
        if main:  # a partly written final set is never used: free its space now
            shutil.rmtree(staged, ignore_errors=True)
        full = filesystem_error(error, directory)
        if full is None:
            raise
        raise full from error
    finally:
        if owns_lock:
            release_output_dir(trainer)
    if trainer.args.push_to_hub and owns_lock:  # what Trainer.save_model does, once the whole set is in place
        trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)
    if trainer._stop_reason is not None:
        reason, code = trainer._stop_reason
        trainer._stop_reason = None
        raise TrainingStopped(f"{reason} at the end of training: the run had finished, and its final model, EMA "
                              f"and model card were written completely to {directory} (nothing to resume)",
                              None, code)


def write_model_card(trainer: Any, directory: str) -> None:
    """README.md beside the final model and ema/README.md beside the EMA model (`sapo.model_card`). `directory`
    is where they are written; the snippets load from where they are published (the final save writes into
    `.staging/` first), or from the Hub repo once `push_to_hub` has set one up."""
    written = Path(directory)
    published = written.parents[1] if written.parent.name == STAGING_DIR else written
    write_cards(written, card_facts(trainer, trainer.hub_model_id or str(published)))


def create_model_card(trainer: Any, model_name: str | None = None, dataset_name: str | None = None,
                      tags: str | list[str] | None = None, *, language: str | list[str] | None = None,
                      license: str | None = None, finetuned_from: str | None = None,
                      dataset: str | list[str] | None = None) -> None:
    """Our card in output_dir, in place of transformers' generic one: `Trainer.push_to_hub` calls this just before
    it uploads output_dir. Takes TRL's arguments (model_name, dataset_name, tags) and the Trainer's that apply
    (language, license, finetuned_from for the base model, dataset)."""
    if not trainer.is_world_process_zero():
        return
    if isinstance(dataset, list):
        dataset = dataset[0] if dataset else None
    chosen = dataset_name or dataset
    extra = {key: value for key, value in (("language", language), ("license", license)) if value}
    facts = card_facts(trainer, trainer.hub_model_id or trainer.args.output_dir, model_name=model_name, data=chosen,
                             base_model=finetuned_from, tags=[tags] if isinstance(tags, str) else tags or [],
                             extra_metadata=extra)
    write_cards(Path(trainer.args.output_dir), facts)


def card_facts(trainer: Any, location: str, *, model_name: str | None = None, data: str | None = None,
                base_model: str | None = None, tags: Sequence[str] = (),
                extra_metadata: dict[str, Any] | None = None) -> CardFacts:
    history = trainer.state.log_history
    return CardFacts(
        location=location, recipe=trainer.args.recipe, loss_type=trainer.args.loss_type,
        base_model=base_model or getattr(getattr(trainer.policy, "config", None), "_name_or_path", None) or None,
        data=data or trainer.data_source or getattr(trainer, "data_description", None),
        adapter=is_peft_model(trainer.policy), has_ema=trainer.copies.ema is not None,
        ema_beta=trainer.args.ema_beta if trainer.copies.ema is not None else None,
        settings=card_settings(trainer.args, [f.name for f in sapo_fields()]), metrics=final_metrics(history),
        eval_metrics=final_eval_metrics(history), command=trainer.command, model_name=model_name, tags=tuple(tags),
        extra_metadata=extra_metadata or {},
        chat=bool(getattr(trainer.processing_class, "chat_template", None)))


def write_model_directory(trainer: Any, model_context: Any, directory: str) -> None:
    """Enter `model_context` on every rank (it may gather shards); the main process saves model + tokenizer."""
    with model_context as model:
        if trainer.args.should_save:
            model.save_pretrained(directory)
            save_tokenizer(trainer.processing_class, directory)
