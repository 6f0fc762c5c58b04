"""The model cards: hub metadata merged with PEFT's, the body, and the loading snippets run on real outputs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from sapo import SAPOConfig, SAPOTrainer
from sapo.model_card import (
    CITATION,
    CardFacts,
    card_metadata,
    card_settings,
    describe_data,
    final_eval_metrics,
    final_metrics,
    hub_id,
    loading_snippet,
    policy_card_body,
    write_cards,
)


def facts(**overrides):
    values = dict(location="out", recipe="sapo-orpo", loss_type="orpo", base_model="org/sft", data="data.jsonl",
                  has_ema=True, settings={"beta": 0.25}, metrics={"loss": 0.123456, "step": 7},
                  command="sapo train --config run.yaml")
    values.update(overrides)
    return CardFacts(**values)


def test_final_metrics_takes_last_training_row():
    history = [{"loss": 1.0, "step": 1, "epoch": 0.1}, {"loss": 0.5, "rewards/margins": 0.2, "step": 2, "epoch": 0.2},
               {"eval_loss": 0.7, "eval_runtime": 1.0, "step": 2, "epoch": 0.2}, {"train_runtime": 3.0, "step": 2}]
    assert final_metrics(history) == {"loss": 0.5, "rewards/margins": 0.2, "step": 2}
    assert final_metrics([{"train_runtime": 1.0}]) == {}
    assert final_eval_metrics(history) == {"eval_loss": 0.7, "eval_runtime": 1.0, "step": 2}
    assert final_eval_metrics(history[:2]) == {}


def test_card_lists_everything_needed_to_reproduce(tmp_path):
    config = SAPOConfig(output_dir=str(tmp_path), beta=0.25, recipe="sapo-orpo", report_to="none", use_cpu=True,
                        model_init_kwargs={"dtype": "bfloat16"})
    settings = card_settings(config, ["recipe", "beta", "loss_type", "model_init_kwargs"])
    assert settings["beta"] == 0.25 and settings["loss_type"] == "orpo" and "learning_rate" in settings
    body = policy_card_body(facts(settings=settings))
    assert "`org/sft`" in body and "`data.jsonl`" in body and "sapo train --config run.yaml" in body
    assert "| `beta` | `0.25` |" in body and "| `loss` | 0.1235 |" in body and "| `step` | 7 |" in body
    assert '| `model_init_kwargs` | `{"dtype": "bfloat16"}` |' in body
    assert "ema/README.md" in body and CITATION in body and "2405.20830" in body


def sapo_field_names() -> list[str]:
    from sapo.config import sapo_fields

    return [f.name for f in sapo_fields()]


@pytest.mark.parametrize(("recipe", "shown", "left_out"), [
    ("sapo", {"ema_beta", "max_replay_buffer_size", "ref_update_mode", "beta"}, {"spin_iterations", "spin_betas"}),
    ("spin", {"spin_iterations", "spin_temperature", "beta"}, {"ema_beta", "max_replay_buffer_size", "top_k"}),
    ("dpo", {"beta", "ref_update_mode"}, {"spin_iterations", "ema_beta", "token_generate_length"}),
    ("sapo-orpo", {"beta", "ema_beta"}, {"ref_update_mode", "cache_reference_logps", "spin_iterations"}),
    ("sft", {"max_length"}, {"beta", "loss_type", "ref_update_mode", "ema_beta", "spin_iterations"}),
])
def test_the_settings_table_lists_only_what_the_runs_recipe_uses(tmp_path, recipe, shown, left_out):
    config = SAPOConfig(output_dir=str(tmp_path), recipe=recipe, report_to="none", use_cpu=True)
    settings = card_settings(config, sapo_field_names())
    assert shown <= settings.keys() and not left_out & settings.keys()
    assert "learning_rate" in settings and "max_prompt_length" in settings


def test_an_in_memory_dataset_is_described_by_its_size_columns_and_fingerprint():
    from datasets import Dataset

    records = [{"messages": [{"role": "user", "content": "hi"}], "id": i} for i in range(3)]
    dataset = Dataset.from_list(records)
    assert describe_data(dataset) == f"in-memory datasets.Dataset, 3 rows, columns: messages, id, fingerprint " \
                                     f"{dataset._fingerprint}"
    assert describe_data(records) == "in-memory list, 3 rows, columns: messages, id"
    assert describe_data(None) is None


def test_only_hub_ids_go_into_the_metadata(tmp_path):
    (tmp_path / "local-model").mkdir()
    assert hub_id("org/sft") == "org/sft" and hub_id("gpt2") == "gpt2"
    for local in (str(tmp_path / "local-model"), "/no/such/dir", "./model", "data.jsonl", "train.parquet", None):
        assert hub_id(local) is None, local
    on_hub = card_metadata(facts(data="org/demos")).to_dict()
    assert on_hub["base_model"] == "org/sft" and on_hub["datasets"] == ["org/demos"]
    assert on_hub["library_name"] == "transformers" and on_hub["pipeline_tag"] == "text-generation"
    assert on_hub["tags"][:4] == ["sapo", "sapo-orpo", "orpo", "preference-optimization"]
    local = card_metadata(facts(base_model=str(tmp_path / "local-model"), data="data.jsonl")).to_dict()
    assert "base_model" not in local and "datasets" not in local  # the Hub refuses a push naming local paths


def test_peft_metadata_is_kept_and_its_local_paths_dropped():
    written_by_peft = {"library_name": "peft", "base_model": "/data/sft", "pipeline_tag": "text-generation",
                       "license": "apache-2.0",
                       "tags": ["base_model:adapter:/data/sft", "lora", "transformers"]}
    merged = card_metadata(facts(adapter=True, base_model="/data/sft"), written_by_peft).to_dict()
    assert merged["library_name"] == "peft" and merged["license"] == "apache-2.0" and "base_model" not in merged
    assert "lora" in merged["tags"] and "sapo" in merged["tags"]
    assert not any(tag.startswith("base_model:") for tag in merged["tags"])
    on_hub = dict(written_by_peft, base_model="org/sft", tags=["base_model:adapter:org/sft", "lora"])
    merged = card_metadata(facts(adapter=True, base_model=None), on_hub).to_dict()
    assert merged["base_model"] == "org/sft" and "base_model:adapter:org/sft" in merged["tags"]
    ema = card_metadata(facts(adapter=True), written_by_peft, ema=True).to_dict()
    assert "ema" in ema["tags"] and ema["base_model"] == "org/sft"


def test_snippets_load_the_ema_through_its_subfolder():
    full = loading_snippet(facts(location="org/run"))
    assert 'AutoModelForCausalLM.from_pretrained("org/run", subfolder="ema")' in full and "peft" not in full
    adapters = loading_snippet(facts(location="org/run", adapter=True), generate_with="ema")
    assert 'AutoPeftModelForCausalLM.from_pretrained("org/run")' in adapters
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("org/sft"), "org/run", subfolder="ema")' \
        in adapters and "ema.generate(" in adapters
    assert "ema" not in loading_snippet(facts(has_ema=False))
    raw = loading_snippet(facts(chat=False))  # a model trained on raw text, whose tokenizer has no chat template
    assert "apply_chat_template" not in raw and 'inputs = tokenizer("Write a haiku' in raw


def test_a_directory_without_ema_gets_a_card_that_does_not_mention_it(tmp_path):
    write_cards(tmp_path, facts(has_ema=True))
    text = (tmp_path / "README.md").read_text()
    assert "subfolder" not in text and "ema/README.md" not in text and not (tmp_path / "ema").exists()
    (tmp_path / "ema").mkdir()
    write_cards(tmp_path, facts(has_ema=True))
    assert 'subfolder="ema"' in (tmp_path / "README.md").read_text() and (tmp_path / "ema" / "README.md").exists()


# ---------------------------------------------------------------------------------------------------------
# On real outputs: the final save, the snippets, and what push_to_hub uploads
# ---------------------------------------------------------------------------------------------------------


def train(tmp_path, model_dir, suite, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                    token_generate_length=6, max_length=64, max_prompt_length=48, logging_steps=1, report_to="none",
                    save_strategy="no", use_cpu=True, disable_tqdm=True, ref_update_mode="fixed", seed=0)
    peft_config = overrides.pop("peft_config", None)
    settings.update(overrides)
    trainer = SAPOTrainer(model=str(model_dir), args=SAPOConfig(**settings), train_dataset=suite["train"],
                          peft_config=peft_config)
    trainer.train()
    trainer.save_model()
    return trainer, tmp_path / "out"


def python_blocks(card: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.read_text(encoding="utf-8"), flags=re.DOTALL)


# Appended to a card's snippet: `ema` holds exactly the weights saved in ema/, and they differ from the policy's.
EMA_CHECK = """
import torch
from safetensors.torch import load_file
adapter = {adapter}
if adapter:
    from peft import get_peft_model_state_dict
    state, policy = get_peft_model_state_dict(ema), get_peft_model_state_dict(model)
