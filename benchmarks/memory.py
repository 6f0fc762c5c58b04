"""Memory benchmark: what SAPO's EMA model and reference cost under each memory option, on the Qwen2-0.5B shape.

    python benchmarks/memory.py                              # CPU or one GPU, every option, fp32 policy
    python benchmarks/memory.py --bf16                       # CUDA: mixed precision (autocast), fp32 weights
    python benchmarks/memory.py --dtype bfloat16             # pure bf16 weights (copies are bf16 already)
    python benchmarks/memory.py --options default,lora       # a subset
    python benchmarks/memory.py --dry_run                    # same code paths, tiny shapes (about a minute)
    python benchmarks/memory.py --json results.json          # also write every number
    python benchmarks/memory.py --jsonl results.jsonl        # each option appended as one JSON line once measured

Besides the policy, SAPO-DPO (``recipe="sapo-dpo"``, loss_type sigmoid) keeps two more versions of its weights:
the EMA model, which generates the rejected segments, and the reference of the DPO loss. Each option below
trains the same randomly initialised model on the same synthetic data in a fresh subprocess (so peaks and
allocator caches do not leak from one option into the next):

* ``default``: copies in the policy's dtype, held as modules on the training device;
* ``bf16``: ``copies_dtype="bfloat16"`` (half the bytes of an fp32 policy's copies);
* ``offload``: ``offload_copies=True``: the copies are plain tensors in host memory (pinned on CUDA) between
  uses; the EMA is gathered into a module on the device for each generation round (kept between rounds and
  refreshed in place when decoding is compiled, on CUDA), the reference is copied into the policy's weights for
  each reference forward;
* ``bf16+offload``: both;
* ``lora``: ``peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=q/k/v/o_proj)``: the copies are adapter
  weights only (the base weights are frozen and shared). This also removes the base weights' gradients and
  optimizer state, so its peak is not the copies' effect alone;
* ``policy-only``: the baseline, ``recipe="sft"`` (no EMA, no reference, no generation) on ``2 x batch``
  sequences per step, as many as SAPO's policy forward sees (``batch`` real + ``batch`` rejected).

Reported per option:

* copy bytes, counted right after the first optimizer step (the copies are built when training starts): the sum
  of ``numel * element_size`` over the parameters of the copies' modules (``trainer.copies.ema_module``,
  ``reference_module``) and over the tensors of their ``ShadowWeights`` (``trainer.copies.ema``, ``reference``),
  each storage counted once (by device and
  data pointer: a module copy's ShadowWeights alias its parameters). "On device" is what stays resident with the
  policy on the training device; "on host" is what the trainer keeps in its offload store. On a GPU run this is
  simply the tensor's device. On a CPU run the training device *is* host memory, so there the offload store's
  tensors (``offload_copies`` on, copies held as ShadowWeights without a module; LoRA copies are never offloaded)
  count as "host": the device column then reads what would stay on a GPU, and the peak column shows that
  offloading saves nothing on a CPU (the copies are in the same memory, plus a temporary module per round);
* peak memory of the option's training: on CUDA ``torch.cuda.max_memory_allocated`` (reset just before the
  trainer is built; the policy's weights, already on the device, are included), on CPU the process's peak RSS
  (``ru_maxrss``) minus its RSS just before the trainer was built, i.e. what training added to the model and data;
* seconds per optimizer step: the mean over the steps after the first (which builds the optimizer state and,
  with offloading, the copies), measured between optimizer-step ends; every SAPO step generates (one round per
  batch) and runs the reference.

Model: ``Qwen2ForCausalLM`` from a ``Qwen2Config`` of the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied embeddings), random init (seed 0), no hub access, with
``sapo.tiny``'s character tokenizer (only the vocabulary size matters for memory; ids above the character range
are never decoded). Data: ``benchmarks/speed.py``'s synthetic chat records, prompt 32 + response 32 tokens,
batch 2, token_generate_length 16, 3 optimizer steps (``max_steps=3``): short, so that all six options run in
about ten minutes on a 2-core CPU (the copies' bytes do not depend on the lengths; activations do, so use
``--prompt_len``/``--response_len``/``--token_generate_length`` for realistic peaks on a GPU).

Precision: the policy's weights are fp32 by default on CPU and GPU alike (``--dtype``), since that is where
``copies_dtype="bfloat16"`` matters; on CUDA ``--bf16`` adds mixed precision (``SAPOConfig(bf16=True)``, autocast)
for the usual fp32-master-weights setup. ``--dtype bfloat16`` trains purely in bf16 (as speed.py's gpu config
does), where the ``bf16`` option is a no-op by construction.

``--dry_run``: Qwen2 with hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, the tokenizer's own
vocabulary (107), the same lengths, 2 steps, and LoRA rank 2 (rank scaled with the hidden size, so the adapters
are a similarly small fraction of the model as at full size).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "bf16": {"copies_dtype": "bfloat16"},
    "offload": {"offload_copies": True},
    "bf16+offload": {"copies_dtype": "bfloat16", "offload_copies": True},
    "lora": {"lora": True},
    "policy-only": {"recipe": "sft"},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_RANK = 16
DRY_RUN_LORA_RANK = 2
MIB = 2**20


def _load_speed():
    """benchmarks/speed.py as a module (the same way the tests load benchmark scripts)."""
    name = "sapo_benchmark_speed"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("speed.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


speed = _load_speed()

FULL_SHAPE = replace(speed.CONFIGS["gpu"], name="qwen2-0.5b", bf16=False, prompt_len=32, response_len=32, batch=2,
                     token_generate_length=16, activation_checkpointing=False, threads=None)


def dry_run_shape(shape):
    """speed.py's dry-run shape (hidden 64, 2 layers, ...) with the character tokenizer's vocabulary."""
    return replace(speed.dry_run_shape(shape), name=f"{shape.name} (dry run)", vocab=None)


# ------------------------------------------------------------------------------------------------
# Counting the copies' bytes
# ------------------------------------------------------------------------------------------------


def placement(tensor: Any, training_device: Any, in_offload_store: bool) -> str:
    """'device' (resident with the policy) or 'host' (the offload store); see the module docstring."""
    if training_device.type != "cpu":
        return "device" if tensor.device.type == training_device.type else "host"
    return "host" if in_offload_store else "device"


def copy_memory(ema_model: Any, ema: Any, ref_model: Any, ref: Any, training_device: Any,
                offload_store: bool) -> dict[str, Any]:
    """Bytes of the EMA and reference copies by placement, each storage counted once.

    `offload_store`: whether copies held as ShadowWeights without a module live in the trainer's offload store
    (``offload_copies`` on a full fine-tune).
    """
    seen: set[tuple[str, int]] = set()
    totals = {"device": 0, "host": 0}
    pinned = 0
    dtypes: set[str] = set()
    forms: dict[str, str | None] = {}
    for name, module, shadow in (("ema", ema_model, ema), ("ref", ref_model, ref)):
        tensors = [p.data for p in module.parameters()] if module is not None else []
        tensors += list(shadow.tensors) if shadow is not None else []
        forms[name] = "module" if module is not None else ("tensors" if shadow is not None else None)
        in_store = offload_store and module is None
        for tensor in tensors:
            key = (str(tensor.device), tensor.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            nbytes = tensor.numel() * tensor.element_size()
            totals[placement(tensor, training_device, in_store)] += nbytes
            pinned += nbytes if tensor.device.type == "cpu" and tensor.is_pinned() else 0
            dtypes.add(str(tensor.dtype).replace("torch.", ""))
    return {"copies_device_bytes": totals["device"], "copies_host_bytes": totals["host"],
            "copies_pinned_bytes": pinned, "copies_dtypes": sorted(dtypes), "copies_form": forms}


def mib(nbytes: float) -> str:
    """MiB with one decimal, or three below 10 MiB (dry-run and LoRA copies are small)."""
    value = nbytes / MIB
    return f"{value:.1f}" if value >= 10 or value == 0 else f"{value:.3f}"


def parameter_bytes(module: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------------------
# One option (runs in its own process)
# ------------------------------------------------------------------------------------------------


def lora_rank(dry_run: bool) -> int:
    return DRY_RUN_LORA_RANK if dry_run else LORA_RANK


def run_option(option: str, shape: Any, settings: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    from sapo import tiny
    from sapo.config import SAPOConfig
    from sapo.trainer import SAPOTrainer

    spec = OPTIONS[option]
    tokenizer = tiny.build_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() and not settings["use_cpu"] else "cpu")
    model = speed.build_model(shape, tokenizer, device)  # fp32, or bf16 when shape.bf16 (--dtype bfloat16)
    sft = spec.get("recipe") == "sft"
    batch = 2 * shape.batch if sft else shape.batch
    steps = settings["steps"]
    records = speed.make_records(shape, batch * steps)
    speed.check_lengths(tokenizer, shape, records[0])
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        rank = lora_rank(settings["dry_run"])
        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                 task_type="CAUSAL_LM")
    meter = speed.MemoryMeter(device)
    meter.start()
    watch = speed.benchlog.CompileWatch()
    with tempfile.TemporaryDirectory() as out:
        args = SAPOConfig(
            output_dir=out, recipe=spec.get("recipe", "sapo-dpo"), beta=0.1, learning_rate=5e-7,
            per_device_train_batch_size=batch, max_length=shape.max_length, max_prompt_length=shape.prompt_len,
            token_generate_length=shape.token_generate_length, **speed.PAPER_SAMPLING, max_steps=steps,
            logging_steps=steps, save_strategy="no", report_to="none", bf16=settings["bf16"],
            **speed.checkpointing(shape), seed=0, disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=device.type == "cpu", copies_dtype=spec.get("copies_dtype", "auto"),
            offload_copies=spec.get("offload_copies", False),
            generation_batch_size=batch,  # one round per batch, every step (SAPO's default rounds: 64 rows)
        )
        trainer = SAPOTrainer(model=model, args=args, train_dataset=speed.sapo_records(records),
                              processing_class=tokenizer, peft_config=peft_config)
        snapshot: dict[str, Any] = {}

        class CountCopies(TrainerCallback):
            """After the first optimizer step (its time goes into that untimed step, before the timer's mark)."""

            def on_step_end(self, args, state, control, **kwargs):
                if not snapshot:
                    copies = trainer.copies
                    snapshot.update(copy_memory(copies.ema_module, copies.ema, copies.reference_module,
                                                copies.reference, trainer.args.device,
                                                trainer.args.offload_copies and copies.mode == "shards"))
                    snapshot["policy_bytes"] = parameter_bytes(trainer.policy)
                    snapshot["trainable_bytes"] = parameter_bytes(trainer.policy, trainable_only=True)

        trainer.add_callback(CountCopies())
        timer = speed.step_timer_callback()
        trainer.add_callback(timer)
        trainer.train()
        walls, cpus = timer.durations()
    if not snapshot:
        raise RuntimeError("training ended before its first optimizer step")
    timed, timed_cpu = walls[1:] or walls, cpus[1:] or cpus
    result = {"option": option, "recipe": args.recipe, "batch": batch, "device": str(device),
              "policy_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "step_mean_s": statistics.fmean(timed), "cpu_s_per_step": statistics.fmean(timed_cpu),
              "all_steps_s": walls, "steps_timed": len(timed), **snapshot, **meter.peak(),
              "compile": watch.report(device, speed.meant_to_compile(trainer.sampler, device),
                                      getattr(trainer.sampler, "compile_error", None))}
    if peft_config is not None:
        result["lora_rank"] = peft_config.r
    return result


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"comma-separated subset of {', '.join(OPTIONS)} (default: all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the policy's weights (default float32: copies_dtype=bfloat16 then halves the copies)")
    parser.add_argument("--bf16", action="store_true",
                        help="SAPOConfig(bf16=True): mixed precision (autocast) over fp32 weights; CUDA only")
    parser.add_argument("--prompt_len", type=int, default=None, help=f"default {FULL_SHAPE.prompt_len}")
    parser.add_argument("--response_len", type=int, default=None, help=f"default {FULL_SHAPE.response_len}")
    parser.add_argument("--token_generate_length", type=int, default=None,
                        help=f"default {FULL_SHAPE.token_generate_length}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (max_steps); default 3, dry run 2")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--use_cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes: checks that everything runs")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    parser.add_argument("--jsonl", default=None,
                        help="append each option's result to this file as one JSON line as soon as it is measured")
    parser.add_argument("--_option", choices=sorted(OPTIONS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.dry_run else 3)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    args.option_list = [name.strip() for name in args.options.split(",") if name.strip()]
    unknown = sorted(set(args.option_list) - set(OPTIONS))
    if unknown:
        parser.error(f"unknown options: {', '.join(unknown)} (choose from {', '.join(OPTIONS)})")
    return args


def shape_of(args: argparse.Namespace):
    shape = replace(FULL_SHAPE, bf16=args.dtype == "bfloat16")
    shape = dry_run_shape(shape) if args.dry_run else shape
    lengths = {key: getattr(args, key) for key in ("prompt_len", "response_len", "token_generate_length")}
    return replace(shape, **{key: value for key, value in lengths.items() if value is not None})


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.steps, "bf16": args.bf16, "use_cpu": args.use_cpu, "dry_run": args.dry_run,
            "dtype": args.dtype, "threads": args.threads}


