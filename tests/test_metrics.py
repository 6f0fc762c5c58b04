"""Tests for `sapo.metrics`: the registry of metric names (and that no module spells one itself), the old names read
as today's, and TRL's metrics in a tiny run's metrics.jsonl with TRL's definitions."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import helpers
import pytest
import torch

from sapo import SAPOTrainer
from sapo import metrics as m
from sapo.metrics import current_name, eval_name, read_metrics, upgrade_row

SRC = Path(__file__).resolve().parents[1] / "src" / "sapo"

TRL_NAMES = (m.REWARDS_CHOSEN, m.REWARDS_REJECTED, m.REWARD_MARGINS, m.REWARD_ACCURACIES, m.LOGPS_CHOSEN,
             m.LOGPS_REJECTED, m.LOGITS_CHOSEN, m.LOGITS_REJECTED, m.ENTROPY, m.MEAN_TOKEN_ACCURACY)
"""What TRL 1.16's DPOTrainer logs (besides loss, grad_norm, learning_rate and num_tokens)."""


def registered_names() -> set[str]:
    return {value for name, value in vars(m).items() if name.isupper() and isinstance(value, str)}


def test_metric_names_are_spelled_only_in_the_registry():
    """A metric name written as a string literal outside sapo/metrics.py is a name the readers (plot, summary,
    model card, benchmarks) can miss when it changes: every module uses the constants."""
    families = sorted({name.split("/")[0] for name in registered_names() if "/" in name}
                      | {old.split("/")[0] for old in m.RENAMED})
    assert {"rewards", "logps", "logits", "buffer", "pairs", "segment", "steps"} <= set(families)
    bare = [name for name in registered_names() if "_" in name and "/" not in name
            and name not in (m.EVAL_PREFIX, m.TRAIN_RUNTIME, m.GRAD_NORM, m.LEARNING_RATE)]
    quote, either = "[\"']", "|".join
    pattern = re.compile(f"{quote}(?:eval_)?(?:(?:{either(families)})/|(?:{either(bare)}){quote})")
    offenders = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
                 for path in sorted(SRC.rglob("*.py")) if path.name != "metrics.py"
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "metric names spelled outside sapo.metrics:\n" + "\n".join(offenders)


def test_trl_names_are_trls():
    assert set(TRL_NAMES) | {m.NLL_LOSS, m.LOG_ODDS_RATIO, m.LOG_ODDS_CHOSEN} <= registered_names()
    assert m.REWARDS_CHOSEN == "rewards/chosen" and m.LOGITS_REJECTED == "logits/rejected"
    assert m.MEAN_TOKEN_ACCURACY == "mean_token_accuracy" and m.ENTROPY == "entropy"


def test_old_names_are_read_as_the_new_ones(tmp_path):
    assert current_name("rewards/real") == "rewards/chosen"
    assert current_name("eval_rewards/real") == "eval_rewards/chosen"
    assert current_name("eval_dev_logps/real_per_token") == "eval_dev_logps/chosen_per_token"
    assert current_name("eval_logps/real_per_token") == "eval_logps/chosen_per_token"
    assert current_name("logps/realistic") == "logps/realistic" and current_name("xrewards/real") == "xrewards/real"
    # a row that has both (never written by sapo, but possible by hand) keeps the new name's value
    assert upgrade_row({"rewards/chosen": 1.0, "rewards/real": 2.0}) == {"rewards/chosen": 1.0}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.5, "logps/real": -3.0, "length/real": 7.0}) + "\n")
    assert read_metrics(path) == [{"step": 1, "loss": 0.5, "logps/chosen": -3.0, "length/chosen": 7.0}]
    assert eval_name(m.LOSS) == "eval_loss" and eval_name(m.JUDGE_SCORE, "dev") == "eval_dev_judge/score"


