"""Every recipe runs end to end in the one trainer; SPIN swaps its opponent at iteration boundaries."""

import json
from collections import defaultdict

import helpers
import pytest
import torch
from helpers import clones

from sapo import SAPOConfig, SAPOTrainer
from sapo.buffer import ReplayEntry
from sapo.recipes import RECIPES, OfflinePairs, SelfAugmented, Spin, StepServices, Supervised, pad_pairs


def config(tmp_path, **overrides):
    return helpers.config(tmp_path / "out", **overrides)


def rows(tmp_path):
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("recipe,loss_type", [("sapo-dpo", "sigmoid"), ("sapo-orpo", "orpo"), ("sft", None),
                                              ("dpo", "sigmoid"), ("orpo", "orpo"), ("spin", "sigmoid")])
def test_recipe_runs_and_builds_only_what_it_needs(tmp_path, tokenizer, tiny_model, suite, recipe, loss_type):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, recipe=recipe), train_dataset=suite["train"],
                          processing_class=tokenizer)
    if loss_type:
        assert trainer.args.loss_type == loss_type
    assert (trainer.copies.ema is not None) == recipe.startswith("sapo")
    assert (trainer.copies.reference is not None) == (recipe in ("sapo-dpo", "dpo", "spin"))
    before = [p.detach().clone() for p in trainer.copies.params]
    trainer.train()
    trainer.save_model()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.copies.params, strict=True))
    logged = rows(tmp_path)
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert ("rewards/margins" in logged[0]) == (recipe != "sft")
    assert ("buffer/size" in logged[0]) == recipe.startswith("sapo")
    assert (tmp_path / "out" / "ema").exists() == recipe.startswith("sapo")


def test_offline_dpo_trains_on_the_datas_rejected_responses(tmp_path, tokenizer, tiny_model, suite):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, recipe="dpo"), train_dataset=suite["train"],
                          processing_class=tokenizer)
    example = trainer.train_dataset.examples[0]
    expected = list(tokenizer(suite["train"][0]["rejected"], add_special_tokens=False)["input_ids"])
    assert example.rejected_ids == expected + [tokenizer.eos_token_id]
    pairs = trainer.recipe.pairs(trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]]), 0, 4)
    assert pairs[0].real == example.response_ids and pairs[0].rejected == example.rejected_ids


def test_offline_recipe_without_rejected_field_names_the_record(tmp_path, tokenizer, tiny_model, suite):
    from sapo.data import DataError

    records = [{"messages": r["messages"]} for r in suite["train"][:4]]
    with pytest.raises(DataError, match="row 0: field 'rejected' is missing"):
        SAPOTrainer(model=tiny_model, args=config(tmp_path, recipe="orpo"), train_dataset=records,
                    processing_class=tokenizer)


def test_conflicting_recipe_and_loss_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="recipe 'dpo' needs a reference loss"):
        config(tmp_path, recipe="dpo", loss_type="orpo")
    with pytest.raises(ValueError, match="recipe must be one of"):
        config(tmp_path, recipe="kto")


