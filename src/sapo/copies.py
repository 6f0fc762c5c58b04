"""The EMA model and the reference: the two extra versions of the policy's weights, as one object.

Where the copies live depends on how the policy is trained, and every use of them (generation, the
reference forward, the EMA update after a step, the reference refresh, checkpoints, the final save) must
follow the same choice. `ModelCopies` makes that choice once, as a named mode:

- ``module``: whole `nn.Module` copies beside the policy (one device, DDP, ZeRO-1/2). A `ref_model=` given by
  the user is such a module too.
- ``adapters``: LoRA. The copies are adapter tensors only, swapped into the policy when used; a fixed
  reference is the base model with the adapters disabled, so it needs no tensors at all.
- ``shards``: the policy is sharded (FSDP2, ZeRO-3) or the copies are offloaded to CPU memory. The copies are
  plain tensors of this rank's shards, built after the engine has prepared the policy; they are gathered into
  a temporary module for generation and copied into the policy's own storage for the reference forward.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sapo.ema import ShadowWeights, trainable_parameters
from sapo.run.paths import copy_file
from sapo.sharding import (
    detect_sharding,
    empty_like_model,
    gather_into,
    loaded_into,
    local_shard,
    materialized,
    release_gathered,
)

MODULE, ADAPTERS, SHARDS = "module", "adapters", "shards"
EMA, REFERENCE = "ema", "reference"


class ModelCopies:
    """EMA and reference weights of one run; `ema`/`reference` are `ShadowWeights` (None when not used)."""

    def __init__(self, policy: nn.Module, *, need_ema: bool, need_reference: bool, reference_moves: bool,
                 is_peft: bool, sharded: bool, offload: bool, dtype: str, device: torch.device | str,
                 ref_model: nn.Module | None = None) -> None:
        if is_peft and sharded:
            raise ValueError("LoRA/peft models with FSDP or DeepSpeed ZeRO-3 are not supported: with LoRA the EMA "
                             "and reference are adapter weights only, so use DDP or ZeRO-2 instead")
        self.mode = ADAPTERS if is_peft else SHARDS if sharded or offload else MODULE
        if self.mode == SHARDS and ref_model is not None:
            raise ValueError("ref_model= cannot be combined with FSDP, DeepSpeed ZeRO-3 or offload_copies: there the "
                             "reference starts as a copy of the policy")
        self.need_ema, self.need_reference, self.reference_moves = need_ema, need_reference, reference_moves
        self.sharded, self.offload, self.dtype_name, self.device = sharded, offload, dtype, device
        self.policy, self.wrapper = policy, None  # the policy without DDP wrappers (peft wrapper kept)
        self.sharding = "replicated"  # how the policy stores its weights (sharding.SHARDINGS), known once prepared
        self.names, self.params = trainable_parameters(policy)
        self.ema_module: nn.Module | None = None
        self.reference_module: nn.Module | None = None
        self.ema: ShadowWeights | None = None
        self.reference: ShadowWeights | None = None
        self._decode_modules: dict[str, nn.Module] = {}  # shards: persistent gathered modules, see `as_model`
        if self.mode != SHARDS:  # shards are copied from the prepared policy, in `bind`
            self._build(ref_model)

    # ------------------------------------------------------------------------------------------------
    # Building
    # ------------------------------------------------------------------------------------------------

    def _build(self, ref_model: nn.Module | None) -> None:
        if self.need_ema:
            if self.mode == ADAPTERS:
                self.ema = ShadowWeights.clone_of(self.names, self.params)
            else:
                self.ema_module = _frozen_copy(self.policy)
                self.ema = ShadowWeights.parameters_of(self.ema_module, self.names)
        if self.need_reference:
            self._build_reference(ref_model)

    def _build_reference(self, ref_model: nn.Module | None) -> None:
        if ref_model is not None:
            self.reference_module = ref_model.to(self.device).eval().requires_grad_(False)
            if self.reference_moves:
                self.reference = ShadowWeights.parameters_of(ref_model, self.names)
        elif self.mode == ADAPTERS:
            if self.reference_moves:  # a fixed one is the base model with adapters disabled
                self.reference = ShadowWeights.clone_of(self.names, self.params)
        else:
            self.reference_module = _frozen_copy(self.policy)
            self.reference = ShadowWeights.parameters_of(self.reference_module, self.names)

    def bind(self, policy: nn.Module, wrapper: nn.Module | None) -> None:
        """After the engine has prepared the policy: find its parameters again (FSDP2 replaces them) and put the
        copies where they belong (shards copied now; modules moved to the engine's device and dtype). `wrapper`
        is the engine's wrapper of the policy (DeepSpeed's engine releases its gathered weights)."""
        self.policy, self.wrapper = policy, wrapper
        self.sharding = detect_sharding(policy)
        self.names, self.params = trainable_parameters(policy)
        if self.mode == SHARDS:
            if self.ema is None and self.need_ema:
                self.ema = self._shadow_of_policy()
            if self.reference is None and self.need_reference:
                self.reference = self._shadow_of_policy()
        else:
            self._place_modules()

    def _dtype(self, policy_dtype: torch.dtype) -> torch.dtype:
        return policy_dtype if self.dtype_name == "auto" else getattr(torch, self.dtype_name)

    def policy_shards(self) -> list[torch.Tensor]:
        """This rank's storage of each trainable parameter (the whole tensor unless sharded)."""
        return [local_shard(p, self.sharding) for p in self.params]

    def _shadow_of_policy(self) -> ShadowWeights:
        """Copies of this rank's shards of the policy, on the CPU (pinned) when offloading."""
        tensors = []
        for shard in self.policy_shards():
            device = "cpu" if self.offload else shard.device
            tensor = shard.detach().to(device=device, dtype=self._dtype(shard.dtype), copy=True)
            if self.offload and torch.cuda.is_available():
                tensor = tensor.pin_memory()
            tensors.append(tensor)
        return ShadowWeights(self.names, tensors)

    def _place_modules(self) -> None:
        """Module copies made before the engine moved (DeepSpeed) or cast the policy follow it to its device and
        dtype (or to copies_dtype); idempotent."""
        policy_dtype = self.params[0].dtype
        for module_attr, weights_attr in (("ema_module", "ema"), ("reference_module", "reference")):
            module, weights = getattr(self, module_attr), getattr(self, weights_attr)
            if module is None:
                continue
            module.to(device=self.device)
            if weights is not None:  # a copy of ours (not a fixed ref_model= given by the user)
                module.to(dtype=self._dtype(policy_dtype))
                setattr(self, weights_attr, ShadowWeights.parameters_of(module, self.names))

    # ------------------------------------------------------------------------------------------------
    # Using
    # ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def as_model(self, which: str, device: torch.device | str | None = None,
                 persistent: bool = False) -> Iterator[nn.Module]:
        """A model holding the EMA's or the reference's weights: its own module, the policy with the adapter
        weights swapped in, or (shards) a plain module gathered for the duration; every rank must enter then,
        as the gathers are collectives.

        Shards with `persistent`: one plain module per copy is kept between calls and its weights are overwritten
        in place each time, so a compiled decode step recorded on it is replayed, not recorded again (a module
        of the copy's size stays allocated until `release_decode_modules`). The other modes always hand out the
        same storage: the copy's own module, or the adapters' EMA tensors swapped in."""
        module = self.ema_module if which == EMA else self.reference_module
        weights = self.ema if which == EMA else self.reference
        if module is not None:
            yield module
        elif self.mode == ADAPTERS:
            with weights.swapped_into(self.params):
                yield self.policy
        else:
            shards = dict(zip(weights.names, weights.tensors, strict=True))
            dtype, device = weights.tensors[0].dtype, device or self.device
            if not persistent:
                with materialized(self.policy, self.sharding, shards, dtype, device) as plain:
                    yield plain
                return
            kept = self._decode_modules.get(which)
            if kept is None or next(kept.parameters()).dtype != dtype:
                self._decode_modules.pop(which, None)
                kept = self._decode_modules[which] = empty_like_model(self.policy, dtype, device)
            gather_into(kept, self.policy, self.sharding, shards)
            yield kept

    def release_decode_modules(self) -> None:
        """Free the modules `as_model(..., persistent=True)` kept (decoding no longer compiled)."""
        self._decode_modules.clear()

    @property
    def reference_forward_is_collective(self) -> bool:
        """Whether `reference_forward` runs through the engine's wrapper of the policy (whose forward may be a
        collective under DDP or sharding: ranks must then run it together), rather than a module of its own."""
        return self.reference_module is None

    def reference_forward(self, score: Callable[[nn.Module], torch.Tensor], policy_model: nn.Module) -> torch.Tensor:
        """`score` run on the reference without gradients. `policy_model` is the model the Trainer passes to
        `compute_loss` (the engine's wrapper), through which shards must be gathered."""
        with torch.no_grad():
            if self.reference_module is not None:
                return score(self.reference_module)
            if self.reference is None:  # LoRA with a fixed reference: the base model
                with self.policy.disable_adapter():
                    return score(policy_model)
            if self.mode == ADAPTERS:
                with self.reference.swapped_into(self.params):
                    return score(policy_model)
            # Shards: the reference's go into the policy's storage for this forward only. Weights the engine still
            # holds gathered are released before and after, so neither model sees the other's.
            release_gathered(self.policy, self.sharding, self.wrapper)
            with loaded_into(self.policy_shards(), self.reference.tensors):
                try:
                    return score(policy_model)
                finally:
                    release_gathered(self.policy, self.sharding, self.wrapper)

    def update_ema(self, ema_beta: float) -> None:
        """theta_ema <- ema_beta * theta_ema + (1 - ema_beta) * theta, on this rank's weights (no communication)."""
        self.ema.update_ema_(self.policy_shards(), ema_beta)

    def refresh_reference(self, source: str) -> None:
        """The reference becomes the EMA model (`source` 'ema') or the current policy ('policy')."""
        self.reference.copy_from_(self.ema.tensors if source == EMA else self.policy_shards())

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------

    @property
    def saves_reference(self) -> bool:
        """A reference that moves, or one built from the prepared policy (which on resume is no longer the
        starting model), is written into checkpoints; a fixed one is rebuilt from the starting model."""
        return self.need_reference and (self.reference_moves or self.mode == SHARDS)

    def _file(self, name: str, rank: int) -> str:
        return copy_file(name, rank if self.sharded else None)  # sharded copies are saved per rank

    def state_files(self, rank: int) -> list[str]:
        files = [self._file(EMA, rank)] if self.need_ema else []
        return files + ([self._file(REFERENCE, rank)] if self.saves_reference else [])

    def save(self, directory: Path, rank: int, is_main: bool) -> None:
        if not (is_main or self.sharded):
            return
        if self.ema is not None:
            save_file(self.ema.state_dict(), str(directory / self._file(EMA, rank)))
        if self.saves_reference:
            save_file(self.reference.state_dict(), str(directory / self._file(REFERENCE, rank)))

    def load(self, directory: Path, rank: int) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(directory / self._file(EMA, rank))))
        if self.saves_reference:
            self.reference.load_state_dict(load_file(str(directory / self._file(REFERENCE, rank))))


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.eval().requires_grad_(False)
    return clone

