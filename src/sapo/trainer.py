"""`SAPOTrainer`: the SAPO loop on top of `transformers.Trainer`.

Each optimizer step (SPEC §1): the EMA model rewrites one segment of every incoming real response
into a rejected one, the triples go into a FIFO replay buffer, a batch is replayed with weights
1/(1 + times sampled), and a preference loss (DPO-style against a reference, or ORPO) is minimised.
After the optimizer step the EMA is updated and, every `ref_update_steps`, the reference refreshed.

Subclassing `Trainer` (as TRL does) means accelerate, DeepSpeed, FSDP, mixed precision, logging
integrations and checkpoint plumbing come from the ecosystem; this module only adds SAPO's state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.config import SAPOConfig, sapo_fields
from sapo.data import (
    TokenizedExample,
    examples_from_records,
    keep_legacy_flag,
    prepare_tokenizer,
    save_tokenizer,
    tokenize_examples,
)
from sapo.ema import ShadowWeights, trainable_parameters
from sapo.errors import CheckpointError, OutputDirError, TrainingStopped, UsageError
from sapo.generation import (
    SamplingSettings,
    SegmentSampler,
    checkpoint_sampling,
    eos_token_ids_of,
    make_sampler,
)
from sapo.logprobs import hidden_state_scoring_is_exact, response_token_logps, sequence_logps
from sapo.losses import nll_from_logps, orpo_loss, preference_loss
from sapo.segments import sample_truncation_point, splice_rejected
from sapo.sharding import (
    any_rank,
    detect_engine,
    global_shape,
    loaded_into,
    local_shard,
    materialized,
    release_gathered,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATE_DIR = "sapo_state"
EMA_DIR = "ema"


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized (prompt, real response) pairs; items are plain lists so no padding happens here."""

    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {"index": index, "prompt_ids": example.prompt_ids, "response_ids": example.response_ids,
                "rejected_ids": example.rejected_ids}