def test_spin_opponent_is_previous_iterate_and_responses_are_whole(tmp_path, tokenizer, tiny_model, suite,
                                                                   snapshot_each_step):
    args = config(tmp_path, recipe="spin", max_steps=6, spin_iterations=3)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    initial = clones(trainer.copies.reference.tensors)
    seen = snapshot_each_step(trainer, lambda: (clones(trainer.copies.params), clones(trainer.copies.reference.tensors),
                                                trainer.recipe.iteration, dict(trainer.recipe.rejected)))
    trainer.train()
    assert trainer.recipe.steps_per_iteration(trainer.state.max_steps) == 2
    assert [seen[s][2] for s in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    for step in (1, 2):  # iteration 0: the opponent is the starting model
        assert all(torch.equal(r, i) for r, i in zip(seen[step][1], initial, strict=True))
    for step, source in ((3, 2), (5, 4)):  # the opponent becomes the policy as it was at the boundary
        assert all(torch.equal(r, p) for r, p in zip(seen[step][1], seen[source][0], strict=True))
    responses = seen[6][3]
    assert len(responses) == 8  # two batches of 4 in iteration 2, each example generated once
    assert all(len(tokens) >= 1 for tokens in responses.values())


def test_spin_restarts_the_schedule_at_every_iteration(tmp_path, tokenizer, tiny_model, suite):
    args = config(tmp_path, recipe="spin", max_steps=6, spin_iterations=3, lr_scheduler_type="linear", warmup_steps=1)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    trainer.train()
    rates = [r["learning_rate"] for r in rows(tmp_path)]
    assert rates[0:2] == rates[2:4] == rates[4:6]
    assert rates[0] != rates[1]  # warm-up then decay within each iteration


@pytest.mark.parametrize("do_sample,expected", [(False, (False, 1.0, 0, 1.0)), (True, (True, 0.8, 0, 1.0))])
def test_spin_samples_as_the_spin_code_does(tmp_path, tokenizer, tiny_model, suite, do_sample, expected):
    args = config(tmp_path, recipe="spin", spin_do_sample=do_sample, spin_temperature=0.8 if do_sample else 1.0)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
    settings = trainer.sampler.settings
    assert (settings.do_sample, settings.temperature, settings.top_k, settings.top_p) == expected
    assert args.spin_max_new_tokens == 256


def test_spin_budget_is_spin_max_new_tokens_within_max_length(tmp_path, tokenizer, tiny_model, suite):
    class Recording:
        def __init__(self):
            self.calls = []

        def sample(self, model, contexts, max_new_tokens):
            self.calls.append((contexts, max_new_tokens))
            return [[tokenizer.eos_token_id] for _ in contexts]

    for budget in (5, 500):
        args = config(tmp_path, recipe="spin", max_steps=1, spin_max_new_tokens=budget, overwrite_output_dir=True)
        sampler = Recording()
        SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer,
                    sampler=sampler).train()
        contexts, given = sampler.calls[0]
        assert given == min(budget, max(args.max_length - len(c) for c in contexts))
        assert given == 5 if budget == 5 else given < 500


# ---------------------------------------------------------------------------------------------------------
# Pair sources on their own: no model, the trainer's services faked
# ---------------------------------------------------------------------------------------------------------


EOS = 2


class FakeServices:
    """Records what a recipe asks of the trainer; generation returns scripted tokens."""

    def __init__(self, sample=(7, 8, 9)):
        self.sample, self.generated, self.refreshes, self.metrics = list(sample), [], 0, defaultdict(list)

    def services(self):
        return StepServices(generate=self.generate, refresh_reference_from_policy=self.refresh,
                            any_rank=lambda flag: flag, record=lambda k, v: self.metrics[k].append(v),
                            pad_token_id=0, eos_token_ids={EOS})

    def generate(self, which, contexts, max_new_tokens):
        self.generated.append((which, [list(c) for c in contexts], max_new_tokens))
        return [self.sample[:max_new_tokens] for _ in contexts]

    def refresh(self):
        self.refreshes += 1


def unit_args(**overrides):
    return config_like(max_steps=4, per_device_train_batch_size=2, token_generate_length=3, max_length=32,
                       max_prompt_length=16, **overrides)


def config_like(**overrides):
    settings = dict(output_dir="unused", learning_rate=1e-3, report_to="none", use_cpu=True, seed=0)
    settings.update(overrides)
    return SAPOConfig(**settings)


INPUTS = {"index": [0, 1], "prompt_ids": [[1, 5, 6], [1, 5, 7]], "response_ids": [[10, 11, 12, 13, 14, 15, EOS]] * 2,
          "rejected_ids": [[20, EOS], [21, EOS]]}


def test_every_recipe_is_registered_under_its_config_name():
    from sapo.config import RECIPES as NAMES

    assert tuple(RECIPES) == NAMES and all(RECIPES[name].name == name for name in NAMES)


