"""`SAPOTrainer`: the SAPO loop on top of `transformers.Trainer`, as wiring.

The life of a step (SPEC §1), in call order:

    Trainer.train                                   (sapo.run.start.train: lock, resume checks, stop signals)
      _SAPOStepHooks.on_train_begin                 (sapo.callbacks: reference period, recipe epoch length)
      for each micro-batch of demonstrations:
        SAPOTrainer.training_step
          Recipe.batch                              (sapo.recipes: where pairs come from; for SAPO the EMA model
            StepServices.generate -> _generate      rewrites a segment of each real response through the sampler,
              sampler.sample                        sapo.generation, the triples go into the replay buffer
            ReplayBuffer.add / sample               sapo.buffer, and a batch is replayed)
          Trainer.training_step -> compute_loss
            PairScoring.pair_loss                   (sapo.scoring -> sapo.logprobs -> sapo.losses)
            pair_metrics -> _record                 (sapo.metrics: names, recorded until the next log)
      _SAPOStepHooks.on_pre_optimizer_step          (sapo.step_guard: no-signal and non-finite steps dropped)
      optimizer.step, scheduler.step                (the Trainer; create_scheduler restarts SPIN's per iteration)
      _SAPOStepHooks.on_step_end
        _after_optimizer_step                       (ModelCopies.update_ema, Recipe.reference_refresh)
        _should_stop                                (a signal or repeated non-finite steps: save and stop)
      log -> sapo.metrics.reduced_metrics           (cross-rank means, appended to metrics.jsonl)
      evaluate                                      (sapo.heldout_eval on pairs made once per run)
      _save_checkpoint                              (sapo.run.state: staged, published in one rename)
    save_model                                      (sapo.run.finish: policy, EMA and cards as one set)

This module builds the parts (model, tokenizer, reference, copies, sampler, recipe, scoring) and holds the step
itself; each Trainer override below that is not part of the step is one line delegating to the module that does
the work. The Trainer internals it relies on are listed in `sapo._hf_compat`. Subclassing `Trainer` (as TRL
does) means accelerate, DeepSpeed, FSDP, mixed precision, logging integrations and checkpoint plumbing come
from the ecosystem.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback

from sapo import heldout_eval
from sapo.callbacks import LogLines, _HeldOutPairsAtStart, _LiveProgress, _SAPOStepHooks
from sapo.config import SAPOConfig
from sapo.copies import SHARDS, ModelCopies
from sapo.data import (
    TokenizedDataset,
    collate_examples,
    examples_from_records,
    keep_legacy_flag,
    require_chat_template,
    tokenized_dataset,
)
from sapo.errors import UsageError
from sapo.generation import SegmentSampler, checkpoint_sampling, eos_token_ids_of, make_sampler
from sapo.heldout import (
    EvalPairs,
    EvalSet,
    check_eval_data,
    check_metric_for_best_model,
    eval_metric_names,
    load_eval_judge,
    prepare_eval_sets,
)
from sapo.heldout_eval import trainer_eval_dataset
from sapo.loading import (  # noqa: F401  (load_policy, load_reference, warn_unless_loaded_with: re-exported)
    disable_dropout,
    is_peft_model,
    load_policy,
    load_policy_for_training,
    load_reference,
    load_run_reference,
    warn_unless_loaded_with,
)
from sapo.losses import pair_metrics
from sapo.metrics import (
    EPOCH,
    LOSS,
    NLL_LOSS,
    NO_SIGNAL_SKIPPED_STEPS,
    NONFINITE_SKIPPED_STEPS,
    REFERENCE_REFRESHES,
    STEP,
    append_metrics_rows,
    reduced_metrics,
)
from sapo.model_card import describe_data
from sapo.recipes import RECIPES, Recipe, StepServices
from sapo.run import finish as run_finish
from sapo.run import start as run_start
from sapo.run import state as run_state
from sapo.run.lock import OutputDirLock, first_missing
from sapo.run.paths import STATE_DIR
from sapo.run.start import (
    refuse_a_dropped_engine,
    refuse_an_uncoordinated_launch,
    remove_created_output_dir,
    will_shard,
)
from sapo.run.start_weights import StartWeights
from sapo.schedules import restarting_scheduler
from sapo.scoring import PairScoring
from sapo.sharding import any_rank
from sapo.step_guard import NONFINITE_EXIT_CODE  # noqa: F401  (re-exported: sapo.trainer.NONFINITE_EXIT_CODE)

__all__ = ["SAPOTrainer", "disable_dropout", "is_peft_model", "refuse_an_uncoordinated_launch"]

logger = logging.getLogger(__name__)


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
        # records are read once, and checked against the tokenizer (a chat template for chats) before any weights load
        examples = [] if isinstance(train_dataset, TokenizedDataset) else examples_from_records(
            train_dataset, skip_invalid=args.skip_invalid, with_rejected=args.needs_rejected_data)
        data_description = describe_data(train_dataset)  # the card's words for data passed in memory
        train_dataset = examples or train_dataset
        model, processing_class = load_policy_for_training(
            model, processing_class, chat_template, peft_config, args.model_init_kwargs, args.max_length,
            check_tokenizer=functools.partial(require_chat_template, examples=examples))
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
                         eval_dataset=trainer_eval_dataset(self), processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers)
        self.model_accepts_loss_kwargs = False  # our loss is a per-pair mean; Trainer divides by accumulation steps
        refuse_a_dropped_engine(self)
        if self.eval_judge is not None and will_shard(self):
            remove_created_output_dir(self)
            raise UsageError("eval_judge generates with the policy, which FSDP/ZeRO-3 shards; with those engines "
                             "judge saved checkpoints with `sapo eval` instead")
        ref_model = self._load_reference(ref_model if args.uses_reference else None)
        self._reference_weights = None if ref_model is None else StartWeights(ref_model)
        self.copies = ModelCopies(
            self.policy, need_ema=args.self_augmenting, need_reference=args.uses_reference,
            reference_moves=self._reference_moves(), is_peft=is_peft_model(self.model), sharded=will_shard(self),
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
        self.data_description = data_description
        self.command: str | None = None
        self.add_callback(_SAPOStepHooks(self))
        self.add_callback(_LiveProgress(self))
        if self.pop_callback(PrinterCallback) is not None:  # disable_tqdm: short lines instead of whole dicts
            self.add_callback(LogLines())
        if self._eval_sets:
            self.add_callback(_HeldOutPairsAtStart(self))

    # ---- Construction ------------------------------------------------------------------------------------------------

    def _load_reference(self, ref_model: nn.Module | str | None) -> nn.Module | None:
        return load_run_reference(self.args, ref_model, self.processing_class)

    def _make_sampler(self) -> SegmentSampler:
        """The configured engine, told the fixed shapes of this run's generation calls (rows of a round, a bound on
        context + new tokens) so that a compiled decode step is compiled once for the whole run."""
        args = self.args
        shapes = {} if args.generation_engine == "hf" else {"cache_len": args.generation_cache_len}
        return make_sampler(args.generation_engine, args.sampling_settings, self.processing_class.pad_token_id,
                            self.eos_token_ids, batch_size=args.generation_rows, device=args.device,
                            generation_config=getattr(self.policy, "generation_config", None), **shapes)

    def _services(self) -> StepServices:
        sharded = self.copies.sharded
        return StepServices(
            generate=self._generate, refresh_reference_from_policy=lambda: self.copies.refresh_reference("policy"),
            any_rank=lambda flag: any_rank(flag, self.args.device) if sharded else flag,
            record=self._record, pad_token_id=self.processing_class.pad_token_id, eos_token_ids=self.eos_token_ids,
            judge_rewrites=self._judge_rewrites() if self.rejected_judge is not None else None,
            reset_optimizer=self._reset_optimizer_state)

    def _judge_rewrites(self) -> Any:
        """`rejected_judge` on this run's rewrites (`sapo.judging.judge_rewrites`), reading the data when called."""
        from sapo.judging import judge_rewrites

        return lambda indices, real, rejected: judge_rewrites(self.rejected_judge, self.args.rejected_judge,
                                                              self.processing_class, self.train_dataset, indices,
                                                              real, rejected)

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

    def _reference_moves(self) -> bool:
        """Whether the reference ever changes (SPIN opponents, refreshed SAPO references)."""
        return self.args.uses_reference and self.args.recipe_class.reference_moves(self.args)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        """After the engine has wrapped the policy, bind the copies to it; only then load a resumed checkpoint's
        SAPO state (the copies' shards exist only now)."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self.copies.bind(self.policy, self.model_wrapped)
        if resume_from_checkpoint is not None:
            self.load_sapo_state(Path(resume_from_checkpoint) / STATE_DIR)
        return model, train_dataloader

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        return restarting_scheduler(self, num_training_steps, optimizer)

    # ---- Training step and loss --------------------------------------------------------------------------------------

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
        if self.recipe.supervised:
            loss, logged = self.scoring.nll_loss(model, inputs)
            output = None
        else:
            result = self.scoring.pair_loss(model, inputs)
            loss, output = result.loss, result.output
            if inputs.get("placeholder"):  # stand-in pairs (nothing to draw yet): in the step, training nothing
                loss, logged = loss * 0.0, {}
            else:
                logged = pair_metrics(result, inputs["loss_mask"][:, 1:], inputs.get("identical"))
                if result.nll is not None:
                    logged[NLL_LOSS] = result.nll.detach()
        for name, value in logged.items():
            self._record(name, value)
        return (loss, output) if return_outputs else loss

    # ---- Once per optimizer step -------------------------------------------------------------------------------------

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's gradient norm (the clipping norm, or the one it computes for logging with max_grad_norm
        0), kept for the non-finite check that runs next, so the gradients are not read a second time."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._grad_norm = grad_norm
        return grad_norm

    def _after_optimizer_step(self) -> None:
        self._metrics[NONFINITE_SKIPPED_STEPS].append(float(self.nonfinite_steps))
        if self.recipe.needs_ema:
            self._metrics[NO_SIGNAL_SKIPPED_STEPS].append(float(self.no_signal_steps))
        if self.copies.ema is not None and not self._step_skipped:  # a skipped step leaves the average alone too
            self.copies.update_ema(self.args.ema_beta)
        source = self.recipe.reference_refresh(self.state.global_step, self.ref_update_steps)
        if source is not None and self.copies.reference is not None:
            self.copies.refresh_reference(source)
            self.recipe.reference_moved()
            self._metrics[REFERENCE_REFRESHES].append(1.0)

    def _should_stop(self) -> bool:
        """Whether any rank wants to stop; ranks must agree or the checkpoint save would deadlock."""
        stop = any_rank(self._stop_reason is not None, self.args.device)
        if stop and self._stop_reason is None:
            self._stop_reason = ("another process asked to stop", 1)
        return stop

    # ---- Training entry point: signals, output directory, resumption checks ------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train` with one run per output_dir, exact-or-refused resumes and stops that end in a checkpoint
        (`sapo.run.start.train`)."""
        return run_start.train(self, resume_from_checkpoint, **kwargs)

    # ---- Logging -----------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and LOSS in logs:
            logs.update(reduced_metrics(self))
        super().log(logs, start_time)
        if self.is_world_process_zero():
            record = {STEP: self.state.global_step, EPOCH: self.state.epoch, **logs}
            if not self.is_in_train and self.state.global_step == 0:  # evaluate() before train(): see _ResumeStart
                self._rows_before_training.append(record)
                return
            append_metrics_rows(self, [record])

    # ---- Evaluation on held-out data (see sapo.heldout) --------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate` on the run's eval pairs, or on records passed here (`sapo.heldout_eval.evaluate`)."""
        return heldout_eval.evaluate(self, eval_dataset, ignore_keys, metric_key_prefix)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        return heldout_eval.eval_dataloader(self, eval_dataset)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        return heldout_eval.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        return heldout_eval.evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys,
                                            metric_key_prefix)

    def _load_best_model(self) -> None:
        return run_state.load_best_model(self)

    # ---- Saving and resuming -----------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy; a final save also writes the EMA model and the cards, published as one set
        (`sapo.run.finish.save_model`)."""
        return run_finish.save_model(self, output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model and tokenizer (final model and checkpoints), with the tokenizer's `legacy`
        flag kept (see `sapo.data.save_tokenizer`)."""
        super()._save(output_dir, state_dict)
        if self.processing_class is not None and self.args.should_save:
            keep_legacy_flag(self.processing_class, output_dir or self.args.output_dir)

    def write_model_card(self, directory: str) -> None:
        """README.md beside the final model and ema/README.md beside the EMA model (`sapo.model_card`)."""
        return run_finish.write_model_card(self, directory)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, *, language: str | list[str] | None = None,
                          license: str | None = None, finetuned_from: str | None = None,
                          dataset: str | list[str] | None = None) -> None:
        """Our card in output_dir in place of transformers' generic one (`Trainer.push_to_hub` calls this)."""
        return run_finish.create_model_card(self, model_name, dataset_name, tags, language=language, license=license,
                                            finetuned_from=finetuned_from, dataset=dataset)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        return run_state.save_checkpoint(self, model, trial)

    def sapo_state_files(self) -> list[str]:
        """Files of `sapo_state/` this run writes (and needs to resume), for this rank."""
        return run_state.sapo_state_files(self)

    def run_settings(self) -> dict[str, Any]:
        """The settings that shape this run's trajectory, recorded in checkpoints and compared on resume."""
        return run_state.trajectory_settings(self)

    def save_sapo_state(self, directory: Path) -> None:
        """The copies, the recipe's state, the counters and the run's manifest and settings, per rank."""
        return run_state.save_sapo_state(self, directory)

    def load_sapo_state(self, directory: Path) -> None:
        """Load what `save_sapo_state` wrote (after the engine has wrapped the policy)."""
        return run_state.load_sapo_state(self, directory)

    def validate_checkpoint(self, path: Path) -> None:
        """Fail before anything is written when `path` cannot resume this run exactly."""
        return run_state.validate_resume_checkpoint(self, path)
