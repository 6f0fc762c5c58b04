"""Tokenizing examples: prompt and response ids split at the chat template's boundary (conversational records) or
as TRL splits raw text (plain-text records), lengths fitted to `max_length`, large datasets tokenized in worker
processes, and the dataset and collator the trainer uses."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sapo.data.records import Example, Message, TokenizedExample
from sapo.data.sources import examples_from_records
from sapo.data.templates import renders_with_mistral_common, require_chat_template
from sapo.errors import DataError
from sapo.packing import common_prefix_length

logger = logging.getLogger(__name__)

def tokenize_example(tokenizer: Any, example: Example,
                     end_token_ids: Collection[int] | None = None) -> TokenizedExample:
    """Token ids of the whole rendered conversation, split at the prompt boundary.

    Tokenizing the response on its own gives other ids than the model sees after the prompt
    (SentencePiece adds a word-start marker, byte-level BPE merges a leading newline with the template's),
    so the conversation is tokenized once and split where its ids stop agreeing with the prompt's: prompt
    ids + response ids are exactly the conversation's ids, up to and including the final turn's end token.
    Use `tokenize_examples` to also get the warning about records whose boundary token merged. A plain-text example
    (`Example.text`) is tokenized as raw text instead, exactly as TRL does (see `_plain_text_with_boundary`).
    """
    return _tokenize_with_boundary(tokenizer, example, end_token_ids)[0]


def _tokenize_with_boundary(tokenizer: Any, example: Example,
                            end_token_ids: Collection[int] | None) -> tuple[TokenizedExample, bool]:
    """The tokenized example, and whether the prompt's own ids differ from the conversation's prefix."""
    import jinja2

    ends = set(end_token_ids) if end_token_ids else {tokenizer.eos_token_id}
    answers = [example.response] if example.rejected is None else [example.response, example.rejected]
    if example.text:
        return _plain_text_with_boundary(tokenizer, example, answers)
    try:
        if renders_with_mistral_common(tokenizer):
            prompt_alone = chat_ids(tokenizer, example.prompt, generation_prompt=True)
            conversations = [chat_ids(tokenizer, [*example.prompt, answer]) for answer in answers]
        else:
            prompt_alone, conversations = _rendered_ids(tokenizer, example, answers)
    except jinja2.TemplateError as error:  # raise_exception('...') in the template, or an undefined name
        raise DataError(f"{example.location or 'a record'}: the chat template refuses this record "
                        f"({' '.join(str(error).split())})") from None
    boundary = common_prefix_length(prompt_alone, *conversations)
    if boundary == 0:  # the sampler needs at least one token to continue from, and so does the loss
        raise DataError(f"{example.location or 'a record'}: the chat template renders the prompt as no tokens")
    responses = [_through_end_token(ids[boundary:], ends, tokenizer.eos_token_id) for ids in conversations]
    rejected = responses[1] if len(responses) > 1 else None
    tokenized = TokenizedExample(conversations[0][:boundary], responses[0], rejected)
    return tokenized, boundary != len(prompt_alone)


def _plain_text_with_boundary(tokenizer: Any, example: Example,
                              answers: Sequence[Message]) -> tuple[TokenizedExample, bool]:
    """A plain-text record tokenized as TRL's DPOTrainer/SFTTrainer tokenize a "standard" one: EOS (as text) appended
    to each response unless it ends with it, `tokenizer(prompt)` and `tokenizer(prompt + response)` with the
    tokenizer's own special tokens (BOS where it adds one), and the response starting where the two stop agreeing.
    No chat template is read, and the response is kept as it is (it ends with the EOS just appended). mistral-common
    encodes "</s>" in text as characters, so there the EOS id is appended to the ids instead."""
    eos = tokenizer.eos_token
    prompt = example.prompt[-1]["content"]
    prompt_alone = plain_text_ids(tokenizer, prompt)
    if renders_with_mistral_common(tokenizer):
        conversations = [[*plain_text_ids(tokenizer, prompt + answer["content"]), tokenizer.eos_token_id]
                         for answer in answers]
    else:
        texts = [text if text.endswith(eos) else text + eos for text in (answer["content"] for answer in answers)]
        conversations = [plain_text_ids(tokenizer, prompt + text) for text in texts]
    boundary = common_prefix_length(prompt_alone, *conversations)
    if boundary == 0:
        raise DataError(f"{example.location or 'a record'}: the prompt tokenizes as no tokens before the response")
    rejected = conversations[1][boundary:] if len(conversations) > 1 else None
    return TokenizedExample(conversations[0][:boundary], conversations[0][boundary:], rejected), \
        boundary != len(prompt_alone)


def plain_text_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of plain text as TRL tokenizes a "standard" record (`tokenizer(text=...)`, special tokens added)."""
    return list(tokenizer(text=text)["input_ids"])


def chat_ids(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> list[int]:
    """Ids of a chat as `apply_chat_template(tokenize=True)` gives them (the template writes the special tokens, so
    the tokenizer adds none and BOS is never doubled), with BOS put first where the template omits it although
    the tokenizer adds it to every text it encodes."""
    if not renders_with_mistral_common(tokenizer):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
        return text_ids(tokenizer, text)
    # mistral-common renders only to ids, and refuses a chat that ends with the assistant unless told to keep it open
    options = {"add_generation_prompt": True} if generation_prompt else {"continue_final_message": True}
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True, **options)["input_ids"]
    return _bos_first(tokenizer, list(ids))


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a rendered chat (what `apply_chat_template(tokenize=True)` does with it), BOS first as in `chat_ids`."""
    return _bos_first(tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _rendered_ids(tokenizer: Any, example: Example,
                  answers: Sequence[Message]) -> tuple[list[int], list[list[int]]]:
    """Ids of the prompt alone and of each conversation, each rendered once; refuses a template that renders the
    prompt differently when an answer follows it (the response could not be separated from it)."""
    prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    texts = [tokenizer.apply_chat_template([*example.prompt, answer], tokenize=False) for answer in answers]
    if not all(text.startswith(prompt_text) for text in texts):
        raise DataError(
            f"{example.location or 'a record'}: the chat template renders the prompt differently when the "
            "response follows it (e.g. it drops earlier reasoning or changes the last prompt turn), so the "
            "response cannot be separated from the prompt; pass a chat_template that renders earlier turns the "
            "same way in both cases")
    return text_ids(tokenizer, prompt_text), [text_ids(tokenizer, text) for text in texts]


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bos_first(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and _adds_bos_when_encoding(tokenizer):
        ids.insert(0, bos)
    return ids


def _adds_bos_when_encoding(tokenizer: Any) -> bool:
    """Whether the model was trained with BOS before every text, as Llama/Mistral tokenizers add it: templates
    such as zephyr's do not write it, and the model must still see it (as TRL's DPO and the SAPO code ensure).
    Asked once per tokenizer (and BOS token), not for every text."""
    key = tokenizer.bos_token_id
    cached = _ADDS_BOS.get(tokenizer)
    if cached is None or cached[0] != key:
        cached = (key, tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [key])
        _ADDS_BOS[tokenizer] = cached
    return cached[1]


def _through_end_token(response: list[int], end_token_ids: Collection[int], eos_token_id: int) -> list[int]:
    """The response up to and including its last end-of-turn token (text a template writes after it, such as
    ChatML's or zephyr's newline, is never generated: decoding stops at that token); EOS appended if it has none."""
    last_end = max((i for i, token in enumerate(response) if token in end_token_ids), default=None)
    if last_end is None:
        return [*response, eos_token_id]
    return response[: last_end + 1]


@dataclass
class TruncationReport:
    kept: int = 0
    prompts_truncated: int = 0
    prompts_dropped: int = 0
    responses_truncated: int = 0


def fit_lengths(
    examples: Sequence[TokenizedExample], *, max_length: int, max_prompt_length: int, prompt_truncation: str
) -> tuple[list[TokenizedExample], TruncationReport]:
    """Apply the length limits: long prompts lose their beginning (or are dropped), long responses their end."""
    if prompt_truncation not in ("left", "drop"):
        raise ValueError(f"prompt_truncation must be 'left' or 'drop', got {prompt_truncation!r}")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length}) to leave room for a response"
        )
    report = TruncationReport()
    fitted: list[TokenizedExample] = []
    for example in examples:
        prompt = example.prompt_ids
        if len(prompt) > max_prompt_length:
            if prompt_truncation == "drop":
                report.prompts_dropped += 1
                continue
            prompt = prompt[-max_prompt_length:]
            report.prompts_truncated += 1
        room = max_length - len(prompt)
        response, rejected = example.response_ids, example.rejected_ids
        if len(response) > room:
            response = response[:room]
            report.responses_truncated += 1
        if rejected is not None:
            rejected = rejected[:room]
        fitted.append(dataclasses.replace(example, prompt_ids=prompt, response_ids=response, rejected_ids=rejected))
    report.kept = len(fitted)
    return fitted, report


PARALLEL_MIN_EXAMPLES = 20_000
"""Below this many examples a second process costs more (starting it, sending it the tokenizer) than it saves."""


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_length: int,
    max_prompt_length: int,
    prompt_truncation: str = "left",
    end_token_ids: Collection[int] | None = None,
    progress: bool = False,
    num_proc: int | None = None,
    keep_origin: bool = False,
) -> list[TokenizedExample]:
    """Tokenize and fit every example; log what was truncated or dropped, fail if nothing is left.

    `end_token_ids` are the ids at which generation stops (the tokenizer's EOS and the model's
    generation_config EOS ids): each response ends at its last one, as the model's own answers do.
    `keep_origin`: each tokenized example keeps its `Example` (and so its raw record), for `rejected_judge`.
    `num_proc` processes share the work (None: one per CPU core of this rank for large datasets, see
    `default_num_proc`); the result is the same list, and an error names the first bad record, as without them.
    """
    require_chat_template(tokenizer, examples)
    workers = default_num_proc(len(examples)) if num_proc is None else num_proc
    if workers > 1:
        results = _tokenize_in_processes(tokenizer, examples, end_token_ids, workers, progress)
    else:
        results = _tokenize_here(tokenizer, examples, end_token_ids, progress)
    tokenized, merged_at = [], []
    for example, (result, merged) in zip(examples, results, strict=True):
        tokenized.append(dataclasses.replace(result, origin=example) if keep_origin else result)
        if merged:
            merged_at.append(example.location or f"example {len(tokenized) - 1}")
    if merged_at:
        logger.warning(
            "%d record(s) (first: %s): the last prompt token merges with the response's first characters when the "
            "whole conversation is tokenized; their prompt ends before that token and the merged token is scored as "
            "part of the response, so training sees exactly the conversation's tokens",
            len(merged_at), ", ".join(merged_at[:3]))
    fitted, report = fit_lengths(
        tokenized, max_length=max_length, max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation
    )
    if report.prompts_dropped or report.prompts_truncated or report.responses_truncated:
        logger.warning(
            "length limits: %d prompts dropped and %d truncated (max_prompt_length=%d), %d responses truncated "
            "(max_length=%d); %d examples kept",
            report.prompts_dropped, report.prompts_truncated, max_prompt_length,
            report.responses_truncated, max_length, report.kept,
        )
    if not fitted:
        raise DataError(
            f"no training example is left after the length limits (max_prompt_length={max_prompt_length}, "
            f"prompt_truncation={prompt_truncation!r})"
        )
    return fitted


def default_num_proc(count: int) -> int:
    """Processes for tokenizing `count` examples: this rank's share of the CPU cores (ranks launched on one machine
    split them, so eight ranks do not start eight processes per core), and one below `PARALLEL_MIN_EXAMPLES`."""
    if count < PARALLEL_MIN_EXAMPLES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(cores // max(ranks_here, 1), count // (PARALLEL_MIN_EXAMPLES // 2)))


def _tokenize_here(tokenizer: Any, examples: Sequence[Example], end_token_ids: Collection[int] | None,
                   progress: bool) -> Iterator[tuple[TokenizedExample, bool]]:
    from tqdm.auto import tqdm

    for example in tqdm(examples, desc="tokenizing", unit="example", disable=not progress):
        yield _tokenize_with_boundary(tokenizer, example, end_token_ids)


def _tokenize_in_processes(tokenizer: Any, examples: Sequence[Example], end_token_ids: Collection[int] | None,
                           num_proc: int, progress: bool) -> list[tuple[TokenizedExample, bool]]:
    """`datasets.Dataset.map` over `num_proc` processes, each running `_tokenize_with_boundary` on its shard.

    Workers return a record's error instead of raising it, so the error reported is the first bad record's in
    the data's order (as without processes), not whichever worker failed first."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint

    columns = {"prompt": [e.prompt for e in examples], "response": [e.response for e in examples],
               "rejected": [e.rejected for e in examples], "location": [e.location for e in examples],
               "text": [e.text for e in examples]}
    ids = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"prompt_ids": ids, "response_ids": ids, "rejected_ids": ids,
                                  "merged": datasets.Value("bool"), "error": datasets.Value("string")})
    shown = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        table = datasets.Dataset.from_dict(columns)
        # a random fingerprint: hashing the tokenizer for datasets' cache would take seconds and the result is
        # not cached (the table lives in memory)
        mapped = table.map(_tokenize_batch, batched=True, num_proc=num_proc, remove_columns=table.column_names,
                           features=features, desc="tokenizing", new_fingerprint=generate_random_fingerprint(),
                           fn_kwargs={"tokenizer_pickle": pickle.dumps(tokenizer),
                                      "end_token_ids": sorted(end_token_ids) if end_token_ids else None})
    finally:
        if shown and not progress:
            datasets.enable_progress_bars()
    table = mapped.with_format("arrow")[:]  # whole Arrow columns to lists: several times faster than row by row
    first_error = next((error for error in table.column("error").to_pylist() if error is not None), None)
    if first_error is not None:
        raise DataError(first_error)
    prompts, responses, rejected, merged = (table.column(name).to_pylist()
                                            for name in ("prompt_ids", "response_ids", "rejected_ids", "merged"))
    return [(TokenizedExample(prompt, response, refused), joined) for prompt, response, refused, joined
            in zip(prompts, responses, rejected, merged, strict=True)]


