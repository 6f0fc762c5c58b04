"""Answering prompts with a model and scoring the answers with a programmatic judge.

Used by `sapo eval` (which compares model directories), by evaluation during training (`eval_judge`) and by
the demo and benchmarks. A judge is any callable `(prompt, response, record) -> float`, named `module:function`
(or `file.py:function`). The pure pieces (:func:`load_judge`, :func:`win_rates`, :func:`build_report`) work
without a model.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from sapo.data import Message, chat_ids, plain_text_ids
from sapo.errors import UsageError
from sapo.generation import HFGenerateSampler, SamplingSettings, eos_token_ids_of

Judge = Callable[[str, str, dict[str, Any]], float]

DEFAULT_JUDGE = "sapo.tasks:judge"


def prompt_ids(tokenizer: Any, prompt: Sequence[Message] | str) -> list[int]:
    """Token ids of a prompt as used in training: a chat prompt ending with the generation prompt, or a plain-text
    prompt (a str) as the raw text."""
    if isinstance(prompt, str):
        return plain_text_ids(tokenizer, prompt)
    return chat_ids(tokenizer, prompt, generation_prompt=True)


def generate_responses(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[Message] | str], *,
                       max_new_tokens: int = 64, batch_size: int = 64,
                       settings: SamplingSettings | None = None, progress: bool = False) -> list[str]:
    """Decoded responses (greedy unless `settings` says otherwise), special tokens removed."""
    from tqdm.auto import tqdm

    sampler = HFGenerateSampler(settings or SamplingSettings(do_sample=False), pad_token_id=tokenizer.pad_token_id,
                                eos_token_ids=eos_token_ids_of(tokenizer, model))
    contexts = [prompt_ids(tokenizer, p) for p in prompts]
    tokens: list[list[int]] = []
    with tqdm(total=len(contexts), desc="generating", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(contexts), batch_size):
            tokens.extend(sampler.sample(model, contexts[start:start + batch_size], max_new_tokens))
            bar.update(min(batch_size, len(contexts) - start))
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def last_user_turn(prompt: Sequence[Message] | str) -> str:
    """What a judge is given as the prompt: the last user turn of a chat, or a plain-text prompt itself."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def evaluate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], judge: Judge, *,
             max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, Any]:
    """Mean judge score and mean response length (characters) of `model` on chat `records`."""
    prompts = [record["messages"][:-1] for record in records]
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [judge(last_user_turn(p), r, rec) for p, r, rec in zip(prompts, responses, records, strict=True)]
    return {"score": sum(scores) / max(1, len(scores)),
            "mean_length": sum(len(r) for r in responses) / max(1, len(responses)),
            "scores": scores, "responses": responses}


# ------------------------------------------------------------------------------------------------
# Pure pieces of `sapo eval`: judge loading, win rates, report and table
# ------------------------------------------------------------------------------------------------


def load_judge(spec: str) -> Judge:
    """Resolve ``module:function`` (or ``path/to/file.py:function``) to a callable judge.

    The current directory is importable, as with ``python -m``. A bad spec raises `sapo.errors.UsageError`.
    """

    module_name, colon, attribute = spec.rpartition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise UsageError(f"--judge {spec!r}: expected module:function, e.g. {DEFAULT_JUDGE} or my_judges.py:score")
    if module_name.endswith(".py"):
        module = _module_from_file(spec, module_name)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise UsageError(f"--judge {spec!r}: cannot import module {module_name!r} ({error})") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"--judge {spec!r}: module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise UsageError(f"--judge {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable "
                         "(prompt, response, record) -> float")
    return target


