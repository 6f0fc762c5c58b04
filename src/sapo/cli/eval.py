"""Generating responses to held-out prompts and scoring them with a programmatic judge; `sapo eval`.

`sapo eval MODEL_DIR [MODEL_DIR...]` loads each directory with plain `AutoModelForCausalLM` /
`AutoTokenizer`, answers the same prompts with every model (greedy unless `--sample`), scores each
response with a judge `(prompt, response, record) -> float`, and reports per model the mean score, the
mean response length (characters) and, when records carry a `task` field, the mean per task family; for
every pair of models it reports per-prompt wins, ties and losses and the win rate (a tie counts as half a
win). Generation and judging live in :mod:`sapo.judging`; this module is the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from sapo.data import Message
from sapo.errors import UsageError, describe_unusable_path
from sapo.generation import SamplingSettings
from sapo.judging import DEFAULT_JUDGE, build_report, generate_responses, load_judge
from sapo.loading import check_model_source, check_tokenizer_source


def suite_families(names: str) -> tuple[str, ...]:
    """`--families`: comma-separated family names, or `short` / `structured` / `all` for the built-in groups."""
    from sapo.demo_kit import tasks

    groups = {"short": tasks.TASK_FAMILIES, "structured": tasks.STRUCTURED_FAMILIES, "all": tasks.ALL_FAMILIES}
    if names in groups:
        return groups[names]
    families = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in families if name not in tasks.ALL_FAMILIES]
    if unknown or not families:
        raise UsageError(f"--families {names!r}: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(tasks.ALL_FAMILIES)} or short, structured, all")
    return families


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text tables of a :func:`build_report` result: scores per model, then pairwise win rates."""
    models, families = report["models"], report["families"]
    width = max([len("model"), *(len(label) for label in models)])
    header = f"{'model':<{width}}  {'score':>7}  {'length':>7}" + "".join(f"  {f:>10}" for f in families)
    lines = [f"judge {report['judge']} on {report['n_prompts']} prompts: mean score (length = mean characters)",
             header, "-" * len(header)]
    for label, result in models.items():
        lines.append(f"{label:<{width}}  {result['score']:>7.3f}  {result['mean_length']:>7.1f}"
                     + "".join(f"  {result['by_family'][f]:>10.3f}" for f in families))
    if report["win_rates"]:
        labels = list(models)
        pair_width = max(len(a) + len(b) + 4 for a in labels for b in labels if a != b)
        lines += ["", "pairwise, per prompt: win = higher judge score; win rate = (wins + 0.5 * ties) / prompts",
                  f"{'A vs B':<{pair_width}}  {'wins':>5}  {'ties':>5}  {'losses':>6}  {'A win rate':>10}"]
        lines.append("-" * len(lines[-1]))
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                r = report["win_rates"][a][b]
                lines.append(f"{f'{a} vs {b}':<{pair_width}}  {r['wins']:>5}  {r['ties']:>5}  {r['losses']:>6}  "
                             f"{r['win_rate']:>10.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# `sapo eval`
# ------------------------------------------------------------------------------------------------


def load_eval_records(args: argparse.Namespace) -> tuple[list[list[Message] | str], list[Any]]:
    """Prompts (chat messages before the final assistant turn, or the prompt string of a plain-text record, answered
    from the raw text as training renders that record) and raw records, from --data or --suite."""
    from sapo.data import DataError, plain_text_prompt, prompt_of_record, read_records

    if (args.data is None) == (args.suite is None):
        raise UsageError("give exactly one of --data FILE and --suite {train,dev,heldout}")
    if args.suite is not None:
        from sapo.demo_kit import tasks

        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")
        families = suite_families(args.families)
        sizes = {split: args.n if split == args.suite else 0 for split in tasks.SPLITS}
        records = tasks.make_suite(sizes["train"], sizes["heldout"], n_dev=sizes["dev"], seed=args.seed,
                                   families=families)[args.suite]
        return [list(r["messages"][:-1]) for r in records], records
    prompts, records = [], []
    for raw in read_records(args.data, args.split):
        if raw.error is not None:
            raise DataError(raw.error)
        prompt = plain_text_prompt(raw.data, raw.location)
        prompts.append(prompt_of_record(raw.data, raw.location) if prompt is None else prompt)
        records.append(raw.data)
    if not prompts:
        raise DataError(f"{args.data}: no records")
    return prompts, records


def load_model(path: str, *, device: str = "cpu", chat_template: str | None = None,
               chat_prompts: bool = True) -> tuple[nn.Module, Any]:
    """A model directory and its tokenizer, loaded and checked by `sapo.loading` (as `sapo train` loads them), in
    eval mode on `device`. With `chat_prompts` a tokenizer without a chat template is refused before the weights."""
    from sapo.loading import load_model_and_tokenizer

    def check_tokenizer(tokenizer: Any) -> None:
        from sapo.data import has_chat_template

        if chat_prompts and not has_chat_template(tokenizer):
            raise UsageError(f"{path}: the tokenizer has no chat template to render the conversational prompts: "
                             "pass --chat_template chatml (or a Jinja template, or a file holding one), or give "
                             "plain-text prompts (string 'prompt' fields, answered from the raw text)")

    model, tokenizer = load_model_and_tokenizer(path, chat_template=chat_template, option="MODEL_DIR",
                                                check_tokenizer=check_tokenizer)
    return model.to(device).eval(), tokenizer


def _check_device(name: str) -> str:
    """`--device` as torch understands it, refused now if this machine lacks it (not after the first prompt)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def _check_output_file(value: str) -> None:
    """--output must be creatable: not a directory, and not under a file (checked before any generation)."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(f"--output {value}: is a directory; name a file for the JSON report")
    existing = path.parent
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output {value}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"--output {value}: {existing} is not writable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sapo eval",
        description="Answer the same prompts with each model, score the responses with a judge, and compare the "
                    "models (mean score, mean response length, per-family means, pairwise win rates).")
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="model directories (AutoModelForCausalLM + AutoTokenizer), e.g. sapo train outputs")
    source = parser.add_argument_group("prompts (exactly one of --data and --suite)")
    source.add_argument("--data", default=None, metavar="FILE",
                        help="chat records: .jsonl/.json/.parquet file or dataset directory, any format sapo "
                             "train reads; the prompt is everything before the last assistant turn")
    source.add_argument("--split", default="train", help="split to read when --data is a dataset directory")
    source.add_argument("--suite", choices=("heldout", "dev", "train"), default=None,
                        help="use the built-in task suite (sapo.tasks) instead of a file: its held-out split for "
                             "reported numbers, dev for choosing settings")
    source.add_argument("--families", default="short", metavar="NAMES",
                        help="--suite: comma-separated families, or short (arithmetic,string,constraint: answers of "
                             "a few characters), structured (chain,listing,profile,format: 25-150 characters with "
                             "partial credit per step/line/sentence) or all (default short)")
    source.add_argument("--n", type=int, default=300, help="--suite: number of prompts (default 300)")
    source.add_argument("--seed", type=int, default=0, help="--suite: suite seed; also seeds --sample (default 0)")
    parser.add_argument("--judge", default=DEFAULT_JUDGE, metavar="MODULE:FUNCTION",
                        help="callable (prompt, response, record) -> float; MODULE may be a .py file path "
                             f"(default {DEFAULT_JUDGE}, which scores records of the built-in suite)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="response length limit in tokens (64)")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts generated at once (64)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="--sample: temperature (0.7)")
    parser.add_argument("--top_p", type=float, default=0.95, help="--sample: nucleus top-p (0.95)")
    parser.add_argument("--top_k", type=int, default=0, help="--sample: top-k, 0 disables (0)")
    parser.add_argument("--chat_template", default=None,
                        help="chat template (Jinja string, file or 'chatml') for tokenizers without one")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="write the full report (scores, win rates, every response) as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if len(set(args.model_dirs)) != len(args.model_dirs):
        raise UsageError("the same MODEL_DIR is given twice")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0):
        raise UsageError("--sample needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0")
    for path in args.model_dirs:  # fail before any generation, not after the first model
        if not Path(path).is_dir() and not describe_unusable_path(path):
            raise UsageError(f"{path}: no such model directory" if not Path(path).exists()
                             else f"{path}: is a file, not a model directory")
        check_model_source(path, "MODEL_DIR", trust_remote_code=False)
        check_tokenizer_source(path, "MODEL_DIR", chat_template=args.chat_template)
    if args.output:
        _check_output_file(args.output)
    judge = load_judge(args.judge)
    prompts, records = load_eval_records(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else _check_device(args.device)
    settings = SamplingSettings(args.temperature, args.top_k, args.top_p, do_sample=True) if args.sample else None
    responses_by_model: dict[str, list[str]] = {}
    for path in args.model_dirs:
        print(f"sapo eval: {path}: answering {len(prompts)} prompts", file=sys.stderr)
        model, tokenizer = load_model(path, device=device, chat_template=args.chat_template,
                                      chat_prompts=any(not isinstance(prompt, str) for prompt in prompts))
        if args.sample:
            torch.manual_seed(args.seed)
        responses_by_model[path] = generate_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                      batch_size=args.batch_size, settings=settings,
                                                      progress=not args.quiet)
        del model
    run_settings = {"data": args.data, "split": args.split if args.data else None, "suite": args.suite,
                    "families": args.families if args.suite else None, "n": args.n if args.suite else None,
                    "seed": args.seed, "decoding": "sample" if args.sample else "greedy",
                    "max_new_tokens": args.max_new_tokens}
    if args.sample:
        run_settings.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    report = build_report(prompts, records, responses_by_model, judge, judge_name=args.judge, settings=run_settings)
    print(format_table(report))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"\nreport written to {output}")
    return 0
