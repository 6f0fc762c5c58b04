import json

from sapo.cli.demo import main


def test_demo_pipeline_in_miniature(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output_dir", str(out), "--n_train", "64", "--n_heldout", "12", "--hidden_size", "32",
                 "--num_layers", "1", "--sft_steps", "5", "--sft_batch_size", "8", "--sapo_steps", "3",
                 "--sapo_batch_size", "4"]) == 0
    summary = json.loads((out / "demo_results.json").read_text())
    assert 0.0 <= summary["before"]["score"] <= 1.0 and 0.0 <= summary["after"]["score"] <= 1.0
    for path in ("sft/model.safetensors", "sapo/model.safetensors", "sapo/ema/model.safetensors",
                 "sapo/metrics.jsonl", "train.jsonl", "heldout.jsonl"):
        assert (out / path).exists(), path
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 12
    printed = capsys.readouterr().out
    assert "SFT (before)" in printed and "SAPO policy (after)" in printed and str(out / "sapo") in printed
    assert "{'loss'" not in printed  # a summary, not the Trainer's raw log rows
    assert (out / "sft" / "metrics.jsonl").exists()  # the SFT warm-up is the `sft` recipe of the same trainer
