"""The engines by name (`ENGINES`), the one "auto" picks per device (`auto_engine`), and `make_sampler`."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch
from transformers import GenerationConfig

from sapo.generation.hf import HFGenerateSampler
from sapo.generation.protocol import ENGINE_CHOICES, SamplingSettings, SegmentSampler
from sapo.generation.sampling import checkpoint_sampling
from sapo.generation.static import StaticCacheSampler

logger = logging.getLogger(__name__)

ENGINES: dict[str, type] = {"hf": HFGenerateSampler, "static": StaticCacheSampler}
"""Generation engines by the name `--generation_engine` takes; a new engine registers here."""

AUTO_ENGINES: dict[str, str] = {"cuda": "static", "cpu": "static"}
"""The engine "auto" picks per device type, from `benchmarks/speed.py --config cpu --phases gen` (docs/results/speed.md,
"Generation alone"): on CPU, at the 64 rows of a default generation round, the static loop (eager) decoded 1.64x
(greedy) and 1.60x (sampled) as many tokens per second as `generate` (a quiet run); on CUDA it is compiled with
CUDA graphs, which removes the per-token launch overhead that dominates `generate` there. Device types not
listed use `generate`."""


def auto_engine(device: torch.device | str | None, do_sample: bool,
                generation_config: GenerationConfig | None = None) -> str:
    """The engine "auto" stands for on `device`: `AUTO_ENGINES`, except that a model whose generation_config sets
    a field only `generate` implements (see `checkpoint_sampling`) gets `generate`."""
    device_type = torch.device(device).type if device is not None else "cpu"
    engine = AUTO_ENGINES.get(device_type, "hf")
    if engine == "static":
        try:
            checkpoint_sampling(generation_config, do_sample)
        except ValueError as error:
            logger.info("generation_engine auto: using model.generate (%s)", error)
            return "hf"
    return engine


def make_sampler(name: str, settings: SamplingSettings, pad_token_id: int, eos_token_ids: Collection[int],
                 batch_size: int | None = None, *, device: torch.device | str | None = None,
                 generation_config: GenerationConfig | None = None, **options: Any) -> SegmentSampler:
    """A sampler by name from `ENGINES`, or "auto" (`auto_engine` on `device`, with `generation_config` the
    model's). `options` go to the static engine's constructor; "auto" drops them when it picks "hf", and gives
    the static engine a `generate` fallback for a failed compilation."""
    if name not in ENGINE_CHOICES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    common = {"pad_token_id": pad_token_id, "eos_token_ids": eos_token_ids, "batch_size": batch_size}
    if name == "auto":
        name = auto_engine(device, settings.do_sample, generation_config)
        options = {} if name == "hf" else {"fallback": HFGenerateSampler(settings, **common), **options}
    if name == "hf" and options:
        raise TypeError(f"make_sampler('hf') takes no options, got {sorted(options)}")
    return ENGINES[name](settings, **common, **options)
