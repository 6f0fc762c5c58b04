"""What a checkpoint records so that a resume is exact or refused: the manifest (trainable parameters' shapes),
the settings that shape the trajectory, the data's fingerprint (`run_settings`, `validate_checkpoint`), and random
states as JSON."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sapo.errors import CheckpointError, UsageError
from sapo.run.paths import (
    CHECKPOINT_RE,
    CHECKSUMS_FILE,
    MANIFEST_FILE,
    RUN_STATE_FILE,
    STATE_DIR,
    TRAINER_STATE_FILE,
)
from sapo.run.publish import checksum_problems, read_json, write_json
from sapo.sharding import global_shape

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# What a checkpoint records so that a resume is exact or refused
# ------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint was written at (0 when it has no trainer state)."""
    state = Path(path) / TRAINER_STATE_FILE
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def write_manifest(directory: Path, params: Mapping[str, torch.Tensor], run_state: Mapping[str, Any]) -> None:
    """The trainable parameters' names and (global) shapes, and run-level values that are not tensors (among them
    the settings that shape the run, see `run_settings`)."""
    write_json(directory / MANIFEST_FILE, {name: list(global_shape(p)) for name, p in params.items()})
    write_json(directory / RUN_STATE_FILE, run_state)


def read_run_state(directory: Path) -> dict[str, Any]:
    return read_json(directory / RUN_STATE_FILE)


# TrainingArguments fields that shape the trajectory (optimizer, schedule, batches, precision, order of the data).
# Fields missing from an installed transformers version are skipped.
TRAINER_TRAJECTORY_FIELDS = (
    "seed", "data_seed", "full_determinism", "per_device_train_batch_size", "gradient_accumulation_steps",
    "dataloader_drop_last", "group_by_length", "train_sampling_strategy", "ignore_data_skip", "learning_rate",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "optim", "optim_args", "bf16", "fp16", "neftune_noise_alpha",
)
# SAPO fields a resumed run may change freely: memory knobs, stopping and bookkeeping (skip_invalid acts through
# the data, which is compared by its fingerprint).
FREE_SAPO_FIELDS = ("logprob_chunk_size", "offload_copies", "max_nonfinite_steps", "overwrite_output_dir",
                    "skip_invalid", "resume_allow_changes", "eval_judge", "eval_judge_max_new_tokens")
DATA_SETTING = "data"
WORLD_SIZE_SETTING = "world_size"
START_WEIGHTS_SETTING = "start_weights"  # sha256 of the weights the run started from (see sapo.run.start_weights)
REFERENCE_WEIGHTS_SETTING = "reference_weights"  # the same, of a ref_model given apart from the policy
FINGERPRINTS = {DATA_SETTING: "the tokenized training data is not the same",
                START_WEIGHTS_SETTING: "the weights this run starts from are not those the checkpoint's run started "
                "from (--model_name_or_path)",
                REFERENCE_WEIGHTS_SETTING: "the reference model's weights are not the same"}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def run_settings(config: Any, sapo_field_names: Sequence[str], *, world_size: int, data: str,
                 start_weights: str | None = None, reference_weights: str | None = None) -> dict[str, Any]:
    """The settings that shape a run's trajectory, as JSON values: every SAPO field but `FREE_SAPO_FIELDS`, the
    Trainer fields in `TRAINER_TRAJECTORY_FIELDS`, the number of processes and fingerprints of the tokenized data
    and of the start (and a separate reference's) weights. The run's length (max_steps, num_train_epochs) is not
    among them: a run may be resumed to train longer."""
    settings = {name: _plain(getattr(config, name)) for name in _config_setting_names(config, sapo_field_names)}
    settings[WORLD_SIZE_SETTING] = world_size
    settings[DATA_SETTING] = data
    settings[START_WEIGHTS_SETTING] = start_weights
    settings[REFERENCE_WEIGHTS_SETTING] = reference_weights
    return settings


def _config_setting_names(config: Any, sapo_field_names: Sequence[str]) -> list[str]:
    names = [n for n in sapo_field_names if n not in FREE_SAPO_FIELDS]
    return names + [n for n in TRAINER_TRAJECTORY_FIELDS if hasattr(config, n) and n not in names]


def run_setting_names(config: Any, sapo_field_names: Sequence[str]) -> list[str]:
    """The names `run_settings` compares, without computing the data fingerprint."""
    return [*_config_setting_names(config, sapo_field_names), WORLD_SIZE_SETTING, *FINGERPRINTS]


def data_fingerprint(dataset: Any) -> str:
    """sha256 over every item's token ids (what the model trains on, after templates, truncation and dropping)."""
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        item = dataset[index]
        for key in sorted(item):
            if key == "index":
                continue
            value = item[key]
            digest.update(key.encode())
            try:
                digest.update(b"-" if value is None else array("q", value).tobytes())
            except TypeError:
                digest.update(json.dumps(value, default=str, sort_keys=True).encode())
        digest.update(b"\n")
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def check_allowed_changes(allowed: Sequence[str], known: Sequence[str]) -> None:
    unknown = sorted(set(allowed) - set(known))
    if unknown:
        raise UsageError(f"resume_allow_changes: unknown setting(s) {', '.join(unknown)}; the settings compared on "
                         f"resume are {', '.join(sorted(known))} (max_steps and num_train_epochs may change without "
                         "it)")


