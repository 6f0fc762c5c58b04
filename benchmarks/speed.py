"""Speed benchmark: SAPO-DPO training steps (generation included) against TRL's DPOTrainer, same model and data.

    python benchmarks/speed.py --config cpu                                  # what `sapo train` does, on a CPU
    python benchmarks/speed.py --config cpu --sampler hf                     # SAPO with model.generate instead
    python benchmarks/speed.py --config cpu --generation_batch_size 8        # the paper's per-step flow
    python benchmarks/speed.py --config cpu --token_generate_length 64     # G = len(y)/2, the gpu config's ratio
    python benchmarks/speed.py --config gpu                                  # Qwen2-0.5B shape, bf16, one GPU
    python benchmarks/speed.py --config gpu --dry_run                        # same code path, tiny shapes (CPU ok)
    python benchmarks/speed.py --config gpu --jsonl results.jsonl            # each measurement appended as taken

Every measurement (a phase's result, each engine and mode of the gen phase, each sapo/trl ratio) is printed as
``RESULT {json}`` and appended to ``--jsonl`` the moment it is taken (``benchlog.emit``), so a run cut short keeps
what it measured; each phase also reports its dynamo frames, recompiles, graph breaks and whether CUDA graphs were
captured (``benchlog.CompileWatch``), and a failed compile of the decode step says so in its row.
``--gen_after_sapo`` runs the gen phase in the sapo phase's process once its result is out, reusing its compiled
decode step; ``--gen_round_sizes 256,64`` measures several round sizes in one gen process; ``--fail_compile``
makes torch.compile raise (the dry run's stand-in for a failed compile).

One invocation measures, on the same model, data shape and machine, each phase in a fresh subprocess (so
peak-memory numbers and allocator caches do not leak from one phase into the next):

* ``sapo``: ``SAPOTrainer`` (loss_type sigmoid = SAPO-DPO) built as ``sapo train`` builds it: no ``sampler=``, so
  the trainer makes its own engine from ``generation_engine`` (``--sampler``, default ``auto``) with the run's
  fixed shapes, and generation rounds follow ``SAPOConfig``'s rule unless ``--generation_batch_size`` is given.
  Every step replays a batch from the buffer, so each step trains on ``batch`` (real, rejected) pairs, and
  generation rounds happen every ``generation_round_size / batch`` steps. Warm-up (the first rounds; on a GPU
  the decode step's compilation) is reported apart, with a breakdown of the timed step.
* ``trl``: TRL's ``DPOTrainer`` on the same model (same weights, seed), the same batch of pairs of the same
  lengths, ``ref_model=`` passed explicitly (a copy of the policy, as SAPO's reference is).
* ``gen``: generation alone, our ``StaticCacheSampler`` vs ``model.generate`` (``HFGenerateSampler``), each built
  as the trainer builds it, on as many rows as one SAPO generation round decodes, prompt-length contexts, G new
  tokens each: greedy (both must return the same tokens; no EOS so that every row decodes G tokens) and sampled
  (temperature 0.7, top-k 50, top-p 0.95); the first (compiling, warming up) call is reported apart.

Step time is measured between consecutive optimizer-step ends (so data loading, SAPO's generation, the loss,
backward, optimizer and EMA update are all inside) after ``--warmup`` steps; SAPO's timed window is a whole
number of generation periods, so that the mean includes exactly the amortised generation cost. The ratio line
uses means; medians are printed too (with generation_batch_size > batch most SAPO steps do not generate, so
the median alone would hide generation). Tokens/s counts the tokens trained on per step: 2 x batch x (prompt +
response). Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the phase (weights, optimizer state,
reference/EMA copies and activations); on CPU the phase's peak RSS (``resource.getrusage().ru_maxrss``) minus
its RSS just before the trainer was built (after the model and data), i.e. what training added.

Data: synthetic chat records, random letters/digits/punctuation (never ``<`` or ``|``, so no text can look like
a special token) rendered by ``sapo.tiny``'s character tokenizer, where one character is one token: prompts are
exactly ``prompt_len`` tokens with the chat template, responses ``response_len`` tokens with EOS. TRL gets the
same records in its conversational prompt/chosen/rejected format (rejected: another random response of the same
length), which it renders with the same template, so both trainers see sequences of identical lengths. The gpu
config keeps that character tokenizer but gives the model the real Qwen2 vocabulary size (151936): only the
embedding/LM-head size matters for cost, no hub tokenizer is needed offline, and sampled ids above the
character range are fine because neither trainer decodes text.

Configurations (``--dry_run`` shrinks the model and shapes, keeping architecture, dtype and every code path):

* ``cpu``: Llama-shaped, hidden 256, 4 layers, 4 heads, vocab of the character tokenizer, fp32; prompt 128 +
  response 128 tokens; batch 8; token_generate_length 256, so G = min(256, len(y)) = 128 and k = 0.
* ``gpu``: Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied
  embeddings), bf16 weights; prompt 512 + response 512; batch 8; 256-token segments; activation checkpointing
  on for both trainers. Training is pure bf16 (weights and AdamW state in bf16) with ``bf16=False`` in both
  trainers' arguments, as the weights are bf16 already; ``--autocast`` sets ``bf16=True`` instead.

The last line is ``sapo/trl step ratio: X.XX`` (median over ``--repeats`` back-to-back sapo/trl pairs of the
ratio of mean step times); the line before gives the same ratio in process CPU time, which on a CPU machine
shared with other work varies much less than wall time. Torch runs single-threaded on the cpu config unless
``--threads`` says otherwise (on a shared 2-core machine two intra-op threads were several times slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlog  # noqa: E402 (a sibling script, found through the path line above)

RESULT_PREFIX = "SPEED_RESULT "
TEXT_CHARACTERS = string.ascii_letters + string.digits + " .,;:!?-+=*/()[]{}'\"#%&@^_~"
PAPER_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}


@dataclass(frozen=True)
class Shape:
    """Everything that defines a configuration's workload."""

    name: str
    arch: str  # llama | qwen2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the character tokenizer's size
    tie_embeddings: bool
    bf16: bool
    prompt_len: int
    response_len: int
    batch: int
    token_generate_length: int
    activation_checkpointing: bool
    threads: int | None  # torch intra-op threads; None leaves torch's default

    @property
    def max_length(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def segment(self) -> int:
        return min(self.token_generate_length, self.response_len)


CONFIGS: dict[str, Shape] = {
    "cpu": Shape("cpu", "llama", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, vocab=None,
                 tie_embeddings=True, bf16=False, prompt_len=128, response_len=128, batch=8,
                 token_generate_length=256, activation_checkpointing=False, threads=1),
    "gpu": Shape("gpu", "qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                 tie_embeddings=True, bf16=True, prompt_len=512, response_len=512, batch=8,
                 token_generate_length=256, activation_checkpointing=True, threads=None),
}


def dry_run_shape(shape: Shape) -> Shape:
    """Same architecture, dtype, vocabulary and code paths; tiny enough for a CPU in about a minute."""
    return replace(shape, hidden=64, layers=2, heads=4, kv_heads=2 if shape.kv_heads < shape.heads else 4,
                   intermediate=128, prompt_len=32, response_len=32, batch=2, token_generate_length=16)


# ------------------------------------------------------------------------------------------------
# Shared pieces: model, data, devices, memory
# ------------------------------------------------------------------------------------------------


def model_config(shape: Shape, tokenizer: Any):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                  intermediate_size=shape.intermediate, tie_word_embeddings=shape.tie_embeddings,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0)
    if shape.arch == "qwen2":
        return Qwen2Config(**common, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    return LlamaConfig(**common, max_position_embeddings=max(512, shape.max_length))


def build_model(shape: Shape, tokenizer: Any, device: Any):
    """Randomly initialised, seed 0, identical for every phase."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(shape, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    if shape.bf16:
        model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def parameter_count(shape: Shape, tokenizer: Any) -> int:
    """Parameters of the configuration's model, counted on the meta device (nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer))
    return sum(p.numel() for p in model.parameters())


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(TEXT_CHARACTERS) for _ in range(length))