def run_option_here(args: argparse.Namespace) -> None:
    """Child process: one option, its JSON result written to --_result."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_option(args._option, shape_of(args), settings_of(args))
    args._result.write_text(json.dumps(result))
    speed.benchlog.emit(f"memory/{args._option}", result, args.jsonl)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def report(args: argparse.Namespace, shape: Any, results: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    first = next(iter(results.values()))
    cuda = first["device"].startswith("cuda")
    peak_kind = "CUDA max allocated" if cuda else "process peak RSS growth"
    precision = f"{first['policy_dtype']} weights" + (", bf16 autocast" if args.bf16 else "")
    lines = [
        f"{shape.name}: {shape.arch} hidden {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} "
        f"heads, intermediate {shape.intermediate}, vocab {shape.vocab or 'char'}; policy "
        f"{mib(first['policy_bytes'])} MiB ({precision}) on {first['device']}; prompt {shape.prompt_len} + "
        f"response {shape.response_len}, batch {shape.batch}, token_generate_length {shape.token_generate_length}, "
        f"{args.steps} steps; SAPO-DPO (loss_type sigmoid: EMA + reference)",
        f"environment: {json.dumps(env)}",
        "",
        f"| option | copies on device (MiB) | copies on host (MiB) | peak (MiB, {peak_kind}) | s/step | compile |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {mib(r['copies_device_bytes'])} | {mib(r['copies_host_bytes'])} | "
                     f"{r['peak_mib']:.0f} | {r['step_mean_s']:.2f} | "
                     f"{speed.benchlog.compile_cell(r.get('compile'))} |")
    lines.append("")
    if not cuda:
        lines.append("(CPU run: the device is host memory; 'on host' counts the offload store, so 'on device' reads "
                     "what would stay on a GPU)")
    if "default" in results:
        base = results["default"]["copies_device_bytes"]
        for name, r in results.items():
            ratio = r["copies_device_bytes"] / base if base else float("nan")
            lines.append(f"{name}: device-resident copies {ratio:.3f}x default "
                         f"({mib(r['copies_device_bytes'])} / {mib(base)} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._option:
        run_option_here(args)
        return 0
    shape = shape_of(args)
    env = environment()
    if args.bf16 and (args.use_cpu or "gpu" not in env):
        raise SystemExit("--bf16 (autocast) is for CUDA runs")
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for option in args.option_list:
        print(f"running option {option} ...", file=sys.stderr, flush=True)
        results[option] = speed.run_isolated(__file__, argv, "option", option)
    env["loadavg_end"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps({"shape": asdict(shape), "settings": settings_of(args), "environment": env,
                                         "results": results}, indent=2))
    print(report(args, shape, results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