def test_read_metrics_has_one_torn_line_rule(tmp_path, caplog):
    """A torn last line is dropped quietly; an unreadable line elsewhere (not a JSON object, not JSON, nested too
    deep for the parser, not UTF-8) is dropped with a warning naming the file and line, and the rest is read."""
    path = tmp_path / "metrics.jsonl"
    damaged = [b"[1]", b"{x", b"[" * 100_000 + b"]" * 100_000, b"\xff"]
    path.write_bytes(b"\n".join([b'{"step": 1}', *damaged, b'{"step": 6}', b'{"step": 7, "lo']))
    with caplog.at_level("INFO", logger="sapo.metrics"):
        assert read_metrics(path) == [{"step": 1}, {"step": 6}]
    for line in range(2, 6):
        assert f"metrics.jsonl:{line}: dropping an unreadable line" in caplog.text
    assert "dropping a torn last line" in caplog.text


def test_sapo_plot_draws_a_damaged_file_with_a_warning(tmp_path, capsys, caplog):
    pytest.importorskip("matplotlib")
    from sapo.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\n{"step": 2, "loss": 0.5}\n')
    with caplog.at_level("WARNING", logger="sapo.metrics"):
        assert main(["plot", str(run)]) == 0
    assert str(run / "plots" / "loss.png") in capsys.readouterr().out
    assert "metrics.jsonl:2: dropping an unreadable line" in caplog.text


@pytest.mark.parametrize("recipe", ["dpo", "orpo", "sft"])
def test_a_run_logs_trls_metrics_with_trls_definitions(tmp_path, tokenizer, tiny_model, suite, recipe):
    trainer = SAPOTrainer(model=tiny_model, args=helpers.config(tmp_path, recipe=recipe, max_steps=2),
                          train_dataset=suite["train"], processing_class=tokenizer)
    trainer.train()
    rows = helpers.loss_rows(tmp_path)
    assert len(rows) == 2 and not any(old in row for row in rows for old in m.RENAMED)
    for row in rows:
        assert 0.0 <= row[m.MEAN_TOKEN_ACCURACY] <= 1.0
        # a random tiny model: its next-token distribution is near uniform over the vocabulary, at most log(V)
        assert 0.0 < row[m.ENTROPY] <= math.log(len(tokenizer)) + 1e-4
        if recipe == "sft":
            assert m.REWARDS_CHOSEN not in row and m.LOGITS_CHOSEN not in row and row[m.NLL_LOSS] > 0
            continue
        assert set(TRL_NAMES) <= set(row)
        assert row[m.REWARD_MARGINS] == pytest.approx(row[m.REWARDS_CHOSEN] - row[m.REWARDS_REJECTED], abs=1e-6)
        assert 0.0 <= row[m.REWARD_ACCURACIES] <= 1.0
        assert all(math.isfinite(row[name]) for name in (m.LOGITS_CHOSEN, m.LOGITS_REJECTED))
        assert row[m.LOGPS_CHOSEN] < 0 and row[m.LOGPS_REJECTED] < 0
    if recipe == "orpo":  # ORPOTrainer's: logps are per-token means, rewards beta times them; its log-odds
        row = rows[0]
        assert row[m.REWARDS_CHOSEN] == pytest.approx(trainer.args.beta * row[m.LOGPS_CHOSEN], rel=1e-5)
        assert row[m.LOGPS_CHOSEN] > -math.log(len(tokenizer)) - 1.0  # a mean per token, not a sum
        assert row[m.LOG_ODDS_RATIO] < 0 and m.NLL_LOSS in row and m.LOG_ODDS_CHOSEN in row
    if recipe == "dpo":  # DPOTrainer's: summed log-probs, and the policy is its reference at the first step
        assert rows[0][m.REWARDS_CHOSEN] == 0.0 and rows[0][m.REWARD_MARGINS] == 0.0
        assert rows[0][m.LOGPS_CHOSEN] / rows[0][m.LENGTH_CHOSEN] > -math.log(len(tokenizer)) - 1.0
        assert m.LOG_ODDS_RATIO not in rows[0]


