import copy
import logging
import math
import random
import subprocess
import sys
import warnings
from functools import partial

import helpers
import pytest
import torch
from helpers import CopyingSampler, ScriptedSampler, clones, loss_rows
from transformers import TrainerCallback

from sapo import SAPOTrainer
from sapo.buffer import ReplayEntry
from sapo.data import tokenized_dataset
from sapo.recipes import pad_pairs
from sapo.step_guard import gradients_are_finite

TRAINER_RUN = dict(token_generate_length=6, ref_update_mode="fixed")


def config(tmp_path, **overrides):
    return helpers.config(tmp_path / "out", **{**TRAINER_RUN, **overrides})


def test_pad_pairs_puts_real_then_rejected_with_response_masks():
    entries = [ReplayEntry([1, 2], [3, 4, 5], [6], 0, 1), ReplayEntry([7], [8], [9, 10], 0, 2)]
    batch = pad_pairs(entries, pad_token_id=0)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][:, :5].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch["loss_mask"][:, :5].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                                        [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 3, 3]


def test_augment_splices_sampled_segment(tmp_path, tokenizer, tiny_model, suite):
    eos = tokenizer.eos_token_id
    sampler = ScriptedSampler([[90, 91, 92, 93], [90, eos, 92, 93]])
    args = config(tmp_path, token_generate_length=4)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          sampler=sampler)
    trainer.recipe.segment_rng = random.Random(1)
    prompt, response = [1, 5, 6, 7, 8], list(range(10, 30))
    entries = trainer.recipe.augment([prompt, prompt], [response, response])
    draws = random.Random(1)
    k1, k2 = draws.randint(0, 13), draws.randint(0, 13)  # bound = min(20 - 3 - 4, 64 - 5 - 4)
    contexts, max_new = sampler.calls[0]
    assert max_new == 4
    assert contexts == [prompt + response[:k1], prompt + response[:k2]]
    assert entries[0].rejected == response[:k1] + [90, 91, 92, 93] + response[k1 + 4:]
    assert entries[1].rejected == response[:k2] + [90, eos]
    assert (entries[0].segment_start, entries[0].segment_length) == (k1, 4)
    assert (entries[1].segment_start, entries[1].segment_length) == (k2, 2)
    assert len(trainer.recipe.buffer) == 2 and trainer.recipe.buffer.entries()[0].real == response


def test_responses_per_prompt_and_sample_every_n_steps(tmp_path, tokenizer, tiny_model, suite):
    sampler = ScriptedSampler([[40, 41, 42, 43, 44, 45]])
    args = config(tmp_path, max_steps=5, responses_per_prompt=3, sample_every_n_steps=2, generation_batch_size=4)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          sampler=sampler)
    trainer.train()
    assert len(sampler.calls) == 3  # global steps 0, 2, 4
    assert all(len(contexts) == 4 * 3 for contexts, _ in sampler.calls)
    assert len(trainer.recipe.buffer) == 3 * 4 * 3


def test_ema_updated_once_per_optimizer_step_with_accumulation(tmp_path, tokenizer, tiny_model, suite):
    args = config(tmp_path, max_steps=3, gradient_accumulation_steps=2, ema_beta=0.5)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    expected = [t.detach().clone().double() for t in trainer.copies.ema.tensors]
    calls = []

    class ExpectedEMA(TrainerCallback):  # runs before SAPO's hooks: the policy has just been stepped
        def on_step_end(self, args, state, control, **kwargs):
            nonlocal expected
            expected = [0.5 * e + 0.5 * p.detach().double() for e, p in zip(expected, trainer.copies.params,
                                                                             strict=True)]
            calls.append(state.global_step)

    trainer.callback_handler.callbacks.insert(0, ExpectedEMA())
    trainer.train()
    assert calls == [1, 2, 3]
    for got, want in zip(trainer.copies.ema.tensors, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    policy = dict(trainer.policy.named_parameters())
    assert not torch.equal(trainer.copies.ema.tensors[0], policy[trainer.copies.names[0]].detach())


@pytest.mark.parametrize("mode", ["policy", "ema"])
def test_reference_refresh_copies_source_every_k_steps(tmp_path, tokenizer, tiny_model, suite, mode,
                                                       snapshot_each_step):
    args = config(tmp_path, max_steps=3, ref_update_mode=mode, ref_update_steps=2)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    initial = clones(trainer.copies.reference.tensors)
    source = trainer.copies.ema.tensors if mode == "ema" else trainer.copies.params
    snapshots = snapshot_each_step(trainer, lambda: (clones(source), clones(trainer.copies.reference.tensors)))
    trainer.train()
    source1, ref1 = snapshots[1]
    assert all(torch.equal(r, i) for r, i in zip(ref1, initial, strict=True))  # not yet refreshed
    source2, ref2 = snapshots[2]
    assert all(torch.equal(r, s) for r, s in zip(ref2, source2, strict=True))
    _, ref3 = snapshots[3]
    assert all(torch.equal(a, b) for a, b in zip(ref3, ref2, strict=True))  # unchanged until step 4


def test_fixed_reference_never_changes(tmp_path, tokenizer, tiny_model, suite):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, max_steps=3, ref_update_steps=1),
                          train_dataset=suite["train"], processing_class=tokenizer)
    before = [p.clone() for p in trainer.copies.reference_module.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.copies.reference_module.parameters(), strict=True))


