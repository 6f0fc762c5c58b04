"""Every recipe runs end to end in the one trainer; SPIN swaps its opponent at iteration boundaries."""

import json

import pytest
import torch
from conftest import clones

from sapo import SAPOConfig, SAPOTrainer


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                    learning_rate=1e-3, token_generate_length=4, max_length=64, max_prompt_length=48,
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    settings.update(overrides)
    return SAPOConfig(**settings)


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
