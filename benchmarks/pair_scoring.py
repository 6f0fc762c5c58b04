"""Pair scoring benchmark: shared-prefix packed rows against separate rows, on `benchmarks/speed.py`'s shapes.

    python benchmarks/pair_scoring.py --config cpu            # the CPU benchmark geometry, one thread
    python benchmarks/pair_scoring.py --config gpu            # Qwen2-0.5B shape, bf16 (needs a GPU)
    python benchmarks/pair_scoring.py --config gpu --dry_run  # same code path, speed.py's tiny dry-run shapes

One training step's scoring work is timed for each layout: the policy's forward and backward with gradients plus
the reference's forward without (the model serves as its own reference: same cost), on one batch of SAPO pairs
built as the trainer builds them (truncation points drawn by `sapo.segments`, the segment rewritten with random
tokens). Layouts alternate, `--repeats` times each after a warm-up; medians of wall and process CPU time are
printed (on a shared CPU machine the CPU time of a single-threaded run varies much less), with the tokens each
layout runs (with and without padding) and the largest difference between the two layouts' log-probs.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from sapo.buffer import ReplayEntry
from sapo.logprobs import packed_response_token_logps, response_token_logps
from sapo.recipes import pad_pairs
from sapo.segments import sample_truncation_point, splice_rejected
from sapo.tiny import build_tokenizer


def speed_module():
    """benchmarks/speed.py, for its shapes and model builder (one definition of the benchmark geometry)."""
    path = Path(__file__).with_name("speed.py")
    spec = importlib.util.spec_from_file_location("sapo_speed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_pairs(shape, vocab_low: int, vocab_high: int, seed: int = 0) -> list[ReplayEntry]:
    """`shape.batch` pairs of a prompt_len prompt and a response_len response, one segment rewritten."""
    rng = random.Random(seed)
    entries = []
    for _ in range(shape.batch):
        prompt = [rng.randrange(vocab_low, vocab_high) for _ in range(shape.prompt_len)]
        real = [rng.randrange(vocab_low, vocab_high) for _ in range(shape.response_len)]
        k, g = sample_truncation_point(len(prompt), len(real), shape.token_generate_length, shape.max_length, rng)
        sample = [rng.randrange(vocab_low, vocab_high) for _ in range(g)]
        rejected, replaced = splice_rejected(real, k, sample, g, set())
        entries.append(ReplayEntry(prompt, real, rejected, k, replaced))
    return entries


def score(model, batch, packed: bool, chunk_size: int = 1024) -> torch.Tensor:
    if packed:
        return packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                           batch["attention_mask"], batch["loss_mask"], chunk_size=chunk_size)
    return response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                chunk_size=chunk_size)


def timed_step(model, batch, packed: bool) -> tuple[float, float]:
    """Policy forward + backward, then the reference forward, as in one training step: (wall, process CPU) s."""
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    sync()
    started, cpu_started = time.perf_counter(), time.process_time()
    score(model, batch, packed).sum().backward()
    with torch.no_grad():
        score(model, batch, packed)
    sync()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, time.process_time() - cpu_started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dry_run", action="store_true", help="benchmarks/speed.py's tiny shapes (CPU ok)")
    options = parser.parse_args(argv)
    speed = speed_module()
    shape = speed.CONFIGS[options.config]
    if options.dry_run:
        shape = speed.dry_run_shape(shape)
    if shape.threads:
        torch.set_num_threads(shape.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    model = speed.build_model(shape, tokenizer, device)
    model.train()
    if shape.activation_checkpointing:
        model.activation_checkpointing_enable()
    entries = make_pairs(shape, len(tokenizer.get_vocab()) // 2, len(tokenizer))
    batch = {name: t.to(device) for name, t in pad_pairs(entries, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        difference = (score(model, batch, True) - score(model, batch, False)).abs().max().item()
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for packed in (False, True):  # warm-up
        timed_step(model, batch, packed)
    for _ in range(options.repeats):
        for packed in (False, True):
            times[packed].append(timed_step(model, batch, packed))
    separate, shared = (statistics.median(t[0] for t in times[p]) for p in (False, True))
    cpu_separate, cpu_shared = (statistics.median(t[1] for t in times[p]) for p in (False, True))
    rows = int(batch["attention_mask"].sum())
    packed_rows = rows - int(batch["prefix_lengths"].sum())
    print(f"config {options.config}: {shape.batch} pairs, prompt {shape.prompt_len} + response {shape.response_len}, "
          f"mean shared prefix {batch['prefix_lengths'].float().mean():.1f} tokens")
    print(f"tokens run: separate {rows} ({batch['input_ids'].numel()} padded), shared_prefix {packed_rows} "
          f"({batch['packed_input_ids'].numel()} padded): {1 - packed_rows / rows:.1%} fewer")
    print(f"policy fwd+bwd + reference fwd, median of {options.repeats}: separate {separate * 1e3:.1f} ms, "
          f"shared_prefix {shared * 1e3:.1f} ms ({shared / separate:.2f}x); process CPU time: separate "
          f"{cpu_separate * 1e3:.1f} ms, shared_prefix {cpu_shared * 1e3:.1f} ms ({cpu_shared / cpu_separate:.2f}x)")
    print(f"largest log-prob difference between the layouts: {difference:.2e}")


if __name__ == "__main__":
    main()
