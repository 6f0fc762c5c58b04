"""Evaluation during training (`sapo.heldout` and its wiring in `SAPOTrainer`): fixed eval pairs, their metrics,
their checkpoint file, the judged score, load_best_model_at_end, and the command line."""

from __future__ import annotations

import json
import math
import random

import helpers
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import sapo.scoring
from sapo import SAPOTrainer, tasks
from sapo.cli import main
from sapo.copies import EMA
from sapo.errors import DataError, UsageError
from sapo.heldout import (
    EVAL_PAIRS_FILE,
    STATISTICS,
    check_metric_for_best_model,
    eval_metric_names,
    eval_metrics,
    independent_rng,
    load_eval_pairs,
    read_eval_records,
    save_eval_pairs,
    segment_rejected,
    whole_rejected,
)
from sapo.heldout_eval import heldout_pairs
from sapo.losses import pair_loss
from sapo.recipes import pad_sequences
from sapo.segments import sample_truncation_point, splice_rejected


@pytest.fixture(scope="module")
def heldout():
    return tasks.make_suite(0, 7, seed=3)["heldout"]


HELDOUT_RUN = dict(token_generate_length=6, ref_update_mode="fixed", per_device_eval_batch_size=3)


def config(tmp_path, **overrides):
    return helpers.config(tmp_path / "out", **{**HELDOUT_RUN, **overrides})


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval_loss" in row]


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------


def statistics(pair_losses, real, rejected, logp_real, tokens, logp_rejected, tokens_rejected=None,
               token_sums=None):
    """`STATISTICS` rows; `token_sums`: per example (logits_real, logits_rejected, entropy, top1_real), or NaN."""
    tokens_rejected = tokens_rejected or [float("nan")] * len(tokens)
    token_sums = token_sums or [(float("nan"),) * 4] * len(tokens)
    return torch.tensor([[*row[:-1], *row[-1]] for row in zip(pair_losses, real, rejected, logp_real, tokens,
                                                                logp_rejected, tokens_rejected, token_sums,
                                                                strict=True)])


def test_eval_metrics_over_the_whole_set():
    rows = statistics([0.5, 0.7, 0.9], [0.2, -0.1, 0.0], [0.1, 0.3, 0.0], [-4.0, -6.0, -2.0], [2, 3, 1],
                      [-5.0, -5.0, -1.0])
    metrics = eval_metrics(rows, nll_weight=0.0)
    assert metrics["loss"] == pytest.approx(0.7)
    assert metrics["rewards/chosen"] == pytest.approx(0.1 / 3) and metrics["rewards/rejected"] == pytest.approx(0.4 / 3)
    assert metrics["rewards/margins"] == pytest.approx(-0.1)
    assert metrics["rewards/ties"] == pytest.approx(1 / 3)  # the third pair: margin exactly 0
    assert metrics["rewards/accuracies"] == pytest.approx(1 / 2)  # of the two ranked pairs, one is right
    assert metrics["logps/chosen"] == pytest.approx(-4.0) and metrics["logps/rejected"] == pytest.approx(-11 / 3)
    assert metrics["logps/chosen_per_token"] == pytest.approx(-12.0 / 6)  # token-weighted, not a mean of means
    # ORPO adds the token-level NLL of the real responses to the mean pair loss
    assert eval_metrics(rows, nll_weight=1.0)["loss"] == pytest.approx(0.7 + 2.0)
    assert "entropy" not in metrics and "logits/chosen" not in metrics  # scored without token statistics