_WORKER_TOKENIZER: list[Any] = [None, None]  # (the pickle it came from, the tokenizer), one per worker process


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer_pickle: bytes,
                    end_token_ids: list[int] | None) -> dict[str, list[Any]]:
    """One `datasets.map` batch: the columns of `_tokenize_in_processes`, a record's DataError as its `error`.

    The tokenizer comes as `pickle` bytes and is unpickled once per worker: `datasets` sends arguments with `dill`,
    which takes several seconds per job for a 150k-token vocabulary where `pickle` takes one."""
    if _WORKER_TOKENIZER[0] is not tokenizer_pickle:
        _WORKER_TOKENIZER[:] = [tokenizer_pickle, pickle.loads(tokenizer_pickle)]
    tokenizer = _WORKER_TOKENIZER[1]
    out: dict[str, list[Any]] = {"prompt_ids": [], "response_ids": [], "rejected_ids": [], "merged": [], "error": []}
    for prompt, response, rejected, location, text in zip(batch["prompt"], batch["response"], batch["rejected"],
                                                          batch["location"], batch["text"], strict=True):
        try:
            example = Example(prompt, response, rejected, location, text=text)
            result, merged = _tokenize_with_boundary(tokenizer, example, end_token_ids)
            error = None
        except DataError as refused:
            result, merged, error = TokenizedExample([], []), False, str(refused)
        out["prompt_ids"].append(result.prompt_ids)
        out["response_ids"].append(result.response_ids)
        out["rejected_ids"].append(result.rejected_ids)
        out["merged"].append(merged)
        out["error"].append(error)
    return out


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


def tokenized_dataset(train_dataset: Any, tokenizer: Any, args: Any, eos_token_ids: set[int]) -> TokenizedDataset:
    """Records, `Example`s or an already tokenized dataset, as the dataset the trainer iterates (`args`: a
    `SAPOConfig`, read for the length limits, `skip_invalid` and whether the recipe needs rejected responses)."""
    if isinstance(train_dataset, TokenizedDataset):
        return train_dataset
    examples = examples_from_records(train_dataset, skip_invalid=args.skip_invalid,
                                     with_rejected=args.needs_rejected_data)
    tokenized = tokenize_examples(tokenizer, examples, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length, prompt_truncation=args.prompt_truncation,
                                  end_token_ids=eos_token_ids, keep_origin=args.rejected_judge is not None,
                                  progress=not args.disable_tqdm and args.process_index == 0)
    return TokenizedDataset(tokenized)
