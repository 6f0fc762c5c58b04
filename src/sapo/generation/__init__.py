"""Sampling continuations from the EMA model.

The trainer only needs "G new tokens after each of these contexts"; `SegmentSampler` is that
interface, so a faster engine can replace the Hugging Face `generate` implementation without touching
the trainer. Two engines are provided (pick one by name with `make_sampler`):

- `HFGenerateSampler` ("hf"): `model.generate` with a dynamic KV cache.
- `StaticCacheSampler` ("static"): a decode loop over a pre-allocated `transformers.StaticCache` whose
  temperature/top-k/top-p sampling and EOS tracking stay on the device (the host only looks at the
  device every `check_every` steps, to stop early once every row has ended), optionally with the decode
  step compiled by `torch.compile` (CUDA graphs), which removes most per-token launch overhead.

"auto" (the default of `SAPOConfig.generation_engine`) picks one of them per device type and decoding mode
from measurements (`auto_engine`), and falls back to `generate`, with one warning, if compiling fails.

Both draw from the same distribution: `SamplingSettings`, plus what `generate` takes from the model's
`generation_config` on its own (see `checkpoint_sampling`: the static engine applies the repetition penalty
and min_p, and refuses to run with any other field `generate` would act on).

The package: `protocol` (the interface and settings), `hf`, `static` (the engines), `sampling` (on-device sampling
and the checkpoint's generation_config), `engines` (by name, "auto", `make_sampler`), and the static engine's
parts `decode_attention`, `decode_state` and `topk_sampling`. Every name is re-exported here, so
`from sapo.generation import make_sampler` keeps working.
"""

from __future__ import annotations

from sapo.generation.engines import (  # noqa: F401
    AUTO_ENGINES,
    ENGINES,
    auto_engine,
    make_sampler,
)
from sapo.generation.hf import (  # noqa: F401
    HFGenerateSampler,
)
from sapo.generation.protocol import (  # noqa: F401
    ENGINE_CHOICES,
    SAMPLER_NAMES,
    SamplingSettings,
    SegmentSampler,
    cut_after_eos,
    eos_token_ids_of,
    left_pad,
)
from sapo.generation.sampling import (  # noqa: F401
    CheckpointSampling,
    _categorical,
    checkpoint_sampling,
    filtered_logits,
    mark_seen,
    next_tokens,
    penalize_repetitions,
    sample_from_logits,
    sampling_probabilities,
    seen_token_mask,
)
from sapo.generation.static import (  # noqa: F401
    StaticCacheSampler,
)
