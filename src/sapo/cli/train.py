"""`sapo train`: checks before anything is written (output location, free space, report_to, resume path),
the run, and the summary printed at its end."""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sapo import metrics as m
from sapo.cli.options import apply_lora, load_model_and_tokenizer, model_init_kwargs, parse_train_args
from sapo.errors import USER_ERRORS, UsageError
from sapo.errors import one_paragraph as _one_paragraph
from sapo.loading import check_model_source
from sapo.metrics import eval_name
from sapo.run.paths import METRICS_FILE


def check_output_location(out: Path, *, needed_bytes: int = 0, largest_file: int = 0) -> None:
    """Refuse, before anything is created, an output_dir that is a file, lies under a file, sits on a read-only
    filesystem or one without room for the final model (`needed_bytes`), or where this process may not write a file
    as large as `largest_file` (ulimit -f: the write would kill the run with SIGXFSZ)."""
    if str(out) in ("", "."):
        raise UsageError("--output_dir is empty; name the directory to train into")
    try:
        os.lstat(out)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise UsageError(f"output_dir {out}: too long for its file system (a name in it, or the whole path; "
                             "ENAMETOOLONG); choose a shorter --output_dir") from None
        if error.errno == errno.ELOOP:
            raise UsageError(f"output_dir {out}: its path runs into a loop of symbolic links") from None
    if os.path.lexists(out) and not out.is_dir():
        kind = "a broken symbolic link" if out.is_symlink() and not out.exists() else "a file"
        raise UsageError(f"output_dir {out}: is {kind}, not a directory")
    existing = out
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output_dir {out}: cannot be created, {existing} is a file")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UsageError(f"output_dir {out}: {existing} is on a read-only filesystem")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output_dir {out}: {existing} is not writable (permission denied)")
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        raise UsageError(f"output_dir {out}: its filesystem has {_size(free)} free, and the final model alone needs "
                         f"about {_size(needed_bytes)}; free some space or choose another --output_dir")
    try:
        import resource
    except ImportError:  # not on Unix
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < largest_file:
        raise UsageError(f"output_dir {out}: this process may write files of at most {_size(limit)} (ulimit -f), "
                         f"and the model's weights file needs {_size(largest_file)}; raise the limit")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _check_report_to(config: Any) -> None:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    for name in config.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise UsageError(f"--report_to {name}: unknown integration; use none or one of "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in available:
            raise UsageError(f"--report_to {name}: the {name} package is not installed (pip install it, or pass "
                             "--report_to none)")


def _check_resume_path(resume: str | None) -> None:
    if not resume or resume.lower() in ("true", "false"):
        return
    path = Path(resume)
    if not path.exists():
        raise UsageError(f"{resume}: checkpoint directory not found")
    if not path.is_dir():
        raise UsageError(f"--resume_from_checkpoint {resume}: is a file, not a checkpoint directory")


def run_train(argv: Sequence[str]) -> int:
    from sapo.data import load_examples, require_chat_template
    from sapo.heldout import check_eval_data, read_eval_examples
    from sapo.run.lock import check_output_dir, first_missing, remove_if_created_empty
    from sapo.run.outdir import refuse_inputs_in_output_dir
    from sapo.trainer import SAPOTrainer

    model_args, config = parse_train_args(argv)
    resume = config.resume_from_checkpoint
    _check_resume_path(resume)
    out = Path(config.output_dir)
    check_output_location(out)
    refuse_inputs_in_output_dir(out, {name: getattr(model_args, name) for name in (
        "model_name_or_path", "tokenizer_name_or_path", "dataset_name", "eval_dataset_name", "chat_template")})
    check_output_dir(out, resuming=bool(resume) and resume.lower() != "false",
                     overwrite=config.overwrite_output_dir)
    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required")
    if model_args.dataset_name is None:
        raise UsageError("--dataset_name is required (a .jsonl/.json/.parquet file, directory or hub name)")
    check_eval_data(config, model_args.eval_dataset_name)
    weights = check_model_source(model_args.model_name_or_path, "model_name_or_path",
                                 trust_remote_code=model_args.trust_remote_code)
    config.model_init_kwargs = model_init_kwargs(model_args, config.model_init_kwargs)
    if weights and not model_args.use_peft:  # the final save writes the policy and the EMA model beside it
        halved = config.model_init_kwargs.get("dtype") in ("bfloat16", "float16")
        sizes = [file.stat().st_size // (2 if halved else 1) for file in weights]
        check_output_location(out, needed_bytes=sum(sizes) * (2 if config.self_augmenting else 1),
                              largest_file=max(sizes))
    _check_report_to(config)
    examples = load_examples(model_args.dataset_name, model_args.dataset_split, skip_invalid=config.skip_invalid,
                             with_rejected=config.needs_rejected_data)
    eval_examples = [] if model_args.eval_dataset_name is None else read_eval_examples(
        model_args.eval_dataset_name, model_args.eval_split, skip_invalid=config.skip_invalid,
        with_rejected=config.needs_rejected_data)
    eval_records = [example.record for example in eval_examples] or None

    def check_tokenizer(tokenizer: Any) -> None:  # the data against the tokenizer, before the weights are read
        require_chat_template(tokenizer, examples, model_args.dataset_name)
        require_chat_template(tokenizer, eval_examples, model_args.eval_dataset_name)

    model, tokenizer = load_model_and_tokenizer(model_args, config.model_init_kwargs, config.max_length,
                                                check_tokenizer)
    if model_args.use_peft:
        model = apply_lora(model, model_args)
    created = first_missing(out)
    try:
        try:
            trainer = SAPOTrainer(model=model, args=config, train_dataset=examples, processing_class=tokenizer,
                                  chat_template=model_args.chat_template, eval_dataset=eval_records)
        except (ValueError, ImportError, RuntimeError) as error:  # refusals of this setup by Trainer, accelerate
            if isinstance(error, USER_ERRORS):
                raise
            raise UsageError(f"cannot set up training: {_one_paragraph(error)}") from error
        trainer.data_source = model_args.dataset_name
        trainer.command = shlex.join(["sapo", "train", *argv])
        show_bar_and_summary(trainer)
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except USER_ERRORS:
        remove_if_created_empty(out, created)
        raise
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(run_summary(trainer.state.log_history, Path(config.output_dir), trainer.copies.ema is not None))
    return 0


SUMMARY_METRICS = {m.LOSS: "loss", m.REWARD_MARGINS: "margin", m.REWARD_ACCURACIES: "accuracy",
                   m.LOGPS_CHOSEN: "log p(chosen)", m.NLL_LOSS: "nll", m.MEAN_TOKEN_ACCURACY: "token acc"}
EVAL_METRICS = {eval_name(m.LOSS): "loss", eval_name(m.REWARD_MARGINS): "margin",
                eval_name(m.REWARD_ACCURACIES): "accuracy", eval_name(m.LOGPS_CHOSEN_PER_TOKEN): "log p(chosen)/token",
                eval_name(m.JUDGE_SCORE): "judge"}
EVAL_LOSS = eval_name(m.LOSS)


def _brief(row: Mapping[str, Any], names: Mapping[str, str]) -> str:
    return ", ".join(f"{short} {row[key]:.4g}" for key, short in names.items() if isinstance(row.get(key), float | int))


def show_bar_and_summary(trainer: Any) -> None:
    """`sapo train` shows the progress bar (with the latest loss, margin and accuracy on it) and one short line per
    evaluation, instead of the Trainer's raw dictionary of every metric at each logging step; metrics.jsonl and
    report_to integrations still get every value. transformers' own bars ("Writing model shards" at every save) are
    turned off; the hub's upload bars stay."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers import ProgressCallback
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    enable_progress_bars()

    class BarAndEvaluations(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and EVAL_LOSS in logs:
                self.training_bar.write(f"step {state.global_step} eval: {_brief(logs, EVAL_METRICS)}")

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(BarAndEvaluations)


def run_summary(log_history: Sequence[Mapping[str, Any]], out: Path, has_ema: bool) -> str:
    """What a finished `sapo train` prints: steps and time, the last logged training (and evaluation) metrics, and
    where the outputs are."""
    train_rows = [row for row in log_history if m.LOSS in row and EVAL_LOSS not in row]
    eval_rows = [row for row in log_history if EVAL_LOSS in row]
    end = next((row for row in reversed(log_history) if m.TRAIN_RUNTIME in row), {})
    lines = [f"sapo: trained {log_history[-1].get(m.STEP, 0) if log_history else 0} steps"
             + (f" in {end[m.TRAIN_RUNTIME]:.1f} s" if m.TRAIN_RUNTIME in end else "")]
    if train_rows:
        last = train_rows[-1]
        lines.append(f"  last training row (step {last.get(m.STEP)}): {_brief(last, SUMMARY_METRICS)}")
    if eval_rows:
        lines.append(f"  last evaluation (step {eval_rows[-1].get(m.STEP)}): {_brief(eval_rows[-1], EVAL_METRICS)}")
    lines.append(f"  policy: {out}" + (f"   EMA model: {out / 'ema'}" if has_ema else ""))
    lines.append(f"  every logged value: {out / METRICS_FILE} (curves: sapo plot {out})")
    return "\n".join(lines)
