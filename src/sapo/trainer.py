"""`SAPOTrainer`: the SAPO loop on top of `transformers.Trainer`, as wiring.

Each optimizer step (SPEC §1): the recipe turns the incoming demonstrations into pairs (for SAPO: the
EMA model rewrites a segment of each real response, the triples go into a replay buffer, a batch is
replayed), a preference loss is minimised, and after the optimizer step the EMA is updated and the
reference refreshed when the recipe says so.

The parts live in their own modules: `recipes` (where pairs come from), `copies` (the EMA model and the
reference in every engine), `losses`, `logprobs`, `generation`, `checkpoint` (output-directory rules and
durable checkpoints). Subclassing `Trainer` (as TRL does) means accelerate, DeepSpeed, FSDP, mixed precision,
logging integrations and checkpoint plumbing come from the ecosystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, get_last_checkpoint, rotate_checkpoints

from sapo.checkpoint import (
    OutputDirLock,
    check_allowed_changes,
    check_output_dir,
    check_output_lock,
    checkpoint_step,
    clear_previous_checkpoints,
    data_fingerprint,
    first_missing,
    on_stop_signals,
    publish_directory,
    publish_final,
    read_json,
    read_run_state,
    recover_staging,
    remove_if_created_empty,
    restore_metrics,
    run_setting_names,
    run_settings,
    save_metrics_rows,
    truncate_metrics,
    validate_checkpoint,
    write_checksums,
    write_json,
    write_manifest,
)
from sapo.config import SAPOConfig, sapo_fields
from sapo.copies import EMA, REFERENCE, SHARDS, ModelCopies
from sapo.data import collate_examples, keep_legacy_flag, save_tokenizer, tokenized_dataset
from sapo.errors import USER_ERRORS, CheckpointError, OutputDirError, TrainingStopped, UsageError
from sapo.fserrors import filesystem_error
from sapo.generation import SegmentSampler, checkpoint_sampling, eos_token_ids_of, make_sampler
from sapo.heldout import (
    EVAL_PAIRS_FILE,
    EVAL_SEED_OFFSET,
    SINGLE,
    EvalPairs,
    EvalSet,
    check_eval_data,
    check_metric_for_best_model,
    eval_metric_names,
    eval_metrics,
    independent_rng,
    load_eval_judge,
    load_eval_pairs,
    pair_statistics,
    prepare_eval_sets,
    real_statistics,
    rejected_source,
    save_eval_pairs,
    segment_rejected,
    whole_rejected,
)
from sapo.layout import (
    CHECKPOINT_METRICS_FILE,
    CHECKPOINT_PREFIX,
    EMA_DIR,
    FINAL_PARTIAL,
    LOCK_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    RUN_STATE_FILE,
    STAGING_DIR,
    STATE_DIR,
    TRAINER_STATE_FILE,
    step_state_file,
)
from sapo.loading import load_policy, load_reference, warn_unless_loaded_with  # noqa: F401  (re-exported)
from sapo.losses import LOSSES, nll_from_logps, pair_metrics
from sapo.model_card import CardFacts, card_settings, final_eval_metrics, final_metrics, write_cards
from sapo.outdir import (
    clear_previous_final,
    holds_only_start_files,
    no_checkpoint_message,
    refuse_inputs_in_output_dir,
)
from sapo.recipes import RECIPES, Recipe, StepServices, pad_pair_sequences, pad_sequences
from sapo.scoring import PairScoring
from sapo.sharding import any_rank, local_shard, materialized
from sapo.start_weights import StartWeights

logger = logging.getLogger(__name__)

NONFINITE_EXIT_CODE = 3  # exit status of a run stopped by repeated non-finite steps
NO_SIGNAL_WARNING_STEPS = 10  # skipped steps in a row after which the run says why it is not learning


def refuse_an_uncoordinated_launch(args: SAPOConfig) -> None:
    """Every process the launcher started must be part of one job, or N processes would each train alone into one
    output_dir. Checked before anything is created."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size != launched:
        raise UsageError(f"the launcher started {launched} processes but accelerate joined {args.world_size} of them "
                         "into this job (DeepSpeed needs GPUs; on a machine without GPUs use plain DDP: torchrun "
                         "--nproc_per_node N -m sapo.cli train ...)")


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class _SAPOStepHooks(TrainerCallback):
    """SAPO's once-per-optimizer-step work, placed around the Trainer's optimizer step."""

    def __init__(self, trainer: SAPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.trainer.ref_update_steps is None:  # default: one epoch of optimizer steps
            batches = len(train_dataloader) if train_dataloader is not None else 1
            self.trainer.ref_update_steps = max(1, math.ceil(batches / args.gradient_accumulation_steps))
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            self.trainer.recipe.set_epoch_length(len(train_dataloader))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer._skip_step_without_signal():
            self.trainer._skip_step_if_nonfinite()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        if state.global_step >= state.max_steps:  # a run shorter than logging_steps still logs its training rows
            control.should_log = True
        if self.trainer._should_stop():
            control.should_save = True
            control.should_training_stop = True


class _HeldOutPairsAtStart(TrainerCallback):
    """Before the first training step (after a resumed checkpoint's state is loaded), the eval pairs exist: made by
    the start model, or restored with the checkpoint."""

    def __init__(self, trainer: SAPOTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        for key in self.trainer._eval_sets:
            self.trainer._heldout_pairs(key)


class _NothingToTrain(Exception):
    """The resumed checkpoint is already at the run's last step."""


class _ResumeStart(TrainerCallback):
    """At the start of training, once the Trainer has loaded the checkpoint and knows max_steps: bring metrics.jsonl
    back to the resumed step, stop before any step when the checkpoint is the run's end (the Trainer would train
    one step past max_steps), and give back the Trainer's loss accumulators saved with the checkpoint."""

    def __init__(self, trainer: SAPOTrainer, checkpoint: str | None) -> None:
        self.trainer, self.checkpoint = trainer, checkpoint
        self.resumed_step = checkpoint_step(checkpoint) if checkpoint else 0

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        finished = self.resumed_step > 0 and state.global_step >= state.max_steps
        metrics = Path(args.output_dir) / METRICS_FILE
        if trainer.is_world_process_zero() and self.checkpoint:
            restore_metrics(metrics, Path(self.checkpoint) / STATE_DIR / CHECKPOINT_METRICS_FILE, self.resumed_step,
                            keep_summary=finished)
        elif trainer.is_world_process_zero() and metrics.exists():
            truncate_metrics(metrics, 0)
        if trainer.is_world_process_zero() and self.resumed_step == 0 and trainer._rows_before_training:
            trainer._append_metrics_rows(trainer._rows_before_training)  # a baseline evaluate() of a fresh run
        trainer._rows_before_training = []
        if finished:
            raise _NothingToTrain
        saved = trainer._resumed_step_state or {}
        if "tr_loss" in saved and isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
            trainer._tr_loss += saved["tr_loss"]
            trainer._globalstep_last_logged = saved["globalstep_last_logged"]


LIVE_METRICS = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "acc",
                "buffer/size": "buffer", "generation/tokens_per_second": "gen tok/s"}


class _LiveProgress(TrainerCallback):
    """Shows the latest loss, margin, accuracy, buffer fill and generation throughput on the training bar."""

    def __init__(self, trainer: SAPOTrainer) -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = next((getattr(cb, "training_bar", None) for cb in self.trainer.callback_handler.callbacks
                    if getattr(cb, "training_bar", None) is not None), None)
        postfix = {short: f"{logs[key]:.3g}" for key, short in LIVE_METRICS.items() if key in (logs or {})}
        if bar is None or not postfix:  # e.g. the end-of-training summary row
            return
        if "buffer" in postfix:
            postfix["buffer"] = f"{int(logs['buffer/size'])}/{self.trainer.args.max_replay_buffer_size}"
        bar.set_postfix(postfix, refresh=True)


class SAPOTrainer(Trainer):
    """Self-Augmented Preference Optimization; use like TRL's trainers.

    `train_dataset` holds demonstrations only (chat `messages`, `prompt`/`completion`, or preference
    records whose `chosen` side is used); rejected responses are made by the EMA model during training.
    `eval_dataset` (the same record formats, or a dict of them by name) is evaluated on pairs made once per run, with
    `eval_strategy`/`eval_steps` or `evaluate()` (see `sapo.heldout`).
    Public parts: `recipe` (the pair source: for SAPO its `buffer`), `copies` (`ema`, `reference`), `sampler`.
    """

    _output_lock: OutputDirLock | None = None  # held by the main process from train() to the final save_model()
    _data_fingerprint: str | None = None  # computed once, when a checkpoint is saved or validated
    _resumed_step_state: dict[str, Any] | None = None  # the Trainer's loss accumulators saved with the checkpoint
    _grad_norm: Any = None  # the Trainer's gradient norm of the step about to be taken, until it is checked

    def __init__(
        self,
        model: nn.Module | str,
        args: SAPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        *,
        ref_model: nn.Module | str | None = None,
        peft_config: Any = None,
        sampler: SegmentSampler | None = None,
        chat_template: str | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        eval_dataset: Any = None,
    ) -> None:
        args = args or SAPOConfig(output_dir="sapo-output")
        if not isinstance(args, SAPOConfig):
            raise TypeError(f"args must be a SAPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("SAPOTrainer needs a train_dataset of demonstrations")
        check_eval_data(args, eval_dataset)
        self.eval_judge = load_eval_judge(args.eval_judge)
        self.rejected_judge = load_eval_judge(args.rejected_judge, "rejected_judge")
        model, processing_class = self._load(model, processing_class, chat_template, peft_config,
                                             args.model_init_kwargs, args.max_length)
        self._start_weights = StartWeights(model)  # before training changes an in-memory model's tensors
        if args.disable_dropout:
            disable_dropout(model)
        if sampler is None and args.generation_engine == "static":  # refuse before anything is written
            try:
                checkpoint_sampling(getattr(model, "generation_config", None), args.sampling_settings.do_sample)
            except ValueError as error:
                raise UsageError(f"generation_engine 'static': {error}") from None
        refuse_an_uncoordinated_launch(args)
        self.eos_token_ids = eos_token_ids_of(processing_class, model)
        dataset = tokenized_dataset(train_dataset, processing_class, args, self.eos_token_ids)
        self._eval_sets: dict[str, EvalSet] = {} if eval_dataset is None else prepare_eval_sets(
            eval_dataset, processing_class, args, self.eos_token_ids)
        if self._eval_sets:
            check_metric_for_best_model(args.metric_for_best_model,
                                        eval_metric_names(args, list(self._eval_sets), self.eval_judge is not None))
        self._eval_pairs: dict[str, EvalPairs] = {}  # made once per run (see sapo.heldout), saved with checkpoints
        self._eval_statistics: list[torch.Tensor] = []
        self._eval_active: EvalPairs | None = None
        self._rows_before_training: list[dict[str, Any]] = []  # logged by evaluate() before train(), written once
        # it starts (a fresh run's output_dir must be empty, and its metrics.jsonl starts empty)
        self._first_created = first_missing(Path(args.output_dir))  # Trainer creates it; undone on early errors
        if args.dataloader_pin_memory and args.device.type == "cpu":  # nothing to pin for; torch warns each epoch
            args.dataloader_pin_memory = False
        super().__init__(model=model, args=args, data_collator=collate_examples, train_dataset=dataset,
                         eval_dataset=self._trainer_eval_dataset(), processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers)
        self.model_accepts_loss_kwargs = False  # our loss is a per-pair mean; Trainer divides by accumulation steps
        self._refuse_a_dropped_engine()
        if self.eval_judge is not None and self._will_shard():
            self._remove_created_output_dir()
            raise UsageError("eval_judge generates with the policy, which FSDP/ZeRO-3 shards; with those engines "
                             "judge saved checkpoints with `sapo eval` instead")
        ref_model = self._load_reference(ref_model if args.uses_reference else None)
        self._reference_weights = None if ref_model is None else StartWeights(ref_model)
        self.copies = ModelCopies(
            self.policy, need_ema=args.self_augmenting, need_reference=args.uses_reference,
            reference_moves=self._reference_moves(), is_peft=is_peft_model(self.model), sharded=self._will_shard(),
            offload=args.offload_copies, dtype=args.copies_dtype, device=args.device, ref_model=ref_model)
        if not self.copies.params:
            raise ValueError("the model has no trainable parameters")
        self.sampler: SegmentSampler = sampler or self._make_sampler()
        self._metrics: dict[str, list[float | torch.Tensor]] = defaultdict(list)  # tensors: synced when logged
        self.recipe: Recipe = RECIPES[args.recipe](args, self._services(), seed=args.seed + args.process_index)
        self.ref_update_steps = args.ref_update_steps
        self.scoring = PairScoring(args, self.policy, self.copies, self.recipe, processing_class.pad_token_id,
                                   processing_class.eos_token_id, self.accelerator.autocast, self._record,
                                   checks_reference=ref_model is not None)
        self._timing = {"generation": 0.0, "step": 0.0, "generated_tokens": 0.0}
        self._step_skipped = False
        self._step_has_signal = False  # some micro-batch of the current optimizer step has pairs that carry signal
        self.no_signal_steps = 0
        self._no_signal_in_a_row = 0
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self._stop_reason: tuple[str, int] | None = None
        self.data_source: str | None = None  # shown in the model card; the CLI sets both
        self.command: str | None = None
        self.add_callback(_SAPOStepHooks(self))
        self.add_callback(_LiveProgress(self))
        if self._eval_sets:
            self.add_callback(_HeldOutPairsAtStart(self))

    # --------------------------------------------------------------------------------------------
    # Construction
    # --------------------------------------------------------------------------------------------

    @staticmethod
    def _load(model: nn.Module | str, tokenizer: Any, chat_template: str | None, peft_config: Any,
              model_init_kwargs: dict[str, Any] | None, max_length: int | None = None) -> tuple[nn.Module, Any]:
        """The policy and its prepared tokenizer, loaded and checked by `sapo.loading` (the loader `sapo train` and
        `sapo eval` use), then wrapped with LoRA when asked."""
        model, tokenizer = load_policy(model, tokenizer, chat_template=chat_template, init_kwargs=model_init_kwargs,
                                       max_length=max_length)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        return model, tokenizer

    def _load_reference(self, ref_model: nn.Module | str | None) -> nn.Module | None:
        """A reference given by path is loaded with `ref_model_init_kwargs` (default: the policy's
        `model_init_kwargs`, so both load alike, as TRL does); either way it is checked like the policy."""
        init_kwargs = self.args.ref_model_init_kwargs
        if isinstance(ref_model, str):
            name = "model_init_kwargs" if init_kwargs is None else "ref_model_init_kwargs"
            chosen = self.args.model_init_kwargs if init_kwargs is None else init_kwargs
            return load_reference(ref_model, chosen, name, self.processing_class, self.args.max_length)
        if ref_model is not None and init_kwargs:
            warn_unless_loaded_with(ref_model, init_kwargs, "ref_model_init_kwargs", "ref_model")
        elif ref_model is None and init_kwargs is not None:
            logger.warning("ref_model_init_kwargs is unused: it applies to a ref_model given by path, and this run %s",
                           "has none" if self.args.uses_reference else f"(recipe {self.args.recipe!r}, loss "
                           f"{self.args.loss_type!r}) uses no reference model")
        return load_reference(ref_model, None, "ref_model_init_kwargs", self.processing_class, self.args.max_length)

    def _make_sampler(self) -> SegmentSampler:
        """The configured engine, told the fixed shapes of this run's generation calls (rows of a round, a bound on
        context + new tokens) so that a compiled decode step is compiled once for the whole run."""
        args = self.args
        shapes = {} if args.generation_engine == "hf" else {"cache_len": args.generation_cache_len}
        return make_sampler(args.generation_engine, args.sampling_settings, self.processing_class.pad_token_id,
                            self.eos_token_ids, batch_size=args.generation_rows, device=args.device,
                            generation_config=getattr(self.policy, "generation_config", None), **shapes)

    def _refuse_a_dropped_engine(self) -> None:
        """An engine asked for must be the one accelerate set up: it silently trains plain DDP instead of FSDP on CPU
        processes. Checked before anything is written."""
        if self.args.fsdp and not self.is_fsdp_enabled:
            self._remove_created_output_dir()
            raise UsageError(f"FSDP was asked for but accelerate set up {self.accelerator.distributed_type.value} "
                             "(FSDP needs GPUs; drop --fsdp on a CPU machine)")

    def _remove_created_output_dir(self) -> None:
        """Leave no trace of a run that never started (the Trainer may have created the directory)."""
        if self.args.should_save:
            remove_if_created_empty(Path(self.args.output_dir), self._first_created)

    def _services(self) -> StepServices:
        sharded = self.copies.sharded
        return StepServices(
            generate=self._generate, refresh_reference_from_policy=lambda: self.copies.refresh_reference("policy"),
            any_rank=lambda flag: any_rank(flag, self.args.device) if sharded else flag,
            record=self._record, pad_token_id=self.processing_class.pad_token_id, eos_token_ids=self.eos_token_ids,
            judge_rewrites=self._judge_rewrites if self.rejected_judge is not None else None,
            reset_optimizer=self._reset_optimizer_state)

    def _judge_rewrites(self, indices: Sequence[int | None], real: Sequence[list[int]],
                        rejected: Sequence[list[int]]) -> list[bool]:
        """`rejected_judge`: whether it scores each rewrite below its real response, both decoded as the judge of
        `sapo eval` sees answers, with the example's prompt and raw record."""
        from sapo.judging import judge_scores

        origins = [self.train_dataset.examples[i].origin if i is not None else None for i in indices]
        if any(origin is None for origin in origins):
            raise UsageError("rejected_judge needs the training records (prompts and the fields the judge reads), "
                             "not an already tokenized dataset")
        prompts, records = [o.prompt for o in origins], [o.record for o in origins]
        decode = partial(self.processing_class.decode, skip_special_tokens=True)
        name = self.args.rejected_judge
        real_scores = judge_scores(self.rejected_judge, name, prompts, [decode(t) for t in real], records)
        rejected_scores = judge_scores(self.rejected_judge, name, prompts, [decode(t) for t in rejected], records)
        return [worse < better for worse, better in zip(rejected_scores, real_scores, strict=True)]

    def _reset_optimizer_state(self) -> None:
        """Forget the optimizer's running statistics (moments, square averages): SPIN's scripts start each iteration
        with a new optimizer. The learning rate is the scheduler's, which restarts on its own."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        optimizer.state.clear()

    def _record(self, name: str, value: float | torch.Tensor) -> None:
        """A metric value, averaged with the others of its name until the next log."""
        self._metrics[name].append(value)

    @property
    def policy(self) -> nn.Module:
        """The policy without DDP/accelerate wrappers (peft wrapper kept)."""
        return self.accelerator.unwrap_model(self.model)

    def _will_shard(self) -> bool:
        """Whether the engine will shard the policy's parameters (FSDP2, ZeRO-3), known before it does."""
        if self.is_fsdp_enabled:
            if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (or "
                                 "fsdp_config={'fsdp_version': 2}); see examples/accelerate/fsdp2-8gpu.yaml")
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _reference_moves(self) -> bool:
        """Whether the reference ever changes (SPIN opponents, refreshed SAPO references)."""
        refreshed = self.args.self_augmenting and self.args.ref_update_mode != "fixed"
        return self.args.uses_reference and (refreshed or self.args.recipe == "spin")

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        """After the engine has wrapped the policy, bind the copies to it; only then load a resumed checkpoint's
        SAPO state (the copies' shards exist only now)."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self.copies.bind(self.policy, self.model_wrapped)
        if resume_from_checkpoint is not None:
            self.load_sapo_state(Path(resume_from_checkpoint) / STATE_DIR)
        return model, train_dataloader

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """A recipe may restart the schedule periodically (SPIN trains each iteration as a fresh run): the schedule
        is then built for one period and its LambdaLR factors repeat."""
        period = self.recipe.schedule_period(num_training_steps)
        if period is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        scheduler = super().create_scheduler(period, optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scale = self.recipe.learning_rate_scale
            scheduler.lr_lambdas = [_restarting_every(period, f, scale) for f in scheduler.lr_lambdas]
            return scheduler
        if self.args.spin_learning_rates:
            raise UsageError(f"spin_learning_rates: lr_scheduler_type {self.args.lr_scheduler_type!r} cannot restart "
                             "at each iteration; use linear, cosine, constant_with_warmup or another LambdaLR schedule")
        logger.warning("lr_scheduler_type %r cannot restart every %d steps; it runs once over the whole run",
                       self.args.lr_scheduler_type, period)
        self.lr_scheduler = None
        return super().create_scheduler(num_training_steps, optimizer)

    # --------------------------------------------------------------------------------------------
    # Training step and loss
    # --------------------------------------------------------------------------------------------

    def _generate(self, which: str, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Sample with the EMA model or the reference under the policy's precision policy (the copies are not
        wrapped by accelerate, so mixed precision is entered here), timed for the metrics."""
        started = time.perf_counter()
        keeps_state = getattr(self.sampler, "keeps_state", None)  # compiled decoding: hand in the same module
        persistent = bool(keeps_state and keeps_state(self.args.device))
        with self.copies.as_model(which, persistent=persistent) as generator, self.accelerator.autocast():
            samples = self.sampler.sample(generator, contexts, max_new_tokens)
        release = getattr(self.sampler, "release", None)
        if self.copies.mode == SHARDS and not persistent:
            self.copies.release_decode_modules()  # kept from compiled rounds, if compilation failed since
            if release is not None:  # caches keyed to a module that is now gone
                release()
        self._timing["generation"] += time.perf_counter() - started
        self._timing["generated_tokens"] += sum(map(len, samples))
        return samples

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        started = time.perf_counter()
        batch = self.recipe.batch(inputs, self.state.global_step, self.state.max_steps)
        self._step_has_signal = self._step_has_signal or batch.get("signal", True)
        loss = super().training_step(model, batch, num_items_in_batch)
        self._timing["step"] += time.perf_counter() - started
        return loss

    def token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs of the batch's response tokens, scored as this run scores them (`sapo.scoring`)."""
        return self.scoring.token_logps(model, batch)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        mask = inputs["loss_mask"][:, 1:]
        if self.recipe.supervised:
            loss = nll_from_logps(self.token_logps(model, inputs), mask)
            self._metrics["nll_loss"].append(loss.detach())
            return (loss, None) if return_outputs else loss
        result = self.scoring.pair_loss(model, inputs)
        if inputs.get("placeholder"):  # stand-in pairs (nothing to draw yet): they take part in the step, train nothing
            loss = result.loss * 0.0
            return (loss, result.output) if return_outputs else loss
        if result.nll is not None:
            self._metrics["nll_loss"].append(result.nll.detach())
        for name, value in pair_metrics(result, mask, inputs.get("identical")).items():
            self._metrics[name].append(value)
        loss, output = result.loss, result.output
        return (loss, output) if return_outputs else loss

    # --------------------------------------------------------------------------------------------
    # Once per optimizer step
    # --------------------------------------------------------------------------------------------

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm (the clipping norm, or the one it computes for logging with max_grad_norm
        0), kept for the non-finite check that runs next, so the gradients are not read a second time."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._grad_norm = grad_norm
        return grad_norm

    def _gradients_are_finite(self) -> bool:
        """From the Trainer's total norm of this step (non-finite iff some gradient entry is; engines that clip
        across ranks give every rank the same norm); engines that give none have their local gradients read."""
        norm, self._grad_norm = self._grad_norm, None
        if hasattr(norm, "full_tensor"):  # FSDP2: a sharded norm; the full one is the same on every rank
            norm = norm.full_tensor()
        if isinstance(norm, (torch.Tensor, float)):
            return bool(torch.isfinite(torch.as_tensor(norm)))
        grads = [local_shard(p.grad, self.copies.sharding) for p in self.copies.params if p.grad is not None]
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        if self.copies.sharded:  # each rank sees its own shard of the gradient: skip on all or none
            finite = not any_rank(not finite, self.args.device)
        return finite

    def _skip_step_without_signal(self) -> bool:
        """`skip_no_signal_steps`: a step none of whose pairs on any rank carries a gradient (identical pairs, or
        stand-ins while nothing can be drawn) changes nothing: gradients dropped, so the optimizer leaves weights and
        moments alone, and the EMA stays. Without it AdamW would still apply its momentum and weight decay, and
        would normalise rounding residue into a full-size update. Returns whether the step is skipped."""
        has_signal, self._step_has_signal = self._step_has_signal, False
        if not self.args.skips_no_signal_steps or not self.recipe.needs_ema:
            return False
        if self.args.world_size > 1:
            has_signal = any_rank(has_signal, self.args.device)
        if has_signal:
            self._no_signal_in_a_row = 0
            return False
        for param in self.copies.params:
            param.grad = None
        self._grad_norm = None
        self._step_skipped = True
        self.no_signal_steps += 1
        self._no_signal_in_a_row += 1
        if self._no_signal_in_a_row == NO_SIGNAL_WARNING_STEPS:
            logger.warning("%d optimizer steps in a row had no pair that carries signal (%d rewrites dropped so far): "
                           "the EMA model reproduces these demonstrations, so SAPO has nothing to learn from them; "
                           "use demonstrations the model has not learned, a higher temperature, or a rejected_judge "
                           "that accepts more rewrites", self._no_signal_in_a_row, getattr(self.recipe, "dropped", 0))
        return True

    def _skip_step_if_nonfinite(self) -> None:
        """Drop the gradients of a step whose loss or gradient is NaN/inf, so the optimizer leaves weights alone."""
        params = self.copies.params
        finite = self._gradients_are_finite()
        self._step_skipped = not finite
        if finite:
            self._nonfinite_in_a_row = 0
            return
        for param in params:
            param.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        logger.warning("step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total)",
                       self.state.global_step + 1, self._nonfinite_in_a_row, self.nonfinite_steps)
        if self._nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self._stop_reason = (f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                 "gradient (lower learning_rate, check the data, or use bf16 instead of fp16)",
                                 NONFINITE_EXIT_CODE)

    def _after_optimizer_step(self) -> None:
        self._metrics["nonfinite/skipped_steps"].append(float(self.nonfinite_steps))
        if self.recipe.needs_ema:
            self._metrics["steps/skipped_no_signal"].append(float(self.no_signal_steps))
        if self.copies.ema is not None and not self._step_skipped:  # a skipped step leaves the average alone too
            self.copies.update_ema(self.args.ema_beta)
        source = self.recipe.reference_refresh(self.state.global_step, self.ref_update_steps)
        if source is not None and self.copies.reference is not None:
            self.copies.refresh_reference(source)
            self.recipe.reference_moved()
            self._metrics["ref/refreshes"].append(1.0)

    def _should_stop(self) -> bool:
        """Whether any rank wants to stop; ranks must agree or the checkpoint save would deadlock."""
        stop = any_rank(self._stop_reason is not None, self.args.device)
        if stop and self._stop_reason is None:
            self._stop_reason = ("another process asked to stop", 1)
        return stop

    # --------------------------------------------------------------------------------------------
    # Training entry point: signals, output directory, resumption checks
    # --------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`, plus: one run per `output_dir` (a lock, held until the final `save_model`); a resume
        is validated before anything is written and is exact or refused; a checkpoint at the run's last step trains
        nothing more; SIGINT/SIGTERM save a checkpoint and stop, and repeated non-finite steps stop with a checkpoint
        (both raise `TrainingStopped` after saving), except that a signal during the last step lets the run end
        normally (the final `save_model` then reports it); a non-empty `output_dir` is only reused when resuming or
        with `overwrite_output_dir`."""
        try:
            resume_from_checkpoint = self._resolve_resume(resume_from_checkpoint)
            self._prepare_output_dir(resume_from_checkpoint)
        except USER_ERRORS:
            self._release_output_dir()
            self._remove_created_output_dir()
            raise
        start = _ResumeStart(self, resume_from_checkpoint)
        self.add_callback(start)
        try:
            with on_stop_signals(lambda reason, code: setattr(self, "_stop_reason", (reason, code))):
                result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except _NothingToTrain:
            logger.info("%s is at the run's last step (%d): nothing more to train", resume_from_checkpoint,
                        self.state.global_step)
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            self.is_in_train = False
            result = TrainOutput(self.state.global_step, 0.0, {})
        except Exception as error:  # a full or read-only disk: OSError, RuntimeError (torch) or SafetensorError
            full = filesystem_error(error, Path(self.args.output_dir)) or self._output_dir_gone_error()
            self._release_output_dir()
            if full is None:
                raise
            raise full from error
        except BaseException:
            self._release_output_dir()
            raise
        finally:
            self.remove_callback(start)
        if self._stop_reason is not None:
            reason, code = self._stop_reason
            if self.state.global_step >= self.state.max_steps and code != NONFINITE_EXIT_CODE:
                logger.warning("%s during the last step: training is complete, the final save follows", reason)
                return result  # save_model() reports the signal once the final outputs are written
            self._release_output_dir()
            self._stop_reason = None
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise TrainingStopped(f"training stopped at step {self.state.global_step}: {reason}; checkpoint "
                                  f"saved to {checkpoint}; resume with --resume_from_checkpoint {checkpoint}",
                                  checkpoint, code)
        return result

    def _resolve_resume(self, resume: str | bool | None) -> str | None:
        """The checkpoint to resume (`true`: the latest), validated like any path; refusals agree across ranks."""
        error: Exception | None = None
        try:
            if self.is_world_process_zero():  # a live run's checkpoints change under us: say so first
                check_output_lock(Path(self.args.output_dir))
            if self.args.resume_allow_changes:
                check_allowed_changes(self.args.resume_allow_changes,
                                      run_setting_names(self.args, [f.name for f in sapo_fields()]))
            if isinstance(resume, str) and resume.lower() in ("true", "false"):
                resume = resume.lower() == "true"
            if resume is True:
                last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
                if last is None:
                    raise CheckpointError(no_checkpoint_message(Path(self.args.output_dir)))
                resume = last
            if resume:
                self.validate_checkpoint(Path(resume))
        except USER_ERRORS as caught:
            error = caught
        if any_rank(error is not None, self.args.device):
            raise error or CheckpointError("another process of this run refused the checkpoint (its message says why)")
        return str(resume) if resume else None

    def _prepare_output_dir(self, resume: str | None) -> None:
        """Before anything is written: refuse another run's directory, take the lock, finish a publish a crash
        interrupted. (metrics.jsonl is brought back to the resumed step once training starts, see `_ResumeStart`.)"""
        out = Path(self.args.output_dir)

        def check() -> None:
            refuse_inputs_in_output_dir(out, self._input_paths())
            check_output_dir(out, resuming=resume is not None, overwrite=self.args.overwrite_output_dir)

        self._take_output_lock(out, check)
        if self.is_world_process_zero():
            recover_staging(out)
            if resume is None and self.args.overwrite_output_dir:
                removed = clear_previous_final(out) + [p.name for p in clear_previous_checkpoints(out)]
                (out / METRICS_FILE).unlink(missing_ok=True)  # the old run's rows; this run writes its own
                if removed:
                    logger.warning("overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
            elif resume is None and holds_only_start_files(out):
                logger.warning("output_dir %s holds only the start of a run that stopped before its first "
                               "checkpoint: nothing to resume there, so this run starts over", out)

    def _input_paths(self) -> dict[str, str | None]:
        """Where the models this run trains from were loaded (their `name_or_path`), which output_dir must not touch."""
        def source(model: Any) -> str | None:
            return getattr(getattr(model, "config", None), "_name_or_path", None) or None

        return {"model_name_or_path": source(self.policy),
                "ref_model": source(getattr(self.copies, "reference_module", None))}

    def _take_output_lock(self, out: Path, check: Any = None) -> None:
        """The main process runs `check` and takes `out`'s lock; a refusal is raised on every rank."""
        error: Exception | None = None
        if self.is_world_process_zero():
            try:
                if check is not None:
                    check()
                if self._output_lock is None or self._output_lock.directory != out:
                    self._release_output_dir()
                    self._output_lock = OutputDirLock(out)
                self._output_lock.acquire()
            except USER_ERRORS as caught:
                error = caught
        if any_rank(error is not None, self.args.device):
            raise error or OutputDirError(f"output_dir {out}: refused by the main process (its message says why)")

    def _release_output_dir(self) -> None:
        if self._output_lock is not None:
            self._output_lock.release()

    # --------------------------------------------------------------------------------------------
    # Logging
    # --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            logs.update(self._reduced_metrics())
        super().log(logs, start_time)
        if self.is_world_process_zero():
            record = {"step": self.state.global_step, "epoch": self.state.epoch, **logs}
            if not self.is_in_train and self.state.global_step == 0:  # evaluate() before train(): see _ResumeStart
                self._rows_before_training.append(record)
                return
            self._append_metrics_rows([record])

    def _append_metrics_rows(self, records: list[dict[str, Any]]) -> None:
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))

    def _metric_values(self) -> dict[str, list[float]]:
        """The recorded metrics as numbers: the device tensors the steps left are brought to the host in one
        transfer (the only synchronisation they cost)."""
        tensors = [v for values in self._metrics.values() for v in values if isinstance(v, torch.Tensor)]
        synced = iter(torch.stack([t.detach().float() for t in tensors]).tolist() if tensors else [])
        return {name: [next(synced) if isinstance(v, torch.Tensor) else v for v in values]
                for name, values in self._metrics.items()}

    def _reduced_metrics(self) -> dict[str, float]:
        """Means since the last log, averaged over the ranks that recorded each metric (a rank may record one that
        another does not: `rewards/accuracies` where every pair it drew was a tie, pair metrics where it had only
        stand-in pairs), so every rank reduces the same list of names."""
        metrics = self._metric_values()
        names = sorted(metrics)
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            names = sorted(set().union(*gather_object([names])))
        means = [sum(metrics[n]) / len(metrics[n]) if metrics.get(n) else 0.0 for n in names]
        recorded = [1.0 if metrics.get(n) else 0.0 for n in names]
        local = torch.tensor([means, recorded], device=self.args.device, dtype=torch.float64)
        total, ranks = self.accelerator.reduce(local, reduction="sum").tolist()
        reduced = {n: value / count for n, value, count in zip(names, total, ranks, strict=True) if count > 0}
        reduced.pop("ref/refreshes", None)
        if self._timing["step"] > 0:
            reduced["time/generation_share"] = self._timing["generation"] / self._timing["step"]
        if self._timing["generation"] > 0:
            reduced["generation/tokens_per_second"] = self._timing["generated_tokens"] / self._timing["generation"]
        self._metrics.clear()
        self._timing = {"generation": 0.0, "step": 0.0, "generated_tokens": 0.0}
        return reduced

    # --------------------------------------------------------------------------------------------
    # Evaluation on held-out data (see sapo.heldout)
    # --------------------------------------------------------------------------------------------

    def _trainer_eval_dataset(self) -> Any:
        """What `Trainer.eval_dataset` holds: one set, or sets by name (Trainer evaluates each under its name)."""
        if not self._eval_sets:
            return None
        if SINGLE in self._eval_sets:
            return self._eval_sets[SINGLE].data
        return {name: eval_set.data for name, eval_set in self._eval_sets.items()}

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate` on the run's eval pairs; records passed here (one set or sets by name) are prepared
        like the constructor's, their pairs made now and not kept. Torch's random state is given back afterwards
        (a DataLoader draws its base seed from it), so evaluating never changes the training run."""
        with independent_rng(self.args.seed + EVAL_SEED_OFFSET):
            if eval_dataset is None or isinstance(eval_dataset, (str, EvalPairs)):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            metrics: dict[str, float] = {}
            sets = prepare_eval_sets(eval_dataset, self.processing_class, self.args, self.eos_token_ids,
                                     origin="evaluate(eval_dataset)")
            for name, eval_set in sets.items():
                prefix = metric_key_prefix if name == SINGLE else f"{metric_key_prefix}_{name}"
                pairs = EvalPairs(eval_set, self._eval_rejected(eval_set))
                metrics.update(super().evaluate(pairs, ignore_keys, prefix))
            return metrics

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """Batches of the eval pairs of `eval_dataset` (a set's name, or none: the only set)."""
        if not isinstance(eval_dataset, EvalPairs):
            key = eval_dataset if isinstance(eval_dataset, str) else SINGLE
            if key not in self._eval_sets:
                known = ", ".join(repr(k) for k in self._eval_sets if k != SINGLE)
                raise UsageError("evaluation needs eval data: pass eval_dataset= to SAPOTrainer or to evaluate()"
                                 if not self._eval_sets else f"no eval set named {key!r} (the sets: {known})")
            eval_dataset = self._heldout_pairs(key)
        self._eval_active = eval_dataset
        return super().get_eval_dataloader(eval_dataset)

    def _heldout_pairs(self, key: str) -> EvalPairs:
        """The run's pairs of eval set `key`, made on first use (before the first step: by the start model)."""
        if key not in self._eval_pairs:
            self._eval_pairs[key] = EvalPairs(self._eval_sets[key], self._eval_rejected(self._eval_sets[key]))
        return self._eval_pairs[key]

    def _eval_rejected(self, eval_set: EvalSet) -> list[list[int]] | None:
        """The rejected side of an eval set's pairs (see `rejected_source`). Generated ones are sampled from a seed of
        their own, each rank for its share of the examples, and gathered so every rank holds all of them."""
        from accelerate.utils import gather_object

        source, data = rejected_source(self.args), eval_set.data
        if source is None:
            return None
        if source == "data":
            return [list(data[i]["rejected_ids"]) for i in range(len(data))]
        which = EMA if source == "segment" else REFERENCE
        if self.state.global_step > 0:
            logger.warning("eval pairs made at step %d by the %s model, not by the start model (none were saved with "
                           "the checkpoint, or the data is new)", self.state.global_step, which)
        rank, world = self.args.process_index, self.args.world_size
        mine = list(range(rank, len(data), world))
        prompts = [data[i]["prompt_ids"] for i in mine]
        seed = self.args.seed + EVAL_SEED_OFFSET + rank
        with independent_rng(seed), self._eval_generator(which) as model, self.accelerator.autocast():
            def generate(contexts, max_new_tokens):
                return self.sampler.sample(model, contexts, max_new_tokens) if contexts else []

            if source == "segment":
                rejected = segment_rejected(prompts, [data[i]["response_ids"] for i in mine], generate,
                                            token_generate_length=self.args.token_generate_length,
                                            max_length=self.args.max_length, eos_token_ids=self.eos_token_ids,
                                            rng=random.Random(seed))
            else:
                rejected = whole_rejected(prompts, generate, max_new_tokens=self.args.spin_max_new_tokens,
                                          max_length=self.args.max_length)
        gathered = dict(gather_object(list(zip(mine, rejected, strict=True))))
        return [gathered[i] for i in range(len(data))]

    def _eval_generator(self, which: str) -> Any:
        """The copy that generates (every rank enters: gathering sharded copies is collective); before the copies
        exist (sharded engines bind them when training starts) the policy, which they would equal."""
        exists = self.copies.ema is not None if which == EMA else (
            self.copies.reference is not None or self.copies.reference_module is not None)
        return self.copies.as_model(which) if exists else contextlib.nullcontext(self.policy)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """The training loss of a batch of eval pairs; per-example statistics are kept for `evaluation_loop`."""
        pad = self.processing_class.pad_token_id
        if self.recipe.supervised:
            padded = pad_sequences(list(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True)), pad)
        else:  # scored like training pairs (packed around their shared prefix where the model allows it)
            padded = pad_pair_sequences(list(zip(inputs["prompt_ids"], inputs["response_ids"], inputs["rejected_ids"],
                                                 strict=True)), pad)
        batch = self._prepare_inputs(padded)
        mask = batch["loss_mask"][:, 1:]
        with torch.no_grad():
            if self.recipe.supervised:
                token_logps = self.token_logps(model, batch)
                loss, statistics = nll_from_logps(token_logps, mask), real_statistics(token_logps, mask)
            else:
                result = self.scoring.pair_loss(model, batch)
                loss, statistics = result.loss, pair_statistics(result, mask)
        self._eval_statistics.append(self.accelerator.gather_for_metrics(statistics).cpu())
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        """`Trainer.evaluation_loop`, plus the eval-set metrics of `sapo.heldout.eval_metrics` (its `loss` replaces
        the Trainer's mean of batch losses) and, with `eval_judge`, the judged score."""
        self._eval_statistics = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        metrics = eval_metrics(torch.cat(self._eval_statistics), adds_nll=LOSSES[self.args.loss_type].adds_nll)
        self._eval_statistics = []
        if self.eval_judge is not None and self._eval_active is not None:
            metrics["judge/score"] = self._judged_score(self._eval_active.eval_set)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def _judged_score(self, eval_set: EvalSet) -> float:
        """Mean judge score of the policy's greedy answers to the eval prompts (each rank answers its share)."""
        from accelerate.utils import gather_object

        from sapo.judging import generate_responses, judge_scores

        if not eval_set.records:
            raise UsageError("eval_judge needs the eval records (prompts and the fields the judge reads), not an "
                             "already tokenized dataset")
        mine = range(self.args.process_index, len(eval_set.prompts), self.args.world_size)
        prompts, records = [eval_set.prompts[i] for i in mine], [eval_set.records[i] for i in mine]
        with independent_rng(self.args.seed + EVAL_SEED_OFFSET), self.accelerator.autocast():
            responses = generate_responses(self.policy, self.processing_class, prompts,
                                           max_new_tokens=self.args.eval_judge_max_new_tokens,
                                           batch_size=self.args.per_device_eval_batch_size) if prompts else []
        scores = gather_object(judge_scores(self.eval_judge, self.args.eval_judge or "eval_judge", prompts,
                                            responses, records))
        return sum(scores) / max(1, len(scores))

    def _load_best_model(self) -> None:
        """The best checkpoint's policy (Trainer) and its EMA model and reference, so the final outputs are the
        best step's whole set."""
        super()._load_best_model()
        try:
            self.copies.load(Path(self.state.best_model_checkpoint) / STATE_DIR, self.args.process_index)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{self.state.best_model_checkpoint}: cannot load the best checkpoint's EMA model "
                                  f"({error})") from None

    # --------------------------------------------------------------------------------------------
    # Saving and resuming
    # --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy as Trainer saves it; a final save also writes the EMA model to `ema/` beside it, and the card.

        The final outputs are written into `.staging/` and published as one set (`checkpoint.publish_final`), under
        the output-dir lock, which is released afterwards. A signal meanwhile lets the save finish, then raises
        `TrainingStopped` (as does a signal received during the last step). Under FSDP2/ZeRO-3 the final policy is
        gathered here into an ordinary model directory, whatever the engine's state_dict_type or 16-bit-gather
        settings (checkpoints keep the engine's own sharded format).
        """
        if _internal_call:  # a checkpoint's weights, in the Trainer's (engine's) format
            super().save_model(output_dir, _internal_call)
            return
        directory = Path(output_dir or self.args.output_dir)
        staged = directory / STAGING_DIR / FINAL_PARTIAL
        main = self.args.should_save
        owns_lock = directory.resolve() == Path(self.args.output_dir).resolve()
        try:
            with on_stop_signals(lambda reason, code: setattr(self, "_stop_reason", (reason, code)),
                                 "finishing the final save first"):
                if owns_lock:
                    self._check_output_dir_still_ours()
                    self._take_output_lock(directory)  # held since train(), unless save_model is called alone
                if main:
                    shutil.rmtree(staged, ignore_errors=True)
                    staged.mkdir(parents=True)
                self.accelerator.wait_for_everyone()
                if self.copies.sharding == "replicated":  # internal: a push waits for the published set, below
                    super().save_model(str(staged), _internal_call=True)
                else:
                    policy = materialized(self.policy, self.copies.sharding, {}, self.copies.params[0].dtype, "cpu")
                    self._write_model_directory(policy, str(staged))
                if self.copies.ema is not None:  # every rank: sharded copies are gathered
                    self._write_model_directory(self.copies.as_model(EMA, device="cpu"), str(staged / EMA_DIR))
                if main:
                    self.write_model_card(str(staged))
                self.accelerator.wait_for_everyone()
                if main:
                    publish_final(staged, directory, self.state.global_step)
                self.accelerator.wait_for_everyone()
        except Exception as error:
            if main:  # a partly written final set is never used: free its space now
                shutil.rmtree(staged, ignore_errors=True)
            full = filesystem_error(error, directory)
            if full is None:
                raise
            raise full from error
        finally:
            if owns_lock:
                self._release_output_dir()
        if self.args.push_to_hub and owns_lock:  # what Trainer.save_model does, once the whole set is in place
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        if self._stop_reason is not None:
            reason, code = self._stop_reason
            self._stop_reason = None
            raise TrainingStopped(f"{reason} at the end of training: the run had finished, and its final model, EMA "
                                  f"and model card were written completely to {directory} (nothing to resume)",
                                  None, code)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model and tokenizer (final model and checkpoints), with the tokenizer's `legacy`
        flag kept (see `sapo.data.save_tokenizer`)."""
        super()._save(output_dir, state_dict)
        if self.processing_class is not None and self.args.should_save:
            keep_legacy_flag(self.processing_class, output_dir or self.args.output_dir)

    def write_model_card(self, directory: str) -> None:
        """README.md beside the final model and ema/README.md beside the EMA model (`sapo.model_card`). `directory`
        is where they are written; the snippets load from where they are published (the final save writes into
        `.staging/` first), or from the Hub repo once `push_to_hub` has set one up."""
        written = Path(directory)
        published = written.parents[1] if written.parent.name == STAGING_DIR else written
        write_cards(written, self._card_facts(self.hub_model_id or str(published)))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, *, language: str | list[str] | None = None,
                          license: str | None = None, finetuned_from: str | None = None,
                          dataset: str | list[str] | None = None) -> None:
        """Our card in output_dir, in place of transformers' generic one: `Trainer.push_to_hub` calls this just before
        it uploads output_dir. Takes TRL's arguments (model_name, dataset_name, tags) and the Trainer's that apply
        (language, license, finetuned_from for the base model, dataset)."""
        if not self.is_world_process_zero():
            return
        if isinstance(dataset, list):
            dataset = dataset[0] if dataset else None
        chosen = dataset_name or dataset
        extra = {key: value for key, value in (("language", language), ("license", license)) if value}
        facts = self._card_facts(self.hub_model_id or self.args.output_dir, model_name=model_name, data=chosen,
                                 base_model=finetuned_from, tags=[tags] if isinstance(tags, str) else tags or [],
                                 extra_metadata=extra)
        write_cards(Path(self.args.output_dir), facts)

    def _card_facts(self, location: str, *, model_name: str | None = None, data: str | None = None,
                    base_model: str | None = None, tags: Sequence[str] = (),
                    extra_metadata: dict[str, Any] | None = None) -> CardFacts:
        history = self.state.log_history
        return CardFacts(
            location=location, recipe=self.args.recipe, loss_type=self.args.loss_type,
            base_model=base_model or getattr(getattr(self.policy, "config", None), "_name_or_path", None) or None,
            data=data or self.data_source, adapter=is_peft_model(self.policy), has_ema=self.copies.ema is not None,
            ema_beta=self.args.ema_beta if self.copies.ema is not None else None,
            settings=card_settings(self.args, [f.name for f in sapo_fields()]), metrics=final_metrics(history),
            eval_metrics=final_eval_metrics(history), command=self.command, model_name=model_name, tags=tuple(tags),
            extra_metadata=extra_metadata or {})

    def _write_model_directory(self, model_context: Any, directory: str) -> None:
        """Enter `model_context` on every rank (it may gather shards); the main process saves model + tokenizer."""
        with model_context as model:
            if self.args.should_save:
                model.save_pretrained(directory)
                save_tokenizer(self.processing_class, directory)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write the whole checkpoint into a staging directory, fsync it, then rename it into place.

        A crash at any moment leaves either the complete new checkpoint or none (plus the previous
        ones, which are only rotated out after the rename).
        """
        self._check_output_dir_still_ours()
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save and (staging / name).exists():
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes (and rotates) in staging
        try:
            try:
                super()._save_checkpoint(model, trial)
                self._name_the_published_best(run_dir, staging / name)
                self.save_sapo_state(staging / name / STATE_DIR)
            finally:
                del self._get_output_dir  # back to the class's method
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                write_checksums(staging / name)  # last: a resume checks every file against it
        except Exception:
            if self.args.should_save:  # a partly written checkpoint is never used: free its space now
                shutil.rmtree(staging / name, ignore_errors=True)
            raise
        if self.args.should_save:
            publish_directory(staging / name, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _check_output_dir_still_ours(self) -> None:
        """Before a checkpoint: stop if output_dir was deleted, moved or taken over meanwhile (its lock is gone),
        rather than recreate it and write half a run into it. Ranks agree."""
        gone = self._output_dir_gone_error()
        if any_rank(gone is not None, self.args.device):
            raise gone or OutputDirError(f"output_dir {self.args.output_dir}: the main process lost it (its message "
                                         "says why)")

    def _output_dir_gone_error(self) -> OutputDirError | None:
        lock = self._output_lock
        if not self.is_world_process_zero() or lock is None or not lock.held or lock.still_ours():
            return None
        return OutputDirError(f"output_dir {self.args.output_dir}: its lock file {LOCK_FILE} is gone or another run's "
                              "(was the directory deleted or moved during the run?), so this run no longer owns it "
                              f"and stopped at step {self.state.global_step} without writing more there; whatever "
                              "checkpoints remain can be resumed with --resume_from_checkpoint")

    def _name_the_published_best(self, run_dir: Path, staged: Path) -> None:
        """The Trainer names the best checkpoint where it wrote it (inside .staging/); name it where it is published
        instead, in the state and in the staged trainer_state.json, so rotation keeps it and load_best_model_at_end
        finds it."""
        best = self.state.best_global_step
        published = run_dir / f"{CHECKPOINT_PREFIX}-{best}"
        if best and (best == self.state.global_step or published.is_dir()):
            self.state.best_model_checkpoint = str(published)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_FILE))

    def sapo_state_files(self) -> list[str]:
        """Files of `sapo_state/` this run writes (and needs to resume), for this rank."""
        rank = self.args.process_index
        return [MANIFEST_FILE, RUN_STATE_FILE, step_state_file(rank), *self.copies.state_files(rank),
                *self.recipe.state_files(rank)]

    def run_settings(self) -> dict[str, Any]:
        """The settings that shape this run's trajectory, recorded in checkpoints and compared on resume."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.train_dataset)
        return run_settings(self.args, [f.name for f in sapo_fields()], world_size=self.args.world_size,
                            data=self._data_fingerprint, start_weights=self._start_weights.fingerprint(),
                            reference_weights=self._reference_weights and self._reference_weights.fingerprint())

    def save_sapo_state(self, directory: Path) -> None:
        """The copies, the recipe's state, the counters and the run's manifest and settings, per rank; safetensors
        and JSON, no pickle."""
        directory.mkdir(parents=True, exist_ok=True)
        rank = self.args.process_index
        if self.args.should_save:
            write_manifest(directory, dict(zip(self.copies.names, self.copies.params, strict=True)),
                           {"ref_update_steps": self.ref_update_steps, "settings": self.run_settings(),
                            "save_only_model": bool(self.args.save_only_model), "global_step": self.state.global_step})
            save_metrics_rows(Path(self.args.output_dir) / METRICS_FILE, directory / CHECKPOINT_METRICS_FILE,
                              self.state.global_step)
        tr_loss = getattr(self, "_tr_loss", None)
        write_json(directory / step_state_file(rank), {
            "nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "no_signal_steps": self.no_signal_steps,
            "metrics": self._metric_values(), "timing": self._timing,
            **({"tr_loss": tr_loss.item(), "globalstep_last_logged": self._globalstep_last_logged}
               if isinstance(tr_loss, torch.Tensor) else {})})
        self.copies.save(directory, rank, self.args.should_save)
        self.recipe.save(directory, rank)
        if self.args.should_save and self._eval_pairs:  # optional: a run may add eval data when resumed
            save_eval_pairs(directory / EVAL_PAIRS_FILE, {name: (pairs.eval_set.fingerprint, pairs.rejected)
                                                          for name, pairs in self._eval_pairs.items()})

    def load_sapo_state(self, directory: Path) -> None:
        rank = self.args.process_index
        try:
            self.copies.load(directory, rank)
            self.recipe.load(directory, rank)
            self._restore_eval_pairs(load_eval_pairs(directory / EVAL_PAIRS_FILE))
        except (OSError, ValueError, KeyError, RuntimeError) as error:  # validated first; this is a last guard
            raise CheckpointError(f"{directory}: cannot load the saved state ({error})") from None
        self.ref_update_steps = read_run_state(directory).get("ref_update_steps") or self.ref_update_steps
        step_state = read_json(directory / step_state_file(rank))
        self.nonfinite_steps = step_state["nonfinite_steps"]
        self._nonfinite_in_a_row = step_state["nonfinite_in_a_row"]
        self.no_signal_steps = step_state.get("no_signal_steps", 0)  # absent in checkpoints of older versions
        self._metrics = defaultdict(list, {name: list(values) for name, values in step_state["metrics"].items()})
        self._timing = dict(step_state["timing"])
        self._resumed_step_state = step_state

    def _restore_eval_pairs(self, saved: dict[str, tuple[str, list[list[int]] | None]]) -> None:
        """The checkpoint's eval pairs, for each eval set that is the same data as when they were made."""
        for name, eval_set in self._eval_sets.items():
            if name in saved and saved[name][0] == eval_set.fingerprint:
                self._eval_pairs[name] = EvalPairs(eval_set, saved[name][1])
            elif name in saved:
                logger.warning("eval set %s is not the data the checkpoint's eval pairs were made for; new pairs are "
                               "made", repr(name) if name else "(eval_dataset)")

    def validate_checkpoint(self, path: Path) -> None:
        """Fail early, before anything is written, when `path` cannot resume this run exactly: missing or changed
        files, another model, or settings that differ (unless named in `resume_allow_changes`). Only the main
        process reads every file for its checksum; the others check presence and sizes."""
        validate_checkpoint(path, dict(zip(self.copies.names, self.copies.params, strict=True)),
                            self.sapo_state_files(), settings=self.run_settings(),
                            allow_changes=list(self.args.resume_allow_changes or ()),
                            verify_content=self.is_world_process_zero())


def _restarting_every(period: int, schedule: Any, scale: Any) -> Any:
    # A closure, not a callable object: LambdaLR would try to save an object's attributes in its state_dict. The
    # factor is a function of the step alone, so a resumed run continues the same per-period rates.
    return lambda step: scale(step // period) * schedule(step % period)