def test_eval_token_metrics_are_token_weighted_over_the_set():
    rows = statistics([0.5, 0.7, 0.9], [0.2, -0.1, 0.0], [0.1, 0.3, 0.0], [-4.0, -6.0, -2.0], [2, 3, 1],
                      [-5.0, -5.0, -1.0], tokens_rejected=[1, 2, 1],
                      token_sums=[(0.2, 0.4, 3.0, 1.0), (0.3, -0.2, 5.0, 2.0), (0.1, 0.2, 2.0, 0.0)])
    metrics = eval_metrics(rows, nll_weight=0.0)
    assert metrics["logits/chosen"] == pytest.approx(0.6 / 6) and metrics["logits/rejected"] == pytest.approx(0.4 / 4)
    assert metrics["entropy"] == pytest.approx(10.0 / 10)  # over the tokens of both sides
    assert metrics["mean_token_accuracy"] == pytest.approx(3 / 6)  # over the chosen tokens
    # ORPO's logps are per-token means of each response (TRL's ORPOTrainer), DPO's sums
    orpo = eval_metrics(rows, nll_weight=1.0, mean_logps=True)
    assert orpo["logps/chosen"] == pytest.approx(-2.0) and orpo["logps/rejected"] == pytest.approx(-8.5 / 3)


def test_eval_metrics_without_pairs_is_the_nll():
    nan = float("nan")
    rows = statistics([nan, nan], [nan, nan], [nan, nan], [-3.0, -5.0], [1, 3], [nan, nan])
    assert eval_metrics(rows, nll_weight=0.0) == pytest.approx(
        {"loss": 2.0, "logps/chosen": -4.0, "logps/chosen_per_token": -2.0})
    with pytest.raises(ValueError, match="statistics"):
        eval_metrics(torch.zeros(0, len(STATISTICS)), nll_weight=0.0)


def test_metric_for_best_model_with_an_old_name_is_told_the_new_one():
    logged = ["eval_loss", "eval_logps/chosen_per_token"]
    check_metric_for_best_model("logps/chosen_per_token", logged)
    with pytest.raises(UsageError, match=r"evaluation logs no 'eval_logps/real_per_token' \(now named "
                                         r"'eval_logps/chosen_per_token', TRL's name\)"):
        check_metric_for_best_model("logps/real_per_token", logged)


def test_segment_rejected_follows_the_training_rule():
    prompts, responses = [[1, 2, 3], [4, 5]], [list(range(10, 30)), [40, 41, 42]]
    asked = []

    def generate(contexts, max_new_tokens):
        asked.append((contexts, max_new_tokens))
        return [[90, 91, 92, 93], [7, 99, 98]]

    rejected = segment_rejected(prompts, responses, generate, token_generate_length=4, max_length=64,
                                eos_token_ids={99}, rng=random.Random(5))
    rng = random.Random(5)
    (k1, g1), (k2, g2) = (sample_truncation_point(len(p), len(y), 4, 64, rng)
                          for p, y in zip(prompts, responses, strict=True))
    assert asked == [([prompts[0] + responses[0][:k1], prompts[1] + responses[1][:k2]], 4)]
    assert rejected == [splice_rejected(responses[0], k1, [90, 91, 92, 93], g1, {99})[0],
                        splice_rejected(responses[1], k2, [7, 99, 98], g2, {99})[0]]
    assert rejected[1] == [7, 99]  # the sample ended: the rejected response ends there


def test_whole_rejected_fits_max_length():
    rejected = whole_rejected([[1] * 6, [2] * 2], lambda contexts, n: [[5] * n, [6] * n], max_new_tokens=10,
                              max_length=8)
    assert rejected == [[5, 5], [6] * 6]


def test_eval_pairs_file_round_trip(tmp_path):
    path = tmp_path / EVAL_PAIRS_FILE
    assert load_eval_pairs(path) == {}
    save_eval_pairs(path, {"": ("abc", [[1, 2], [3]]), "dev": ("def", None)})
    assert load_eval_pairs(path) == {"": ("abc", [[1, 2], [3]]), "dev": ("def", None)}


def test_independent_rng_leaves_the_global_stream_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with independent_rng(4):
        first = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    with independent_rng(4):
        assert torch.equal(torch.rand(2), first)


