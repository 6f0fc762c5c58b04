"""Held-out evaluation during training: fixed evaluation pairs, their metrics, and their checkpoint file.

A held-out number is only worth watching if it moves because the policy moves. The real side of an eval pair is
the record's own response; the rejected side is made once per run (see `rejected_source`), so every evaluation of
the run scores the same pairs:

- SAPO recipes: the start model (the EMA at step 0 equals the policy) rewrites one segment of each real response
  with the run's segment rule (`sapo.segments`) and sampling settings, from a seed of its own;
- spin: the start model writes whole responses, as SPIN's first iteration does;
- dpo, orpo: the record's own `rejected` response;
- sft: no pairs; only the likelihood of the real responses is measured.

Evaluation computes the training loss (`sapo.losses.pair_loss`, with the reference where the loss needs one) over
the whole eval set, the implicit rewards, their margin and accuracy, and the mean per-token log-likelihood of the
real responses (`logps/chosen_per_token`: it falls when a preference loss displaces the likelihood of the real
answers, the effect DPO is known for). The pure pieces here take tensors and token lists; the trainer wires them.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sapo import metrics as m
from sapo.data import (
    Example,
    Message,
    RawRecord,
    TokenizedDataset,
    check_one_format,
    normalize_record,
    read_records,
    tokenize_examples,
)
from sapo.errors import DataError, UsageError
from sapo.judging import Judge, load_judge
from sapo.logprobs import TOKEN_STATISTICS, sequence_logps
from sapo.losses import PairLoss
from sapo.run.resume import data_fingerprint
from sapo.segments import Generate, rewrite_segments

SINGLE = ""  # key of an eval set given as one dataset (named sets keep their names)
EVAL_PAIRS_FILE = "eval_pairs.json"  # in a checkpoint's sapo_state: the rejected side of every eval pair
EVAL_SEED_OFFSET = 7919  # eval generation seed = args.seed + this + rank, apart from any training stream
STATISTICS = ("pair_loss", "reward_real", "reward_rejected", "logp_real", "tokens_real", "logp_rejected",
              "tokens_rejected", "logits_real", "logits_rejected", "entropy", "top1_real")
"""Per-example columns gathered from every eval batch (NaN where a recipe has no pairs): the last four are sums over
the example's response tokens of `sapo.logprobs.TOKEN_STATISTICS` (mean logit of each side, entropy of both, argmax
hits of the real one), so the token-level metrics are token-weighted over the whole set."""



@dataclass
class EvalSet:
    """One held-out set: the tokenized examples the pairs are built on, and the prompts and raw records a judge
    reads (aligned with each other; the tokenized ones may be fewer, after the length limits)."""

    data: TokenizedDataset
    prompts: list[list[Message] | str] = field(default_factory=list)  # a str: a plain-text prompt, sent as it is
    records: list[Any] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenized set, so saved pairs are only reused for the same data."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.data)
        return self._fingerprint


class EvalPairs(torch.utils.data.Dataset):
    """An eval set with the rejected side of each pair fixed; items as the training data's (see `collate_examples`),
    `rejected_ids` None for sft."""

    def __init__(self, eval_set: EvalSet, rejected: Sequence[list[int]] | None) -> None:
        if rejected is not None and len(rejected) != len(eval_set.data):
            raise ValueError(f"{len(rejected)} rejected responses for {len(eval_set.data)} eval examples")
        self.eval_set, self.rejected = eval_set, rejected

    def __len__(self) -> int:
        return len(self.eval_set.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.eval_set.data[index])
        item["rejected_ids"] = None if self.rejected is None else self.rejected[index]
        return item


def check_eval_data(args: Any, eval_dataset: Any) -> None:
    """An evaluation schedule needs eval data: say so naming both, before anything is loaded or written (the
    Trainer's own refusal would come later and name only its own argument)."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is None and (strategy != "no" or args.eval_on_start):
        asked, off = (f"eval_strategy {strategy!r}", "set eval_strategy 'no'") if strategy != "no" else \
            ("eval_on_start", "turn eval_on_start off")
        raise UsageError(f"{asked} evaluates on held-out data, but no eval data was given: pass eval_dataset= to "
                         f"SAPOTrainer (--eval_dataset_name FILE on the command line), or {off}")


def load_eval_judge(spec: str | None, setting: str = "eval_judge") -> Judge | None:
    """A judge setting (`eval_judge`, `rejected_judge`) resolved as `sapo eval --judge` resolves its judge, its
    errors naming the setting."""
    if spec is None:
        return None
    try:
        return load_judge(spec)
    except UsageError as error:
        raise UsageError(str(error).replace("--judge", setting, 1)) from None


def eval_metric_names(args: Any, set_names: Sequence[str], judged: bool) -> list[str]:
    """Every metric an evaluation of these eval sets logs, as Trainer names them (`eval_loss`, `eval_dev_loss`)."""
    metrics = [m.LOSS, m.LOGPS_CHOSEN, m.LOGPS_CHOSEN_PER_TOKEN, m.ENTROPY, m.MEAN_TOKEN_ACCURACY]
    if rejected_source(args) is not None:
        metrics += [m.REWARDS_CHOSEN, m.REWARDS_REJECTED, m.REWARD_MARGINS, m.REWARD_ACCURACIES, m.REWARD_TIES,
                    m.LOGPS_REJECTED, m.LOGITS_CHOSEN, m.LOGITS_REJECTED]
    metrics += [m.JUDGE_SCORE] if judged else []
    metrics += ["runtime", "samples_per_second", "steps_per_second"]  # the Trainer's own
    return [m.eval_name(metric, None if name == SINGLE else name) for name in set_names for metric in metrics]


def check_metric_for_best_model(metric: str | None, logged: Sequence[str]) -> None:
    """A `metric_for_best_model` that evaluation never logs is refused now, listing those it logs, rather than by
    a KeyError at the first evaluation, hours into the run."""
    if metric is None:
        return
    name = metric if metric.startswith(m.EVAL_PREFIX) else m.eval_name(metric)
    if name not in logged:
        renamed = f" (now named {m.current_name(name)!r}, TRL's name)" if m.current_name(name) != name else ""
        raise UsageError(f"metric_for_best_model {metric!r}: evaluation logs no {name!r}{renamed}; it logs "
                         f"{', '.join(logged)}")


@contextlib.contextmanager
def independent_rng(seed: int) -> Iterator[None]:
    """Draw from torch's generators seeded with `seed`, then give them back their state: evaluation samples from a
    fixed seed of its own and leaves the training run's random stream exactly where it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------------
# Reading and preparing eval data
# ------------------------------------------------------------------------------------------------


def read_eval_records(source: str, split: str, *, skip_invalid: bool, with_rejected: bool) -> list[Any]:
    """The raw records of an eval file or dataset, each checked as training data is (errors name file:line and
    field); the raw records are kept because a judge reads their extra fields."""
    return [example.record for example in read_eval_examples(source, split, skip_invalid=skip_invalid,
                                                             with_rejected=with_rejected)]


def read_eval_examples(source: str, split: str, *, skip_invalid: bool, with_rejected: bool) -> list[Example]:
    """`read_eval_records` as `Example`s (each keeps its raw record and file:line), all of one format (plain text
    or conversational), so the data can be checked against the tokenizer before any weights load."""
    examples, problems = [], []
    for raw in read_records(source, split):
        try:
            examples.append(_checked(raw, with_rejected))
        except DataError as error:
            if not skip_invalid:
                raise
            problems.append(str(error))
    if not examples:
        raise DataError(f"{source}: no valid eval record" + (f" (first problem: {problems[0]})" if problems else ""))
    check_one_format(examples, source)
    return examples


def _checked(raw: RawRecord, with_rejected: bool) -> Example:
    if raw.error is not None:
        raise DataError(raw.error)
    return normalize_record(raw.data, raw.location, with_rejected)


def prepare_eval_sets(eval_dataset: Any, tokenizer: Any, args: Any, end_token_ids: set[int],
                      origin: str = "eval_dataset") -> dict[str, EvalSet]:
    """Eval data as `EvalSet`s by name: a mapping of datasets (a `DatasetDict` too) gives one set per name, as the
    Trainer does; anything else is one set. Records are normalised and tokenized as the training data is."""
    if isinstance(eval_dataset, Mapping) and not _is_record(eval_dataset):
        if not eval_dataset:
            raise DataError(f"{origin}: an empty mapping of eval sets")
        return {str(name): _one_set(data, tokenizer, args, end_token_ids, f"{origin}[{name!r}]")
                for name, data in eval_dataset.items()}
    return {SINGLE: _one_set(eval_dataset, tokenizer, args, end_token_ids, origin)}


def _is_record(value: Mapping[str, Any]) -> bool:
    return any(key in value for key in ("messages", "prompt", "chosen", "completion"))


def _one_set(dataset: Any, tokenizer: Any, args: Any, end_token_ids: set[int], origin: str) -> EvalSet:
    if isinstance(dataset, TokenizedDataset):
        return EvalSet(dataset)
    if isinstance(dataset, (str, bytes)) or not hasattr(dataset, "__iter__"):
        raise DataError(f"{origin}: expected records (a list of dicts or a datasets.Dataset), got "
                        f"{type(dataset).__name__}")
    examples, prompts, records = [], [], []
    for index, row in enumerate(dataset):
        try:
            example = row if isinstance(row, Example) else normalize_record(row, f"{origin}: row {index}",
                                                                            args.needs_rejected_data)
        except DataError:
            if not args.skip_invalid:
                raise
            continue
        if args.needs_rejected_data and example.rejected is None:
            raise DataError(f"{example.location or f'{origin}: row {index}'}: field 'rejected' is missing (offline "
                            "preference recipes evaluate on the records' own pairs)")
        examples.append(example)
        prompts.append(example.prompt[-1]["content"] if example.text else example.prompt)
        records.append({"messages": [*example.prompt, example.response]} if isinstance(row, Example) else row)
    if not examples:
        raise DataError(f"{origin}: no valid eval record")
    check_one_format(examples, origin)
    tokenized = tokenize_examples(tokenizer, examples, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
                                  end_token_ids=end_token_ids)
    return EvalSet(TokenizedDataset(tokenized), prompts, records)


# ------------------------------------------------------------------------------------------------
# The rejected side of the eval pairs
# ------------------------------------------------------------------------------------------------


def rejected_source(args: Any) -> str | None:
    """Where a recipe's eval pairs get their rejected side: 'segment' (SAPO: the start model rewrites a segment),
    'whole' (spin: the start model answers the prompt), 'data' (dpo/orpo: the records' own), None (sft)."""
    return args.recipe_class.eval_rejected


def segment_rejected(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], generate: Generate, *,
                     token_generate_length: int, max_length: int, eos_token_ids: set[int],
                     rng: random.Random) -> list[list[int]]:
    """One rejected response per real one, made as training makes them (`sapo.segments.rewrite_segments`)."""
    return [rewrite.rejected for rewrite in rewrite_segments(
        prompts, responses, generate, token_generate_length=token_generate_length, max_length=max_length,
        eos_token_ids=eos_token_ids, rng=rng)]


def whole_rejected(prompts: Sequence[Sequence[int]], generate: Generate, *, max_new_tokens: int,
                   max_length: int) -> list[list[int]]:
    """Whole responses to the prompts (SPIN's opponent), each cut to the room `max_length` leaves."""
    if not prompts:
        return []
    room = max(max_length - len(p) for p in prompts)
    samples = generate([list(p) for p in prompts], max(1, min(room, max_new_tokens)))
    return [list(s[:max_length - len(p)]) for p, s in zip(prompts, samples, strict=True)]


def save_eval_pairs(path: Path, pairs: Mapping[str, tuple[str, list[list[int]] | None]]) -> None:
    """The rejected side of every eval set's pairs, with the fingerprint of the set it belongs to (JSON)."""
    path.write_text(json.dumps({name: {"fingerprint": fingerprint, "rejected": rejected}
                                for name, (fingerprint, rejected) in pairs.items()}), encoding="utf-8")


def load_eval_pairs(path: Path) -> dict[str, tuple[str, list[list[int]] | None]]:
    """What `save_eval_pairs` wrote; {} when the checkpoint has none (saved by a run without eval data)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text(encoding="utf-8"))
    return {name: (entry["fingerprint"], entry["rejected"]) for name, entry in saved.items()}


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def pair_statistics(result: PairLoss, mask: torch.Tensor) -> torch.Tensor:
    """Per-pair columns of `STATISTICS` from a batch scored as training scores it (real rows, then rejected)."""
    sums = result.sums.detach().float()
    half = sums.shape[0] // 2
    tokens = mask.sum(-1).float()
    entropy, logits, top1 = _token_sums(result.token_statistics, mask, sums)
    return torch.stack([result.output.losses.detach().float(), result.output.real_rewards.float(),
                        result.output.rejected_rewards.float(), sums[:half], tokens[:half], sums[half:],
                        tokens[half:], logits[:half], logits[half:], entropy[:half] + entropy[half:], top1[:half]],
                       dim=1)


def real_statistics(token_logps: torch.Tensor, mask: torch.Tensor,
                    token_statistics: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example columns of `STATISTICS` for real responses alone (sft): no pair, so no loss or rewards."""
    sums, _ = sequence_logps(token_logps.detach().float(), mask)
    nan = torch.full_like(sums, float("nan"))
    entropy, logits, top1 = _token_sums(token_statistics, mask, sums)
    return torch.stack([nan, nan, nan, sums, mask.sum(-1).float(), nan, nan, logits, nan, entropy, top1], dim=1)


def _token_sums(token_statistics: torch.Tensor | None, mask: torch.Tensor, like: torch.Tensor
                ) -> list[torch.Tensor]:
    """Per row, the sums over its response tokens of each `TOKEN_STATISTICS` column (NaN without statistics)."""
    if token_statistics is None:
        return [torch.full_like(like, float("nan")) for _ in TOKEN_STATISTICS]
    weighted = token_statistics.detach().float() * mask.unsqueeze(-1).float()
    return list(weighted.sum(1).unbind(-1))


def eval_metrics(rows: torch.Tensor, *, nll_weight: float, mean_logps: bool = False) -> dict[str, float]:
    """Metrics of a whole eval set from its per-example `STATISTICS` rows (names without the `eval_` prefix).

    `loss` is the training loss over the whole set: the mean pair loss plus, for losses that add it (ORPO at weight
    1, a reference loss at `nll_weight`) and for sft, the token-level NLL of the real responses, so it does not
    depend on the eval batch size.
    `logps/chosen_per_token` is the mean log-likelihood per token of the real responses, over all their tokens.
    `logps/*` are summed over each response (TRL's DPOTrainer), or with `mean_logps` (ORPO) per-token means
    (TRL's ORPOTrainer); the token-level metrics (`sapo.losses.token_metrics`) are token-weighted over the set.
    """
    if rows.ndim != 2 or rows.shape[1] != len(STATISTICS) or rows.shape[0] == 0:
        raise ValueError(f"expected (examples, {len(STATISTICS)}) statistics, got {tuple(rows.shape)}")
    column = dict(zip(STATISTICS, rows.double().unbind(1), strict=True))
    tokens_real = column["tokens_real"].sum().clamp(min=1)
    per_token = (column["logp_real"].sum() / tokens_real).item()
    logps_real = column["logp_real"] / column["tokens_real"].clamp(min=1) if mean_logps else column["logp_real"]
    metrics = {m.LOGPS_CHOSEN: logps_real.mean().item(), m.LOGPS_CHOSEN_PER_TOKEN: per_token}
    has_statistics = not torch.isnan(column["entropy"]).any()
    if has_statistics:
        metrics[m.MEAN_TOKEN_ACCURACY] = (column["top1_real"].sum() / tokens_real).item()
    if torch.isnan(column["pair_loss"]).all():  # sft: the NLL of the real responses is the loss
        if has_statistics:
            metrics[m.ENTROPY] = (column["entropy"].sum() / tokens_real).item()
        return {m.LOSS: -per_token, **metrics}
    real, rejected = column["reward_real"], column["reward_rejected"]
    tokens_rejected = column["tokens_rejected"]
    logps_rejected = column["logp_rejected"] / tokens_rejected.clamp(min=1) if mean_logps else column["logp_rejected"]
    metrics.update({
        m.LOSS: column["pair_loss"].mean().item() - nll_weight * per_token,
        m.REWARDS_CHOSEN: real.mean().item(), m.REWARDS_REJECTED: rejected.mean().item(),
        m.REWARD_MARGINS: (real - rejected).mean().item(),
        # a tie (margin exactly 0: the rejected response is the real one) is reported apart from the ranked pairs
        m.REWARD_TIES: (real == rejected).double().mean().item(),
        m.REWARD_ACCURACIES: ((real > rejected).sum() / (real != rejected).sum().clamp(min=1)).item(),
        m.LOGPS_REJECTED: logps_rejected.mean().item()})
    if has_statistics:
        metrics.update({
            m.ENTROPY: (column["entropy"].sum() / (tokens_real + tokens_rejected.sum())).item(),
            m.LOGITS_CHOSEN: (column["logits_real"].sum() / tokens_real).item(),
            m.LOGITS_REJECTED: (column["logits_rejected"].sum() / tokens_rejected.sum().clamp(min=1)).item()})
    return metrics