def collate_examples(items: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keep ragged token lists: each recipe builds its own padded batch from them."""
    return {key: [item[key] for item in items] for key in ("index", "prompt_ids", "response_ids", "rejected_ids")}


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """(prompt, response) token pairs as one right-padded batch; `loss_mask` marks response tokens."""
    width = max(len(p) + len(r) for p, r in sequences)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pad_pairs(entries: Sequence[ReplayEntry], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Real and rejected sequences of replayed entries in one batch (real rows first): one forward for both."""
    sequences = [(e.prompt, e.real) for e in entries] + [(e.prompt, e.rejected) for e in entries]
    return pad_sequences(sequences, pad_token_id)


def sampling_settings(args: SAPOConfig) -> SamplingSettings:
    """SAPO's EMA samples with the paper's temperature/top-k/top-p; SPIN's opponent as the SPIN code does
    (greedy, or plain temperature sampling)."""
    if args.recipe == "spin":
        return SamplingSettings(temperature=args.spin_temperature, top_k=0, top_p=1.0, do_sample=args.spin_do_sample)
    return SamplingSettings(args.temperature, args.top_k, args.top_p)


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
        self.trainer._set_ref_update_steps(train_dataloader)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._skip_step_if_nonfinite()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()
        if self.trainer._should_stop():
            control.should_save = True
            control.should_training_stop = True


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
    """

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
        model_init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        args = args or SAPOConfig(output_dir="sapo-output")
        if not isinstance(args, SAPOConfig):
            raise TypeError(f"args must be a SAPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("SAPOTrainer needs a train_dataset of demonstrations")
        model_path = model if isinstance(model, str) else None
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **(model_init_kwargs or {}))
        if processing_class is None:
            if model_path is None:
                raise ValueError("pass processing_class (the tokenizer) when model is an instance")
            processing_class = AutoTokenizer.from_pretrained(model_path)
        processing_class = prepare_tokenizer(processing_class, chat_template)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)

        if sampler is None and args.generation_engine == "static":  # refuse before anything is written
            try:
                checkpoint_sampling(getattr(model, "generation_config", None), sampling_settings(args).do_sample)
            except ValueError as error:
                raise UsageError(f"generation_engine 'static': {error}") from None
        eos_token_ids = eos_token_ids_of(processing_class, model)
        dataset = self._tokenize_dataset(train_dataset, processing_class, args, eos_token_ids)
        self._created_output_dir = not Path(args.output_dir).exists()  # Trainer creates it; undone on early errors
        super().__init__(model=model, args=args, data_collator=collate_examples, train_dataset=dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        # Our loss is a per-pair mean; let Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

        self.is_peft = is_peft_model(self.model)
        self._param_names, self._params = trainable_parameters(self.model)
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        self.engine = "replicated"  # how the policy's weights are stored; known once the engine has wrapped it
        self.sharded = self._will_shard()
        self._copies_deferred = self._defer_copies(ref_model)
        if self._copies_deferred:  # built from the policy's shards once the engine has prepared it
            self.ema_model, self.ema, self.ref_model, self.ref = None, None, None, None
        else:
            self.ema_model, self.ema = self._build_ema() if args.self_augmenting else (None, None)
            self.ref_model, self.ref = self._build_reference(ref_model)
        self.eos_token_ids = eos_token_ids
        self.sampler: SegmentSampler = sampler or make_sampler(
            args.generation_engine, sampling_settings(args), pad_token_id=processing_class.pad_token_id,
            eos_token_ids=self.eos_token_ids,
        )
        rank_seed = args.seed + args.process_index
        self.buffer = ReplayBuffer(args.max_replay_buffer_size, seed=rank_seed)
        self.segment_rng = random.Random(rank_seed)
        self.ref_update_steps = args.ref_update_steps
        # Sharded heads cannot be applied outside the engine's forward: score through ordinary logits there.
        self._use_hidden_states = not self.sharded and self._check_hidden_state_scoring()
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._timing = {"generation": 0.0, "step": 0.0, "generated_tokens": 0.0}
        self._step_skipped = False
        self._nonfinite_in_a_row = 0
        self.nonfinite_steps = 0
        self._stop_reason: tuple[str, int] | None = None
        self.pending: list[tuple[list[int], list[int]]] = []  # examples queued for the next generation round
        self.data_source: str | None = None  # shown in the model card; the CLI sets both
        self.command: str | None = None
        self.spin_iteration = -1
        self.spin_rejected: dict[int, list[int]] = {}  # SPIN: the opponent's response per example, this iteration
        self.add_callback(_SAPOStepHooks(self))
        self.add_callback(_LiveProgress(self))

    # --------------------------------------------------------------------------------------------
    # Construction helpers
    # --------------------------------------------------------------------------------------------

    @staticmethod
    def _tokenize_dataset(train_dataset: Any, tokenizer: Any, args: SAPOConfig,
                          eos_token_ids: set[int]) -> TokenizedDataset:
        if isinstance(train_dataset, TokenizedDataset):
            return train_dataset
        examples = examples_from_records(train_dataset, skip_invalid=args.skip_invalid,
                                         with_rejected=args.needs_rejected_data)
        tokenized = tokenize_examples(tokenizer, examples, max_length=args.max_length,
                                      max_prompt_length=args.max_prompt_length,
                                      prompt_truncation=args.prompt_truncation, end_token_ids=eos_token_ids,
                                      progress=not args.disable_tqdm and args.process_index == 0)
        return TokenizedDataset(tokenized)

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

    def _defer_copies(self, ref_model: Any) -> bool:
        """Sharded or offloaded copies are plain tensors made from the prepared policy, not modules."""
        deferred = self.sharded or self.args.offload_copies
        if self.is_peft:
            if self.sharded:
                raise ValueError("LoRA/peft models with FSDP or DeepSpeed ZeRO-3 are not supported: with LoRA the EMA "
                                 "and reference are adapter weights only, so use DDP or ZeRO-2 instead")
            return False  # adapter copies are small; offloading them would save nothing
        if deferred and ref_model is not None:
            raise ValueError("ref_model= cannot be combined with FSDP, DeepSpeed ZeRO-3 or offload_copies: there the "
                             "reference starts as a copy of the policy")
        return deferred

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        """After the engine has wrapped the policy: find its parameters again (FSDP2 replaces them), put the
        EMA/reference where they belong, and only then load SAPO's state of a resumed checkpoint."""
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        self._bind_copies()
        if resume_from_checkpoint is not None:
            self.load_sapo_state(Path(resume_from_checkpoint) / STATE_DIR)
        return model, train_dataloader

    def _bind_copies(self) -> None:
        self.engine = detect_engine(self.policy)
        self._param_names, self._params = trainable_parameters(self.model)
        if self._copies_deferred:
            if self.ema is None and self.args.self_augmenting:
                self.ema = self._shadow_of_policy()
            if self.ref is None and self.args.uses_reference:
                self.ref = self._shadow_of_policy()
        else:
            self._place_module_copies()

    def _copy_dtype(self, policy_dtype: torch.dtype) -> torch.dtype:
        name = self.args.copies_dtype
        return policy_dtype if name == "auto" else getattr(torch, name)

    def _policy_shards(self) -> list[torch.Tensor]:
        """This rank's storage of each trainable parameter (the whole tensor unless sharded)."""
        return [local_shard(p, self.engine) for p in self._params]

    def _shadow_of_policy(self) -> ShadowWeights:
        """Copies of this rank's shards of the policy, on the CPU (pinned) when offloading."""
        tensors = []
        for shard in self._policy_shards():
            device = "cpu" if self.args.offload_copies else shard.device
            tensor = shard.detach().to(device=device, dtype=self._copy_dtype(shard.dtype), copy=True)
            if self.args.offload_copies and torch.cuda.is_available():
                tensor = tensor.pin_memory()
            tensors.append(tensor)
        return ShadowWeights(self._param_names, tensors)

    def _place_module_copies(self) -> None:
        """Module copies made before the engine moved (DeepSpeed) or cast the policy follow it to its device
        and dtype (or to copies_dtype); a no-op once they have."""
        policy_dtype = self._params[0].dtype
        for attr in ("ema", "ref"):
            module = getattr(self, f"{attr}_model")
            shadow = getattr(self, attr)
            if module is None:
                continue
            module.to(device=self.args.device)
            if shadow is not None:  # a copy of ours (not a fixed ref_model= given by the user)
                module.to(dtype=self._copy_dtype(policy_dtype))
                setattr(self, attr, ShadowWeights.parameters_of(module, self._param_names))

    def _build_ema(self) -> tuple[nn.Module | None, ShadowWeights]:
        """Full fine-tune: a separate EMA module; LoRA: copies of the adapter weights only."""
        if self.is_peft:
            return None, ShadowWeights.clone_of(self._param_names, self._params)
        ema_model = self._frozen_copy(self.policy)
        return ema_model, ShadowWeights.parameters_of(ema_model, self._param_names)

    def _build_reference(self, ref_model: nn.Module | str | None) -> tuple[nn.Module | None, ShadowWeights | None]:
        if not self.args.uses_reference:
            return None, None
        if ref_model is not None:
            if isinstance(ref_model, str):
                ref_model = AutoModelForCausalLM.from_pretrained(ref_model)
            ref_model = ref_model.to(self.args.device)
            ref_model.eval().requires_grad_(False)
            shadow = ShadowWeights.parameters_of(ref_model, self._param_names) if self.reference_moves else None
            return ref_model, shadow
        if self.is_peft:
            if not self.reference_moves:
                return None, None  # the base model with adapters disabled
            return None, ShadowWeights.clone_of(self._param_names, self._params)
        ref = self._frozen_copy(self.policy)
        return ref, ShadowWeights.parameters_of(ref, self._param_names)

    @property
    def reference_moves(self) -> bool:
        """Whether the reference ever changes (SPIN opponents, refreshed SAPO references); a fixed one is
        rebuilt from the starting model on resume instead of being written into every checkpoint."""
        refreshed = self.args.self_augmenting and self.args.ref_update_mode != "fixed"
        return self.args.uses_reference and (refreshed or self.args.recipe == "spin")

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        clone = copy.deepcopy(model)
        clone.eval().requires_grad_(False)
        return clone

    def _check_hidden_state_scoring(self) -> bool:
        probe = torch.tensor([[self.processing_class.eos_token_id] * 4], device=self.args.device)
        try:
            exact = hidden_state_scoring_is_exact(self.policy, probe)
        except Exception as error:  # unusual heads: fall back to ordinary logits
            logger.info("hidden-state scoring unavailable (%s); using full logits", error)
            return False
        if not exact:
            logger.info("the model's logits are not lm_head(hidden state); scoring with full logits")
        return exact

    def _set_ref_update_steps(self, train_dataloader: Any) -> None:
        if self.ref_update_steps is None:
            batches = len(train_dataloader) if train_dataloader is not None else 1
            self.ref_update_steps = max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    # --------------------------------------------------------------------------------------------
    # Self-augmentation
    # --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _weights_as_model(self, module: nn.Module | None, shadow: ShadowWeights,
                          device: torch.device | str | None = None) -> Iterator[nn.Module]:
        """A model holding `shadow`'s weights: its own module for a full copy; the policy with the shadow
        (adapter) weights swapped in for LoRA; for sharded or offloaded copies a plain module gathered from
        the shards for the duration (every rank must enter: the gathers are collectives)."""
        if module is not None:
            yield module
        elif self.is_peft:
            with shadow.swapped_into(self._params):
                yield self.policy
        else:
            weights = dict(zip(shadow.names, shadow.tensors, strict=True))
            dtype = shadow.tensors[0].dtype
            with materialized(self.policy, self.engine, weights, dtype, device or self.args.device) as plain:
                yield plain
            release = getattr(self.sampler, "release", None)
            if release is not None:  # caches/compiled steps keyed to a module that is gone after this round
                release()

    def augment(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[ReplayEntry]:
        """Make rejected responses for a batch of real ones (SPEC §1 step 2) and push them to the buffer."""
        plans = [sample_truncation_point(len(p), len(y), self.args.token_generate_length, self.args.max_length,
                                         self.segment_rng) for p, y in zip(prompts, responses, strict=True)]
        n = self.args.responses_per_prompt
        contexts = [list(p) + list(y[:k]) for p, y, (k, _) in zip(prompts, responses, plans, strict=True)
                    for _ in range(n)]
        samples = self._generate(self.ema_model, self.ema, contexts, max(g for _, g in plans))
        entries = []
        for index, sample in enumerate(samples):
            example = index // n
            k, gen_len = plans[example]
            rejected, replaced = splice_rejected(responses[example], k, sample, gen_len, self.eos_token_ids)
            entries.append(ReplayEntry(list(prompts[example]), list(responses[example]), rejected, k, replaced))
        self.buffer.extend(entries)
        self._metrics["segment/replaced_length"].extend(float(e.segment_length) for e in entries)
        self._metrics["segment/start"].extend(float(e.segment_start) for e in entries)
        # A rejected response equal to the real one carries no preference signal (its loss gradient is zero).
        self._metrics["segment/identical_fraction"].extend(float(e.rejected == e.real) for e in entries)
        return entries

    def _generate(self, module: nn.Module | None, shadow: ShadowWeights, contexts: Sequence[Sequence[int]],
                  max_new_tokens: int) -> list[list[int]]:
        """Sample with the model holding `shadow`'s weights, under the policy's precision policy (the copies
        are not wrapped by accelerate, so mixed precision must be entered here), timed for the metrics."""
        started = time.perf_counter()
        with self._weights_as_model(module, shadow) as generator, self.accelerator.autocast():
            samples = self.sampler.sample(generator, contexts, max_new_tokens)
        self._timing["generation"] += time.perf_counter() - started
        self._timing["generated_tokens"] += sum(map(len, samples))
        return samples

    # --------------------------------------------------------------------------------------------
    # Training step and loss
    # --------------------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        started = time.perf_counter()
        pad = self.processing_class.pad_token_id
        if self.args.recipe == "sft":
            batch = pad_sequences(list(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True)), pad)
        else:
            batch = pad_pairs(self._pairs_for_step(inputs), pad)
        loss = super().training_step(model, batch, num_items_in_batch)
        self._timing["step"] += time.perf_counter() - started
        return loss

    def _pairs_for_step(self, inputs: dict[str, Any]) -> list[ReplayEntry]:
        """The (prompt, real, rejected) pairs this micro-batch trains on, by recipe."""
        if self.args.self_augmenting:
            if self.state.global_step % self.args.sample_every_n_steps == 0:
                self._queue_for_augmentation(inputs)
            replayed = self.buffer.sample(self.args.per_device_train_batch_size)
            self._metrics["buffer/size"].append(float(len(self.buffer)))
            self._metrics["buffer/mean_times_sampled"].append(self.buffer.stats()["mean_times_sampled"])
            return replayed
        spin = self.args.recipe == "spin"
        rejected = self._spin_opponent_responses(inputs) if spin else inputs["rejected_ids"]
        return [ReplayEntry(list(p), list(y), list(r), 0, len(r))
                for p, y, r in zip(inputs["prompt_ids"], inputs["response_ids"], rejected, strict=True)]

    def _queue_for_augmentation(self, inputs: dict[str, Any]) -> None:
        """Augment once `generation_batch_size` examples are waiting (or the buffer is still empty)."""
        self.pending.extend(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True))
        round_size = self.args.generation_batch_size or len(inputs["prompt_ids"])
        if len(self.pending) >= round_size or len(self.buffer) == 0:
            prompts, responses = zip(*self.pending, strict=True)
            self.pending = []
            self.augment(list(prompts), list(responses))

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """SPIN trains each iteration as a fresh run, as the SPIN code does: the schedule (warm-up included) is
        built for one iteration's steps and restarts at every opponent refresh."""
        if self.args.recipe != "spin" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        per_iteration = max(1, math.ceil(num_training_steps / self.args.spin_iterations))
        scheduler = super().create_scheduler(per_iteration, optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.lr_lambdas = [_restarting_every(per_iteration, f) for f in scheduler.lr_lambdas]
            return scheduler
        logger.warning("lr_scheduler_type %r cannot restart at each SPIN iteration; it runs once over the whole run",
                       self.args.lr_scheduler_type)
        self.lr_scheduler = None
        return super().create_scheduler(num_training_steps, optimizer)

    @property
    def spin_steps_per_iteration(self) -> int:
        return max(1, math.ceil(self.state.max_steps / self.args.spin_iterations))

    def _spin_opponent_responses(self, inputs: dict[str, Any]) -> list[list[int]]:
        """SPIN: whole responses of the frozen previous iterate, made once per example and iteration.

        At each iteration boundary the opponent (the reference) becomes the current policy. Responses
        are generated lazily for the examples of each batch: the opponent is frozen within an
        iteration, so this equals generating for all prompts up front, without the up-front pass.
        """
        iteration = self.state.global_step // self.spin_steps_per_iteration
        if iteration != self.spin_iteration:
            if iteration > 0:
                self.ref.copy_from_(self._policy_shards())
            self.spin_iteration, self.spin_rejected = iteration, {}
            self._metrics["spin/iteration"].append(float(iteration))
        missing = [i for i, index in enumerate(inputs["index"]) if index not in self.spin_rejected]
        generate = bool(missing)
        if self.sharded:  # gathering the opponent is collective: every rank joins if any rank needs it
            generate = any_rank(generate, self.args.device)
        if generate:
            prompts = [inputs["prompt_ids"][i] for i in missing]
            room = max((self.args.max_length - len(p) for p in prompts), default=0)
            samples = self._generate(self.ref_model, self.ref, prompts, min(room, self.args.spin_max_new_tokens))
            for i, sample in zip(missing, samples, strict=True):
                room = self.args.max_length - len(inputs["prompt_ids"][i])
                self.spin_rejected[inputs["index"][i]] = list(sample[:room])
        return [self.spin_rejected[index] for index in inputs["index"]]

    def _token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scored under the accelerator's autocast, so the policy, its reference and the head projection that
        runs outside the prepared forward all see the same precision policy."""
        with self.accelerator.autocast():
            return response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                        chunk_size=self.args.logprob_chunk_size,
                                        use_hidden_states=self._use_hidden_states)

    @torch.no_grad()
    def _reference_token_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return self._token_logps(self.ref_model, batch)
        if self.ref is None:  # LoRA with a fixed reference: the base model
            with self.policy.disable_adapter():
                return self._token_logps(model, batch)
        if self.is_peft:
            with self.ref.swapped_into(self._params):
                return self._token_logps(model, batch)
        # Sharded or offloaded: the reference's shards go into the policy's storage for this forward only.
        release_gathered(self.policy, self.engine, self.model_wrapped)
        with loaded_into(self._policy_shards(), self.ref.tensors):
            try:
                return self._token_logps(model, batch)
            finally:
                release_gathered(self.policy, self.engine, self.model_wrapped)

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        mask = inputs["loss_mask"][:, 1:]
        # The reference goes first: with sharded copies its forward borrows the policy's parameter storage.
        needs_reference = self.args.recipe != "sft" and self.args.loss_type != "orpo"
        ref_token_logps = self._reference_token_logps(model, inputs) if needs_reference else None
        token_logps = self._token_logps(model, inputs)
        if self.args.recipe == "sft":
            loss = nll_from_logps(token_logps, mask)
            self._metrics["nll_loss"].append(loss.item())
            return (loss, None) if return_outputs else loss
        sums, means = sequence_logps(token_logps, mask)
        half = sums.shape[0] // 2
        if self.args.loss_type == "orpo":
            output = orpo_loss(means[:half], means[half:], beta=self.args.beta)
            nll = nll_from_logps(token_logps[:half], mask[:half])
            loss = nll + output.losses.mean()
            self._metrics["nll_loss"].append(nll.item())
        else:
            ref_sums, ref_means = sequence_logps(ref_token_logps, mask)
            policy, ref = (means, ref_means) if self.args.loss_type == "ipo" else (sums, ref_sums)
            output = preference_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=self.args.beta,
                                     loss_type=self.args.loss_type, label_smoothing=self.args.label_smoothing)
            loss = output.losses.mean()
        self._record_pair_metrics(output, sums, mask, half)
        return (loss, output) if return_outputs else loss

    def _record_pair_metrics(self, output: Any, sums: torch.Tensor, mask: torch.Tensor, half: int) -> None:
        real, rejected = output.real_rewards.float(), output.rejected_rewards.float()
        lengths = mask.sum(-1).float()
        values = {
            "rewards/real": real.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (real - rejected).mean(), "rewards/accuracies": (real > rejected).float().mean(),
            "logps/real": sums[:half].detach().mean(), "logps/rejected": sums[half:].detach().mean(),
            "length/real": lengths[:half].mean(), "length/rejected": lengths[half:].mean(),
        }
        for name, value in values.items():
            self._metrics[name].append(value.item())

    # --------------------------------------------------------------------------------------------
    # Once per optimizer step
    # --------------------------------------------------------------------------------------------

    def _skip_step_if_nonfinite(self) -> None:
        """Drop the gradients of a step whose loss or gradient is NaN/inf, so the optimizer leaves weights alone."""
        grads = [local_shard(p.grad, self.engine) for p in self._params if p.grad is not None]
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        if self.sharded:  # each rank sees its own shard of the gradient: skip on all or none
            finite = not any_rank(not finite, self.args.device)
        self._step_skipped = not finite
        if finite:
            self._nonfinite_in_a_row = 0
            return
        for param in self._params:
            param.grad = None
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        logger.warning("step %d: non-finite loss or gradient; step skipped (%d in a row, %d in total)",
                       self.state.global_step + 1, self._nonfinite_in_a_row, self.nonfinite_steps)
        if self._nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self._stop_reason = (f"{self._nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                                 "gradient (lower learning_rate, check the data, or use bf16 instead of fp16)", 3)

    def _after_optimizer_step(self) -> None:
        self._metrics["nonfinite/skipped_steps"].append(float(self.nonfinite_steps))
        if self.ema is not None and not self._step_skipped:  # a skipped step leaves the average alone too
            self.ema.update_ema_(self._policy_shards(), self.args.ema_beta)
        step = self.state.global_step
        refreshing = self.args.self_augmenting and self.args.ref_update_mode != "fixed"
        if self.ref is not None and refreshing and step % self.ref_update_steps == 0:
            source = self.ema.tensors if self.args.ref_update_mode == "ema" else self._policy_shards()
            self.ref.copy_from_(source)
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
        """`Trainer.train`, plus: SIGINT/SIGTERM save a checkpoint and stop, repeated non-finite steps stop
        with a checkpoint (both raise `TrainingStopped` after saving), and a non-empty `output_dir` is only
        reused when resuming or with `overwrite_output_dir`."""
        try:
            resume_from_checkpoint = self._resolve_resume(resume_from_checkpoint)
            self._prepare_output_dir(resume_from_checkpoint)
        except (CheckpointError, OutputDirError):
            out = Path(self.args.output_dir)
            if self._created_output_dir and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # leave no trace of a run that never started
            raise
        with self._stop_on_signals():
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self._stop_reason is not None:
            reason, code = self._stop_reason
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise TrainingStopped(f"training stopped at step {self.state.global_step}: {reason}; checkpoint "
                                  f"saved to {checkpoint}; resume with --resume_from_checkpoint {checkpoint}",
                                  checkpoint, code)
        return result

    def _resolve_resume(self, resume: str | bool | None) -> str | None:
        if isinstance(resume, str) and resume.lower() in ("true", "false"):
            resume = resume.lower() == "true"
        if resume is True:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if last is None:
                raise CheckpointError(f"resume_from_checkpoint=true but {self.args.output_dir} has no checkpoint")
            return last
        if not resume:
            return None
        self.validate_checkpoint(Path(resume))
        return str(resume)

    def _prepare_output_dir(self, resume: str | None) -> None:
        out = Path(self.args.output_dir)
        check_output_dir(out, resuming=resume is not None, overwrite=self.args.overwrite_output_dir)
        if self.is_world_process_zero() and (out / METRICS_FILE).exists():
            resumed_step = _checkpoint_step(resume) if resume else 0
            _truncate_metrics(out / METRICS_FILE, resumed_step)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """On SIGINT/SIGTERM finish the current step, save a checkpoint and stop; a second signal kills."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            logger.warning("%s received: saving a checkpoint after the current step (send again to kill)", name)
            self._stop_reason = (f"{name} received", 128 + signum)
            for sig, old in previous.items():
                signal.signal(sig, old)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # --------------------------------------------------------------------------------------------
    # Logging
    # --------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            logs.update(self._reduced_metrics())
        super().log(logs, start_time)
        if self.is_world_process_zero():
            record = {"step": self.state.global_step, "epoch": self.state.epoch, **logs}
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, METRICS_FILE), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _reduced_metrics(self) -> dict[str, float]:
        """Means since the last log, averaged over ranks."""
        names = sorted(self._metrics)
        local = torch.tensor([sum(self._metrics[n]) / max(1, len(self._metrics[n])) for n in names],
                             device=self.args.device)
        values = self.accelerator.reduce(local, reduction="mean").tolist()
        reduced = dict(zip(names, values, strict=True))
        reduced.pop("ref/refreshes", None)
        if self._timing["step"] > 0:
            reduced["time/generation_share"] = self._timing["generation"] / self._timing["step"]
        if self._timing["generation"] > 0:
            reduced["generation/tokens_per_second"] = self._timing["generated_tokens"] / self._timing["generation"]
        self._metrics.clear()
        self._timing = {"generation": 0.0, "step": 0.0, "generated_tokens": 0.0}
        return reduced

    # --------------------------------------------------------------------------------------------
    # Saving and resuming
    # --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy as Trainer saves it; a final save also writes the EMA model to `ema/` beside it.

        Under FSDP2/ZeRO-3 the final policy is gathered here into an ordinary model directory, whatever the
        engine's state_dict_type or 16-bit-gather settings (checkpoints keep the engine's own sharded format).
        """
        directory = output_dir or self.args.output_dir
        if _internal_call or self.engine == "replicated":
            super().save_model(output_dir, _internal_call)
        else:
            policy = materialized(self.policy, self.engine, {}, self._params[0].dtype, "cpu")
            self._write_model_directory(policy, directory)
        if _internal_call:
            return
        if self.ema is not None:
            self.save_ema(os.path.join(directory, EMA_DIR))  # every rank: sharded copies are gathered
        if self.args.should_save:
            self.write_model_card(directory)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model and tokenizer (final model and checkpoints), with the tokenizer's `legacy`
        flag kept (see `sapo.data.save_tokenizer`)."""
        super()._save(output_dir, state_dict)
        if self.processing_class is not None and self.args.should_save:
            keep_legacy_flag(self.processing_class, output_dir or self.args.output_dir)

    def write_model_card(self, directory: str) -> None:
        """README.md beside the final model: base model, data, recipe, settings, final metrics, command."""
        from sapo.model_card import card_settings, final_metrics, render_model_card

        card = render_model_card(
            base_model=getattr(getattr(self.policy, "config", None), "_name_or_path", None) or None,
            data=self.data_source, recipe=self.args.recipe,
            settings=card_settings(self.args, [f.name for f in sapo_fields()]),
            metrics=final_metrics(self.state.log_history), command=self.command)
        Path(directory, "README.md").write_text(card, encoding="utf-8")

    def save_ema(self, directory: str) -> None:
        """The EMA model as a loadable model directory; every rank calls it, the main process writes."""
        self._write_model_directory(self._weights_as_model(self.ema_model, self.ema, device="cpu"), directory)

    def _write_model_directory(self, model_context: contextlib.AbstractContextManager, directory: str) -> None:
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
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save and (staging / name).exists():
            shutil.rmtree(staging / name)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes (and rotates) in staging
        try:
            super()._save_checkpoint(model, trial)
            self.save_sapo_state(staging / name / STATE_DIR)
        finally:
            del self._get_output_dir  # back to the class's method
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _publish_directory(staging / name, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    @property
    def _copies_suffix(self) -> str:
        """Sharded copies are saved per rank (each rank's shards), whole ones once."""
        return f"_rank{self.args.process_index}" if self.sharded else ""

    @property
    def saves_reference(self) -> bool:
        """A reference that moves, or one built from the prepared policy (which on resume is no longer the
        starting model), is written into checkpoints."""
        return self.reference_moves or (self._copies_deferred and self.args.uses_reference)

    def sapo_state_files(self) -> list[str]:
        """Files of `sapo_state/` this run writes (and needs to resume), for this rank."""
        rank = self.args.process_index
        files = [MANIFEST_FILE, "trainer.json", f"segment_rng_rank{rank}.json"]
        if self.args.self_augmenting:
            files += [f"ema{self._copies_suffix}.safetensors", f"replay_buffer_rank{rank}.safetensors",
                      f"pending_rank{rank}.json"]
        if self.saves_reference:
            files.append(f"reference{self._copies_suffix}.safetensors")
        if self.args.recipe == "spin":
            files.append(f"spin_rank{rank}.json")
        return files

    def save_sapo_state(self, directory: Path) -> None:
        """EMA, reference, replay buffer with counts, RNG and SPIN state, per rank; safetensors and JSON."""
        directory.mkdir(parents=True, exist_ok=True)
        rank = self.args.process_index
        if self.args.should_save:
            manifest = {name: list(global_shape(p)) for name, p in zip(self._param_names, self._params, strict=True)}
            (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
            (directory / "trainer.json").write_text(json.dumps({"ref_update_steps": self.ref_update_steps}))
        if self.args.should_save or self.sharded:
            suffix = self._copies_suffix
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(directory / f"ema{suffix}.safetensors"))
            if self.saves_reference:
                save_file(self.ref.state_dict(), str(directory / f"reference{suffix}.safetensors"))
        if self.ema is not None:
            self.buffer.save(directory / f"replay_buffer_rank{rank}.safetensors")
            (directory / f"pending_rank{rank}.json").write_text(json.dumps(self.pending))
        (directory / f"segment_rng_rank{rank}.json").write_text(json.dumps(_rng_state_to_json(self.segment_rng)))
        if self.args.recipe == "spin":
            spin = {"iteration": self.spin_iteration, "rejected": {str(k): v for k, v in self.spin_rejected.items()}}
            (directory / f"spin_rank{rank}.json").write_text(json.dumps(spin))

    def load_sapo_state(self, directory: Path) -> None:
        rank = self.args.process_index
        suffix = self._copies_suffix
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(directory / f"ema{suffix}.safetensors")))
            self.buffer = ReplayBuffer.load(directory / f"replay_buffer_rank{rank}.safetensors")
            self.pending = [tuple(pair) for pair in json.loads((directory / f"pending_rank{rank}.json").read_text())]
        if self.saves_reference:
            self.ref.load_state_dict(load_file(str(directory / f"reference{suffix}.safetensors")))
        meta = json.loads((directory / "trainer.json").read_text())
        self.ref_update_steps = meta.get("ref_update_steps") or self.ref_update_steps
        state = json.loads((directory / f"segment_rng_rank{rank}.json").read_text())
        self.segment_rng.setstate(_rng_state_from_json(state))
        if self.args.recipe == "spin":
            spin = json.loads((directory / f"spin_rank{rank}.json").read_text())
            self.spin_iteration = spin["iteration"]
            self.spin_rejected = {int(k): v for k, v in spin["rejected"].items()}

    def validate_checkpoint(self, path: Path) -> None:
        """Fail early, before anything is written, when `path` cannot resume this run."""
        validate_checkpoint(path, dict(zip(self._param_names, self._params, strict=True)), self.sapo_state_files())