def test_read_eval_records_names_file_line_and_field(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                               "content": "yo"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*messages"):
        read_eval_records(str(path), "test", skip_invalid=False, with_rejected=False)
    assert len(read_eval_records(str(path), "test", skip_invalid=True, with_rejected=False)) == 1


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


def test_eval_strategy_without_eval_data_names_both(tmp_path, tokenizer, tiny_model, suite):
    with pytest.raises(UsageError, match="eval_strategy 'steps'.*eval_dataset="):
        SAPOTrainer(model=tiny_model, args=config(tmp_path, eval_strategy="steps", eval_steps=2),
                    train_dataset=suite["train"], processing_class=tokenizer)
    assert not (tmp_path / "out").exists()


def test_metrics_are_the_training_loss_on_the_fixed_pairs(tmp_path, tokenizer, tiny_model, suite, heldout,
                                                          monkeypatch):
    logged = []

    class Integration(TrainerCallback):  # what report_to integrations receive
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, max_steps=3), train_dataset=suite["train"],
                          eval_dataset=heldout, processing_class=tokenizer, callbacks=[Integration()])
    trainer.train()
    packed_calls = []
    packed = sapo.scoring.packed_response_token_scores
    monkeypatch.setattr(sapo.scoring, "packed_response_token_scores",
                        lambda *args, **kwargs: packed_calls.append(1) or packed(*args, **kwargs))
    metrics = trainer.evaluate()
    assert packed_calls  # eval pairs are scored like training pairs: packed around their shared prefix
    assert logged[-1]["eval_rewards/margins"] == metrics["eval_rewards/margins"]
    assert eval_rows(tmp_path / "out")[-1]["eval_loss"] == metrics["eval_loss"]  # and metrics.jsonl, at step 3
    pairs = trainer._eval_pairs[""]
    assert len(pairs) == len(heldout) and any(item["rejected_ids"] != item["response_ids"] for item in pairs)
    items = [pairs[i] for i in range(len(pairs))]
    sequences = [(i["prompt_ids"], i["response_ids"]) for i in items] + [(i["prompt_ids"], i["rejected_ids"])
                                                                        for i in items]
    batch = pad_sequences(sequences, tokenizer.pad_token_id)
    mask = batch["loss_mask"][:, 1:]
    with torch.no_grad():  # one batch of every pair, scored by hand with the policy and the (start) reference
        token_logps = trainer.token_logps(trainer.model, batch)
        reference = trainer.copies.reference_forward(lambda m: trainer.token_logps(m, batch), trainer.model)
    result = pair_loss("sigmoid", token_logps, mask, reference, beta=trainer.args.beta)
    real, rejected = result.output.real_rewards, result.output.rejected_rewards
    half = len(items)
    assert metrics["eval_loss"] == pytest.approx(result.loss.item(), rel=1e-5)  # eval batches of 3: same number
    assert metrics["eval_rewards/margins"] == pytest.approx((real - rejected).mean().item(), rel=1e-4, abs=1e-7)
    assert metrics["eval_rewards/accuracies"] == pytest.approx((real > rejected).float().mean().item())
    assert metrics["eval_rewards/chosen"] == pytest.approx(real.mean().item(), rel=1e-4, abs=1e-7)
    per_token = (token_logps[:half] * mask[:half]).sum() / mask[:half].sum()
    assert metrics["eval_logps/chosen_per_token"] == pytest.approx(per_token.item(), rel=1e-5)
    assert metrics["eval_rewards/accuracies"] > 0  # the policy has learnt something against the start model
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0 and metrics["eval_entropy"] > 0
    assert {"eval_logits/chosen", "eval_logits/rejected"} <= set(metrics)