def test_self_augmented_rewrites_a_segment_and_replays_from_its_buffer():
    fake = FakeServices()
    recipe = SelfAugmented(unit_args(), fake.services(), seed=0)
    pairs = recipe.pairs(INPUTS, step=0, max_steps=4)
    which, contexts, budget = fake.generated[0]
    assert which == "ema" and budget == 3 and len(contexts) == 2
    for entry in recipe.buffer.entries():
        k = entry.segment_start
        assert entry.rejected == entry.real[:k] + [7, 8, 9] + entry.real[k + 3:]  # one segment replaced
    assert len(pairs) == 2 and fake.metrics["buffer/size"] == [2.0]
    assert recipe.state_files(3) == ["segment_rng_rank3.json", "replay_buffer_rank3.safetensors",
                                     "pending_rank3.json"]


def test_self_augmented_state_round_trips(tmp_path):
    fake = FakeServices()
    recipe = SelfAugmented(unit_args(generation_batch_size=4), fake.services(), seed=0)
    recipe.pairs(INPUTS, 0, 4)  # empty buffer: augments the first batch at once
    recipe.pairs(INPUTS, 1, 4)  # queued: 2 of 4 waiting
    recipe.save(tmp_path, 0)
    restored = SelfAugmented(unit_args(generation_batch_size=4), FakeServices().services(), seed=99)
    restored.load(tmp_path, 0)
    assert restored.pending == recipe.pending and len(restored.pending) == 2
    assert [(e.rejected, e.times_sampled) for e in restored.buffer.entries()] == [
        (e.rejected, e.times_sampled) for e in recipe.buffer.entries()]
    assert restored.segment_rng.random() == recipe.segment_rng.random()


def test_reference_refresh_follows_the_mode_and_period():
    def refresh(mode, step):
        return SelfAugmented(unit_args(ref_update_mode=mode), FakeServices().services(), 0).reference_refresh(step, 2)

    assert (refresh("ema", 4), refresh("policy", 4), refresh("policy", 3), refresh("fixed", 4)) == (
        "ema", "policy", None, None)


def test_offline_and_supervised_batches_come_from_the_data():
    fake = FakeServices()
    pairs = OfflinePairs(unit_args(recipe="dpo"), fake.services(), 0).pairs(INPUTS, 0, 4)
    assert [p.rejected for p in pairs] == INPUTS["rejected_ids"] and not fake.generated
    batch = Supervised(unit_args(recipe="sft"), fake.services(), 0).batch(INPUTS, 0, 4)
    assert batch["input_ids"].shape[0] == 2 and batch["loss_mask"][0].sum() == len(INPUTS["response_ids"][0])


def test_spin_generates_once_per_example_and_iteration_and_refreshes_the_opponent(tmp_path):
    fake = FakeServices(sample=(30, 31, EOS))
    recipe = Spin(unit_args(recipe="spin", spin_iterations=2, spin_max_new_tokens=5), fake.services(), 0)
    for step in range(4):
        pairs = recipe.pairs(INPUTS, step, max_steps=4)
    assert [w for w, _, _ in fake.generated] == ["reference", "reference"]  # iteration 0 and 1, not per step
    assert fake.generated[0][2] == 5 and fake.refreshes == 1 and recipe.iteration == 1
    assert [p.rejected for p in pairs] == [[30, 31, EOS]] * 2
    assert recipe.schedule_period(4) == 2
    recipe.save(tmp_path, 0)
    restored = Spin(unit_args(recipe="spin"), FakeServices().services(), 0)
    restored.load(tmp_path, 0)
    assert (restored.iteration, restored.rejected) == (recipe.iteration, recipe.rejected)


def test_pad_pairs_packs_each_pair_around_its_shared_prefix():
    entries = [ReplayEntry([1, 2], [3, 4, 5], [3, 9], 1, 1),  # shares prompt + y[:1]
               ReplayEntry([7], [8], [8], 0, 0),  # rejected == real: everything shared
               ReplayEntry([6], [5], [4, 3], 0, 2)]  # shares the prompt only
    batch = pad_pairs(entries, pad_token_id=0)
    assert batch["prefix_lengths"].tolist() == [3, 2, 1]
    assert batch["packed_input_ids"].shape == (3, 8)
    assert batch["packed_input_ids"][:, :5].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [6, 5, 4, 3, 0]]
    assert batch["packed_input_ids"][0, 5].item() == 9