def _restarting_every(period: int, schedule: Any) -> Any:
    # A closure, not a callable object: LambdaLR would try to save an object's attributes in its state_dict.
    return lambda step: schedule(step % period)


def _rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return version, tuple(internal), gauss


STAGING_DIR = ".staging"
MANIFEST_FILE = "parameters.json"


def check_output_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """Refuse to mix a new run's files with another run's results."""
    if out.is_dir() and any(out.iterdir()) and not resuming and not overwrite:
        raise OutputDirError(f"output_dir {out} is not empty; pass --overwrite_output_dir to train into it "
                             "anyway, or --resume_from_checkpoint to continue the run it holds")


def _checkpoint_step(path: str) -> int:
    state = Path(path) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def _truncate_metrics(path: Path, keep_until_step: int) -> None:
    """Drop rows logged after the resumed checkpoint (or all rows for a fresh run), so a resumed run's
    metrics.jsonl reads as if it had never stopped."""
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


def validate_checkpoint(path: Path, params: dict[str, torch.Tensor], state_files: Sequence[str]) -> None:
    """Check that `path` is a complete sapo checkpoint of a model with exactly these trainable parameters."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    required = [path / "trainer_state.json", *(path / STATE_DIR / name for name in state_files)]
    missing = [str(p.relative_to(path)) for p in required if not p.exists()]
    if missing:
        raise CheckpointError(f"{path}: not a complete sapo checkpoint of this kind of run "
                              f"(missing {', '.join(missing)})")
    manifest = json.loads((path / STATE_DIR / MANIFEST_FILE).read_text())
    for name, param in params.items():
        if name not in manifest:
            raise CheckpointError(f"{path}: written by another run: it has no parameter {name!r}")
        if tuple(manifest[name]) != global_shape(param):
            raise CheckpointError(f"{path}: written by another run: parameter {name!r} has shape "
                                  f"{tuple(manifest[name])}, this model {global_shape(param)}")


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for file in files:
            with open(os.path.join(directory, file), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_directory(staged: Path, final: Path) -> None:
    """Durably move a fully written directory into place (replacing a stale one of the same name)."""
    _fsync_tree(staged)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(final.parent)
