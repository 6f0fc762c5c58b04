"""When the static engine's kept decode state (KV cache, compiled step and its CUDA graph pool) is released.

Compiled decoding keeps its static cache between generation rounds, since CUDA graphs replay on fixed addresses:
at the gpu benchmark's shape that is 64 rows x 1280 slots x 24 layers x 2 (keys, values) x 128 x 2 KV heads in
bf16 = 0.98 GiB, 3.9 GiB at 256 rows, held through every training step in between. Releasing it makes the next
round allocate it again and compile (and capture) its step again, so it is worth it only when training is short
of memory. `release_state` of `StaticCacheSampler` picks the rule:

- "never": keep it (the fastest rounds);
- "always": free it after every round;
- "auto" (default): free it after a round when the device's memory is tight (`memory_tight`): less is available
  to the next training steps (free device memory plus what PyTorch's allocator holds unused) than the larger of
  the kept state and a tenth of the device. Devices without such figures (the CPU) keep it.
"""

from __future__ import annotations

from typing import Any

import torch

RELEASE_RULES = ("auto", "always", "never")
TIGHT_FRACTION = 0.1  # "auto" releases when less than this share of the device (or the kept state) is available


def state_bytes(cache: Any) -> int:
    """Bytes held by a static cache's key and value tensors (0 for None)."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def memory_tight(available: int, total: int, kept: int) -> bool:
    """The "auto" rule on a device's figures: available memory below max(kept, TIGHT_FRACTION x total)."""
    return kept > 0 and available < max(kept, TIGHT_FRACTION * total)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(available, total) bytes on a CUDA device: free memory plus the allocator's reserved-but-unused blocks;
    None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + unused, total


def should_release(rule: str, device: torch.device, kept: int) -> bool:
    """Whether to free `kept` bytes of decode state after a round on `device`, under `rule` (RELEASE_RULES)."""
    if rule == "always":
        return True
    if rule == "never":
        return False
    figures = device_memory(device)
    return figures is not None and memory_tight(figures[0], figures[1], kept)