@pytest.mark.parametrize("pair_scoring,use_hidden_states,grad", [
    ("shared_prefix", True, True), ("shared_prefix", True, False), ("separate", True, True),
    ("separate", False, False), ("shared_prefix", False, True)])
def test_token_metrics_match_a_direct_computation_from_the_logits(tmp_path, tokenizer, tiny_model, suite,
                                                                   pair_scoring, use_hidden_states, grad):
    """`logits/*`, `entropy` and `mean_token_accuracy` from the scoring path (packed or separate rows; chunked
    head, checkpointed under grad, or full logits) equal TRL's definitions applied to the model's full logits
    (token-weighted means over the response tokens), and the log-probs are those of scoring without them."""
    trainer = SAPOTrainer(model=tiny_model, args=helpers.config(tmp_path, recipe="dpo", pair_scoring=pair_scoring,
                                                                logprob_chunk_size=7),
                          train_dataset=suite["train"], processing_class=tokenizer)
    trainer.scoring.use_hidden_states = use_hidden_states  # the run's choice of head, as the probe would make it
    batch = trainer.recipe.batch(next(iter(trainer.get_train_dataloader())), 0, 1)
    assert trainer.scoring.shared_prefix == (pair_scoring == "shared_prefix")
    with torch.set_grad_enabled(grad):
        result = trainer.scoring.pair_loss(trainer.model, batch)
        plain = trainer.scoring.token_logps(trainer.model, batch)
    if grad:
        result.loss.backward()  # the checkpointed chunks recompute without their statistics
    torch.testing.assert_close(result.sums, (plain * batch["loss_mask"][:, 1:]).sum(-1), rtol=0, atol=0)
    from sapo.losses import pair_metrics

    got = {k: v.item() for k, v in pair_metrics(result, batch["loss_mask"][:, 1:]).items()}
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    half = mask.shape[0] // 2
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    top1 = (logits.argmax(-1) == labels).float()
    mean_logit = logits.mean(-1)
    assert got[m.ENTROPY] == pytest.approx(entropy[mask].mean().item(), rel=1e-4)
    assert got[m.MEAN_TOKEN_ACCURACY] == pytest.approx(top1[:half][mask[:half]].mean().item(), abs=1e-6)
    assert got[m.LOGITS_CHOSEN] == pytest.approx(mean_logit[:half][mask[:half]].mean().item(), rel=1e-4, abs=1e-6)
    assert got[m.LOGITS_REJECTED] == pytest.approx(mean_logit[half:][mask[half:]].mean().item(), rel=1e-4, abs=1e-6)


# `log_line`: the short line printed per logged row when the progress bar is off


def test_a_training_row_is_a_short_line_of_key_metrics_with_counts_as_whole_numbers():
    row = {"loss": 0.51234, "grad_norm": 1.2345, "learning_rate": 1.2e-4, "rewards/margins": 0.3087,
           "rewards/accuracies": 0.75, "rewards/chosen": -0.1, "logps/chosen": -42.0, "length/chosen": 17.5,
           "buffer/size": 67.2, "generation/tokens_per_second": 1234.56, "segment/start": 3.3, "epoch": 0.33}
    from sapo.metrics import log_line

    line = log_line(row, 40, 120)
    assert line == ("step 40/120 | loss 0.512 | rewards/margins 0.309 | rewards/accuracies 0.75 | buffer/size 67 | "
                    "generation/tokens_per_second 1235 | grad_norm 1.23 | lr 1.2e-04")


def test_evaluation_and_end_of_training_rows_get_their_own_lines():
    from sapo.metrics import log_line

    assert log_line({"eval_loss": 0.25, "eval_rewards/accuracies": 1.0, "eval_runtime": 3.2, "epoch": 1.0}, 4, 4) \
        == "step 4/4 eval | eval_loss 0.25 | eval_rewards/accuracies 1"
    assert log_line({"train_runtime": 12.345, "train_loss": 0.4, "total_flos": 1e9}, 4, 4) \
        == "step 4/4 end | train_runtime 12.3 s | train_loss 0.4"
