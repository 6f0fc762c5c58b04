"""The EMA model and the reference when the policy is sharded (FSDP2, DeepSpeed ZeRO-3) or offloaded.

SAPO needs two extra versions of the policy's weights. Under DDP and ZeRO-1/2 every rank holds whole
weights and the copies can be ordinary modules. Under FSDP2 and ZeRO-3 each rank holds a shard of every
parameter, and the copies hold *the same shards* as plain tensors: the EMA update is then a local op with
no communication, and the copies' memory per rank falls with the world size like the policy's. They are
used in two ways:

* generation: once per round, every shard of the EMA is gathered into a plain, unsharded module that
  decodes with no communication at all, and is freed afterwards (one gather per round, not per token);
* the reference forward: the reference's shards are copied into the policy's own shard storage for one
  no-grad forward, so the engine gathers them layer by layer exactly as it gathers the policy's, then the
  policy's shards are copied back.

With `offload_copies` the same two paths serve copies kept in CPU memory, on any engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

SHARDINGS = ("replicated", "fsdp2", "zero3")


def detect_sharding(model: nn.Module) -> str:
    """How the prepared policy stores its weights: 'fsdp2', 'zero3', or 'replicated' (plain, DDP, ZeRO-1/2)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("FSDP1 (FullyShardedDataParallel) is not supported: set fsdp_version: 2 in the accelerate "
                         "config (or fsdp_config={'fsdp_version': 2}); see examples/accelerate/fsdp2-8gpu.yaml")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "fsdp2"
    if any(_is_zero3_partitioned(p) for p in model.parameters()):
        return "zero3"
    return "replicated"


def _is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_numel")


def local_shard(param: torch.Tensor, sharding: str) -> torch.Tensor:
    """The storage this rank holds for `param`, which the engine gathers from at forward time."""
    if sharding == "fsdp2" and hasattr(param, "to_local"):
        return param.to_local()
    if sharding == "zero3" and _is_zero3_partitioned(param):
        # Every parameter, even a small one ZeRO-3 keeps gathered ("persistent"), has its partition here, and
        # the optimizer updates the partitions; gathered copies are refreshed from them.
        return param.ds_tensor.data
    return param.data


def global_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape (ZeRO-3 leaves an empty tensor in `param` and records the shape in `ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gather_full(param: torch.Tensor, shard: torch.Tensor, sharding: str) -> torch.Tensor:
    """The whole tensor whose local piece on this rank is `shard` (laid out like `param`'s); a collective."""
    if sharding == "fsdp2" and hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor

        local = shard.to(param.device_mesh.device_type)  # the mesh's device, even if parameters are offloaded
        return DTensor.from_local(local, device_mesh=param.device_mesh, placements=param.placements,
                                  run_check=False, shape=param.shape, stride=param.stride()).full_tensor()
    if sharding == "zero3" and _is_zero3_partitioned(param):
        group = getattr(param, "ds_process_group", None)
        local = shard.to(param.ds_tensor.device).contiguous().view(-1)
        out = local.new_empty(local.numel() * dist.get_world_size(group))
        dist.all_gather_into_tensor(out, local, group=group)
        return out[: param.ds_numel].view(param.ds_shape)
    return shard


def release_gathered(model: nn.Module, sharding: str, wrapper: nn.Module | None = None) -> None:
    """Drop any weights the engine still holds gathered, so the next forward gathers from the shards again.

    Needed around a forward run with swapped-in reference shards: FSDP2 with `reshard_after_forward=False`
    and ZeRO-3's parameter reuse cache and persistent (always gathered) small parameters would otherwise
    serve the policy's (or the reference's) gathered weights to the other model.
    """
    if sharding == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    elif sharding == "zero3" and wrapper is not None and hasattr(wrapper, "empty_partition_cache"):
        wrapper.empty_partition_cache()


def plain_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (FSDP2 swaps in a subclass named `FSDP<Class>`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def empty_like_model(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An unsharded module of `model`'s class and config with uninitialised weights on `device`."""
    with torch.device("meta"):
        module = plain_class(model)(copy.deepcopy(model.config))
    module.to(dtype).to_empty(device=device)
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # to_empty gives tied parameters separate storage; tie them again
    if getattr(model, "generation_config", None) is not None:
        module.generation_config = copy.deepcopy(model.generation_config)
    return module.eval().requires_grad_(False)


@contextmanager
def materialized(model: nn.Module, sharding: str, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str) -> Iterator[nn.Module]:
    """A plain module holding `weights` (local shards, by name) gathered whole, and `model`'s other weights.

    Every rank must enter together (the gathers are collectives). The module is freed on exit.
    """
    release_gathered(model, sharding)  # FSDP2 registers its sharded parameters on the modules again
    module = empty_like_model(model, dtype, device)
    gather_into(module, model, sharding, weights)
    try:
        yield module
    finally:
        del module


def gather_into(module: nn.Module, model: nn.Module, sharding: str, weights: Mapping[str, torch.Tensor]) -> None:
    """Write `weights` (local shards, by name) gathered whole, and `model`'s other weights and buffers, into the
    plain `module` in place: its tensors keep their storage, so a compiled decode step (and its CUDA graphs)
    recorded on it stays valid. A collective: every rank must call it."""
    release_gathered(model, sharding)
    targets = dict(module.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in targets:
                raise ValueError(f"materialized: the rebuilt {type(module).__name__} has no parameter {name}")
            shard = weights[name] if name in weights else local_shard(param, sharding)
            targets[name].copy_(gather_full(param, shard, sharding))
        buffers = dict(module.named_buffers())
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffers[name].copy_(buffer)


@contextmanager
def loaded_into(targets: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Copy `weights` into `targets` for the duration, then restore the targets' own values.

    The saved values go to the memory the weights live in (CPU for offloaded copies), so an offloaded
    reference adds no device memory beyond one tensor in flight.
    """
    if len(targets) != len(weights):
        raise ValueError(f"loaded_into: {len(targets)} targets but {len(weights)} weights")
    with torch.no_grad():
        saved = [t.detach().to(device=w.device, copy=True) for t, w in zip(targets, weights, strict=True)]
        for target, weight in zip(targets, weights, strict=True):
            target.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            for target, value in zip(targets, saved, strict=True):
                target.copy_(value)
            del saved


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether `flag` holds on any rank (ranks must agree, e.g. on skipping a step of sharded gradients)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
