"""Names of everything sapo writes into a run directory, in one place.

The trainer writes these files, and `sapo plot` / `sapo inspect` read them; keeping the names here (a
module that imports nothing heavy) means the readers need not import the trainer and cannot drift from it.

    output_dir/
      model.safetensors, tokenizer files, README.md   final policy and its model card
      ema/                                           final EMA model (same form)
      sapo_final.json                                written last by the final save: step and checksums of
                                                     the final files (its presence: they are complete)
      metrics.jsonl                                  one JSON row per logging step
      .sapo.lock                                     held while a run writes here (pid, host, start time)
      .staging/                                      checkpoints and final outputs being written (moved into
                                                     place when complete)
      checkpoint-N/                                  the Trainer's own files, plus
        sapo_checksums.json                          size and sha256 of every file, written last
        sapo_state/                                  sapo's state of step N (per-rank files have _rankR)
"""

from __future__ import annotations

import re

METRICS_FILE = "metrics.jsonl"
EMA_DIR = "ema"
STAGING_DIR = ".staging"
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}-(\d+)")
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's own, read for the step of a checkpoint
CHECKSUMS_FILE = "sapo_checksums.json"  # size and sha256 of every file of a checkpoint, checked before resuming
LOCK_FILE = ".sapo.lock"  # one writer per output_dir: pid, host and start time of the run holding it
FINAL_STAGING = "final"  # .staging/final: the final outputs, complete, being moved into output_dir
FINAL_PARTIAL = "final.partial"  # .staging/final.partial: the final outputs being written
FINAL_RECORD_FILE = "sapo_final.json"  # step and checksums of the final outputs, moved into place last

STATE_DIR = "sapo_state"
MANIFEST_FILE = "parameters.json"  # trainable parameter names and shapes: refuses another model's checkpoint
RUN_STATE_FILE = "trainer.json"  # run-level values that are not tensors (reference period, settings, counters)
CHECKPOINT_METRICS_FILE = "metrics.jsonl"  # sapo_state/metrics.jsonl: the rows logged up to the checkpoint's step
BUFFER_FILE_RE = re.compile(r"replay_buffer_rank(\d+)\.safetensors")
BUFFER_FILE_GLOB = "replay_buffer_rank*.safetensors"


def buffer_file(rank: int) -> str:
    """Each rank keeps its own replay buffer (fed by its own data shard)."""
    return f"replay_buffer_rank{rank}.safetensors"


def pending_file(rank: int) -> str:
    """Examples queued for the next generation round."""
    return f"pending_rank{rank}.json"


def step_state_file(rank: int) -> str:
    """A rank's counters and the metrics accumulated since the last log (so a resumed run logs the same rows)."""
    return f"step_state_rank{rank}.json"


def segment_rng_file(rank: int) -> str:
    return f"segment_rng_rank{rank}.json"


def spin_file(rank: int) -> str:
    return f"spin_rank{rank}.json"


def copy_file(name: str, rank: int | None) -> str:
    """Weights of the EMA model or the reference (`name`); sharded copies are saved per rank, whole ones once."""
    suffix = "" if rank is None else f"_rank{rank}"
    return f"{name}{suffix}.safetensors"