class CopyingServices(FakeServices):
    """A generator that continues every context with the real response it came from (a model that reproduces its
    demonstrations), except at the segment starts in `differ_at`, where it writes the scripted sample."""

    def __init__(self, inputs, differ_at=(), judge=None):
        super().__init__()
        self.sequences = [p + y for p, y in zip(inputs["prompt_ids"], inputs["response_ids"], strict=True)]
        self.differ_at, self.judge, self.judged = set(differ_at), judge, []

    def services(self):
        services = super().services()
        if self.judge is not None:
            services.judge_rewrites = self.judge_rewrites
        return services

    def generate(self, which, contexts, max_new_tokens):
        self.generated.append((which, [list(c) for c in contexts], max_new_tokens))
        samples = []
        for context in contexts:
            full = next(s for s in self.sequences if s[:len(context)] == list(context))
            start = len(context) - len(INPUTS["prompt_ids"][0])
            samples.append(self.sample[:max_new_tokens] if start in self.differ_at
                           else full[len(context):len(context) + max_new_tokens])
        return samples

    def judge_rewrites(self, indices, real, rejected):
        self.judged.append(list(indices))
        return [self.judge(r) for r in rejected]


def test_an_identical_rewrite_is_regenerated_at_a_new_segment_start_then_dropped_and_counted():
    fake = CopyingServices(INPUTS)
    recipe = SelfAugmented(unit_args(), fake.services(), seed=0)
    recipe.augment(INPUTS["prompt_ids"], INPUTS["response_ids"], INPUTS["index"])
    assert len(fake.generated) == 2  # the round, then one retry of both examples at fresh segment starts
    assert len(recipe.buffer) == 0 and recipe.dropped == 2
    assert fake.metrics["segment/identical_fraction"] == [1.0, 1.0]


def test_a_retry_that_differs_enters_the_buffer():
    fake = CopyingServices(INPUTS, differ_at=(1, 2, 3))
    recipe = SelfAugmented(unit_args(), fake.services(), seed=3)
    entries = recipe.augment(INPUTS["prompt_ids"], INPUTS["response_ids"], INPUTS["index"])
    assert all(e.rejected != e.real for e in entries) and recipe.dropped == 2 - len(entries)
    assert len(recipe.buffer) == len(entries) > 0


@pytest.mark.parametrize("mode,generations,in_buffer", [("drop", 1, 0), ("keep", 1, 2)])
def test_drop_generates_once_and_keep_is_the_papers_buffer(mode, generations, in_buffer):
    fake = CopyingServices(INPUTS)
    recipe = SelfAugmented(unit_args(identical_rejected=mode), fake.services(), seed=0)
    recipe.augment(INPUTS["prompt_ids"], INPUTS["response_ids"], INPUTS["index"])
    assert len(fake.generated) == generations and len(recipe.buffer) == in_buffer
    assert recipe.dropped == 2 - in_buffer


def test_with_nothing_to_draw_the_batch_is_stand_in_pairs_without_signal():
    recipe = SelfAugmented(unit_args(), CopyingServices(INPUTS).services(), seed=0)
    batch = recipe.batch(INPUTS, 0, 4)
    assert batch["placeholder"] is True and batch["signal"] is False and batch["identical"] == [True, True]
    assert batch["entry_ids"] == [-1, -1]
    kept = SelfAugmented(unit_args(identical_rejected="keep"), CopyingServices(INPUTS).services(), seed=0)
    batch = kept.batch(INPUTS, 0, 4)  # the paper's buffer: identical pairs drawn, no signal, not stand-ins
    assert batch["placeholder"] is False and batch["signal"] is False and batch["entry_ids"] != [-1, -1]
    orpo = SelfAugmented(unit_args(identical_rejected="keep", loss_type="orpo"), CopyingServices(INPUTS).services(),
                         seed=0)
    assert orpo.batch(INPUTS, 0, 4)["signal"] is True  # ORPO's NLL term trains on an identical pair too


