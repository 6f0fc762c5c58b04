"""Pair scoring benchmark: shared-prefix packed rows against separate rows, on `benchmarks/speed.py`'s shapes.

    python benchmarks/pair_scoring.py --config cpu            # the CPU benchmark geometry, one thread
    python benchmarks/pair_scoring.py --config gpu            # Qwen2-0.5B shape, bf16 (needs a GPU)
    python benchmarks/pair_scoring.py --config gpu --dry_run  # same code path, speed.py's tiny dry-run shapes

Layouts (`--layouts`): separate rows; packed rows under SDPA's dense mask; packed rows under FlexAttention's block
mask (`sapo.pair_attention`; on a CPU only the reference's no-grad forward runs FlexAttention, uncompiled, since torch
has no CPU backward). One training step's scoring work is timed for each layout: the policy's forward and backward
with gradients plus the reference's forward without (the model serves as its own reference: same cost), on one batch
of SAPO pairs built as the trainer builds them (truncation points drawn by `sapo.segments`, the segment rewritten with
random tokens). Layouts alternate, `--repeats` times each after a first call each; medians of wall and process CPU
time are printed (on a shared CPU machine the CPU time of a single-threaded run varies much less), with the tokens
each layout runs (with and without padding) and each layout's largest log-prob difference to separate rows. Each
layout's row is also a JSON line (`--jsonl`, `benchmarks/benchlog.py`), with the first call's time (FlexAttention's
compile) and, for packed-flex, dynamo's frames, recompiles and graph breaks.
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
from sapo.pair_attention import attend_pairs_densely, attend_pairs_with_flex
from sapo.recipes import pad_pairs
from sapo.segments import sample_truncation_point, splice_rejected
from sapo.tiny import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlog  # noqa: E402 (a sibling script, found through the path line above)


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


LAYOUTS = ("separate", "packed-dense", "packed-flex")
"""Separate rows; packed rows under SDPA's dense mask; packed rows under FlexAttention's block mask (on a CPU only
the reference's no-grad forward can use it: torch has no CPU backward)."""


def use_layout(model, layout: str) -> bool:
    """Put `model` in the layout's attention; returns whether pairs are packed."""
    if layout == "packed-flex":
        reason = attend_pairs_with_flex(model)
        if reason is not None:
            raise SystemExit(f"packed-flex: {reason}")
    else:
        attend_pairs_densely(model)
    return layout != "separate"


def score(model, batch, packed: bool, chunk_size: int = 1024) -> torch.Tensor:
    if packed:
        return packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                           batch["attention_mask"], batch["loss_mask"], chunk_size=chunk_size)
    return response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                chunk_size=chunk_size)


def timed_step(model, batch, layout: str) -> tuple[float, float]:
    """Policy forward + backward, then the reference forward, as in one training step: (wall, process CPU) s."""
    packed = use_layout(model, layout)
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
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {','.join(LAYOUTS)}")
    parser.add_argument("--dry_run", action="store_true", help="benchmarks/speed.py's tiny shapes (CPU ok)")
    parser.add_argument("--jsonl", default=None, help="append each layout's row to this file as it is measured")
    options = parser.parse_args(argv)
    layouts = [name for name in options.layouts.split(",") if name]
    if unknown := set(layouts) - set(LAYOUTS):
        parser.error(f"unknown layouts: {', '.join(sorted(unknown))}")
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
    rows = int(batch["attention_mask"].sum())
    packed_rows = rows - int(batch["prefix_lengths"].sum())
    print(f"config {options.config}{' (dry run)' if options.dry_run else ''}: {shape.batch} pairs, prompt "
          f"{shape.prompt_len} + response {shape.response_len}, mean shared prefix "
          f"{batch['prefix_lengths'].float().mean():.1f} tokens, {shape.heads}/{shape.kv_heads} heads, {device}")
    print(f"tokens run: separate {rows} ({batch['input_ids'].numel()} padded), packed {packed_rows} "
          f"({batch['packed_input_ids'].numel()} padded): {1 - packed_rows / rows:.1%} fewer")
    with torch.no_grad():
        use_layout(model, "separate")
        reference = score(model, batch, False)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in layouts}
    first: dict[str, float] = {}
    watch = benchlog.CompileWatch()
    for name in layouts:  # the first step of each layout: its compile, if any
        first[name] = timed_step(model, batch, name)[0]
    for _ in range(options.repeats):
        for name in layouts:
            times[name].append(timed_step(model, batch, name))
    compiled = watch.report(device, "packed-flex" in layouts and device.type == "cuda")
    base = statistics.median(t[0] for t in times[layouts[0]])
    for name in layouts:
        with torch.no_grad():
            difference = (score(model, batch, use_layout(model, name)) - reference).abs().max().item()
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        row = {"layout": name, "step_mean_s": wall, "cpu_s": cpu, "first_call_s": first[name],
               f"ratio_to_{layouts[0]}": wall / base, "max_logp_difference": difference, "device": str(device),
               "repeats": options.repeats, "compile": compiled if name == "packed-flex" else None}
        benchlog.emit(f"pairs-{options.config}/{name}", row, options.jsonl)
        print(f"{name:<13} policy fwd+bwd + reference fwd, median of {options.repeats}: {wall * 1e3:.1f} ms wall "
              f"({wall / base:.2f}x {layouts[0]}), {cpu * 1e3:.1f} ms CPU; first call {first[name]:.2f} s; "
              f"largest log-prob difference to separate rows {difference:.2e}")
    if "packed-flex" in layouts:
        print(f"compile (all layouts): {benchlog.compile_cell(compiled)}")


if __name__ == "__main__":
    main()
