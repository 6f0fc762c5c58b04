"""The `sapo` command: dispatching to `train`, `demo`, `plot`, `inspect` and `eval`, and turning expected
failures into one paragraph and exit status 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from sapo.cli.options import EXIT_USAGE, FILESYSTEM_ERRNOS, ModelArguments
from sapo.cli.train import run_train
from sapo.errors import USER_ERRORS, TrainingStopped, UsageError


def run_demo(argv: Sequence[str]) -> int:
    from sapo.cli.demo import main as demo_main

    return demo_main(argv)


def run_plot(argv: Sequence[str]) -> int:
    from sapo.cli.plot import main as plot_main

    return plot_main(argv)


def run_inspect(argv: Sequence[str]) -> int:
    from sapo.cli.inspect import main as inspect_main

    return inspect_main(argv)


def run_eval(argv: Sequence[str]) -> int:
    from sapo.cli.eval import main as eval_main

    return eval_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": run_train, "demo": run_demo, "plot": run_plot, "inspect": run_inspect, "eval": run_eval}
    debug = "--debug" in argv  # sapo's own flag; TrainingArguments' `debug` stays reachable from YAML
    argv = [arg for arg in argv if arg != "--debug"]
    if argv and argv[0] in ("--version", "-V"):
        print(f"sapo {package_version()}")
        return 0
    if argv and argv[0] not in commands and argv[0] not in ("-h", "--help"):
        import difflib

        close = difflib.get_close_matches(argv[0], list(commands), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(f"sapo: error: unknown command {argv[0]!r}; {hint}commands: {', '.join(commands)} (see `sapo --help`)",
              file=sys.stderr)
        return EXIT_USAGE
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sapo {train,demo,plot,inspect,eval} [options]   (sapo --version: the installed version)\n\n"
              "  train    train a model (sapo train --help lists every option)\n"
              "  demo     run the whole pipeline on a built-in task with a tiny model, no downloads\n"
              "  plot     plot training curves of runs from their metrics.jsonl (sapo plot RUN_DIR... [--out DIR])\n"
              "  inspect  show replay-buffer entries with the rewritten segment highlighted (sapo inspect PATH)\n"
              "  eval     compare model dirs on prompts with a judge: scores, per-family means, pairwise win rates\n"
              "           (sapo eval MODEL_DIR... --suite heldout | --data FILE [--judge module:function])",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_deepspeed_probe()
    return _run_guarded(commands[argv[0]], argv[1:], debug)


def package_version() -> str:
    """The installed distribution's version (what a bug report should name), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sapo-align")
    except PackageNotFoundError:
        from sapo import __version__

        return __version__


def quiet_deepspeed_probe() -> None:
    """accelerate imports deepspeed whenever it is installed (to unwrap models), and deepspeed then warns "Setting
    accelerator to CPU" on every machine without CUDA, though nothing uses it. Naming the CPU accelerator, which it
    would pick anyway, keeps that line out of a CPU run; a GPU machine, or a choice the user made, is left alone."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _run_guarded(command, argv: Sequence[str], debug: bool) -> int:
    try:
        with _argparse_errors_raise():
            return command(argv)
    except TrainingStopped as stopped:
        print(f"sapo: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"sapo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # a full or read-only disk met after the checks (another process filled it, quota)
        if debug or error.errno not in FILESYSTEM_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename else ""
        partial = " (the run stopped there; what it had written is kept)" \
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
        print(f"sapo: error: {where}{error.strerror or error}{partial}", file=sys.stderr)
        return EXIT_USAGE


class _ArgumentError(UsageError):
    """An argparse refusal (unknown choice, mistyped value, missing argument), reported as one paragraph."""


@contextlib.contextmanager
def _argparse_errors_raise() -> Iterator[None]:
    """While a command runs, argparse's errors raise instead of printing the whole usage (hundreds of options for
    `sapo train`) and exiting; `--help` still prints and exits 0."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str):
        raise _ArgumentError(f"{parser.prog}: {message} (see `{parser.prog} --help`)")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def config_reference_markdown() -> str:
    """docs/guides/config.md's option tables, generated from the dataclasses so the docs cannot drift from the code."""
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
