"""A fingerprint of the weights a run starts from, recorded in its checkpoints and compared on resume.

A resume rebuilds what the checkpoint does not hold from the command line: with `ref_update_mode fixed` the
reference is the start model itself, loaded again from `--model_name_or_path`. Parameter names and shapes cannot
tell two models of one architecture apart, so the checkpoint records a sha256 of the start weights and a resume
from other weights is refused like any other changed setting (see `sapo.checkpoint.run_settings`).

What is hashed is chosen to stay cheap for a 16 GB checkpoint:
- a model loaded from a local directory: the bytes of its weight files, streamed in 64 MiB pieces hashed on
  several threads (hashlib releases the GIL), only when a checkpoint is first saved or validated;
- a model on the hub: its repository id and commit, as transformers recorded them when it was loaded;
- a model built in memory: its tensors, hashed when the trainer is created (before training changes them).
LoRA adapters are left out: they are trained, and the checkpoint holds them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PIECE = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory (top level only, sorted): what from_pretrained reads its tensors from."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state"))


def _hash_piece(piece: tuple[Path, int]) -> bytes:
    path, offset = piece
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(offset)
        remaining = PIECE
        while remaining and (chunk := handle.read(min(remaining, 8 << 20))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()


def files_fingerprint(files: list[Path]) -> str:
    """sha256 over each file's name, size and the sha256 of each 64 MiB piece of its bytes, pieces in parallel."""
    pieces = [(path, offset) for path in files for offset in range(0, max(path.stat().st_size, 1), PIECE)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_hash_piece, pieces))
    total = hashlib.sha256()
    for path in files:
        total.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    for digest in digests:
        total.update(digest)
    return total.hexdigest()


def tensors_fingerprint(model: Any) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes and bytes), LoRA adapters left out."""
    digest = hashlib.sha256()
    plain = {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor  # peft's names
             for name, tensor in model.state_dict().items()}
    for name, tensor in sorted(plain.items()):
        if "lora_" in name or not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _config_of(model: Any) -> Any:
    return getattr(model, "config", None)


class StartWeights:
    """The start weights of one model, fingerprinted when first asked (files) or at once (tensors in memory)."""

    def __init__(self, model: Any) -> None:
        config = _config_of(model)
        source = str(getattr(config, "_name_or_path", "") or "")
        self.directory = Path(source) if source and Path(source).is_dir() else None
        self.files = weight_files(self.directory) if self.directory is not None else []
        self._stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        commit = getattr(config, "_commit_hash", None)
        self._value: str | None = None
        if self.files:
            return
        if source and commit and not Path(source).exists():
            self._value = f"hub:{source}@{commit}"
        else:
            self._value = "tensors:" + tensors_fingerprint(model)

    def fingerprint(self) -> str | None:
        """The fingerprint; None where the files cannot be read any more (then a resume cannot compare it)."""
        if self._value is None:
            try:
                now = [(p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
                if now != self._stats:
                    logger.warning("%s: the weight files changed since this run loaded them; the checkpoint records "
                                   "their current bytes", self.directory)
                self._value = "files:" + files_fingerprint(self.files)
            except OSError as error:
                logger.warning("%s: cannot fingerprint the start weights (%s); a resume will not be able to check "
                               "that it starts from the same model", self.directory, error)
                return None
        return self._value