def test_pairs_are_made_once_by_the_start_model_and_training_is_unchanged(tmp_path, tokenizer, suite, heldout):
    from sapo import tiny

    def run(name, **eval_settings):
        model = tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0)
        trainer = SAPOTrainer(model=model, args=config(tmp_path / name, **eval_settings),
                              train_dataset=suite["train"], processing_class=tokenizer,
                              eval_dataset=heldout if eval_settings else None)
        before = trainer.evaluate()["eval_loss"] if eval_settings else None
        trainer.train()
        return trainer, before

    plain, _ = run("plain")
    evaluated, before = run("evaluated", eval_strategy="steps", eval_steps=1)
    assert before == pytest.approx(math.log(2))  # step 0: policy == reference
    for a, b in zip(plain.model.parameters(), evaluated.model.parameters(), strict=True):
        assert torch.equal(a, b)  # evaluating every step left training's random stream alone
    rows = eval_rows(tmp_path / "evaluated" / "out")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # the pairs of every evaluation are the ones made at step 0 by the start model, from the eval seed
    fresh = SAPOTrainer(model=tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0),
                        args=config(tmp_path / "fresh"), train_dataset=suite["train"], processing_class=tokenizer,
                        eval_dataset=heldout)
    assert heldout_pairs(fresh, "").rejected == evaluated._eval_pairs[""].rejected


def test_resumed_run_evaluates_on_the_saved_pairs(tmp_path, model_dir, tokenizer, suite, heldout, caplog):
    args = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    whole = SAPOTrainer(model=str(model_dir), args=config(tmp_path / "whole", **args), train_dataset=suite["train"],
                        eval_dataset=heldout)
    whole.train()
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-2"
    saved = load_eval_pairs(checkpoint / "sapo_state" / EVAL_PAIRS_FILE)
    assert saved[""][1] == whole._eval_pairs[""].rejected
    resumed = SAPOTrainer(model=str(model_dir), args=config(tmp_path / "whole", **args),
                          train_dataset=suite["train"], eval_dataset=heldout)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "eval pairs made at step" not in caplog.text
    assert resumed._eval_pairs[""].rejected == whole._eval_pairs[""].rejected
    rows = eval_rows(tmp_path / "whole" / "out")
    assert [row["step"] for row in rows] == [2, 4]
    assert rows[1]["eval_loss"] == pytest.approx(whole.state.log_history[-2]["eval_loss"], rel=1e-6)


def test_best_checkpoint_is_loaded_with_its_ema(tmp_path, tokenizer, tiny_model, suite, heldout):
    # the eval loss falls as training goes, so "greater is better" makes the first evaluated step the best
    args = config(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                  save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                  greater_is_better=True)
    trainer = SAPOTrainer(model=tiny_model, args=args, train_dataset=suite["train"], eval_dataset=heldout,
                          processing_class=tokenizer)
    trainer.train()
    rows = eval_rows(tmp_path / "out")
    best_step = max(rows, key=lambda row: row["eval_loss"])["step"]
    assert best_step != 4
    best = tmp_path / "out" / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [best.name]  # rotation kept it
    assert json.loads((best / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best)
    trainer.save_model()
    policy, saved = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(best / "model.safetensors"))
    assert all(torch.equal(policy[name], saved[name]) for name in saved)
    ema, saved_ema = load_file(str(tmp_path / "out" / "ema" / "model.safetensors")), \
        load_file(str(best / "sapo_state" / f"{EMA}.safetensors"))
    assert all(torch.equal(ema[name], tensor) for name, tensor in saved_ema.items())


def test_named_sets_offline_pairs_and_sft(tmp_path, tokenizer, tiny_model, suite, heldout):
    dpo = SAPOTrainer(model=tiny_model, args=config(tmp_path / "dpo", recipe="dpo"), train_dataset=suite["train"],
                      eval_dataset={"a": heldout[:3], "b": heldout[3:]}, processing_class=tokenizer)
    metrics = dpo.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_rewards/margins", "eval_b_logps/chosen_per_token"} <= set(metrics)
    assert set(eval_metric_names(dpo.args, ["a", "b"], judged=False)) == {
        name for name in metrics if name != "epoch" and not name.endswith("model_preparation_time")}
    assert dpo._eval_pairs["a"].rejected == [dpo._eval_sets["a"].data[i]["rejected_ids"] for i in range(3)]
    sft = SAPOTrainer(model=tiny_model, args=config(tmp_path / "sft", recipe="sft"), train_dataset=suite["train"],
                      eval_dataset=heldout, processing_class=tokenizer)
    metrics = sft.evaluate()
    assert metrics["eval_loss"] == pytest.approx(-metrics["eval_logps/chosen_per_token"])
    assert "eval_rewards/margins" not in metrics
    with pytest.raises(UsageError, match="metric_for_best_model 'rewards/margins': evaluation logs no "
                                         "'eval_rewards/margins'; it logs eval_loss, "):
        SAPOTrainer(model=tiny_model, args=config(tmp_path / "best", recipe="sft",
                                                  metric_for_best_model="rewards/margins"),
                    train_dataset=suite["train"], eval_dataset=heldout, processing_class=tokenizer)