def settings_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                         allowed: Sequence[str] = ()) -> list[str]:
    """Each setting that differs from the checkpoint's and was not named in `allowed`, described for a message.
    Settings the checkpoint does not record (written by another sapo version) are not compared."""
    check_allowed_changes(allowed, list(current))
    differences = []
    for name, value in current.items():
        if name in FINGERPRINTS and (saved.get(name) is None or value is None):
            continue  # not recorded (an older sapo), or the files could not be read
        if name in saved and saved[name] != value and name not in allowed:
            if name == DATA_SETTING:
                differences.append(f"{name} ({FINGERPRINTS[name]})")
            elif name in FINGERPRINTS:
                differences.append(f"{name} ({FINGERPRINTS[name]}: checkpoint {str(saved[name])[:24]}..., this "
                                   f"run {str(value)[:24]}...)")
            else:
                differences.append(f"{name} (checkpoint {json.dumps(saved[name])}, this run {json.dumps(value)})")
    return differences


def _earlier_checkpoints_hint(path: Path) -> str:
    step = CHECKPOINT_RE.fullmatch(path.name)
    if step is None or not path.parent.is_dir():
        return ""
    earlier = sorted((int(m.group(1)), p) for p in path.parent.iterdir()
                     if (m := CHECKPOINT_RE.fullmatch(p.name)) and int(m.group(1)) < int(step.group(1)))
    return f"; an earlier checkpoint may still be whole: --resume_from_checkpoint {earlier[-1][1]}" if earlier else ""


def _check_step(path: Path) -> None:
    """The checkpoint's step agrees in its name, the Trainer's trainer_state.json and sapo's own record of it."""
    trainer_step = read_json(path / TRAINER_STATE_FILE).get("global_step")
    recorded = read_run_state(path / STATE_DIR).get("global_step")
    named = CHECKPOINT_RE.fullmatch(path.name)
    steps = {f"{TRAINER_STATE_FILE} (global_step)": trainer_step, f"{STATE_DIR}/{RUN_STATE_FILE}": recorded,
             "its name": int(named.group(1)) if named else None}
    known = {where: step for where, step in steps.items() if step is not None}
    if len(set(known.values())) > 1:
        raise CheckpointError(f"{path}: its step is not one step: " + ", ".join(
            f"{where} says {step}" for where, step in known.items()) + "; it was assembled from different "
            f"checkpoints or renamed, so it cannot resume exactly{_earlier_checkpoints_hint(path)}")


def validate_checkpoint(path: Path, params: Mapping[str, torch.Tensor], state_files: Sequence[str], *,
                        settings: Mapping[str, Any] | None = None, allow_changes: Sequence[str] = (),
                        verify_content: bool = True) -> None:
    """Check, reading only, that `path` resumes this run exactly: every file the run needs is there, every file is
    as it was saved (size, and sha256 with `verify_content`), the trainable parameters are this model's, the
    checkpoint can continue training, and the run's `settings` equal the checkpoint's (but those in
    `allow_changes`). Each failure is a `CheckpointError` naming what is wrong."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    required = [TRAINER_STATE_FILE, CHECKSUMS_FILE, *(f"{STATE_DIR}/{name}" for name in state_files)]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete sapo checkpoint of this kind of run "
                              f"(missing {', '.join(missing)}){_earlier_checkpoints_hint(path)}")
    problems = checksum_problems(path, content=verify_content)
    if problems:
        raise CheckpointError(f"{path}: damaged checkpoint ({'; '.join(problems)}), so it cannot resume the run "
                              f"exactly{_earlier_checkpoints_hint(path)}")
    _check_step(path)
    manifest = read_json(path / STATE_DIR / MANIFEST_FILE)
    for name, param in params.items():
        if name not in manifest:
            raise CheckpointError(f"{path}: written by another run: it has no parameter {name!r}")
        if tuple(manifest[name]) != global_shape(param):
            raise CheckpointError(f"{path}: written by another run: parameter {name!r} has shape "
                                  f"{tuple(manifest[name])}, this model {global_shape(param)}")
    run_state = read_run_state(path / STATE_DIR)
    if run_state.get("save_only_model"):
        raise CheckpointError(f"{path}: written with save_only_model, so it holds no optimizer, scheduler or RNG "
                              "state and training cannot continue exactly from it; start a new run from its weights")
    if settings is None:
        return
    saved = run_state.get("settings")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: records no run settings (written by an older sapo), so an exact resume "
                              "cannot be checked")
    differences = settings_differences(saved, settings, allow_changes)
    if differences:
        names = " ".join(d.split(" ", 1)[0] for d in differences)
        raise CheckpointError(f"{path}: this run's settings differ from those the checkpoint was trained with, so "
                              f"resuming would not continue the same run: {'; '.join(differences)}. Resume with the "
                              f"checkpoint's settings, or pass --resume_allow_changes {names} to change them "
                              "deliberately")



def rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_state_from_json(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return version, tuple(internal), gauss