def test_orpo_builds_no_reference(tmp_path, tokenizer, tiny_model, suite):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, loss_type="orpo", beta=0.05),
                          train_dataset=suite["train"], processing_class=tokenizer)
    assert trainer.copies.reference_module is None and trainer.copies.reference is None


LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "sapo" not in sys.modules
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True,
                                  return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    print(path, out.shape[1] > len(ids))
"""


def assert_loads_without_sapo(*paths):
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("True") == len(paths)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("orpo", 0.5)])
def test_end_to_end_margin_rises_and_outputs_load(tmp_path, tokenizer, model_dir, suite, loss_type, beta):
    args = config(tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=2e-3, loss_type=loss_type,
                  beta=beta, lr_scheduler_type="constant")  # default generation rounds: 64 examples, every 8 steps
    # Fixed pairs (rejected sides made once by the start model) measure learning; the training rows' margins restart
    # at each generation round, when fresher rejected responses enter the buffer.
    trainer = SAPOTrainer(model=str(model_dir), args=args, train_dataset=suite["train"],
                          eval_dataset=suite["train"][:32])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model()
    out = tmp_path / "out"
    rows = [row for row in loss_rows(out) if "loss" in row]
    assert len(rows) == 30
    if loss_type == "sigmoid":
        assert before["eval_rewards/margins"] == 0.0  # the policy is its own reference at step 0
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.05, (before, after)
    assert after["eval_rewards/accuracies"] > 0.5, after
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "buffer/size", "time/generation_share"):
        assert key in rows[-1]
    rounds = [index for index, row in enumerate(rows) if "segment/identical_fraction" in row]
    # The first batch at once, then a round once 3 batches wait (96 examples, 12 batches per epoch: the default
    # round of 64 examples is capped at a quarter epoch, 24), and what waits at an epoch's last batch (11, 23).
    assert rounds == [0, 3, 6, 9, 11, 14, 17, 20, 23, 26, 29]
    assert rows[-1]["buffer/size"] + rows[-1]["pairs/dropped"] == 30 * 8
    assert_loads_without_sapo(out, out / "ema")


def test_lora_ema_holds_adapters_only_and_base_is_untouched(tmp_path, tokenizer, tiny_model, suite):
    peft = pytest.importorskip("peft")
    base_before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = config(tmp_path, max_steps=6, ref_update_mode="fixed")
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          peft_config=lora)
    copies = trainer.copies
    assert copies.mode == "adapters" and copies.ema_module is None and copies.reference_module is None
    assert copies.reference is None  # fixed reference: the base model with adapters disabled
    assert trainer.copies.names and all("lora_" in name for name in trainer.copies.names)
    trainer.train()
    trainer.save_model()
    for name, param in trainer.policy.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(param, base_before[key]), name
    lora_b = [t for n, t in zip(trainer.copies.names, trainer.copies.ema.tensors, strict=True) if "lora_B" in n]
    assert any(t.abs().sum() > 0 for t in lora_b)  # the EMA followed the trained adapters
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "ema" / "adapter_model.safetensors").exists()


def as_format(record, shape):
    prompt, answer = record["messages"][0]["content"], record["messages"][1]["content"]
    user, assistant = {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}
    return {
        "messages": {"messages": [user, assistant]},
        "prompt_completion_text": {"prompt": prompt, "completion": answer},
        "prompt_completion_messages": {"prompt": [user], "completion": [assistant]},
        "preference_text": {"prompt": prompt, "chosen": answer, "rejected": record["rejected"]},
        "preference_conversation": {"prompt": prompt, "chosen": [user, assistant],
                                    "rejected": [user, {"role": "assistant", "content": record["rejected"]}]},
    }[shape]


@pytest.mark.parametrize("shape", ["messages", "prompt_completion_text", "prompt_completion_messages",
                                   "preference_text", "preference_conversation"])
def test_every_input_format_trains_on_the_tokens_of_its_format(tmp_path, tokenizer, tiny_model, suite, shape):
    """Conversational shapes train on the chat template's tokens; the string-only ones on the raw text, as TRL
    trains its "standard" format: the same tokens as `prompt + completion + EOS` (no BOS: this tokenizer adds none)."""
    records = [as_format(r, shape) for r in suite["train"][:8]]
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, max_steps=1), train_dataset=records,
                          processing_class=tokenizer)
    if shape.endswith("_text"):
        for record, example in zip(suite["train"][:8], trainer.train_dataset.examples, strict=True):
            prompt, answer = (m["content"] for m in record["messages"])
            assert tokenizer.decode(example.prompt_ids) == prompt
            assert tokenizer.decode(example.response_ids) == answer + tokenizer.eos_token
    else:
        reference = tokenized_dataset(suite["train"][:8], tokenizer, trainer.args, trainer.eos_token_ids)
        assert trainer.train_dataset.examples == reference.examples
    trainer.train()
    assert len(trainer.recipe.buffer) == 4


def test_chat_records_for_a_model_path_without_a_template_are_refused_before_its_weights(tmp_path, suite):
    """The Python API as `sapo train`: the data is checked against the tokenizer before the (garbage) weights."""
    from sapo import tiny
    from sapo.errors import DataError

    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None
    base = tmp_path / "base"
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer, base)
    (base / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"^train_dataset: row 0: the record is conversational \(field 'messages' "
                                        r"holds chat messages\) and the tokenizer \(.*\) has no chat template"):
        SAPOTrainer(model=str(base), args=config(tmp_path, max_steps=1), train_dataset=suite["train"][:4])


def test_generation_batch_size_queues_batches_into_larger_rounds(tmp_path, tokenizer, tiny_model, suite):
    sampler = ScriptedSampler([[40, 41, 42, 43, 44, 45]])
    args = config(tmp_path, max_steps=7, generation_batch_size=12)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          sampler=sampler)
    trainer.train()
    # step 1: empty buffer, so its batch is generated at once; then every third batch completes a round of 12
    assert [len(contexts) for contexts, _ in sampler.calls] == [4, 12, 12]
    assert len(trainer.recipe.buffer) == 28 and len(trainer.recipe.pending) == 0


def test_report_to_tensorboard_writes_sapo_metrics(tmp_path, tokenizer, tiny_model, suite):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = config(tmp_path, max_steps=2, report_to="tensorboard")
    SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer).train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/buffer/size"} <= tags
    assert [e.step for e in accumulator.Scalars("train/rewards/margins")] == [1, 2]


def test_progress_bar_shows_live_metrics_and_throughput(tmp_path, tokenizer, tiny_model, suite):
    from transformers.trainer_callback import ProgressCallback

    args = config(tmp_path, max_steps=2, disable_tqdm=False, generation_batch_size=4)  # the paper's per-step flow
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    postfixes = []
    progress = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback))
    begin = progress.on_train_begin

    def spy_begin(*a, **k):
        begin(*a, **k)
        original = progress.training_bar.set_postfix
        progress.training_bar.set_postfix = lambda values, **kw: (postfixes.append(dict(values)),
                                                                   original(values, **kw))

    progress.on_train_begin = spy_begin
    trainer.train()
    assert postfixes and {"loss", "margin", "acc", "buffer", "gen tok/s"} <= set(postfixes[0])
    assert postfixes[-1]["buffer"] == "8/2000"
    rows = loss_rows(tmp_path / "out")
    assert all(r["generation/tokens_per_second"] > 0 for r in rows)


def test_static_generation_engine_trains(tmp_path, tokenizer, tiny_model, suite):
    from sapo.generation import StaticCacheSampler

    args = config(tmp_path, max_steps=2, generation_engine="static", generation_batch_size=4)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    assert isinstance(trainer.sampler, StaticCacheSampler)
    trainer.train()
    assert len(trainer.recipe.buffer) == 8
    assert all(e.rejected[:e.segment_start] == e.real[:e.segment_start] for e in trainer.recipe.buffer.entries())


def test_default_generation_engine_gets_the_runs_fixed_shapes(tmp_path, tokenizer, tiny_model, suite):
    """`generation_engine` auto on CPU is the static engine, told the rows of a round and one cache length (so that
    a compiled decode step would be compiled once), with `generate` as its fallback."""
    from sapo.generation import HFGenerateSampler, StaticCacheSampler

    args = config(tmp_path, per_device_train_batch_size=4, responses_per_prompt=3)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    sampler = trainer.sampler
    assert args.generation_engine == "auto" and isinstance(sampler, StaticCacheSampler)
    assert isinstance(sampler.fallback, HFGenerateSampler)
    assert args.generation_round_size == 24  # 6 batches of 4 examples x 3 responses: 72 >= 64 rows
    assert sampler.batch_size == 72 and sampler.cache_len == args.max_length + args.token_generate_length
    hf = SAPOTrainer(model=tiny_model, args=config(tmp_path, generation_engine="hf", generation_batch_size=6),
                     train_dataset=suite["train"], processing_class=tokenizer).sampler
    assert isinstance(hf, HFGenerateSampler) and hf.batch_size == 8  # rounds of 6 fill up in whole batches of 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_compiles_once_on_one_persistent_decode_module(tmp_path, tokenizer, tiny_model, suite):
    """On CUDA the default engine decodes compiled; with offloaded copies (a module gathered for each round) the
    gathered module, its weights refreshed in place, and the cache persist, so the step is compiled once."""
    from sapo.generation import StaticCacheSampler

    args = config(tmp_path, max_steps=4, use_cpu=False, offload_copies=True, generation_batch_size=4)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    sampler = trainer.sampler
    assert isinstance(sampler, StaticCacheSampler) and sampler.keeps_state(args.device)
    kept = []

    class Record(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            module = trainer.copies._decode_modules.get("ema")
            ema = {n: t.detach().cpu().clone() for n, t in zip(trainer.copies.ema.names, trainer.copies.ema.tensors,
                                                                  strict=True)}
            kept.append((module, sampler._cache, [p.data_ptr() for p in module.parameters()], ema))

    trainer.add_callback(Record())
    trainer.train()
    assert len(kept) == 4 and all(entry[0] is kept[0][0] and entry[1] is kept[0][1] for entry in kept)
    assert all(entry[2] == kept[0][2] for entry in kept)  # the same storage: CUDA graphs replay on it
    assert sampler._compile_works and not sampler.compile_failed and len(sampler._compiled_steps) == 1
    weights = dict(kept[0][0].named_parameters())  # gathered for the last round: the EMA after step 3
    for name, tensor in kept[2][3].items():
        assert torch.equal(weights[name].cpu(), tensor), name


def test_bf16_copies_are_bf16_modules_that_follow_the_ema_formula(tmp_path, tokenizer, tiny_model, suite,
                                                                   snapshot_each_step):
    args = config(tmp_path, max_steps=3, copies_dtype="bfloat16", ref_update_mode="ema", ref_update_steps=2)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    snapshots = snapshot_each_step(trainer, lambda: (clones(trainer.copies.params), clones(trainer.copies.ema.tensors)))
    trainer.train()
    assert {p.dtype for p in trainer.copies.ema_module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.copies.reference_module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.copies.params} == {torch.float32}  # the policy is untouched
    (_, ema1), (params2, ema2) = snapshots[1], snapshots[2]
    for before, param, after in zip(ema1, params2, ema2, strict=True):  # EMA step computed in bf16
        expected = (0.5 * before.float() + 0.5 * param).to(torch.bfloat16)
        torch.testing.assert_close(after, expected, atol=1e-2, rtol=1e-2)
    assert all(torch.equal(r, e) for r, e in zip(trainer.copies.reference.tensors, snapshots[2][1], strict=True))


def test_offloaded_copies_are_plain_tensors_and_the_reference_is_the_starting_model(tmp_path, tokenizer, tiny_model,
                                                                                     suite, snapshot_each_step):
    start = clones(p for p in tiny_model.parameters() if p.requires_grad)
    args = config(tmp_path, max_steps=3, offload_copies=True, save_strategy="steps", save_steps=3)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    snapshots = snapshot_each_step(trainer, lambda: (clones(trainer.copies.params), clones(trainer.copies.ema.tensors)))
    trainer.train()
    assert trainer.copies.ema_module is None and trainer.copies.reference_module is None
    fixed = trainer.copies.reference.tensors
    assert all(torch.equal(r, s) for r, s in zip(fixed, start, strict=True))
    (_, ema1), (params2, ema2) = snapshots[1], snapshots[2]
    for before, param, after in zip(ema1, params2, ema2, strict=True):
        torch.testing.assert_close(after, 0.5 * before + 0.5 * param, rtol=0, atol=1e-7)
    # the reference forward (reference weights loaded into the policy) equals the starting model's, and the
    # policy's own weights come back
    batch = pad_pairs(trainer.recipe.buffer.entries()[:4], tokenizer.pad_token_id)
    policy_before = clones(trainer.copies.params)
    reference_logps = trainer.copies.reference_forward(lambda m: trainer.token_logps(m, batch), trainer.model)
    assert all(torch.equal(a, b) for a, b in zip(trainer.copies.params, policy_before, strict=True))
    with trainer.copies.as_model("reference") as starting_model:
        torch.testing.assert_close(reference_logps, trainer.token_logps(starting_model, batch))
    state = tmp_path / "out" / "checkpoint-3" / "sapo_state"
    assert (state / "ema.safetensors").exists() and (state / "reference.safetensors").exists()
    trainer.save_model()
    assert (tmp_path / "out" / "ema" / "model.safetensors").exists()


def test_offloading_rejects_a_separate_reference_model(tmp_path, tokenizer, tiny_model, suite):
    with pytest.raises(ValueError, match="ref_model= cannot be combined"):
        SAPOTrainer(model=tiny_model, args=config(tmp_path, offload_copies=True), train_dataset=suite["train"],
                    processing_class=tokenizer, ref_model=copy.deepcopy(tiny_model))


def test_unknown_copies_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="copies_dtype must be one of auto, bfloat16, float16, float32"):
        config(tmp_path, copies_dtype="int8")


def test_a_sampler_is_told_to_release_what_it_kept_for_each_gathered_generator(tmp_path, tokenizer, tiny_model,
                                                                              suite):
    class ReleasingSampler(ScriptedSampler):
        def __init__(self, outputs):
            super().__init__(outputs)
            self.models, self.releases = [], 0

        def sample(self, model, contexts, max_new_tokens):
            self.models.append(model)
            return super().sample(model, contexts, max_new_tokens)

        def release(self):
            self.releases += 1

    sampler = ReleasingSampler([[90, 91, 92, 93, 94, 95]])
    args = config(tmp_path, max_steps=3, offload_copies=True, generation_batch_size=4)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                          sampler=sampler)
    trainer.train()
    assert len(sampler.calls) == 3 and sampler.releases == 3  # one generator module per round, then released
    assert all(m is not trainer.policy for m in sampler.models)  # a plain module gathered for the round


class AutocastRecordingSampler(ScriptedSampler):
    """Records whether the generator runs under the CPU autocast the policy's forward gets."""

    def sample(self, model, contexts, max_new_tokens):
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        return super().sample(model, contexts, max_new_tokens)


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_bf16_mixed_precision_scores_policy_and_reference_alike(tmp_path, tokenizer, tiny_model, suite,
                                                                 weights_dtype):
    """At step 0 policy and reference hold the same weights: the DPO loss must be exactly log 2 under bf16."""
    sampler = AutocastRecordingSampler([[40, 41, 42, 43, 44, 45]])
    trainer = SAPOTrainer(model=tiny_model.to(weights_dtype), args=config(tmp_path, max_steps=1, bf16=True),
                          train_dataset=suite["train"], processing_class=tokenizer, sampler=sampler)
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, output = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        seen.append((loss.item(), (output.real_rewards - output.rejected_rewards).abs().max().item()))
        return (loss, output) if return_outputs else loss

    trainer.compute_loss = recording
    trainer.train()
    loss, margin = seen[0]
    assert abs(loss - math.log(2)) < 1e-6
    assert margin == 0.0
    assert sampler.autocast == (True, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# Model loading: model_init_kwargs and ref_model_init_kwargs
# ---------------------------------------------------------------------------------------------------------


def test_init_kwargs_load_the_policy_and_a_reference_given_by_path(tmp_path, model_dir, suite):
    loading = {"dtype": "bfloat16", "attn_implementation": "eager"}
    args = config(tmp_path, model_init_kwargs=loading)
    trainer = SAPOTrainer(model=str(model_dir), args=args, train_dataset=suite["train"], ref_model=str(model_dir))
    reference = trainer.copies.reference_module
    assert trainer.policy.dtype == torch.bfloat16 and trainer.policy.config._attn_implementation == "eager"
    assert reference.dtype == torch.bfloat16 and reference.config._attn_implementation == "eager"  # like the policy
    args = config(tmp_path, model_init_kwargs=loading, ref_model_init_kwargs={"attn_implementation": "sdpa"})
    trainer = SAPOTrainer(model=str(model_dir), args=args, train_dataset=suite["train"], ref_model=str(model_dir))
    reference = trainer.copies.reference_module
    assert reference.dtype == torch.float32 and reference.config._attn_implementation == "sdpa"
    assert trainer.policy.dtype == torch.bfloat16


@pytest.mark.parametrize("field", ["model_init_kwargs", "ref_model_init_kwargs"])
def test_a_load_refused_by_transformers_names_the_path_and_the_option(tmp_path, model_dir, suite, field):
    from sapo.errors import UsageError

    args = config(tmp_path, **{field: {"attn_implementation": "nonsense"}})
    with pytest.raises(UsageError, match=rf"{model_dir}: cannot load the model's weights with {field} "
                                         r'\{"attn_implementation": "nonsense"\} \(ValueError: .*nonsense'):
        SAPOTrainer(model=str(model_dir), args=args, train_dataset=suite["train"], ref_model=str(model_dir))


def test_init_kwargs_that_cannot_apply_to_a_loaded_model_are_reported(tmp_path, tokenizer, tiny_model, suite, caplog):
    args = config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}, ref_model_init_kwargs={"dtype": "bfloat16"},
                  loss_type="orpo")
    with caplog.at_level("WARNING", logger="sapo.trainer"):
        trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    assert trainer.policy.dtype == torch.float32
    assert "model_init_kwargs applies only when model is a path" in caplog.text
    assert "dtype 'bfloat16' (the instance has 'float32')" in caplog.text
    assert "ref_model_init_kwargs is unused" in caplog.text and "uses no reference model" in caplog.text