def make_records(shape: Shape, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat records whose prompt renders to `prompt_len` tokens and whose responses are `response_len` tokens.

    The template writes ``<s><|user|>`` before and ``<|assistant|>`` after the prompt (3 tokens) and ``</s>``
    after the response (1 token).
    """
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        prompt = random_text(rng, shape.prompt_len - 3)
        chosen, rejected = random_text(rng, shape.response_len - 1), random_text(rng, shape.response_len - 1)
        records.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
    return records


def sapo_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": r["prompt"] + r["chosen"]} for r in records]


def check_lengths(tokenizer: Any, shape: Shape, record: dict[str, Any]) -> None:
    prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(record["prompt"] + record["chosen"], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if (len(prompt_ids), len(full_ids)) != (shape.prompt_len, shape.max_length):
        raise AssertionError(f"synthetic data has {len(prompt_ids)}+{len(full_ids) - len(prompt_ids)} tokens, "
                             f"expected {shape.prompt_len}+{shape.response_len}")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def current_rss_kib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class MemoryMeter:
    """Peak memory of a phase: CUDA max_memory_allocated, or on CPU peak RSS minus the RSS at start()."""

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.baseline_kib = 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline_kib = current_rss_kib()

    def peak(self) -> dict[str, Any]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "memory_kind": "cuda max_memory_allocated"}
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"peak_mib": (peak_kib - self.baseline_kib) / 1024, "memory_kind": "cpu peak RSS delta"}


def step_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Timestamps at every optimizer-step end (added last, so it runs after SAPO's EMA update)."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.start = 0.0
            self.cpu_start = 0.0
            self.hooks: list[Any] = []

        @staticmethod
        def _cpu_seconds() -> float:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start, self.cpu_start = time.perf_counter(), self._cpu_seconds()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(self._cpu_seconds())
            for hook in self.hooks:
                hook()

        def durations(self) -> tuple[list[float], list[float]]:
            walls = [b - a for a, b in zip([self.start, *self.ends[:-1]], self.ends, strict=True)]
            cpus = [b - a for a, b in zip([self.cpu_start, *self.cpu_ends[:-1]], self.cpu_ends, strict=True)]
            return walls, cpus

    return StepTimer()


class TimedSampler:
    """Wraps the trainer's own sampler to record the time and tokens of every generation round; every other
    attribute (`keeps_state`, `release`, ...) is the inner sampler's, so the trainer treats it the same."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.tokens = 0
        self.rounds = 0
        self.round_seconds: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sample(self, model, contexts, max_new_tokens):
        synchronize()
        started = time.perf_counter()
        out = self.inner.sample(model, contexts, max_new_tokens)
        synchronize()
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.round_seconds.append(elapsed)
        self.tokens += sum(len(row) for row in out)
        self.rounds += 1
        return out


def engine_description(sampler: Any, device: Any) -> dict[str, Any]:
    """Which engine a sampler (the trainer's, or one built like it) is, and how the static one decodes."""
    from sapo.generation import StaticCacheSampler

    if not isinstance(sampler, StaticCacheSampler):
        return {"engine": "hf"}
    failed = sampler.compile_failed
    engine = "hf (after a failed compile)" if failed and sampler.fallback is not None else "static"
    return {"engine": engine, "static_compiled": sampler.uses_compile(device), "static_compile_failed": failed,
            "static_compile_error": sampler.compile_error, "rows": sampler.batch_size, "cache_len": sampler.cache_len,
            "cache_spans": sampler.cache_spans, "state_releases": sampler.releases}


def meant_to_compile(sampler: Any, device: Any) -> bool | None:
    """Whether the engine compiles its decode step (or tried to and failed); None for `generate`."""
    from sapo.generation import StaticCacheSampler

    if not isinstance(sampler, StaticCacheSampler):
        return None
    return sampler.compile_failed or sampler.uses_compile(device)


def summarize_steps(walls: list[float], cpus: list[float], skip: int, tokens_per_step: int) -> dict[str, Any]:
    timed, timed_cpu = walls[skip:], cpus[skip:]
    mean = statistics.fmean(timed)
    return {"steps_timed": len(timed), "step_mean_s": mean, "step_median_s": statistics.median(timed),
            "step_min_s": min(timed), "step_max_s": max(timed), "cpu_s_per_step": statistics.fmean(timed_cpu),
            "tokens_per_s": tokens_per_step / mean, "all_steps_s": walls}


def checkpointing(shape: Shape) -> dict[str, bool]:
    """The same activation checkpointing for both trainers (TRL's own default is on, TrainingArguments' off).

    Only the transformers >= 5.23 name: `gradient_checkpointing` is its deprecated alias (a FutureWarning), and
    TRL's config, a TrainingArguments, mirrors the new name into the old one it reads.
    """
    return {"activation_checkpointing": shape.activation_checkpointing}


def set_threads(shape: Shape, threads: int | None) -> None:
    import torch

    threads = threads if threads is not None else shape.threads
    if threads:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Phases (each runs in its own process)
# ------------------------------------------------------------------------------------------------


def sapo_config(shape: Shape, options: dict[str, Any], **extra: Any):
    """SAPO's arguments: what `sapo train` uses for this shape, with only the flags given changed (engine, round)."""
    from sapo.config import SAPOConfig

    return SAPOConfig(
        loss_type="sigmoid", beta=0.1, learning_rate=5e-7, per_device_train_batch_size=shape.batch,
        max_length=shape.max_length, max_prompt_length=shape.prompt_len,
        token_generate_length=shape.token_generate_length, generation_engine=options["sampler"],
        generation_batch_size=options["generation_batch_size"], **PAPER_SAMPLING, report_to="none",
        cache_reference_logps=options["reference_cache"] == "on", pair_attention=options["pair_attention"],
        bf16=options["autocast"], **checkpointing(shape), seed=0, disable_tqdm=True, dataloader_num_workers=0,
        **extra)


def set_compile(sampler: Any, flag: str) -> None:
    """`--compile on|off` overrides the static engine's own choice (auto: compiled on CUDA only)."""
    if flag != "auto" and hasattr(sampler, "uses_compile"):
        sampler.compile = flag == "on"


def reused_reference_shares(recipe: Any, step: Callable[[], int]) -> list[tuple[int, float]]:
    """(optimizer step, share of the drawn pairs whose reference scores were remembered) per micro-step."""
    shares: list[tuple[int, float]] = []
    lookup = recipe.cached_reference_logps

    def counting(entry_ids):
        scores = lookup(entry_ids)
        shares.append((step(), sum(s is not None for s in scores) / max(1, len(scores))))
        return scores

    recipe.cached_reference_logps = counting
    return shares


def phase_sapo(shape: Shape, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sapo import tiny
    from sapo.trainer import SAPOTrainer

    tokenizer = tiny.build_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() and not options["use_cpu"] else "cpu")
    model = build_model(shape, tokenizer, device)
    batch = shape.batch
    round_size = sapo_config(shape, options, output_dir="unused", use_cpu=device.type == "cpu").generation_round_size
    period = max(1, math.ceil(round_size / batch))
    timed = math.ceil(options["steps"] / period) * period
    # Rounds happen at steps 1 (the buffer is empty), 1 + period, 1 + 2 period, ...: warm up past the first
    # full round (it may compile the decode step), then time whole periods only.
    warmup = max(options["warmup"], 1 + period if period > 1 else 1)
    max_steps = warmup + timed
    # A dataset of at least 4 rounds: the trainer caps a round at a quarter of an epoch (a short dataset still gets
    # several rounds), which at 17 steps' worth of records halved the default round (32 rows every 4 steps).
    records = make_records(shape, max(batch * max_steps, 4 * round_size))
    check_lengths(tokenizer, shape, records[0])
    meter = MemoryMeter(device)
    meter.start()
    watch = benchlog.CompileWatch()
    with tempfile.TemporaryDirectory() as out:
        args = sapo_config(shape, options, output_dir=out, max_steps=max_steps, logging_steps=max_steps,
                           save_strategy="no", use_cpu=device.type == "cpu")
        # No sampler= argument: the trainer builds its engine exactly as `sapo train` does.
        trainer = SAPOTrainer(model=model, args=args, train_dataset=sapo_records(records), processing_class=tokenizer)
        set_compile(trainer.sampler, options["compile"])
        sampler = trainer.sampler = TimedSampler(trainer.sampler)
        ema_seconds = time_ema_updates(device)
        # (optimizer step, seconds) of each call: a step may run the reference forward once or not at all (every
        # drawn pair's reference scores remembered), so calls are attributed to steps, not counted.
        training_seconds: list[tuple[int, float]] = []  # Trainer.training_step: pairs (generation included), loss,
        reference_seconds: list[tuple[int, float]] = []  # backward; the reference forward
        step_now = lambda: trainer.state.global_step  # noqa: E731 (read at each call)
        timed_calls(trainer, "training_step", training_seconds, step_now)
        timed_calls(trainer.copies, "reference_forward", reference_seconds, step_now)
        reused = reused_reference_shares(trainer.recipe, step_now)
        timer = step_timer_callback()
        generation_per_step: list[tuple[float, int]] = []  # (seconds, tokens) generated during each step
        last = {"seconds": 0.0, "tokens": 0}

        def record_generation() -> None:
            generation_per_step.append((sampler.seconds - last["seconds"], sampler.tokens - last["tokens"]))
            last.update(seconds=sampler.seconds, tokens=sampler.tokens)

        timer.hooks.append(record_generation)
        trainer.add_callback(timer)
        trainer.train()
        walls, cpus = timer.durations()
    result = summarize_steps(walls, cpus, warmup, 2 * batch * shape.max_length)
    result["breakdown_s"] = step_breakdown(
        walls, warmup, sum(seconds for seconds, _ in generation_per_step[warmup:]),
        sum(seconds for step, seconds in training_seconds if step >= warmup),
        sum(seconds for step, seconds in reference_seconds if step >= warmup),
        sum(ema_seconds[warmup:]))
    timed_generation = sum(seconds for seconds, _ in generation_per_step[warmup:])
    timed_tokens = sum(tokens for _, tokens in generation_per_step[warmup:])
    rounds = sampler.round_seconds
    result.update(meter.peak())
    result.update({
        "sampler": options["sampler"], "pair_attention": options["pair_attention"],
        "generation_batch_size": round_size, "generation_period_steps": period,
        "warmup_steps": warmup, "warmup_s": sum(walls[:warmup]),
        "generation_share": timed_generation / sum(walls[warmup:]),
        "generation_rounds": sampler.rounds, "generated_tokens": sampler.tokens,
        "generation_tokens_per_s": timed_tokens / timed_generation if timed_generation else float("nan"),
        "first_round_s": rounds[0] if rounds else float("nan"),
        "full_round_s": rounds[1] if len(rounds) > 1 else float("nan"),  # the first full round: compiles on CUDA
        "steady_round_s": statistics.fmean(rounds[2:]) if len(rounds) > 2 else float("nan"),
        "device": str(device),
        "ema_update_ms": 1000 * statistics.mean(ema_seconds) if ema_seconds else float("nan"),
        "reference_reused": statistics.fmean([share for step, share in reused if step >= warmup] or [0.0]),
        "pair_layout": trainer.scoring.layout,
        **engine_description(sampler.inner, device),
        "compile": watch.report(device, meant_to_compile(sampler.inner, device),
                                getattr(sampler.inner, "compile_error", None)),
    })
    result["ema_update_share"] = result["ema_update_ms"] / 1000 / result["step_mean_s"]
    return result


def phase_trl(shape: Shape, options: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from sapo import tiny

    tokenizer = tiny.build_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() and not options["use_cpu"] else "cpu")
    model = build_model(shape, tokenizer, device)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    warmup = max(options["warmup"], 1)
    max_steps = warmup + options["steps"]
    records = make_records(shape, shape.batch * max_steps)
    check_lengths(tokenizer, shape, records[0])
    meter = MemoryMeter(device)
    meter.start()
    watch = benchlog.CompileWatch()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, loss_type=["sigmoid"], beta=0.1, learning_rate=5e-7,
            per_device_train_batch_size=shape.batch, max_length=shape.max_length, max_steps=max_steps,
            logging_steps=max_steps, save_strategy="no", report_to="none", bf16=options["autocast"],
            **checkpointing(shape),
            seed=0, disable_tqdm=True, dataloader_num_workers=0, use_cpu=device.type == "cpu", disable_dropout=True,
        )
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                             train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer)
        lengths = {len(trainer.train_dataset[0][key]) for key in ("chosen_ids", "rejected_ids")}
        if len(trainer.train_dataset[0]["prompt_ids"]) != shape.prompt_len or lengths != {shape.response_len}:
            raise AssertionError("TRL tokenized the synthetic data to other lengths than SAPO")
        timer = step_timer_callback()
        trainer.add_callback(timer)
        trainer.train()
        walls, cpus = timer.durations()
    result = summarize_steps(walls, cpus, warmup, 2 * shape.batch * shape.max_length)
    result.update(meter.peak())
    result.update({"warmup_steps": warmup, "device": str(device), "compile": watch.report(device, None)})
    return result


