"""`sapo.metrics.log_line`: the short line printed per logged row when the progress bar is off."""

from __future__ import annotations

from sapo.metrics import log_line


def test_a_training_row_is_a_short_line_of_key_metrics_with_counts_as_whole_numbers():
    row = {"loss": 0.51234, "grad_norm": 1.2345, "learning_rate": 1.2e-4, "rewards/margins": 0.3087,
           "rewards/accuracies": 0.75, "rewards/real": -0.1, "logps/real": -42.0, "length/real": 17.5,
           "buffer/size": 67.2, "generation/tokens_per_second": 1234.56, "segment/start": 3.3, "epoch": 0.33}
    line = log_line(row, 40, 120)
    assert line == ("step 40/120 | loss 0.512 | rewards/margins 0.309 | rewards/accuracies 0.75 | buffer/size 67 | "
                    "generation/tokens_per_second 1235 | grad_norm 1.23 | lr 1.2e-04")


def test_evaluation_and_end_of_training_rows_get_their_own_lines():
    assert log_line({"eval_loss": 0.25, "eval_rewards/accuracies": 1.0, "eval_runtime": 3.2, "epoch": 1.0}, 4, 4) \
        == "step 4/4 eval | eval_loss 0.25 | eval_rewards/accuracies 1"
    assert log_line({"train_runtime": 12.345, "train_loss": 0.4, "total_flos": 1e9}, 4, 4) \
        == "step 4/4 end | train_runtime 12.3 s | train_loss 0.4"