# ------------------------------------------------------------------------------------------------
# The step's bookkeeping
# ------------------------------------------------------------------------------------------------


def test_step_metrics_stay_on_the_device_until_logged(tmp_path, tokenizer, tiny_model, suite):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, max_steps=2, logging_steps=2),
                          train_dataset=suite["train"], processing_class=tokenizer)
    kept = {}

    class Peek(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                kept.update({name: list(values) for name, values in trainer._metrics.items()})

    trainer.add_callback(Peek())
    trainer.train()
    assert all(isinstance(v, torch.Tensor) for v in kept["rewards/margins"] + kept["logps/chosen"])
    row = loss_rows(tmp_path / "out")[0]
    assert row["step"] == 2 and isinstance(row["rewards/margins"], float)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_non_finite_step_is_skipped_with_and_without_clipping(tmp_path, tokenizer, tiny_model, suite,
                                                                 max_grad_norm):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, max_steps=3, max_grad_norm=max_grad_norm),
                          train_dataset=suite["train"], processing_class=tokenizer)
    compute = trainer.compute_loss

    def poisoned(model, inputs, **kwargs):  # the loss of step 2 is NaN
        loss = compute(model, inputs, **kwargs)
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    trainer.compute_loss = poisoned
    trainer.train()
    assert trainer.nonfinite_steps == 1
    assert [r["nonfinite/skipped_steps"] for r in loss_rows(tmp_path / "out")] == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.copies.params)


