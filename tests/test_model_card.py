from sapo.model_card import card_settings, final_metrics, render_model_card


def test_final_metrics_takes_last_training_row():
    history = [{"loss": 1.0, "step": 1, "epoch": 0.1}, {"loss": 0.5, "rewards/margins": 0.2, "step": 2, "epoch": 0.2},
               {"train_runtime": 3.0, "step": 2}]
    assert final_metrics(history) == {"loss": 0.5, "rewards/margins": 0.2, "step": 2}
    assert final_metrics([{"train_runtime": 1.0}]) == {}


def test_card_lists_everything_needed_to_reproduce(tmp_path):
    from sapo import SAPOConfig

    config = SAPOConfig(output_dir=str(tmp_path), beta=0.25, recipe="sapo-orpo", report_to="none", use_cpu=True)
    settings = card_settings(config, ["recipe", "beta", "loss_type"])
    assert settings["beta"] == 0.25 and settings["loss_type"] == "orpo" and "learning_rate" in settings
    card = render_model_card(base_model="org/sft", data="data.jsonl", recipe="sapo-orpo", settings=settings,
                             metrics={"loss": 0.123456, "step": 7}, command="sapo train --config run.yaml")
    assert "`org/sft`" in card and "`data.jsonl`" in card and "sapo train --config run.yaml" in card
    assert "| `beta` | `0.25` |" in card and "| `loss` | 0.1235 |" in card and "| `step` | 7 |" in card
    assert "ema/" in card