def phase_gen(shape: Shape, options: dict[str, Any]) -> dict[str, Any]:
    """Generation alone at each round size of `gen_round_sizes` (default: the run's own), one after the other in
    this one warm process: the model is built once, and a later size reuses what compiling an earlier one left
    (dynamo's graphs where the shapes agree, the inductor cache). The first size's result carries the others in
    `more_rounds`."""
    import torch

    from sapo import tiny

    tokenizer = tiny.build_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() and not options["use_cpu"] else "cpu")
    model = build_model(shape, tokenizer, device).eval()
    sizes = options.get("gen_round_sizes") or [options["generation_batch_size"]]
    results = [gen_round(shape, {**options, "generation_batch_size": size}, tokenizer, model, device)
               for size in sizes]
    if len(results) > 1:
        results[0]["more_rounds"] = results[1:]
    return results[0]


def gen_round(shape: Shape, options: dict[str, Any], tokenizer: Any, model: Any, device: Any) -> dict[str, Any]:
    """Generation alone, each engine built as the trainer builds it (rows of a round, cache length), on as many
    rows as one SAPO round of `options` decodes."""
    import torch

    from sapo import tiny
    from sapo.generation import SamplingSettings, auto_engine, make_sampler

    args = sapo_config(shape, options, output_dir="unused", use_cpu=device.type == "cpu")
    rows = args.generation_rows
    rng = random.Random(1)
    low = len(tiny.SPECIAL_TOKENS)
    contexts = [[rng.randrange(low, len(tokenizer)) for _ in range(shape.prompt_len)] for _ in range(rows)]
    new_tokens = shape.segment
    result: dict[str, Any] = {"rows": rows, "context_len": shape.prompt_len, "new_tokens": new_tokens,
                              "cache_len": args.generation_cache_len,
                              "auto_engine": auto_engine(device, True, model.generation_config)}
    outputs: dict[str, list[list[int]]] = {}
    modes = {"greedy": SamplingSettings(do_sample=False), "sampled": SamplingSettings(**PAPER_SAMPLING)}
    for mode in options["gen_modes"]:
        settings = modes[mode]
        for name in options["gen_engines"]:
            extra = {"check_every": options["check_every"], "cache_len": args.generation_cache_len} \
                if name == "static" else {}
            # no EOS: every row decodes all `new_tokens`, so both engines do exactly the same work
            sampler = make_sampler(name, settings, tokenizer.pad_token_id, set(), rows, device=device, **extra)
            set_compile(sampler, options["compile"])
            watch = benchlog.CompileWatch()
            times = []
            for repeat in range(options["gen_warmup"] + options["gen_repeats"]):
                torch.manual_seed(repeat)
                synchronize()
                started = time.perf_counter()
                out = sampler.sample(model, contexts, new_tokens)
                synchronize()
                times.append(time.perf_counter() - started)
            steady = statistics.median(times[options["gen_warmup"]:])
            produced = sum(len(row) for row in out)
            result[f"{mode}_{name}_s"] = steady
            result[f"{mode}_{name}_first_s"] = times[0]  # compile and warm-up included
            result[f"{mode}_{name}_tokens_per_s"] = produced / steady
            outputs[f"{mode}_{name}"] = out
            result[f"{mode}_{name}_compile"] = watch.report(device, meant_to_compile(sampler, device),
                                                            getattr(sampler, "compile_error", None))
            if name == "static":
                result["static_compiled"] = sampler.uses_compile(device)
                result["static_compile_failed"] = sampler.compile_failed
                result["static_compile_error"] = sampler.compile_error
            benchlog.emit(f"gen/{rows}/{mode}/{name}", {
                "rows": rows, "context_len": shape.prompt_len, "new_tokens": new_tokens, "seconds": steady,
                "first_call_s": times[0], "tokens_per_s": produced / steady,
                "engine": engine_description(sampler, device)["engine"],
                "compile": result[f"{mode}_{name}_compile"]}, options.get("jsonl"))
    if {"greedy_hf", "greedy_static"} <= set(outputs):
        same = sum(a == b for a, b in zip(outputs["greedy_hf"], outputs["greedy_static"], strict=True))
        result["greedy_identical_rows"] = f"{same}/{rows}"
    result["device"] = str(device)
    return result