else:
    state, policy = ema.state_dict(), model.state_dict()
saved = load_file({ema_file!r})
assert saved and saved.keys() <= state.keys(), sorted(saved)[:3]
assert all(torch.equal(state[k], saved[k]) for k in saved)
assert any(not torch.equal(state[k], policy[k]) for k in saved)
print("EMA-OK")
"""


def run_snippet(card: Path, adapter: bool):
    (block,) = python_blocks(card)
    assert "import sapo" not in block and "from sapo" not in block
    ema_file = card.parents[1 if card.parent.name == "ema" else 0] / "ema" / \
        ("adapter_model.safetensors" if adapter else "model.safetensors")
    script = block + EMA_CHECK.format(adapter=adapter, ema_file=str(ema_file))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=card.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EMA-OK" in result.stdout


def test_card_snippets_load_the_saved_policy_and_ema(tmp_path, model_dir, suite):
    trainer, out = train(tmp_path, model_dir, suite, model_init_kwargs={"attn_implementation": "eager"})
    card, ema_card = ModelCard.load(out / "README.md"), ModelCard.load(out / "ema" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"sapo", "sigmoid"} <= set(card.data.tags) and "ema" in ema_card.data.tags
    assert f"`{model_dir}`" in card.text and "## Final training metrics" in card.text and "| `loss` |" in card.text
    assert "EMA model of out" in ema_card.text and "ema.generate(" in ema_card.text
    run_snippet(out / "README.md", adapter=False)
    run_snippet(out / "ema" / "README.md", adapter=False)


def test_a_relative_output_dir_is_loaded_as_given_and_in_memory_data_is_described(tmp_path, model_dir, suite,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(tmp_path, model_dir, suite, output_dir="runs/out")
    text = (tmp_path / "runs" / "out" / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("runs/out")' in text and '"out"' not in text
    assert f"**Training data:** `in-memory list, {len(suite['train'])} rows, columns: messages" in text
    assert "spin_" not in text and "| `ema_beta` |" in text


def test_lora_card_keeps_peft_metadata_and_its_snippets_run(tmp_path, model_dir, suite):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer, out = train(tmp_path, model_dir, suite, peft_config=lora, learning_rate=1e-2)
    for path in (out / "README.md", out / "ema" / "README.md"):
        card = ModelCard.load(path)
        assert card.data.library_name == "peft" and {"lora", "sapo"} <= set(card.data.tags), path
        assert card.data.base_model is None  # PEFT wrote the local path, which the Hub would refuse
        assert f"- PEFT {peft.__version__}" in card.text and card.text.count("### Framework versions") == 1
        assert "More Information Needed" not in card.text  # PEFT's placeholder body is replaced
    run_snippet(out / "README.md", adapter=True)


def upload_set(folder: Path) -> set[str]:
    """The files `Trainer.push_to_hub` uploads: `upload_folder(folder_path=output_dir, ignore_patterns=["_*",
    "checkpoint-*"])`, to which huggingface_hub adds its default ignore patterns."""
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return set(filter_repo_objects(files, ignore_patterns=["_*", "checkpoint-*", *DEFAULT_IGNORE_PATTERNS]))


@pytest.mark.parametrize("adapter", [False, True])
def test_push_to_hub_uploads_our_card_not_the_generic_one(tmp_path, model_dir, suite, adapter):
    """What `Trainer.push_to_hub` does before its upload, run here without the network: the repo id is the one
    `init_hf_repo` would have set, then `save_model(_internal_call=True)` (PEFT rewrites its card there) and
    `create_model_card(model_name=...)`."""
    overrides = {}
    if adapter:
        peft = pytest.importorskip("peft")
        overrides["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   task_type="CAUSAL_LM")
    trainer, out = train(tmp_path, model_dir, suite, **overrides)
    trainer.hub_model_id = "me/tiny-sapo"
    trainer.save_model(_internal_call=True)
    trainer.create_model_card(model_name="tiny-sapo", dataset_name="me/demos", tags=["tiny"], license="mit")
    uploaded = upload_set(out)
    assert {"README.md", "ema/README.md"} <= uploaded
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == ("peft" if adapter else "transformers")
    assert card.data.datasets == ["me/demos"] and card.data.license == "mit" and card.data.model_name == "tiny-sapo"
    assert {"sapo", "sigmoid", "tiny"} <= set(card.data.tags) and "generated_from_trainer" not in card.data.tags
    assert "trained from scratch" not in card.text and "unknown dataset" not in card.text
    assert '"me/tiny-sapo", subfolder="ema"' in card.text and "# tiny-sapo" in card.text
    ema_card = ModelCard.load(out / "ema" / "README.md")
    assert '"me/tiny-sapo", subfolder="ema"' in ema_card.text and ema_card.data.model_name == "tiny-sapo-ema"


def test_create_model_card_names_a_hub_base_model(tmp_path, model_dir, suite):
    trainer, out = train(tmp_path, model_dir, suite, recipe="sapo-orpo")
    trainer.create_model_card(finetuned_from="org/tiny-sft")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-sft" and ModelCard.load(out / "ema" / "README.md").data.base_model \
        == "org/tiny-sft"
    assert {"sapo-orpo", "orpo"} <= set(card.data.tags)
    assert f'from_pretrained("{out}")' in card.text  # no hub repo: the snippets load the directory