def test_the_non_finite_check_reads_the_norm_the_trainer_computed(tmp_path, tokenizer, tiny_model, suite):
    """No second pass over the gradients: the check takes the Trainer's clipping/logging norm of the step."""
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path), train_dataset=suite["train"],
                          processing_class=tokenizer)
    assert all(p.grad is None for p in trainer.copies.params)  # nothing to read a norm from but the Trainer's
    assert trainer._get_grad_norm(trainer.model, torch.tensor(float("nan"))).isnan()
    assert not gradients_are_finite(trainer)
    trainer._get_grad_norm(trainer.model, torch.tensor(3.0))
    assert gradients_are_finite(trainer)
    assert trainer._grad_norm is None  # used once: a later step without a norm reads its own gradients


def copying_trainer(tmp_path, tokenizer, suite, sampler, **overrides):
    from sapo.tiny import build_model

    model = build_model(tokenizer, hidden_size=32, seed=0)
    args = config(tmp_path, ema_beta=0.5, weight_decay=0.1, **overrides)
    return sampler.attach(SAPOTrainer(model=model, args=args, train_dataset=suite["train"][:16],
                                      processing_class=tokenizer, sampler=sampler))


def test_a_model_that_reproduces_its_demonstrations_takes_no_step(tmp_path, tokenizer, suite, caplog):
    """Issue #23: identical pairs never enter the buffer (each is retried at a new segment start, then dropped), and
    a step with nothing that carries signal changes no weight, optimizer moment or EMA (AdamW's weight decay and
    momentum included) but still counts; after 10 such steps the run says why it is not learning."""
    trainer = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(), max_steps=10)
    before = clones(trainer.policy.parameters())
    with caplog.at_level(logging.WARNING, logger="sapo.trainer"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.copies.ema.tensors, strict=True))
    assert trainer.state.global_step == 10 and len(trainer.recipe.buffer) == 0
    assert not trainer.optimizer.state  # AdamW never stepped: no moments
    last = loss_rows(tmp_path / "out")[-1]
    assert last["steps/skipped_no_signal"] == 10 and last["pairs/dropped"] == 40
    assert "10 optimizer steps in a row had no pair that carries signal (40 rewrites dropped" in caplog.text
    assert "rewards/accuracies" not in last  # stand-in pairs are not logged as pairs