def test_rejected_judge_keeps_only_rewrites_it_scores_below_the_real_response():
    judge = lambda rejected: 8 not in rejected  # noqa: E731 - "worse" unless the sample wrote an 8
    fake = CopyingServices(INPUTS, differ_at=range(7), judge=judge)
    recipe = SelfAugmented(unit_args(identical_rejected="drop"), fake.services(), seed=0)
    entries = recipe.augment(INPUTS["prompt_ids"], INPUTS["response_ids"], INPUTS["index"])
    assert fake.judged == [[0, 1]]  # the dataset index of each judged rewrite
    assert entries == [] and recipe.dropped == 2 and fake.metrics["pairs/judged_not_worse"] == [1.0]
    fake = CopyingServices(INPUTS, differ_at=range(7), judge=lambda rejected: True)
    recipe = SelfAugmented(unit_args(identical_rejected="drop"), fake.services(), seed=0)
    assert len(recipe.augment(INPUTS["prompt_ids"], INPUTS["response_ids"], INPUTS["index"])) == 2


def test_a_short_epoch_caps_the_round_and_flushes_what_is_pending_at_its_last_batch():
    """Issue #22.4: 48 examples at batch 8 (6 batches) with the default round of 64 examples: before, the first
    batch's 8 pairs were the buffer for the whole epoch."""
    fake = FakeServices()
    recipe = SelfAugmented(unit_args(), fake.services(), seed=0)  # batch 2, default round: 64 examples
    assert recipe.round_size == 64
    recipe.set_epoch_length(3)  # 6 examples per epoch: a quarter is under one batch, so one batch per round
    assert recipe.round_size == 2
    recipe.set_epoch_length(40)  # 80 examples: rounds of 20
    assert recipe.round_size == 20
    for step in range(39):
        recipe.pairs(INPUTS, step, 100)
    assert len(recipe.buffer) == 2 + 76 // 20 * 20 and len(recipe.pending) == 76 % 20
    recipe.pairs(INPUTS, 39, 100)  # the epoch's last batch: everything pending is generated
    assert recipe.pending == [] and len(recipe.buffer) == 80 and recipe.epoch_position == 0


# ---------------------------------------------------------------------------------------------------------
# SPIN's per-iteration schedule (the SPIN scripts' learning rates and betas), fresh optimizer, EOS on cut answers
# ---------------------------------------------------------------------------------------------------------


def test_spin_paper_preset_is_the_spin_scripts_schedule_in_one_setting():
    args = config_like(recipe="spin", spin_preset="paper")
    assert args.spin_iterations == 4
    assert args.spin_learning_rates == [5e-7, 5e-7, 1e-7, 1e-7] and args.spin_betas == [0.1, 0.1, 0.1, 5.0]
    assert (args.learning_rate, args.beta) == (5e-7, 0.1)  # what the optimizer starts from and the card shows
    assert args.spin_reset_optimizer and args.spin_end_with_eos
    assert config_like(recipe="spin").spin_iterations == 3  # the default without per-iteration values


@pytest.mark.parametrize("overrides,message", [
    ({"recipe": "spin", "spin_preset": "paper", "spin_betas": [0.1, 0.2, 0.3, 0.4]},
     "spin_preset 'paper' sets spin_betas; give one or the other"),
    ({"recipe": "spin", "spin_preset": "zephyr"}, "spin_preset must be one of paper; got 'zephyr'"),
    ({"recipe": "spin", "spin_betas": [0.1, 0.2], "spin_iterations": 3},
     "spin_betas has 2 value(s), one per iteration, but spin_iterations is 3"),
    ({"recipe": "spin", "spin_learning_rates": [1e-6, -1e-7]}, "spin_learning_rates must be finite numbers > 0"),
    ({"recipe": "sapo", "spin_preset": "paper"}, "spin_preset applies to recipe 'spin' only, not 'sapo'"),
    ({"recipe": "dpo", "spin_end_with_eos": True}, "spin_end_with_eos applies to recipe 'spin' only"),
])
def test_spin_schedule_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_like(**overrides)


def test_spin_iterations_carry_their_beta_learning_rate_and_a_fresh_optimizer():
    fake = FakeServices(sample=(30, 31, EOS))
    resets = []
    services = fake.services()
    services.reset_optimizer = lambda: resets.append(1)
    recipe = Spin(unit_args(recipe="spin", spin_learning_rates=[1e-3, 2e-4], spin_betas=[0.1, 5.0],
                            spin_reset_optimizer=True), services, 0)
    assert recipe.beta == 0.1 and recipe.learning_rate_scale(0) == 1.0
    assert recipe.learning_rate_scale(1) == pytest.approx(0.2)
    recipe.pairs(INPUTS, 0, max_steps=4)
    assert recipe.beta == 0.1 and not resets
    recipe.pairs(INPUTS, 2, max_steps=4)
    assert recipe.beta == 5.0 and resets == [1] and fake.metrics["spin/beta"] == [0.1, 5.0]