def _module_from_file(spec: str, file_name: str) -> Any:
    """Execute the judge file as a module (it runs with this process's rights), its folder first on sys.path so it
    can import the helpers beside it."""
    path = Path(file_name)
    if not path.is_file():
        raise UsageError(f"--judge {spec!r}: no such file {file_name!r}")
    module_spec = importlib.util.spec_from_file_location(f"sapo_judge_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--judge {spec!r}: cannot load {file_name!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ beside the user's file
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's file failed while importing
        raise UsageError(f"--judge {spec!r}: importing {file_name!r} failed "
                         f"({type(error).__name__}: {' '.join(str(error).split())})") from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def win_rates(scores_by_model: Mapping[str, Sequence[float]], *,
              tolerance: float = 0.0) -> dict[str, dict[str, dict[str, float]]]:
    """Per-prompt head-to-head comparison of every ordered pair of models.

    ``result[a][b]`` counts, over the prompts, ``wins`` (a's score higher than b's by more than
    ``tolerance``), ``ties`` and ``losses``, with ``n`` prompts and
    ``win_rate = (wins + 0.5 * ties) / n``: a tie counts as half a win, so two identical models score 0.5
    and ``win_rate[a][b] + win_rate[b][a] == 1``. All score lists must have the same, non-zero length.
    """
    lengths = {name: len(scores) for name, scores in scores_by_model.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every model needs one score per prompt; got lengths {lengths}")
    if any(n == 0 for n in lengths.values()):
        raise ValueError("win rates need at least one prompt")
    result: dict[str, dict[str, dict[str, float]]] = {}
    for a, a_scores in scores_by_model.items():
        result[a] = {}
        for b, b_scores in scores_by_model.items():
            if a == b:
                continue
            wins = sum(x - y > tolerance for x, y in zip(a_scores, b_scores, strict=True))
            losses = sum(y - x > tolerance for x, y in zip(a_scores, b_scores, strict=True))
            n = len(a_scores)
            ties = n - wins - losses
            result[a][b] = {"wins": wins, "ties": ties, "losses": losses, "n": n, "win_rate": (wins + 0.5 * ties) / n}
    return result


def family_order(family: str) -> tuple[int, str]:
    """Built-in families in their usual order, then any others alphabetically."""
    from sapo.demo_kit.tasks import ALL_FAMILIES

    return (ALL_FAMILIES.index(family) if family in ALL_FAMILIES else len(ALL_FAMILIES), family)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def build_report(prompts: Sequence[Sequence[Message]], records: Sequence[Any],
                 responses_by_model: Mapping[str, Sequence[str]], judge: Judge, *,
                 judge_name: str = "judge", settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score every model's responses and compare the models; no model is needed.

    ``prompts[i]`` (chat messages) and ``records[i]`` (the raw record handed to the judge) describe prompt
    ``i``; ``responses_by_model[label][i]`` is that model's response. Judge failures and non-numeric or
    non-finite scores raise `sapo.errors.UsageError` naming the prompt.
    """

    if len(prompts) != len(records):
        raise ValueError(f"{len(prompts)} prompts but {len(records)} records")
    tasks_ = [record.get("task") if isinstance(record, Mapping) else None for record in records]
    families = sorted({t for t in tasks_ if isinstance(t, str)}, key=family_order)
    models: dict[str, dict[str, Any]] = {}
    scores_by_model: dict[str, list[float]] = {}
    for label, responses in responses_by_model.items():
        if len(responses) != len(prompts):
            raise ValueError(f"{label}: {len(responses)} responses for {len(prompts)} prompts")
        scores = judge_scores(judge, judge_name, prompts, responses, records)
        scores_by_model[label] = scores
        by_family = {family: _mean([s for s, t in zip(scores, tasks_, strict=True) if t == family])
                     for family in families}
        models[label] = {"score": _mean(scores), "mean_length": _mean([len(r) for r in responses]),
                         "by_family": by_family, "n": len(scores)}
    per_prompt = [{"prompt": last_user_turn(prompt), "task": task,
                   "responses": {label: responses[index] for label, responses in responses_by_model.items()},
                   "scores": {label: scores[index] for label, scores in scores_by_model.items()}}
                  for index, (prompt, task) in enumerate(zip(prompts, tasks_, strict=True))]
    return {"judge": judge_name, "n_prompts": len(prompts), "families": families, "settings": dict(settings or {}),
            "models": models,
            "win_rates": win_rates(scores_by_model) if len(scores_by_model) > 1 and prompts else {},
            "per_prompt": per_prompt}


def judge_scores(judge: Judge, judge_name: str, prompts: Sequence[Sequence[Message] | str], responses: Sequence[str],
                 records: Sequence[Any]) -> list[float]:
    """The judge's score of each response (prompt `i` is `prompts[i]`, with raw record `records[i]`); a failing
    judge or a score that is not a finite number raises `sapo.errors.UsageError` naming the prompt."""
    return [_judge_one(judge, judge_name, index, prompt, response, record)
            for index, (prompt, response, record) in enumerate(zip(prompts, responses, records, strict=True))]


def _judge_one(judge: Judge, judge_name: str, index: int, prompt: Sequence[Message] | str, response: str,
               record: Any) -> float:
    try:
        value = judge(last_user_turn(prompt), response, record)
    except Exception as error:
        hint = ""
        if judge_name == DEFAULT_JUDGE:
            hint = ("; the default judge only scores records of the built-in suite (fields 'task', 'reference', "
                    "'kind', 'params'): pass --judge module:function for other data")
        raise UsageError(f"judge {judge_name} failed on prompt {index} ({type(error).__name__}: {error}){hint}") \
            from error
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"judge {judge_name} returned {value!r} for prompt {index}; expected a number") from None
    if not math.isfinite(score):
        raise UsageError(f"judge {judge_name} returned {score} for prompt {index}; expected a finite number")
    return score




def judge_rewrites(judge: Judge, name: str | None, tokenizer: Any, dataset: Any, indices: Sequence[int | None],
                   real: Sequence[list[int]], rejected: Sequence[list[int]]) -> list[bool]:
    """`rejected_judge`: whether it scores each rewrite below its real response, both decoded as the judge of
    `sapo eval` sees answers, with the example's prompt and raw record (`dataset`: the run's tokenized data)."""
    origins = [dataset.examples[i].origin if i is not None else None for i in indices]
    if any(origin is None for origin in origins):
        raise UsageError("rejected_judge needs the training records (prompts and the fields the judge reads), "
                         "not an already tokenized dataset")
    prompts, records = [o.prompt for o in origins], [o.record for o in origins]
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    real_scores = judge_scores(judge, name, prompts, [decode(t) for t in real], records)
    rejected_scores = judge_scores(judge, name, prompts, [decode(t) for t in rejected], records)
    return [worse < better for worse, better in zip(rejected_scores, real_scores, strict=True)]