PHASES = {"sapo": phase_sapo, "trl": phase_trl, "gen": phase_gen}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--sampler", choices=("auto", "static", "hf"), default="auto",
                        help="SAPO's generation_engine (default auto, as `sapo train`)")
    parser.add_argument("--generation_batch_size", type=int, default=None,
                        help="SAPO examples per generation round (default: SAPOConfig's rule, as `sapo train`: "
                             "whole batches of at least 64 rows)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile of the static engine's decode step (auto: its own choice, CUDA only)")
    parser.add_argument("--token_generate_length", type=int, default=None,
                        help="SAPO's segment length G (default: the config's, 256 as SAPOConfig; on the cpu config "
                             "G = min(256, 128) rewrites whole responses; 64 gives the gpu config's G/len of 1/2)")
    parser.add_argument("--check_every", type=int, default=16, help="static sampler: steps between EOS checks")
    parser.add_argument("--pair_attention", choices=("auto", "flex", "dense"), default="auto",
                        help="how packed pairs attend (sapo's pair_attention; auto: FlexAttention on CUDA)")
    parser.add_argument("--reference_cache", choices=("on", "off"), default="on",
                        help="SAPOConfig.cache_reference_logps (default on, as `sapo train`): off runs the reference "
                             "on every drawn pair")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps (SAPO rounds up to whole generation periods); default 6, "
                             "dry run 1")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2, dry run 1)")
    parser.add_argument("--gen_repeats", type=int, default=None, help="timed generation repeats (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for the cpu config, torch's default for gpu)")
    parser.add_argument("--phases", default="sapo,trl,gen", help="comma-separated subset of sapo,trl,gen")
    parser.add_argument("--gen_modes", default="greedy,sampled", help="gen phase: subset of greedy,sampled")
    parser.add_argument("--gen_engines", default="hf,static", help="gen phase: subset of hf,static")
    parser.add_argument("--gen_round_sizes", default="",
                        help="gen phase: comma-separated round sizes (examples) measured one after the other in one "
                             "process, e.g. 256,64 (default: the run's generation_batch_size)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the sapo and trl phases this many times (back to back) and report the median "
                             "of the per-run ratios; helps on a machine shared with other work")
    parser.add_argument("--use_cpu", action="store_true", help="run on the CPU even if CUDA is available")
    parser.add_argument("--autocast", action="store_true",
                        help="bf16=True (autocast) in both trainers' arguments; default off: the bf16 configs hold "
                             "their weights in bf16 already (pure bf16 training for both)")
    parser.add_argument("--dry_run", action="store_true",
                        help="tiny shapes, one warm-up and one timed step: checks that everything runs")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    parser.add_argument("--jsonl", default=None,
                        help="append each measurement to this file as one JSON line as soon as it is taken")
    parser.add_argument("--gen_after_sapo", action="store_true",
                        help="run the gen phase in the sapo phase's process, after its training (and after its "
                             "result is written): generation at the run's round size reuses the compiled decode step "
                             "instead of compiling it again in a fresh process")
    parser.add_argument("--fail_compile", action="store_true",
                        help="make torch.compile raise (a stand-in for a compile failure on the device), to check "
                             "that the engine's fallback reports itself")
    parser.add_argument("--_phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps if args.steps is not None else (1 if dry else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 2)
    args.gen_repeats = args.gen_repeats if args.gen_repeats is not None else (1 if dry else 3)
    args.gen_warmup = 1
    args.gen_modes = [m for m in args.gen_modes.split(",") if m]
    args.gen_engines = [e for e in args.gen_engines.split(",") if e]
    if not set(args.gen_modes) <= {"greedy", "sampled"} or not set(args.gen_engines) <= {"hf", "static"}:
        parser.error("--gen_modes takes greedy,sampled and --gen_engines hf,static")
    args.gen_round_sizes = [int(size) for size in args.gen_round_sizes.split(",") if size.strip()]
    if dry:  # rounds of two batches, so that a dry run also goes through a queued round in a few steps
        cap = 2 * dry_run_shape(CONFIGS[args.config]).batch
        args.generation_batch_size = min(args.generation_batch_size or 2 ** 31, cap)
        # each size capped too, halving the cap per size so that several sizes stay distinct (256,64 -> 4,2)
        args.gen_round_sizes = list(dict.fromkeys(min(size, cap // (2 ** i)) or 1
                                                  for i, size in enumerate(args.gen_round_sizes)))
    return args


def shape_of(args: argparse.Namespace) -> Shape:
    shape = dry_run_shape(CONFIGS[args.config]) if args.dry_run else CONFIGS[args.config]
    if args.token_generate_length is not None:
        shape = replace(shape, token_generate_length=args.token_generate_length)
    return shape


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("sampler", "generation_batch_size", "compile", "check_every", "steps", "warmup", "gen_repeats",
            "gen_warmup", "gen_modes", "gen_engines", "use_cpu", "autocast", "reference_cache", "pair_attention",
            "jsonl", "gen_round_sizes")
    return {key: getattr(args, key) for key in keys}


def run_phase_here(args: argparse.Namespace) -> None:
    """Child process: run one phase, write its JSON result."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    shape = shape_of(args)
    set_threads(shape, args.threads)
    if args.fail_compile:
        fail_compile()
    result = PHASES[args._phase](shape, options_of(args))
    if args._phase != "gen":  # gen emits each of its measurements as it takes them
        benchlog.emit(f"{args.config}/{args._phase}", result, args.jsonl)
    if args._phase == "sapo" and args.gen_after_sapo:  # the warm process: its compiled decode step is reused
        result["gen_after"] = phase_gen(shape, options_of(args))
    args._result.write_text(json.dumps(result))


def fail_compile() -> None:
    """The stand-in for a compile failure: torch.compile raises as a broken backend would, so that a dry run
    shows the "auto" engine's fallback to generate reporting itself (warning, table, JSON)."""
    import torch

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile disabled by --fail_compile (a stand-in for a failed compile)")

    torch.compile = failing


def run_isolated(script: str, argv: list[str], kind: str, name: str) -> dict[str, Any]:
    """Run `script` again in a fresh Python process with `argv --_<kind> <name>` and return the JSON result it
    writes, so peak-memory numbers and allocator caches of one phase (or option) cannot leak into the next."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, os.path.abspath(script), *argv, f"--_{kind}", name, "--_result", str(result_file)]
        started = time.perf_counter()
        returncode = stream(command)
        if returncode != 0 or not result_file.exists():
            raise SystemExit(f"{kind} {name} failed (exit status {returncode})")
        result = json.loads(result_file.read_text())
        result[f"{kind}_wall_s"] = time.perf_counter() - started
        return result


def stream(command: list[str]) -> int:
    """Run `command`, passing its output lines through as they come (its RESULT lines are measurements: a timeout
    of this process must not hold them back); the child is ended with this process (SIGTERM from `timeout`)."""
    import signal

    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def end(signum: int, frame: Any) -> None:
        child.terminate()
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, end)
    try:
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        signal.signal(signal.SIGTERM, previous)


def environment() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def step_row(label: str, r: dict[str, Any]) -> str:
    return (f"{label:<40} {r['step_mean_s']:>11.3f} {r['step_median_s']:>9.3f} {r['cpu_s_per_step']:>10.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['peak_mib']:>9.0f}")


def timed_calls(owner: Any, name: str, seconds: list[tuple[int, float]], step: Callable[[], int]) -> None:
    """Replace `owner.name` (an instance's method) by a synchronised timer around it that appends (`step()` at the
    call, seconds) to `seconds`."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        synchronize()
        started, at = time.perf_counter(), step()
        try:
            return original(*args, **kwargs)
        finally:
            synchronize()
            seconds.append((at, time.perf_counter() - started))

    setattr(owner, name, timed)


def step_breakdown(walls: list[float], warmup: int, generation: float, training: float, reference: float,
                   ema: float) -> dict[str, float]:
    """Seconds per timed step spent generating, in the reference forward, in the rest of the training step (the
    policy's forward and backward, the loss), in the EMA update, and elsewhere (optimizer, data, callbacks)."""
    steps = len(walls) - warmup
    total = sum(walls[warmup:])
    policy = training - generation - reference
    return {"generation": generation / steps, "reference": reference / steps, "policy": policy / steps,
            "ema": ema / steps, "other": (total - training - ema) / steps}


def time_ema_updates(device: Any) -> list[float]:
    """Wall seconds of every EMA update (`sapo.ema.ema_update_`, the fused lerp), synchronised on CUDA."""
    import torch

    import sapo.ema

    seconds: list[float] = []
    original = sapo.ema.ema_update_

    def timed(ema, params, beta):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        original(ema, params, beta)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)

    sapo.ema.ema_update_ = timed
    return seconds


def gen_report(args: argparse.Namespace, g: dict[str, Any]) -> list[str]:
    """The lines of one round size of the gen phase."""
    lines: list[str] = []
    failed = f" (torch.compile FAILED: {g.get('static_compile_error')})" if g.get("static_compile_failed") else ""
    lines.append(f"generation alone ({g['rows']} rows = one SAPO round, context {g['context_len']}, "
                 f"{g['new_tokens']} new tokens, no EOS; static cache {g['cache_len']} when compiled; static "
                 f"compiled: {g.get('static_compiled', '-')}{failed}; generation_engine auto picks "
                 f"{g['auto_engine']}; median of {args.gen_repeats} after a warm-up call):")
    for mode in args.gen_modes:
        cells = [f"  {mode:<8}"]
        for name, label in (("hf", "generate"), ("static", "static")):
            if f"{mode}_{name}_s" in g:
                cells.append(f"{label} {g[f'{mode}_{name}_tokens_per_s']:>9.0f} tokens/s "
                             f"(first call {g[f'{mode}_{name}_first_s']:.2f} s)")
        if f"{mode}_hf_s" in g and f"{mode}_static_s" in g:
            cells.append(f"speed-up {g[f'{mode}_static_tokens_per_s'] / g[f'{mode}_hf_tokens_per_s']:.2f}x")
        lines.append("   ".join(cells))
    for mode in args.gen_modes:
        for name in ("hf", "static"):
            if f"{mode}_{name}_compile" in g:
                lines.append(f"  compile {mode} {name}: {benchlog.compile_cell(g[f'{mode}_{name}_compile'])}")
    if "greedy_identical_rows" in g:
        lines.append(f"  greedy rows identical to generate: {g['greedy_identical_rows']}")
    return lines


def report(args: argparse.Namespace, shape: Shape, results: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [f"config {args.config}{' (dry run)' if args.dry_run else ''}: {shape.arch} hidden {shape.hidden}, "
             f"{shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab or 'char'}, "
             f"{'bf16' if shape.bf16 else 'fp32'}; prompt {shape.prompt_len} + response {shape.response_len}, "
             f"batch {shape.batch}, G {shape.segment}, activation checkpointing {shape.activation_checkpointing}",
             f"environment: {json.dumps(env)}; torch threads: {args.threads or shape.threads or 'default'}",
             f"model parameters: {results['params']['count'] / 1e6:.1f} M (full-size config: "
             f"{results['params']['full_size'] / 1e6:.1f} M)",
             f"{'phase':<40} {'step mean s':>11} {'median s':>9} {'cpu-s/step':>10} {'tokens/s':>9} {'peak MiB':>9}"]
    runs = results["runs"]
    for index, run in enumerate(runs):
        suffix = f" (run {index + 1})" if len(runs) > 1 else ""
        if "sapo" in run:
            r = run["sapo"]
            lines.append(step_row(f"SAPO-DPO [{r['engine']}, gen batch {r['generation_batch_size']}]{suffix}", r))
        if "trl" in run:
            lines.append(step_row(f"TRL DPOTrainer{suffix}", run["trl"]))
    first = runs[0]
    timed = [f"{name} {first[name]['steps_timed']} after {first[name]['warmup_steps']} warm-up"
             for name in ("sapo", "trl") if name in first]
    if timed:
        kind = (first.get("sapo") or first["trl"])["memory_kind"]
        lines.append(f"(peak memory: {kind}; steps timed: {', '.join(timed)})")
    for index, run in enumerate(runs):
        if "sapo" in run:
            r = run["sapo"]
            suffix = f" (run {index + 1})" if len(runs) > 1 else ""
            lines.append(f"SAPO generation{suffix}: engine {r['engine']} (generation_engine {r['sampler']})"
                         + (f", compiled decode: {r['static_compiled']} (compiled shape: {r['rows']} rows x cache "
                            f"{r['cache_len']})"
                            if "static_compiled" in r else "")
                         + (f" (torch.compile FAILED: {r.get('static_compile_error')}; decoded with generate)"
                            if r.get("static_compile_failed") else "")
                         + f"; {r['generation_share'] * 100:.1f}% of timed step time, "
                         f"{r['generation_tokens_per_s']:.0f} tokens/s in the timed steps (tokens up to EOS), "
                         f"{r['generation_rounds']} rounds in all, one every {r['generation_period_steps']} steps")
            lines.append(f"SAPO warm-up{suffix} (not in the step times): {r['warmup_steps']} steps, "
                         f"{r['warmup_s']:.2f} s; generation rounds: first (one batch) {r['first_round_s']:.2f} s, "
                         f"first full (compiles when compiled) {r['full_round_s']:.2f} s, "
                         f"later full rounds {r['steady_round_s']:.2f} s each")
            lines.append(f"SAPO compile{suffix}: {benchlog.compile_cell(r.get('compile'))}")
            lines.append(f"SAPO pair scoring{suffix}: {r.get('pair_layout', 'not recorded')} "
                         f"(pair_attention {r.get('pair_attention', 'auto')})")
            lines.append(f"SAPO EMA update{suffix}: {r['ema_update_ms']:.2f} ms per optimizer step, "
                         f"{r['ema_update_share'] * 100:.2f}% of the mean step")
            parts = r["breakdown_s"]
            lines.append(f"SAPO step breakdown{suffix} (s per timed step): " + ", ".join(
                f"{name} {parts[name]:.3f}" for name in ("generation", "policy", "reference", "ema", "other"))
                + " (policy: the training step's forward, loss and backward less generation and reference); "
                f"{r.get('reference_reused', 0.0):.0%} of the timed steps' pairs reused remembered reference scores")
    if "gen" in results:
        for g in (results["gen"], *results["gen"].get("more_rounds", [])):
            lines.extend(gen_report(args, g))
    pairs = [run for run in runs if "sapo" in run and "trl" in run]
    if pairs:
        walls = [run["sapo"]["step_mean_s"] / run["trl"]["step_mean_s"] for run in pairs]
        cpus = [run["sapo"]["cpu_s_per_step"] / run["trl"]["cpu_s_per_step"] for run in pairs]
        if len(pairs) > 1:
            lines.append("per-run wall ratios: " + ", ".join(f"{x:.2f}" for x in walls))
        memory = [run["sapo"]["peak_mib"] / run["trl"]["peak_mib"] for run in pairs]
        lines.append(f"sapo/trl peak memory ratio: {statistics.median(memory):.2f} ({pairs[0]['sapo']['memory_kind']})")
        lines.append(f"sapo/trl process CPU-time ratio: {statistics.median(cpus):.2f} "
                     "(less sensitive than wall time to other load on a shared CPU machine)")
        lines.append(f"sapo/trl step ratio: {statistics.median(walls):.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._phase:
        run_phase_here(args)
        return 0
    shape = shape_of(args)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases: {sorted(unknown)}")
    env = environment()
    from sapo import tiny

    tokenizer = tiny.build_tokenizer()
    results: dict[str, Any] = {
        "params": {"count": parameter_count(shape, tokenizer),
                   "full_size": parameter_count(CONFIGS[args.config], tokenizer)},
        "runs": []}
    for repeat in range(args.repeats):  # sapo and trl back to back, so that each pair sees similar machine load
        run: dict[str, Any] = {}
        for phase in (p for p in phases if p != "gen"):
            print(f"running phase {phase} (run {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            run[phase] = run_isolated(__file__, argv, "phase", phase)
        results["runs"].append(run)
        if "gen_after" in run.get("sapo", {}):
            gen_after = run["sapo"].pop("gen_after")
            results.setdefault("gen", gen_after)
        if "sapo" in run and "trl" in run:
            benchlog.emit(f"{args.config}/ratio", {
                "run": repeat + 1, "step_ratio": run["sapo"]["step_mean_s"] / run["trl"]["step_mean_s"],
                "cpu_ratio": run["sapo"]["cpu_s_per_step"] / run["trl"]["cpu_s_per_step"],
                "peak_memory_ratio": run["sapo"]["peak_mib"] / run["trl"]["peak_mib"],
                "memory_kind": run["sapo"]["memory_kind"], "engine": run["sapo"]["engine"],
                "compile_failed": bool(run["sapo"].get("static_compile_failed"))}, args.jsonl)
    if "gen" in phases:
        print("running phase gen ...", file=sys.stderr, flush=True)
        results["gen"] = run_isolated(__file__, argv, "phase", "gen")
    env["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"shape": asdict(shape), "options": options_of(args), "environment": env,
                                         "results": results}, indent=2))
    print(report(args, shape, results, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
