"""Training configuration for SAPO.

`SAPOConfig` extends `transformers.TrainingArguments`, so every Trainer option (optimizer, schedule,
precision, logging, DeepSpeed, FSDP, checkpointing) works unchanged; the fields below add SAPO's own
settings, named as in TRL where the meaning is the same (`beta`, `loss_type`, `max_length`...).
Defaults follow the paper's published Mistral-7B SAPO-DPO setting unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from sapo.config_checks import check_choice, has_accelerator, init_kwargs, validate_trainer_fields, validate_types
from sapo.generation import ENGINE_CHOICES, SamplingSettings
from sapo.losses import LOSS_TYPES, LOSSES, REFERENCE_FREE_LOSS_TYPES, nll_term_weight
from sapo.pair_attention import PAIR_ATTENTIONS
from sapo.recipes import RECIPES as RECIPE_CLASSES
from sapo.recipes import Recipe
from sapo.trl_compat import one_loss_type

logger = logging.getLogger(__name__)

REF_UPDATE_MODES = ("ema", "policy", "fixed")
RECIPES = tuple(RECIPE_CLASSES)
PROMPT_TRUNCATION_MODES = ("left", "drop")
COPY_DTYPES = ("auto", "bfloat16", "float16", "float32")
PAIR_SCORINGS = ("shared_prefix", "separate")
IDENTICAL_REJECTED_MODES = ("resample", "drop", "keep")
DEFAULT_LOSS_TYPE = "sigmoid"
DPO_BETA = 0.1  # paper, SAPO-DPO (Mistral-7B)
ORPO_LAMBDA = 0.05  # paper and authors' code, SAPO-ORPO (LLaMA-3-8B)
PAPER_TOKEN_GENERATE_LENGTH = 256  # paper and authors' code: tokens regenerated per rejected response
DEFAULT_GENERATION_ROWS = 64  # sequences decoded together by default (generation_batch_size's rule)


@dataclass
class SAPOConfig(TrainingArguments):
    """Settings of a SAPO run; every field, with its help text, is in docs/guides/config.md."""

    # --- recipe -----------------------------------------------------------------------------------
    recipe: str = field(
        default="sapo",
        metadata={"help": f"What to train: one of {', '.join(RECIPES)}. 'sapo': self-augmented pairs with any "
                  "loss_type (default sigmoid). 'sapo-dpo': the same with a reference loss (sigmoid, ipo, hinge; "
                  "orpo refused). 'sapo-orpo': fixes loss_type orpo (no reference; beta = lambda, default 0.05). "
                  "'sft': NLL of the real responses (loss, reference and generation settings unused). 'dpo': "
                  "offline on the data's chosen/rejected pairs with a fixed reference (sigmoid, ipo or hinge). "
                  "'orpo': offline pairs, fixes loss_type orpo. 'spin': SPIN, whole responses of the frozen previous "
                  "iterate vs the real ones with a reference loss, spin_iterations times; fixes ref_update_mode "
                  "fixed and samples with the spin_* settings. A loss_type a recipe cannot use is an error."},
    )
    spin_iterations: int | None = field(
        default=None,
        metadata={"help": "SPIN only: iterations (opponent refreshes) over the run's optimizer steps. Default: the "
                  "number of per-iteration values given (spin_preset, spin_learning_rates, spin_betas), else 3."},
    )
    spin_preset: str | None = field(
        default=None,
        metadata={"help": "SPIN only: 'paper' is the SPIN scripts' schedule in one setting: 4 iterations, learning "
                  "rates 5e-7, 5e-7, 1e-7, 1e-7 and betas 0.1, 0.1, 0.1, 5.0 per iteration, fresh optimizer state "
                  "each iteration, cut responses ended with EOS. The scripts also use optim rmsprop and 6 epochs per "
                  "iteration (num_train_epochs 24): set those yourself."},
    )
    spin_learning_rates: list[float] | None = field(
        default=None,
        metadata={"help": "SPIN only: the peak learning rate of each iteration (one value per iteration; replaces "
                  "learning_rate). The schedule restarts at each iteration and scales to its value."},
    )
    spin_betas: list[float] | None = field(
        default=None,
        metadata={"help": "SPIN only: the loss's beta in each iteration (one value per iteration; replaces beta)."},
    )
    spin_reset_optimizer: bool = field(
        default=False,
        metadata={"help": "SPIN only: start each iteration with fresh optimizer state, as each run of the SPIN "
                  "scripts starts a new optimizer."},
    )
    spin_end_with_eos: bool = field(
        default=False,
        metadata={"help": "SPIN only: end an opponent response cut at its token budget with the end token, as the SPIN "
                  "code does when it re-renders each generated answer with the chat template."},
    )
    spin_do_sample: bool = field(
        default=False,
        metadata={"help": "SPIN only: sample the opponent's responses at spin_temperature (no top-k/top-p, as the "
                  "SPIN code's vLLM path) instead of greedy decoding (the SPIN code's default generate path)."},
    )
    spin_temperature: float = field(
        default=1.0, metadata={"help": "SPIN only: sampling temperature when spin_do_sample is on."}
    )
    spin_max_new_tokens: int = field(
        default=256,
        metadata={"help": "SPIN only: maximum tokens of each opponent response (the SPIN code's budget), further "
                  "limited by max_length."},
    )
    # --- loss -------------------------------------------------------------------------------------
    loss_type: str | None = field(
        default=None,
        metadata={"help": f"Preference loss: one of {', '.join(LOSS_TYPES)}. 'sigmoid' is SAPO-DPO, "
                  "'orpo' is SAPO-ORPO (no reference model). Default: orpo for the sapo-orpo and orpo recipes, "
                  "sigmoid otherwise."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "DPO/IPO/hinge temperature beta; for 'orpo' the weight lambda of the odds-ratio term. "
                  "Default: the paper's values, 0.1 for reference losses and 0.05 for orpo."},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Conservative-DPO label smoothing (loss_type 'sigmoid' only)."}
    )
    nll_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the real responses' NLL added to a reference loss (sigmoid, ipo, hinge): RPO "
                  "(Pang et al. 2024), TRL's loss_type [sigmoid, sft] with loss_weights [1, w]. A margin loss alone "
                  "can lower the real answers' likelihood along with the rejected ones'; this term keeps it rising. "
                  "0 (default) is the paper's SAPO. orpo has its own NLL term and refuses this."},
    )
    # --- lengths ----------------------------------------------------------------------------------
    max_length: int = field(
        default=1024, metadata={"help": "Maximum tokens of prompt + response; responses are cut to fit."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Maximum prompt tokens; longer prompts are handled by prompt_truncation."}
    )
    prompt_truncation: str = field(
        default="left",
        metadata={"help": "What to do with prompts longer than max_prompt_length: 'left' keeps their last "
                  "tokens, 'drop' removes the example (the count is logged)."},
    )
    # --- self-augmentation ------------------------------------------------------------------------
    token_generate_length: int | None = field(
        default=None,
        metadata={"help": "Tokens the EMA model regenerates per rejected response (segment length), at most "
                  "max_length. Default: the paper's 256, or max_length when that is smaller."},
    )
    ema_beta: float = field(
        default=0.5,
        metadata={"help": "EMA decay: theta_ema <- ema_beta * theta_ema + (1 - ema_beta) * theta, once per "
                  "optimizer step."},
    )
    max_replay_buffer_size: int = field(
        default=2000, metadata={"help": "Replay buffer capacity (FIFO; the oldest entries are evicted)."}
    )
    sample_every_n_steps: int = field(
        default=1, metadata={"help": "Generate rejected segments for the incoming batch every N optimizer steps."}
    )
    responses_per_prompt: int = field(
        default=1, metadata={"help": "Rejected responses sampled per real example in each generation round."}
    )
    generation_engine: str = field(
        default="auto",
        metadata={"help": "How the EMA model samples: 'hf' (model.generate), 'static' (sapo's static-KV-cache decode "
                  "loop, sampling on the device, compiled with CUDA graphs on GPUs; greedy-identical to generate) or "
                  "'auto': the faster one as measured per device (CUDA: static, compiled, falling back to generate "
                  "with one warning if compiling fails; CPU: static, eager; other devices: generate; generate for "
                  "a model whose generation_config sets a field only generate implements). A `sampler=` passed to "
                  "SAPOTrainer overrides it."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Examples per generation round: incoming batches are queued and their segments generated "
                  "together once this many are waiting, which amortises decoding over m = generation_batch_size / "
                  "per_device_train_batch_size batches; the replay buffer then lags by up to m-1 batches (steps, "
                  "with sample_every_n_steps 1 and no gradient accumulation): a batch's rejected responses enter "
                  "it up to m-1 steps after the batch arrives, and between rounds the newest entries come from an "
                  f"EMA model up to m-1 steps old. Default: the smallest multiple of per_device_train_batch_size "
                  f"that decodes at least {DEFAULT_GENERATION_ROWS} sequences (x responses_per_prompt), e.g. 64 "
                  "examples, m = 8, a lag of up to 7 steps at batch 8. Set it to per_device_train_batch_size for the "
                  "paper's flow (every batch augmented at once, no lag). The first round runs at step 0 on the "
                  "first batch alone, since the buffer must not be empty. A short dataset never waits for a round "
                  "it cannot fill: a round is at most a quarter of the examples a process sees per epoch (in whole "
                  "batches, at least one), and what is pending at an epoch's last batch is generated then."},
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the EMA model."})
    top_k: int = field(default=50, metadata={"help": "Top-k of the EMA model's sampling (0 disables)."})
    top_p: float = field(default=0.95, metadata={"help": "Top-p (nucleus) of the EMA model's sampling (1 disables)."})
    identical_rejected: str = field(
        default="resample",
        metadata={"help": "What happens to a rewrite that carries no preference signal (identical to the real "
                  "response, or not judged worse by rejected_judge): 'resample' regenerates it once at a new segment "
                  "start and drops it (counted as pairs/dropped) if it is still unusable; 'drop' drops it at once; "
                  "'keep' pushes it into the buffer like any other, as the paper does (an identical pair has zero "
                  "gradient)."},
    )
    skip_no_signal_steps: bool | None = field(
        default=None,
        metadata={"help": "Skip an optimizer step whose pairs carry no gradient on any rank (all identical, or no "
                  "pair to draw yet): no weight, optimizer-moment or EMA change; the step still counts for "
                  "max_steps and the schedule (counted as steps/skipped_no_signal). Default: on unless "
                  "identical_rejected is 'keep' (the paper's behaviour)."},
    )
    rejected_judge: str | None = field(
        default=None,
        metadata={"help": "A judge that must score each rewrite below its real response for the pair to be kept: "
                  "module:function (or file.py:function), the judge interface of `sapo eval`, (prompt, response, "
                  "record) -> float, given the training record. A rewrite it does not score lower is handled as "
                  "identical_rejected says. Unset: no judge."},
    )
    # --- reference model --------------------------------------------------------------------------
    ref_update_mode: str = field(
        default="ema",
        metadata={"help": "How the reference model is refreshed every ref_update_steps: 'ema' copies the EMA "
                  "model, 'policy' copies the policy, 'fixed' never refreshes."},
    )
    ref_update_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps between reference refreshes; default one epoch."},
    )
    # --- efficiency -------------------------------------------------------------------------------
    logprob_chunk_size: int = field(
        default=1024,
        metadata={"help": "Rows (tokens) of the vocabulary projection computed at a time when scoring "
                  "responses, so full-vocabulary fp32 logits of the whole batch are never held at once."},
    )
    pair_scoring: str = field(
        default="shared_prefix",
        metadata={"help": "How a pair's two sequences are scored: 'shared_prefix' packs each pair into one row "
                  "(the prompt and the real response before the rewritten segment run once, with a block attention "
                  "mask), 'separate' runs the real and the rejected sequence as two rows. Same log-probs up to float "
                  "rounding; shared_prefix falls back to separate (logged once) where the model cannot take it "
                  "(flash-attention, sliding windows)."},
    )
    pair_attention: str = field(
        default="auto",
        metadata={"help": "How packed pairs (pair_scoring shared_prefix) attend: 'flex' through FlexAttention's "
                  "block mask (empty blocks skipped, grouped KV heads not copied), 'dense' through SDPA with a "
                  "dense boolean mask, 'auto' flex on CUDA and dense elsewhere (torch has no FlexAttention backward "
                  "on a CPU). Same attention either way; flex needs an sdpa model that supports FlexAttention, and "
                  "falls back to dense (logged once) where it cannot run."},
    )
    cache_reference_logps: bool = field(
        default=True,
        metadata={"help": "Remember the reference's log-probs of each replay-buffer pair until the reference next "
                  "moves (ref_update_steps), so a pair drawn again is not run through the reference again; the "
                  "same numbers up to float rounding, kept on the training device (4 bytes per response token "
                  "of each buffered pair) and saved with checkpoints. False: one reference forward of every "
                  "drawn pair, as the authors' code."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off in the policy (as TRL's preference trainers do)."}
    )
    copies_dtype: str = field(
        default="auto",
        metadata={"help": f"Dtype of the EMA model and the reference: one of {', '.join(COPY_DTYPES)}; 'auto' keeps "
                  "the policy's parameter dtype. 'bfloat16' halves their memory under fp32 (mixed-precision) "
                  "training and makes generation faster. LoRA copies stay in the adapters' dtype."},
    )
    offload_copies: bool = field(
        default=False,
        metadata={"help": "Keep the EMA model and the reference in CPU memory between uses: the EMA is gathered onto "
                  "the device once per generation round, the reference is copied into the policy's weights for "
                  "each reference forward (and the policy's weights put back). Saves their device memory at the "
                  "cost of host-device copies every step. No effect with LoRA (the copies are adapter weights)."},
    )
    # --- robustness -------------------------------------------------------------------------------
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "Optimizer steps with a non-finite loss or gradient are skipped; this many in a row "
                  "stop the run with a checkpoint."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into a non-empty output_dir that is not being resumed; the previous run's "
                  "checkpoints (checkpoint-N with a sapo_state/) are removed first, other files are kept, and the "
                  "final outputs are replaced at the end."},
    )
    skip_invalid: bool = field(
        default=False, metadata={"help": "Drop invalid data records (counted in the log) instead of failing."}
    )
    resume_allow_changes: list[str] | None = field(
        default=None,
        metadata={"help": "Settings a resumed run may change on purpose, by name (e.g. learning_rate seed). A resume "
                  "is refused, naming each one, when a setting that shapes the training differs from the "
                  "checkpoint's: every SAPO setting except logprob_chunk_size, offload_copies, max_nonfinite_steps "
                  "and skip_invalid; the seed, batch, optimizer, schedule and precision settings; 'data' (the "
                  "tokenized dataset) and 'world_size' (number of processes). max_steps and num_train_epochs may "
                  "always change (to train longer)."},
    )
    # --- model loading ----------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of AutoModelForCausalLM.from_pretrained when the policy is loaded by "
                  "path (SAPOTrainer(model='...') or `sapo train`), e.g. '{\"dtype\": \"bfloat16\", "
                  "\"attn_implementation\": \"sdpa\"}' (a JSON object on the command line, a mapping in YAML). "
                  "`sapo train` adds --dtype and --attn_implementation to them; a key set both ways is an error."},
    )
    ref_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "The same for a reference model given by path (SAPOTrainer(ref_model='...')). Default: "
                  "model_init_kwargs, so the reference loads like the policy."},
    )
    # --- evaluation during training (eval_dataset, eval_strategy, eval_steps: docs/guides/evaluation.md) ---
    eval_judge: str | None = field(
        default=None,
        metadata={"help": "Also score held-out answers at each evaluation: module:function (or file.py:function), "
                  "the judge interface of `sapo eval`, (prompt, response, record) -> float. The policy answers "
                  "every eval prompt greedily; the mean score is logged as eval_judge/score."},
    )
    eval_judge_max_new_tokens: int = field(
        default=64, metadata={"help": "eval_judge only: maximum tokens of each judged answer."}
    )
    # --- overridden TrainingArguments defaults ----------------------------------------------------
    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate (paper: 5e-7 for DPO)."})
    logging_steps: float = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: SAPO's collator reads its own tokenized columns."}
    )

    def __post_init__(self) -> None:
        self.loss_type = one_loss_type(self.loss_type)  # TRL 1.16's form, a list of one loss (default ["sigmoid"])
        self._use_cpu_for_a_cpu_only_launch()
        self._apply_recipe()
        self._validate_sapo_fields()
        super().__post_init__()

    @property
    def sampling_settings(self) -> SamplingSettings:
        """How the recipe samples its generations (`Recipe.sampling_settings`: SAPO's EMA with the paper's
        temperature/top-k/top-p, SPIN's opponent as the SPIN code does)."""
        return self.recipe_class.sampling_settings(self)

    @property
    def generation_round_size(self) -> int:
        """Examples per SAPO generation round: `generation_batch_size`, or the default rule (its help)."""
        if self.generation_batch_size is not None:
            return self.generation_batch_size
        batch = self.per_device_train_batch_size
        return batch * max(1, math.ceil(DEFAULT_GENERATION_ROWS / (batch * self.responses_per_prompt)))

    @property
    def generation_rows(self) -> int:
        """The most sequences one generation call decodes, the row count the static engine pads every call to
        (`Recipe.generation_rows`: a SAPO round, or one batch)."""
        return self.recipe_class.generation_rows(self)

    @property
    def generation_cache_len(self) -> int:
        """A bound on context + new tokens of any generation call, the static engine's one cache length
        (`Recipe.generation_cache_len`)."""
        return self.recipe_class.generation_cache_len(self)

    @property
    def skips_no_signal_steps(self) -> bool:
        """`skip_no_signal_steps`, its default resolved (on, unless identical pairs are kept as in the paper)."""
        if self.skip_no_signal_steps is not None:
            return self.skip_no_signal_steps
        return self.identical_rejected != "keep"

    @property
    def recipe_class(self) -> type[Recipe]:
        return RECIPE_CLASSES[self.recipe]

    @property
    def uses_reference(self) -> bool:
        """Reference-free losses (ORPO) and SFT never build or query a reference model."""
        return not self.recipe_class.supervised and LOSSES[self.loss_type].needs_reference

    @property
    def self_augmenting(self) -> bool:
        """SAPO proper: EMA model, segment regeneration and replay buffer."""
        return self.recipe_class.needs_ema

    @property
    def needs_rejected_data(self) -> bool:
        return self.recipe_class.needs_rejected_data

    def _use_cpu_for_a_cpu_only_launch(self) -> None:
        """Under torchrun/accelerate with several processes and no accelerator, accelerate only joins the processes
        into one job (gloo) with `use_cpu`; without it each process would train alone into the same output_dir.
        Accelerate does not run FSDP or DeepSpeed on CPU processes: the trainer then refuses by name (DeepSpeed is
        left without `use_cpu`, which it rejects, and is refused as an uncoordinated launch)."""
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched and not self.use_cpu and not self.deepspeed and not has_accelerator():
            logger.info("several processes and no GPU: training on the CPU processes as one gloo job (use_cpu)")
            self.use_cpu = True

    def _apply_recipe(self) -> None:
        """Recipes fix the loss where it is part of their definition, and defaults follow the paper (beta 0.1
        for DPO-style losses, lambda 0.05 for ORPO); a setting a recipe cannot use is an error, not ignored."""
        check_choice("recipe", self.recipe, RECIPES)
        recipe = self.recipe_class
        required = recipe.fixed_loss_type
        if required is not None and self.loss_type not in (None, required):
            raise ValueError(f"SAPOConfig.recipe {self.recipe!r} fixes loss_type {required!r}; "
                             f"got loss_type {self.loss_type!r}")
        if self.loss_type is None:
            self.loss_type = required or DEFAULT_LOSS_TYPE
        allowed = recipe.allowed_loss_types
        if allowed is not None and self.loss_type not in allowed:
            raise ValueError(f"SAPOConfig.recipe {self.recipe!r} needs a reference loss ({', '.join(allowed)}), "
                             f"got loss_type {self.loss_type!r}")
        if self.beta is None:
            self.beta = ORPO_LAMBDA if self.loss_type in REFERENCE_FREE_LOSS_TYPES else DPO_BETA
        for recipe_class in dict.fromkeys(RECIPE_CLASSES.values()):  # each checks its own settings, chosen or not
            recipe_class.configure(self)
        if self.rejected_judge is not None and not recipe.needs_ema:
            raise ValueError(f"SAPOConfig.rejected_judge judges the EMA model's rewrites; recipe {self.recipe!r} makes "
                             "none (use a sapo recipe, or leave rejected_judge unset)")
        if recipe.fixed_reference and self.ref_update_mode != "fixed":
            self.ref_update_mode = "fixed"  # the reference is the SFT model (dpo) or managed per iteration (spin)

    def _validate_sapo_fields(self) -> None:
        validate_types(self)
        for name in ("model_init_kwargs", "ref_model_init_kwargs"):
            setattr(self, name, init_kwargs(name, getattr(self, name)))
        validate_trainer_fields(self)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("ref_update_mode", self.ref_update_mode, REF_UPDATE_MODES)
        check_choice("prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATION_MODES)
        check_choice("generation_engine", self.generation_engine, ENGINE_CHOICES)
        check_choice("copies_dtype", self.copies_dtype, COPY_DTYPES)
        check_choice("pair_scoring", self.pair_scoring, PAIR_SCORINGS)
        check_choice("pair_attention", self.pair_attention, PAIR_ATTENTIONS)
        check_choice("identical_rejected", self.identical_rejected, IDENTICAL_REJECTED_MODES)
        if self.token_generate_length is None:
            self.token_generate_length = min(PAPER_TOKEN_GENERATE_LENGTH, self.max_length)
        for name in ("max_length", "max_prompt_length", "token_generate_length", "max_replay_buffer_size",
                     "sample_every_n_steps", "responses_per_prompt", "logprob_chunk_size", "max_nonfinite_steps",
                     "spin_iterations", "spin_max_new_tokens", "eval_judge_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SAPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"SAPOConfig.max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) to leave room for the response"
            )
        if self.token_generate_length > self.max_length:
            raise ValueError(f"SAPOConfig.token_generate_length ({self.token_generate_length}) must be at most "
                             f"max_length ({self.max_length}): a rewritten segment lies within one sequence")
        if not 0.0 <= self.ema_beta <= 1.0:
            raise ValueError(f"SAPOConfig.ema_beta must be in [0, 1], got {self.ema_beta}")
        if self.beta <= 0:
            raise ValueError(f"SAPOConfig.beta must be > 0, got {self.beta}")
        for name in ("temperature", "spin_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SAPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SAPOConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SAPOConfig.top_k must be >= 0, got {self.top_k}")
        if self.generation_batch_size is not None and self.generation_batch_size < 1:
            raise ValueError(f"SAPOConfig.generation_batch_size must be >= 1 or unset, "
                             f"got {self.generation_batch_size}")
        if self.ref_update_steps is not None and self.ref_update_steps < 1:
            raise ValueError(f"SAPOConfig.ref_update_steps must be >= 1 or unset, got {self.ref_update_steps}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"SAPOConfig.label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        if self.nll_weight and self.recipe_class.supervised:
            raise ValueError(f"SAPOConfig.nll_weight adds an NLL term to a preference loss; recipe {self.recipe!r} "
                             "trains on the NLL alone")
        try:
            nll_term_weight(self.loss_type, self.nll_weight)
        except ValueError as error:
            raise ValueError(f"SAPOConfig.{error}") from None
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ValueError(f"SAPOConfig.label_smoothing is only defined for loss_type 'sigmoid', not "
                             f"{self.loss_type!r}")


def sapo_fields() -> list[dataclasses.Field]:
    """SAPO's own fields of SAPOConfig (those not inherited from TrainingArguments)."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(SAPOConfig) if f.name not in inherited]