def test_the_papers_buffer_keeps_identical_pairs_and_reports_them_as_ties(tmp_path, tokenizer, suite):
    trainer = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(), identical_rejected="keep")
    before = clones(trainer.policy.parameters())
    trainer.train()
    rows = loss_rows(tmp_path / "out")
    assert all(r["rewards/ties"] == 1.0 and "rewards/accuracies" not in r for r in rows)
    assert rows[-1]["steps/skipped_no_signal"] == 0 and rows[-1]["pairs/dropped"] == 0
    assert len(trainer.recipe.buffer) == 16 and trainer.optimizer.state  # AdamW stepped on zero-signal pairs
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))  # decay
    skipping = copying_trainer(tmp_path / "skip", tokenizer, suite, CopyingSampler(), identical_rejected="keep",
                               skip_no_signal_steps=True)
    skipping.train()
    assert loss_rows(tmp_path / "skip" / "out")[-1]["steps/skipped_no_signal"] == 4


def test_an_nll_weight_gives_identical_pairs_a_signal_and_logs_the_nll(tmp_path, tokenizer, suite):
    trainer = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(), identical_rejected="keep",
                              skip_no_signal_steps=True, nll_weight=0.5)
    trainer.train()
    rows = loss_rows(tmp_path / "out")
    assert rows[-1]["steps/skipped_no_signal"] == 0  # the real answers' NLL trains even on ties
    assert all(r["nll_loss"] > 0 and r["rewards/ties"] == 1.0 for r in rows)
    # a tie's margin term is log 2 whatever the weights, so the loss is that plus the weighted NLL
    assert all(abs(r["loss"] - (math.log(2) + 0.5 * r["nll_loss"])) < 1e-3 for r in rows)


