"""The trainer's evaluation on held-out pairs (`SAPOTrainer.evaluate` and the Trainer's evaluation loop).

The pairs themselves, their statistics and metrics are `sapo.heldout`'s; here they are made with the run's
models (the rejected side generated once per run, by the start model, from a seed of its own), batched, scored
like training pairs, and, with `eval_judge`, the policy's greedy answers judged.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from sapo._hf_compat import prepare_inputs
from sapo.batching import pad_pair_sequences, pad_sequences
from sapo.copies import EMA, REFERENCE
from sapo.errors import UsageError
from sapo.heldout import (
    EVAL_SEED_OFFSET,
    SINGLE,
    EvalPairs,
    EvalSet,
    eval_metrics,
    independent_rng,
    pair_statistics,
    prepare_eval_sets,
    real_statistics,
    rejected_source,
    segment_rejected,
    whole_rejected,
)
from sapo.losses import LOSSES, nll_from_logps, nll_term_weight
from sapo.metrics import JUDGE_SCORE

logger = logging.getLogger("sapo.trainer")


def trainer_eval_dataset(trainer: Any) -> Any:
    """What `Trainer.eval_dataset` holds: one set, or sets by name (Trainer evaluates each under its name)."""
    if not trainer._eval_sets:
        return None
    if SINGLE in trainer._eval_sets:
        return trainer._eval_sets[SINGLE].data
    return {name: eval_set.data for name, eval_set in trainer._eval_sets.items()}


def evaluate(trainer: Any, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
             metric_key_prefix: str = "eval") -> dict[str, float]:
    """`Trainer.evaluate` on the run's eval pairs; records passed here (one set or sets by name) are prepared
    like the constructor's, their pairs made now and not kept. Torch's random state is given back afterwards
    (a DataLoader draws its base seed from it), so evaluating never changes the training run."""
    with independent_rng(trainer.args.seed + EVAL_SEED_OFFSET):
        if eval_dataset is None or isinstance(eval_dataset, (str, EvalPairs)):
            return Trainer.evaluate(trainer, eval_dataset, ignore_keys, metric_key_prefix)
        metrics: dict[str, float] = {}
        sets = prepare_eval_sets(eval_dataset, trainer.processing_class, trainer.args, trainer.eos_token_ids,
                                 origin="evaluate(eval_dataset)")
        for name, eval_set in sets.items():
            prefix = metric_key_prefix if name == SINGLE else f"{metric_key_prefix}_{name}"
            pairs = EvalPairs(eval_set, eval_rejected(trainer, eval_set))
            metrics.update(Trainer.evaluate(trainer, pairs, ignore_keys, prefix))
        return metrics


def eval_dataloader(trainer: Any, eval_dataset: Any = None) -> Any:
    """Batches of the eval pairs of `eval_dataset` (a set's name, or none: the only set)."""
    if not isinstance(eval_dataset, EvalPairs):
        key = eval_dataset if isinstance(eval_dataset, str) else SINGLE
        if key not in trainer._eval_sets:
            known = ", ".join(repr(k) for k in trainer._eval_sets if k != SINGLE)
            raise UsageError("evaluation needs eval data: pass eval_dataset= to SAPOTrainer or to evaluate()"
                             if not trainer._eval_sets else f"no eval set named {key!r} (the sets: {known})")
        eval_dataset = heldout_pairs(trainer, key)
    trainer._eval_active = eval_dataset
    return Trainer.get_eval_dataloader(trainer, eval_dataset)


def heldout_pairs(trainer: Any, key: str) -> EvalPairs:
    """The run's pairs of eval set `key`, made on first use (before the first step: by the start model)."""
    if key not in trainer._eval_pairs:
        trainer._eval_pairs[key] = EvalPairs(trainer._eval_sets[key], eval_rejected(trainer, trainer._eval_sets[key]))
    return trainer._eval_pairs[key]


def eval_rejected(trainer: Any, eval_set: EvalSet) -> list[list[int]] | None:
    """The rejected side of an eval set's pairs (see `rejected_source`). Generated ones are sampled from a seed of
    their own, each rank for its share of the examples, and gathered so every rank holds all of them."""
    from accelerate.utils import gather_object

    source, data = rejected_source(trainer.args), eval_set.data
    if source is None:
        return None
    if source == "data":
        return [list(data[i]["rejected_ids"]) for i in range(len(data))]
    which = EMA if source == "segment" else REFERENCE
    if trainer.state.global_step > 0:
        logger.warning("eval pairs made at step %d by the %s model, not by the start model (none were saved with "
                       "the checkpoint, or the data is new)", trainer.state.global_step, which)
    rank, world = trainer.args.process_index, trainer.args.world_size
    mine = list(range(rank, len(data), world))
    prompts = [data[i]["prompt_ids"] for i in mine]
    seed = trainer.args.seed + EVAL_SEED_OFFSET + rank
    with independent_rng(seed), eval_generator(trainer, which) as model, trainer.accelerator.autocast():
        def generate(contexts, max_new_tokens):
            return trainer.sampler.sample(model, contexts, max_new_tokens) if contexts else []

        if source == "segment":
            rejected = segment_rejected(prompts, [data[i]["response_ids"] for i in mine], generate,
                                        token_generate_length=trainer.args.token_generate_length,
                                        max_length=trainer.args.max_length, eos_token_ids=trainer.eos_token_ids,
                                        rng=random.Random(seed))
        else:
            rejected = whole_rejected(prompts, generate, max_new_tokens=trainer.args.spin_max_new_tokens,
                                      max_length=trainer.args.max_length)
    gathered = dict(gather_object(list(zip(mine, rejected, strict=True))))
    return [gathered[i] for i in range(len(data))]


def eval_generator(trainer: Any, which: str) -> Any:
    """The copy that generates (every rank enters: gathering sharded copies is collective); before the copies
    exist (sharded engines bind them when training starts) the policy, which they would equal."""
    exists = trainer.copies.ema is not None if which == EMA else (
        trainer.copies.reference is not None or trainer.copies.reference_module is not None)
    return trainer.copies.as_model(which) if exists else contextlib.nullcontext(trainer.policy)


def prediction_step(trainer: Any, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                    ignore_keys: list[str] | None = None):
    """The training loss of a batch of eval pairs; per-example statistics are kept for `evaluation_loop`."""
    pad = trainer.processing_class.pad_token_id
    if trainer.recipe.supervised:
        padded = pad_sequences(list(zip(inputs["prompt_ids"], inputs["response_ids"], strict=True)), pad)
    else:  # scored like training pairs (packed around their shared prefix where the model allows it)
        padded = pad_pair_sequences(list(zip(inputs["prompt_ids"], inputs["response_ids"], inputs["rejected_ids"],
                                             strict=True)), pad)
    batch = prepare_inputs(trainer, padded)
    mask = batch["loss_mask"][:, 1:]
    with torch.no_grad():
        if trainer.recipe.supervised:
            token_logps, token_statistics = trainer.scoring.token_scores(model, batch)
            loss, statistics = nll_from_logps(token_logps, mask), real_statistics(token_logps, mask, token_statistics)
        else:
            result = trainer.scoring.pair_loss(model, batch)
            loss, statistics = result.loss, pair_statistics(result, mask)
    trainer._eval_statistics.append(trainer.accelerator.gather_for_metrics(statistics).cpu())
    return loss.detach(), None, None


def evaluation_loop(trainer: Any, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                    ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
    """`Trainer.evaluation_loop`, plus the eval-set metrics of `sapo.heldout.eval_metrics` (its `loss` replaces
    the Trainer's mean of batch losses) and, with `eval_judge`, the judged score."""
    trainer._eval_statistics = []
    output = Trainer.evaluation_loop(trainer, dataloader, description, prediction_loss_only, ignore_keys,
                                     metric_key_prefix)
    spec = LOSSES[trainer.args.loss_type]
    metrics = eval_metrics(torch.cat(trainer._eval_statistics),
                           nll_weight=nll_term_weight(trainer.args.loss_type, trainer.args.nll_weight),
                           mean_logps=not spec.needs_reference)  # ORPO's logps are per-token means, as in TRL
    trainer._eval_statistics = []
    if trainer.eval_judge is not None and trainer._eval_active is not None:
        metrics[JUDGE_SCORE] = judged_score(trainer, trainer._eval_active.eval_set)
    output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
    return output


def judged_score(trainer: Any, eval_set: EvalSet) -> float:
    """Mean judge score of the policy's greedy answers to the eval prompts (each rank answers its share)."""
    from accelerate.utils import gather_object

    from sapo.judging import generate_responses, judge_scores

    if not eval_set.records:
        raise UsageError("eval_judge needs the eval records (prompts and the fields the judge reads), not an "
                         "already tokenized dataset")
    mine = range(trainer.args.process_index, len(eval_set.prompts), trainer.args.world_size)
    prompts, records = [eval_set.prompts[i] for i in mine], [eval_set.records[i] for i in mine]
    with independent_rng(trainer.args.seed + EVAL_SEED_OFFSET), trainer.accelerator.autocast():
        responses = generate_responses(trainer.policy, trainer.processing_class, prompts,
                                       max_new_tokens=trainer.args.eval_judge_max_new_tokens,
                                       batch_size=trainer.args.per_device_eval_batch_size) if prompts else []
    scores = gather_object(judge_scores(trainer.eval_judge, trainer.args.eval_judge or "eval_judge", prompts,
                                        responses, records))
    return sum(scores) / max(1, len(scores))
