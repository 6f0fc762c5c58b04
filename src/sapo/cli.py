"""Command line: `sapo train` (YAML config + flags, like TRL's scripts) and `sapo demo`.

Every `SAPOConfig`/`TrainingArguments` field is a flag of the same name, so `--help` documents all of
them and a YAML file may set any of them; flags given on the command line override the file.
Expected failures (bad data, bad config) print one paragraph and exit with status 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sapo.errors import USER_ERRORS, TrainingStopped, UsageError

EXIT_USAGE = 2


@dataclass
class ModelArguments:
    """Where the model and data come from; everything else lives in SAPOConfig."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "SFT checkpoint: a local directory or a hub id (required)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory or hub id; default: model_name_or_path."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Demonstrations: a .jsonl/.json/.parquet file, a local directory or a hub dataset "
                  "name (required)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Chat template: a Jinja string, a file holding one, or 'chatml'; needed when the "
                  "tokenizer has none."},
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype when loading: auto, float32, bfloat16 or float16."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the checkpoint directory/hub (off by default)."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: all linear layers)."}
    )


def build_train_parser():
    """`HfArgumentParser` over (ModelArguments, SAPOConfig), plus `--config` and `--debug`."""
    from transformers import HfArgumentParser

    from sapo.config import SAPOConfig

    parser = HfArgumentParser((ModelArguments, SAPOConfig), prog="sapo train",
                              description="Train a causal LM with SAPO on demonstrations. Errors are reported in one "
                              "paragraph; add --debug (before or after `train`) to see Python tracebacks.")
    parser.add_argument("--config", default=None, help="YAML file of any options below; flags override it.")
    return parser


def known_option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions}


def read_yaml_config(path: str, known: set[str]) -> dict[str, Any]:
    """Load a YAML mapping of options, rejecting unknown keys with the closest known name."""
    import difflib

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: invalid YAML ({error})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of option: value")
    for key in values:
        if key not in known or key == "config":
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{path}: unknown option {key!r}{hint}")
    return values


def parse_train_args(argv: Sequence[str]) -> tuple[Any, Any]:
    parser = build_train_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        defaults = read_yaml_config(pre.config, known_option_names(parser))
        parser.set_defaults(**defaults)
    try:
        model_args, config, _, rest = parser.parse_args_into_dataclasses(args=list(argv),
                                                                         return_remaining_strings=True)
    except ValueError as error:  # SAPOConfig/TrainingArguments validation
        raise UsageError(f"invalid configuration: {error}") from None
    if rest:
        raise UsageError(f"unknown option(s): {' '.join(rest)} (see `sapo train --help`)")
    return model_args, config


def load_model_and_tokenizer(model_args: ModelArguments):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    if path is None:
        raise UsageError("--model_name_or_path is required")
    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise UsageError(f"{path}: directory has no model (config.json missing)")
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.dtype != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, model_args.dtype)
    else:
        kwargs["dtype"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name_or_path or path,
                                              trust_remote_code=model_args.trust_remote_code)
    return model, tokenizer


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=model_args.lora_target_modules or "all-linear", task_type="CAUSAL_LM")


def run_train(argv: Sequence[str]) -> int:
    from sapo.checkpoint import check_output_dir
    from sapo.data import load_examples
    from sapo.trainer import SAPOTrainer

    model_args, config = parse_train_args(argv)
    resume = config.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "false") and not Path(resume).is_dir():
        raise UsageError(f"{resume}: checkpoint directory not found")
    check_output_dir(Path(config.output_dir), resuming=bool(resume) and resume.lower() != "false",
                     overwrite=config.overwrite_output_dir)
    if model_args.dataset_name is None:
        raise UsageError("--dataset_name is required (a .jsonl/.json/.parquet file, directory or hub name)")
    examples = load_examples(model_args.dataset_name, model_args.dataset_split, skip_invalid=config.skip_invalid,
                             with_rejected=config.needs_rejected_data)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = SAPOTrainer(model=model, args=config, train_dataset=examples, processing_class=tokenizer,
                          peft_config=lora_config(model_args) if model_args.use_peft else None,
                          chat_template=model_args.chat_template)
    trainer.data_source = model_args.dataset_name
    trainer.command = shlex.join(["sapo", "train", *argv])
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        ema_note = f", EMA model to {Path(config.output_dir) / 'ema'}" if trainer.copies.ema is not None else ""
        print(f"sapo: policy written to {config.output_dir}{ema_note}")
    return 0


def run_demo(argv: Sequence[str]) -> int:
    from sapo.demo import main as demo_main

    return demo_main(argv)


def run_plot(argv: Sequence[str]) -> int:
    from sapo.plots import main as plot_main

    return plot_main(argv)


def run_inspect(argv: Sequence[str]) -> int:
    from sapo.inspection import main as inspect_main

    return inspect_main(argv)


def run_eval(argv: Sequence[str]) -> int:
    from sapo.evaluation import main as eval_main

    return eval_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": run_train, "demo": run_demo, "plot": run_plot, "inspect": run_inspect, "eval": run_eval}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: sapo {train,demo,plot,inspect,eval} [options]\n\n"
              "  train    train a model (sapo train --help lists every option)\n"
              "  demo     run the whole pipeline on a built-in task with a tiny model, no downloads\n"
              "  plot     plot training curves of runs from their metrics.jsonl (sapo plot RUN_DIR... [--out DIR])\n"
              "  inspect  show replay-buffer entries with the rewritten segment highlighted (sapo inspect PATH)\n"
              "  eval     compare model dirs on prompts with a judge: scores, per-family means, pairwise win rates\n"
              "           (sapo eval MODEL_DIR... --suite heldout | --data FILE [--judge module:function])",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    debug = "--debug" in argv  # sapo's own flag; TrainingArguments' `debug` stays reachable from YAML
    argv = [arg for arg in argv if arg != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _run_guarded(commands[argv[0]], argv[1:], debug)


def _run_guarded(command, argv: Sequence[str], debug: bool) -> int:
    try:
        return command(argv)
    except TrainingStopped as stopped:
        print(f"sapo: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"sapo: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def config_reference_markdown() -> str:
    """The README's option tables, generated from the dataclasses so the docs cannot drift from the code."""
    from sapo.config import sapo_fields

    sections = [("Model and data (`ModelArguments`)", dataclasses.fields(ModelArguments)),
                ("SAPO settings (`SAPOConfig`, beyond `transformers.TrainingArguments`)", sapo_fields()),
                ("`TrainingArguments` options whose default SAPO changes", changed_trainer_defaults())]
    lines: list[str] = []
    for title, fields in sections:
        lines += [f"**{title}**", "", "| option | default | meaning |", "|---|---|---|"]
        for item in fields:
            default = item.default if item.default is not dataclasses.MISSING else "required"
            help_text = item.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `--{item.name}` | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def changed_trainer_defaults() -> list[dataclasses.Field]:
    """Inherited Trainer options that SAPOConfig gives another default (e.g. the paper's learning rate)."""
    from transformers import TrainingArguments

    from sapo.config import SAPOConfig

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(SAPOConfig) if f.name in base and f.default != base[f.name]]


if __name__ == "__main__":
    raise SystemExit(main())