def test_steps_with_signal_train_and_ties_are_apart_from_accuracy(tmp_path, tokenizer, suite):
    trainer = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(differ=range(0, 16, 2)))
    before = clones(trainer.policy.parameters())
    trainer.train()
    rows = loss_rows(tmp_path / "out")
    assert rows[-1]["pairs/dropped"] == 8 and all(r["rewards/ties"] == 0.0 for r in rows)
    assert all(e.rejected != e.real for e in trainer.recipe.buffer.entries())
    assert rows[-1]["steps/skipped_no_signal"] < 4
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))


def test_a_resume_across_skipped_steps_and_dropped_pairs_is_exact(tmp_path, tokenizer, suite):
    # The first round and its retry reproduce the data (all dropped: step 1 skips), later rewrites differ; the
    # sampler is the user's plug-in, whose own state (its call count) is not sapo's to checkpoint.
    full = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(differ_from_call=2), save_strategy="steps",
                           save_steps=1)
    full.train()
    resumed = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(differ_from_call=0), save_strategy="steps",
                              save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert full.no_signal_steps == resumed.no_signal_steps > 0
    assert full.recipe.dropped == resumed.recipe.dropped > 0
    assert all(torch.equal(a, b) for a, b in zip(full.policy.parameters(), resumed.policy.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(full.copies.ema.tensors, resumed.copies.ema.tensors, strict=True))


def test_rejected_judge_keeps_only_rewrites_the_task_judge_scores_below_the_real_answer(tmp_path, tokenizer, suite):
    """The filter beyond the paper, through the trainer: the built-in task judge reads each training record's ground
    truth; a rewrite that scores as well as the real answer (here: every rewrite of half the examples copies it)
    never enters the buffer."""
    from sapo import tasks

    trainer = copying_trainer(tmp_path, tokenizer, suite, CopyingSampler(differ=range(0, 16, 2)),
                              rejected_judge="sapo.tasks:judge", identical_rejected="drop")
    trainer.train()
    examples = trainer.train_dataset.examples
    assert trainer.recipe.buffer.entries()
    for entry in trainer.recipe.buffer.entries():
        record = next(e.origin.record for e in examples if (e.prompt_ids, e.response_ids) == (entry.prompt, entry.real))
        decode = partial(tokenizer.decode, skip_special_tokens=True)
        assert tasks.judge("", decode(entry.rejected), record) < tasks.judge("", decode(entry.real), record)
    rows = loss_rows(tmp_path / "out")
    assert "pairs/judged_not_worse" in rows[0] and rows[-1]["pairs/dropped"] >= 8


def test_rejected_judge_needs_a_sapo_recipe_and_a_loadable_function(tmp_path):
    with pytest.raises(ValueError, match="rejected_judge judges the EMA model's rewrites"):
        config(tmp_path, recipe="dpo", rejected_judge="sapo.tasks:judge")


@pytest.mark.parametrize("enabled", [True, False])
def test_activation_checkpointing_is_enabled_on_the_policy_without_a_deprecation_warning(tmp_path, tokenizer,
                                                                                          tiny_model, suite, enabled):
    """transformers 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns on every
    run); the new name alone turns recomputation on for the policy's decoder layers while it trains."""
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "mlp")]
            seen[state.global_step] = (model.training, [m.gradient_checkpointing for m in layers])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = config(tmp_path, max_steps=2, activation_checkpointing=enabled)
        trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                              callbacks=[Probe()])
        trainer.train()
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert args.activation_checkpointing is enabled
    assert trainer.model.is_activation_checkpointing is enabled
    assert seen.keys() == {1, 2}
    for training, flags in seen.values():
        assert training and len(flags) == 2 and all(flag is enabled for flag in flags)  # both decoder layers
