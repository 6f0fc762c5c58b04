"""Worker for tests/test_distributed.py: trains SAPO-DPO under torchrun with one engine and reports, per rank,
hashes of the whole (gathered) policy, EMA and reference, the rank's buffer, and checks of the sharded paths.

Engines: ddp (plain accelerate DDP), zero2 / zero3 (DeepSpeed), zero3-by-path (the model loaded by path, i.e.
partitioned as it loads), fsdp2 (torch FSDP2 through accelerate), fsdp2-keep-gathered (reshard_after_forward
off), ddp-offload (DDP with offload_copies and copies_dtype bfloat16); a "-spin" suffix trains SPIN instead.
DDP runs as a user's launch would (sapo joins CPU processes into one gloo job itself). Accelerate refuses FSDP
on CPU processes, so for fsdp2 its state is told to use the FSDP plugin anyway (the sharding itself is torch's
and runs on gloo), and DeepSpeed is given accelerate's gloo backend; sapo refuses both on a user's CPU launch.
On a CUDA machine the worker runs on the GPUs without those patches, e.g.
`torchrun --nproc_per_node 1 tests/workers/distributed_train.py OUT 4 fsdp2`.
"""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from sapo import SAPOConfig, SAPOTrainer, tasks, tiny
from sapo.buffer import ReplayEntry
from sapo.recipes import pad_pairs


def allow_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init


def allow_deepspeed_on_cpu() -> None:
    """Accelerate finds no backend for DeepSpeed on a CPU-only machine and then counts one process; DeepSpeed
    itself runs on gloo there, so give accelerate the same backend."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.PartialState._prepare_backend

    def prepare(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, kind = original(self, cpu, sagemaker_dp, backend)
        if backend is None and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_CPU
        return backend, kind

    state.PartialState._prepare_backend = prepare


def engine_arguments(engine: str) -> dict:
    if engine in ("fsdp2", "fsdp2-keep-gathered"):  # the latter keeps weights gathered after forward (ZeRO-2-like)
        return {"use_cpu": not torch.cuda.is_available(), "fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2,
                                                      "reshard_after_forward": engine == "fsdp2",
                                                      "state_dict_type": "SHARDED_STATE_DICT",
                                                      "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    if engine in ("zero2", "zero3", "zero3-by-path"):
        stage = 2 if engine == "zero2" else 3
        zero = {"stage": stage}
        if engine == "zero3":  # every parameter partitioned and fetched per forward, as in large models; the tiny
            zero["stage3_param_persistence_threshold"] = 0  # model's are otherwise all small enough to persist
        return {"use_cpu": False, "deepspeed": {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                                                "gradient_accumulation_steps": "auto"}}
    if engine == "ddp-offload":
        return {"offload_copies": True, "copies_dtype": "bfloat16"}
    return {}


def full_policy(trainer) -> list[torch.Tensor]:
    """The whole policy weights, gathered without sapo's own code."""
    params = trainer.copies.params
    if trainer.copies.sharding == "fsdp2":
        return [p.full_tensor().detach().clone() for p in params]
    if trainer.copies.sharding == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.data.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def full_copy(trainer, which) -> list[torch.Tensor]:
    with trainer.copies.as_model(which, device="cpu") as plain:
        weights = dict(plain.named_parameters())
        return [weights[name].detach().float().clone() for name in trainer.copies.names]


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class ExpectedEMA(TrainerCallback):
    """The EMA by its formula, from the gathered policy after every optimizer step of this process."""

    def __init__(self, trainer, beta: float) -> None:
        self.trainer, self.beta, self.ema = trainer, beta, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.ema = full_copy(self.trainer, "ema")  # fresh, or as resumed

    def on_step_end(self, args, state, control, **kwargs):
        policy = [t.float().cpu() for t in full_policy(self.trainer)]
        self.ema = [self.beta * e + (1 - self.beta) * p for e, p in zip(self.ema, policy, strict=True)]


COLLECTIVES = ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor")


def count_generation_traffic(trainer) -> dict:
    """Counts, per generation round, the whole-tensor gathers sapo makes to build the generator and every
    torch.distributed collective issued while the sampler decodes (there should be none)."""
    import sapo.sharding

    counts = {"rounds": 0, "gathers": 0, "collectives_while_decoding": 0}
    gather, augment, in_round = sapo.sharding.gather_full, trainer.recipe.augment, [False]

    def counted_gather(*args, **kwargs):
        counts["gathers"] += in_round[0]
        return gather(*args, **kwargs)

    def marked_augment(*args, **kwargs):
        in_round[0] = True
        try:
            return augment(*args, **kwargs)
        finally:
            in_round[0] = False

    sapo.sharding.gather_full = counted_gather
    trainer.recipe.augment = marked_augment
    sample = trainer.sampler.sample

    def counted_sample(model, contexts, max_new_tokens):
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def counting(name):
            def call(*args, **kwargs):
                counts["collectives_while_decoding"] += 1
                return originals[name](*args, **kwargs)
            return call

        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            counts["rounds"] += 1
            return sample(model, contexts, max_new_tokens)
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)

    trainer.sampler.sample = counted_sample
    return counts