def test_eval_judge_scores_the_policy_answers(tmp_path, tokenizer, tiny_model, suite, heldout):
    judge = tmp_path / "length_judge.py"
    judge.write_text("def score(prompt, response, record):\n    return float(len(record['reference']))\n")
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, eval_judge=f"{judge}:score",
                                                        eval_judge_max_new_tokens=4),
                          train_dataset=suite["train"], eval_dataset=heldout, processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert metrics["eval_judge/score"] == pytest.approx(sum(len(r["reference"]) for r in heldout) / len(heldout))
    with pytest.raises(UsageError, match="eval_judge 'nowhere:score': cannot import"):
        SAPOTrainer(model=tiny_model, args=config(tmp_path, eval_judge="nowhere:score"),
                    train_dataset=suite["train"], eval_dataset=heldout, processing_class=tokenizer)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_trains_with_evaluation_end_to_end(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", tasks.make_suite(16, 0, seed=1)["train"])
    dev = write_jsonl(tmp_path / "dev.jsonl", tasks.make_suite(0, 5, seed=2)["heldout"])
    common = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_steps", "4",
              "--per_device_train_batch_size", "4", "--token_generate_length", "4", "--max_length", "64",
              "--max_prompt_length", "48", "--use_cpu", "--report_to", "none", "--save_strategy", "no",
              "--disable_tqdm", "true"]
    out = tmp_path / "out"
    assert main([*common, "--output_dir", str(out), "--eval_dataset_name", str(dev), "--eval_strategy", "steps",
                 "--eval_steps", "2", "--eval_judge", "sapo.tasks:judge"]) == 0
    rows = eval_rows(out)
    assert [row["step"] for row in rows] == [2, 4]
    assert {"eval_rewards/accuracies", "eval_logps/chosen_per_token", "eval_judge/score"} <= set(rows[0])
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "eval.png").is_file()
    capsys.readouterr()
    assert main([*common, "--output_dir", str(tmp_path / "o2"), "--eval_strategy", "steps"]) == 2
    assert "eval_strategy 'steps'" in capsys.readouterr().err
    dev.write_text(dev.read_text() + '{"messages": [{"role": "user"}]}\n')
    assert main([*common, "--output_dir", str(tmp_path / "o3"), "--eval_dataset_name", str(dev)]) == 2
    assert f"{dev}:6: " in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_spin_pairs_are_the_start_models_whole_answers(tmp_path, tokenizer, tiny_model, suite, heldout):
    trainer = SAPOTrainer(model=tiny_model, args=config(tmp_path, recipe="spin", spin_max_new_tokens=5),
                          train_dataset=suite["train"], eval_dataset=heldout, processing_class=tokenizer)
    metrics = trainer.evaluate()  # greedy opponent (spin_do_sample off): the start model's own answers
    data = trainer._eval_sets[""].data
    prompts = [data[i]["prompt_ids"] for i in range(len(data))]
    assert trainer._eval_pairs[""].rejected == trainer.sampler.sample(trainer.model, prompts, 5)
    assert metrics["eval_loss"] == pytest.approx(math.log(2)) and metrics["eval_rewards/margins"] == 0.0