@pytest.mark.parametrize("end_with_eos,expected", [(False, [30, 31, 32]), (True, [30, 31, 32, EOS])])
def test_spin_ends_a_cut_answer_with_the_end_token_when_asked(end_with_eos, expected):
    fake = FakeServices(sample=(30, 31, 32, 33))
    recipe = Spin(unit_args(recipe="spin", spin_max_new_tokens=3, spin_end_with_eos=end_with_eos), fake.services(),
                  0)
    assert [p.rejected for p in recipe.pairs(INPUTS, 0, max_steps=4)] == [expected] * 2
    tight = Spin(config_like(recipe="spin", max_steps=4, per_device_train_batch_size=2, max_length=6,
                             max_prompt_length=3, token_generate_length=3, spin_end_with_eos=True),
                 FakeServices(sample=(30, 31, 32, 33)).services(), 0)
    assert [p.rejected for p in tight.pairs(INPUTS, 0, max_steps=4)] == [[30, 31, EOS]] * 2  # max_length 6
    finished = Spin(unit_args(recipe="spin", spin_max_new_tokens=3, spin_end_with_eos=True),
                    FakeServices(sample=(30, EOS)).services(), 0)
    assert [p.rejected for p in finished.pairs(INPUTS, 0, max_steps=4)] == [[30, EOS]] * 2  # left as generated


def test_spin_per_iteration_rates_and_betas_reach_the_optimizer_and_the_loss_and_survive_resume(
        tmp_path, tokenizer, tiny_model, suite):
    import copy

    settings = dict(recipe="spin", max_steps=4, spin_learning_rates=[1e-3, 2e-4], spin_betas=[0.1, 5.0],
                    spin_reset_optimizer=True, lr_scheduler_type="constant", save_strategy="steps", save_steps=1)
    trainer = SAPOTrainer(model=copy.deepcopy(tiny_model), args=config(tmp_path, **settings),
                          train_dataset=suite["train"], processing_class=tokenizer)
    trainer.train()
    assert [r["learning_rate"] for r in rows(tmp_path)] == pytest.approx([1e-3, 1e-3, 2e-4, 2e-4])
    resumed = SAPOTrainer(model=copy.deepcopy(tiny_model), args=config(tmp_path, **settings),
                          train_dataset=suite["train"], processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.recipe.iteration == 1 and resumed.recipe.beta == 5.0
    assert rows(tmp_path)[-1]["learning_rate"] == pytest.approx(2e-4)


def test_spin_loss_uses_the_iterations_beta(tmp_path, tokenizer, tiny_model, suite):
    """Same pairs, same models: the loss differs between iterations exactly when their betas do."""
    losses = {}
    for betas in ([0.1, 0.1], [0.1, 5.0]):
        args = config(tmp_path, recipe="spin", max_steps=2, spin_betas=betas, overwrite_output_dir=True)
        trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], processing_class=tokenizer)
        with torch.no_grad():
            trainer.copies.reference.tensors[0].add_(0.05)  # a reference that differs from the policy
        items = [trainer.train_dataset[i] for i in range(2)]
        inputs = {key: [item[key] for item in items] for key in items[0]}
        batch = trainer.recipe.batch(inputs, 0, 2)
        values = []
        for iteration in (0, 1):  # the same pairs and opponent, scored as iteration 0 and as iteration 1
            trainer.recipe.iteration = iteration
            values.append(float(trainer.scoring.pair_loss(trainer.model, batch).loss))
        losses[tuple(betas)] = values
    assert losses[(0.1, 0.1)][0] == pytest.approx(losses[(0.1, 0.1)][1], abs=1e-6)
    assert losses[(0.1, 5.0)][0] != pytest.approx(losses[(0.1, 5.0)][1], abs=1e-3)