def reference_check(trainer) -> dict:
    """The reference forward through the engine equals a plain module holding the reference's weights, and the
    policy's own forward is unchanged afterwards (its shards were put back and nothing stale stayed gathered)."""
    buffer = getattr(trainer.recipe, "buffer", None)
    entries = buffer.entries()[: trainer.args.per_device_train_batch_size] if buffer is not None else []
    if not entries:  # SPIN has no buffer: score a few real responses against themselves
        items = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)]
        entries = [ReplayEntry(list(x["prompt_ids"]), list(x["response_ids"]), list(x["response_ids"]), 0, 0)
                   for x in items]
    batch = {k: v.to(trainer.args.device) for k, v in pad_pairs(entries, trainer.processing_class.pad_token_id).items()}
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        before = trainer.token_logps(model, batch)
        through_engine = trainer.copies.reference_forward(lambda m: trainer.token_logps(m, batch), model)
        after = trainer.token_logps(model, batch)
    with trainer.copies.as_model("reference") as plain, torch.no_grad():
        expected = trainer.token_logps(plain.to(trainer.args.device), batch)
    return {"ref_error": float((through_engine - expected).abs().max()),
            "policy_restored_error": float((before - after).abs().max()),
            "ref_differs_from_policy": float((through_engine - before).abs().max())}


def main(out: str, max_steps: int, engine: str, resume: str | None) -> None:
    spin = engine.endswith("-spin")  # the SPIN recipe under the engine named before the suffix
    engine = engine.removesuffix("-spin")
    if engine.startswith("fsdp2"):
        allow_fsdp_on_cpu()
    if engine.startswith("zero"):
        allow_deepspeed_on_cpu()
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, hidden_size=32, seed=0)
    if engine == "zero3-by-path":  # loaded after the ZeRO-3 config exists: partitioned as it loads (zero.Init)
        model_dir = f"{out}-model-rank{os.environ['RANK']}"  # same weights; no two processes write one file
        tiny.save_pair(model, tokenizer, model_dir)
        model = model_dir
    settings = {"output_dir": out, "max_steps": max_steps, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                "token_generate_length": 4, "max_length": 64, "max_prompt_length": 48, "logging_steps": 1,
                "report_to": "none", "save_steps": 2, "disable_tqdm": True,
                "ref_update_steps": 3, "seed": 0,
                "generation_batch_size": 4}  # a generation round every step: each run checks per-round traffic
    if spin:
        settings.update(recipe="spin", spin_iterations=2)
    args = SAPOConfig(**{**settings, **engine_arguments(engine)})
    trainer = SAPOTrainer(model=model, args=args, train_dataset=tasks.make_suite(64, 0, seed=3)["train"],
                          processing_class=tokenizer)
    partitioned_at_load = any(hasattr(p, "ds_tensor") for p in trainer.model.parameters())
    if spin:
        trainer.train(resume_from_checkpoint=resume)
        ref = full_copy(trainer, "reference")
        report = {"world_size": args.world_size, "engine": trainer.copies.sharding, "step": trainer.state.global_step,
                  "policy": digest(full_policy(trainer)), "ref": digest(ref),
                  "spin_iteration": trainer.recipe.iteration, "shared_prefix": trainer.scoring.shared_prefix,
                  **reference_check(trainer)}
        trainer.save_model()
        return finish(out, args, report)
    expected = ExpectedEMA(trainer, args.ema_beta)
    trainer.add_callback(expected)
    traffic = count_generation_traffic(trainer)
    trainer.train(resume_from_checkpoint=resume)
    traffic["gathers_per_round"] = traffic["gathers"] / max(1, traffic["rounds"])
    traffic["parameters"] = len(list(trainer.policy.parameters()))
    ema = full_copy(trainer, "ema")
    ref = full_copy(trainer, "reference")
    report = {"world_size": args.world_size, "engine": trainer.copies.sharding, "step": trainer.state.global_step,
              "policy": digest(full_policy(trainer)),
              "ema": digest(ema), "ref": digest(ref),
              "ema_error": max(float((a - b).abs().max()) for a, b in zip(ema, expected.ema, strict=True)),
              "local_ema_numel": sum(t.numel() for t in trainer.copies.ema.tensors),
              "full_numel": sum(t.numel() for t in ema),
              "ema_device": str(trainer.copies.ema.tensors[0].device),
              "ema_dtype": str(trainer.copies.ema.tensors[0].dtype),
              "buffer": [e.real for e in trainer.recipe.buffer.entries()], "generation_traffic": traffic,
              "partitioned_at_load": partitioned_at_load, "shared_prefix": trainer.scoring.shared_prefix,
              **reference_check(trainer)}
    trainer.save_model()
    finish(out, args, report)


def finish(out: str, args, report: dict) -> None:
    with open(f"{out}/rank{args.process_index}.json", "w") as handle:
        json.dump(report, handle)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
