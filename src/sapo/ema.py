"""EMA and frozen copies of a model's trainable weights.

SAPO keeps two extra versions of the policy: the EMA model (generates rejected segments) and, for
DPO-style losses, the reference. Both only differ from the policy in its trainable parameters, so
`ShadowWeights` stores exactly those tensors: for a full fine-tune they are the parameters of a separate
module (usable directly for generation); with LoRA they are copies of the adapter weights only, swapped
into the policy for the duration of a forward pass, so no second full model is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

EMA_CAST_CHUNK = 1 << 27
"""Elements of policy weights cast to the EMA's dtype at a time (256 MiB in bf16), bounding the scratch memory of a
mixed-dtype update while keeping it a handful of multi-tensor kernels."""


def ema_update_(ema: Sequence[torch.Tensor], params: Sequence[torch.Tensor], beta: float) -> None:
    """theta_ema <- beta * theta_ema + (1 - beta) * theta, in place, as fused multi-tensor ops.

    `lerp(ema, theta, 1 - beta)` is exactly that formula; the foreach form launches one kernel per
    dtype/device group instead of one per tensor, keeping the update a small fraction of a step. Where the EMA
    is held in another dtype or device than the policy (a bf16 EMA of an fp32 policy, an offloaded EMA), the
    weights are first cast into scratch tensors of the EMA's kind by one multi-tensor copy per chunk, which gives
    the same numbers as casting each tensor before its lerp.
    """
    if len(ema) != len(params):
        raise ValueError(f"ema_update_: {len(ema)} EMA tensors but {len(params)} parameters")
    if not ema:
        return
    same_kind = all(e.dtype == p.dtype and e.device == p.device for e, p in zip(ema, params, strict=True))
    with torch.no_grad():
        if same_kind:
            torch._foreach_lerp_(list(ema), [p.detach() for p in params], 1.0 - beta)
            return
        for start, stop in _chunks([e.numel() for e in ema], EMA_CAST_CHUNK):
            targets = list(ema[start:stop])
            cast = [torch.empty_like(t) for t in targets]
            copy_weights_(cast, params[start:stop])  # one multi-tensor copy (per tensor only across devices)
            torch._foreach_lerp_(targets, cast, 1.0 - beta)


def _chunks(sizes: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose sizes add up to at most `budget` (a larger single tensor is its own range)."""
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > budget:
            ranges.append((start, index))
            start, total = index, 0
        total += size
    ranges.append((start, len(sizes)))
    return ranges


def copy_weights_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Overwrite `targets` with `sources` (reference refresh), fused where dtypes agree."""
    if len(targets) != len(sources):
        raise ValueError(f"copy_weights_: {len(targets)} targets but {len(sources)} sources")
    with torch.no_grad():
        if all(t.device == s.device for t, s in zip(targets, sources, strict=True)):
            torch._foreach_copy_(list(targets), [s.detach() for s in sources])
        else:  # offloaded copies: host <-> device per tensor
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source.detach())


def trainable_parameters(module: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and parameters that the optimizer changes; only these can differ between policy and copies."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    return [name for name, _ in named], [p for _, p in named]


class ShadowWeights:
    """A named set of tensors mirroring some parameters of a model (the EMA or a reference).

    Names are kept so that the state can be saved and reloaded by name and checked against the model.
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        if len(names) != len(tensors):
            raise ValueError("ShadowWeights: names and tensors differ in length")
        self.names = list(names)
        self.tensors = list(tensors)

    @classmethod
    def clone_of(cls, names: Sequence[str], params: Sequence[torch.Tensor], dtype: torch.dtype | None = None):
        """Independent copies of `params` (optionally in another dtype)."""
        return cls(names, [p.detach().clone().to(dtype or p.dtype) for p in params])

    @classmethod
    def parameters_of(cls, module: nn.Module, names: Sequence[str]) -> ShadowWeights:
        """The live parameters of a separate module, so updates land in that module directly."""
        by_name = dict(module.named_parameters())
        missing = [name for name in names if name not in by_name]
        if missing:
            raise ValueError(f"ShadowWeights: the copy lacks parameters {missing[:3]}")
        return cls(names, [by_name[name].data for name in names])

    def update_ema_(self, params: Sequence[torch.Tensor], beta: float) -> None:
        ema_update_(self.tensors, params, beta)

    def copy_from_(self, params: Sequence[torch.Tensor]) -> None:
        copy_weights_(self.tensors, params)

    @contextmanager
    def swapped_into(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        """Temporarily make `params` hold these weights (pointer swap, no copy), restoring them after."""
        if len(params) != len(self.tensors):
            raise ValueError("ShadowWeights.swapped_into: parameter count differs")
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: Sequence[nn.Parameter]) -> None:
        for index, param in enumerate(params):
            shadow = self.tensors[index]
            if shadow.dtype != param.dtype or shadow.shape != param.shape:
                raise ValueError(f"ShadowWeights: {self.names[index]} has {shadow.dtype} {tuple(shadow.shape)}, "
                                 f"the model {param.dtype} {tuple(param.shape)}")
            self.tensors[index] = param.data
            param.data = shadow

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().contiguous() for name, tensor in zip(self.names, self.tensors, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise ValueError(f"ShadowWeights: saved state lacks {missing[:3]} (from another model?)")
        for name, tensor in zip(self.names, self.tensors, strict=True):
            if state[name].shape != tensor.shape:
                raise ValueError(f"ShadowWeights: saved {name} has shape {tuple(state[name].shape)}, this run holds "
                                 f"{tuple(tensor.shape)} (saved with another number of processes or sharding?)")
        copy_weights_(self.tensors, [state[name].to(t.device, t.dtype) for name, t in zip(self.names, self.tensors,
                                                                                          strict=True)])
