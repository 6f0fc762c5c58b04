"""Fingerprints of a fixed-seed CPU run of every recipe: final policy, EMA, replay buffer and per-step losses.

A refactor that claims "behaviour unchanged" records these before the move and compares after it:

    .venv/bin/python scripts/recipe_fingerprints.py --out before.json
    ... refactor ...
    .venv/bin/python scripts/recipe_fingerprints.py --compare before.json   # exit 1 on any difference

`--statistics` prints robust per-tensor statistics (sum, sum of squares) in place of the exact digests: the
form tests/test_golden.py compares with a tolerance, because exact bytes of float weights can differ between
CPUs. Regenerate its expected values (only for an intended behaviour change, and say so in the commit) with:

    .venv/bin/python scripts/recipe_fingerprints.py --statistics --out tests/golden_recipes.json

`--setting name=value` (repeatable) sets a SAPOConfig field in every run, e.g. to check that a new setting's
non-default value reproduces the old behaviour (`--setting pair_scoring=separate`).

Every run goes through the public API (SAPOTrainer, save_model, the checkpoint files), loads a tiny saved
model by path like a user's SFT checkpoint, and checkpoints mid-run so the buffer file is part of the print.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sapo import SAPOConfig, SAPOTrainer, tasks, tiny
from sapo.config import RECIPES
from sapo.metrics import LOSS, read_metrics
from sapo.run.paths import METRICS_FILE

STEPS = 6


def tensors_digest(path: Path) -> str:
    """Hash of the tensors (names, dtypes, shapes, bytes) of a safetensors file, not of its metadata."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_statistics(path: Path) -> dict[str, list[float]]:
    """Per tensor of a safetensors file: its sum and sum of squares (float64), robust to rounding across CPUs."""
    return {name: [tensor.double().sum().item(), tensor.double().square().sum().item()]
            for name, tensor in sorted(load_file(str(path)).items())}


def run_recipe(recipe: str, model_dir: Path, out: Path, suite: dict, settings: dict[str, str],
               summarize: Any = tensors_digest) -> dict:
    torch.manual_seed(0)
    args = SAPOConfig(output_dir=str(out), recipe=recipe, max_steps=STEPS, per_device_train_batch_size=4,
                      learning_rate=1e-3, token_generate_length=4, spin_max_new_tokens=8, spin_iterations=2,
                      max_length=64, max_prompt_length=48, logging_steps=1, save_steps=STEPS // 2,
                      report_to="none", use_cpu=True, disable_tqdm=True, seed=0, ref_update_steps=2, **settings)
    trainer = SAPOTrainer(model=str(model_dir), args=args, train_dataset=suite["train"])
    trainer.train()
    trainer.save_model()
    rows = read_metrics(out / METRICS_FILE)
    checkpoint = out / f"checkpoint-{STEPS}" / "sapo_state"
    prints = {"losses": [r[LOSS] for r in rows if LOSS in r],
              "policy": summarize(out / "model.safetensors")}
    if (out / "ema").is_dir():
        prints["ema"] = summarize(out / "ema" / "model.safetensors")
    buffer = checkpoint / "replay_buffer_rank0.safetensors"
    if buffer.exists():
        prints["buffer"] = summarize(buffer)
    return prints


def fingerprints(settings: dict[str, str], summarize: Any = tensors_digest) -> dict[str, dict]:
    """Every recipe's prints; `summarize` turns a safetensors file into its print (exact digest or statistics)."""
    torch.set_num_threads(1)
    suite = tasks.make_suite(32, 0, seed=0)
    tokenizer = tiny.build_tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer,
                       model_dir)
        return {recipe: run_recipe(recipe, model_dir, Path(scratch) / recipe, suite, settings, summarize)
                for recipe in RECIPES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="compare with fingerprints written earlier; exit 1 on any difference")
    parser.add_argument("--statistics", action="store_true",
                        help="per-tensor sums and sums of squares instead of exact digests (the golden test's form)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a SAPOConfig field for every run (string values), e.g. pair_scoring=separate")
    options = parser.parse_args(argv)
    malformed = [s for s in options.setting if "=" not in s]
    if malformed:
        parser.error(f"--setting expects NAME=VALUE, got {malformed[0]!r}")
    prints = fingerprints(dict(s.split("=", 1) for s in options.setting),
                          tensors_statistics if options.statistics else tensors_digest)
    if options.out:
        Path(options.out).write_text(json.dumps(prints, indent=1) + "\n")
    if not options.compare:
        print(json.dumps(prints, indent=1))
        return 0
    before = json.loads(Path(options.compare).read_text())
    differences = [f"{recipe}.{key}" for recipe in sorted(set(before) | set(prints))
                   for key in sorted(set(before.get(recipe, {})) | set(prints.get(recipe, {})))
                   if before.get(recipe, {}).get(key) != prints.get(recipe, {}).get(key)]
    for recipe in prints:
        print(f"{recipe:10s} " + ("identical" if not any(d.startswith(f"{recipe}.") for d in differences)
                                  else "DIFFERS: " + ", ".join(d for d in differences if d.startswith(f"{recipe}."))))
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
