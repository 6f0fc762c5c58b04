"""Real clients of what `sapo train` writes, offline: lm-evaluation-harness, peft, and plain transformers.

A user's next step after training is to score or serve the output directory with tools that know nothing of sapo.
Each output here comes from the real `sapo train` console script, once per module, on the tiny offline model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sapo import tasks

TRAIN_FLAGS = ("--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
               "--ema_beta", "0.5", "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48",
               "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true")
MC_DOCS = [
    {"question": "What is 2+3? Answer:", "choices": ["5", "6", "7"], "answer": 0},
    {"question": "Reverse abc:", "choices": ["cba", "abc"], "answer": 0},
    {"question": "Upper case of q:", "choices": ["Q", "P", "R"], "answer": 0},
    {"question": "Sort 3 1 2:", "choices": ["1 2 3", "3 2 1", "2 1 3"], "answer": 0},
]


def sapo_train(model_dir: Path, data: Path, out: Path, *extra: str) -> Path:
    """Run the `sapo` console script of this interpreter, as a user would."""
    command = [str(Path(sys.executable).with_name("sapo")), "train", "--model_name_or_path", str(model_dir),
               "--dataset_name", str(data), "--output_dir", str(out), *TRAIN_FLAGS, *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def demonstrations(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(16, 0, seed=1)["train"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir, demonstrations) -> Path:
    return sapo_train(model_dir, demonstrations, tmp_path_factory.mktemp("full") / "out")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, model_dir, demonstrations) -> Path:
    pytest.importorskip("peft")
    return sapo_train(model_dir, demonstrations, tmp_path_factory.mktemp("lora") / "out", "--use_peft", "--lora_r", "4")


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness on a local task file
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> tuple[str, Path]:
    """A multiple-choice (loglikelihood) task in its own include_path, reading a local JSON Lines file."""
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = directory / "docs.jsonl"
    docs.write_text("".join(json.dumps(doc) + "\n" for doc in MC_DOCS))
    task = {"task": "sapo_local_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (directory / "sapo_local_mc.yaml").write_text(yaml.safe_dump(task))
    return "sapo_local_mc", directory


def lm_eval_samples(directory: Path, task: tuple[str, Path]) -> tuple[dict, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    name, include_path = task
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={directory},dtype=float32", tasks=[name],
                                      task_manager=TaskManager(include_path=str(include_path)), device="cpu",
                                      batch_size=2, log_samples=True)
    return results["results"][name], results["samples"][name]


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) computed directly, as lm-eval defines it (context tokens, then the rest)."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits.float().log_softmax(-1)[0]
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def test_lm_eval_scores_the_policy_and_the_ema_model(full_run, local_task):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scored = {}
    for directory in (full_run, full_run / "ema"):
        metrics, samples = lm_eval_samples(directory, local_task)
        assert len(samples) == len(MC_DOCS)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
        correct = 0
        for sample in sorted(samples, key=lambda s: s["doc_id"]):
            harness = [response[0][0] for response in sample["resps"]]
            own = [own_loglikelihood(model, tokenizer, *arguments[:2]) for arguments in sample["arguments"]]
            assert harness == pytest.approx(own, abs=1e-3)  # the harness scored this directory's weights
            correct += max(range(len(own)), key=own.__getitem__) == sample["target"]
        assert metrics["acc,none"] == pytest.approx(correct / len(MC_DOCS))
        scored[directory.name] = [response[0][0] for s in samples for response in s["resps"]]
    assert scored["out"] != pytest.approx(scored["ema"], abs=1e-4)  # two different models were scored


# ---------------------------------------------------------------------------------------------------------
# peft: a LoRA output and its EMA adapter
# ---------------------------------------------------------------------------------------------------------


def test_peft_loads_the_lora_output_and_its_ema(lora_run, model_dir):
    from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    adapters = {}
    for directory in (lora_run, lora_run / "ema"):
        model = AutoPeftModelForCausalLM.from_pretrained(directory)
        assert isinstance(model, PeftModel)
        assert model.peft_config["default"].base_model_name_or_path == str(model_dir)
        saved = load_file(directory / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(model)
        assert saved.keys() == loaded.keys() and saved  # every saved tensor found its module
        assert all(torch.equal(saved[key], loaded[key]) for key in saved)
        assert any(key.endswith("lora_B.weight") and loaded[key].abs().sum() > 0 for key in loaded)  # trained
        inputs = AutoTokenizer.from_pretrained(directory).apply_chat_template(
            [{"role": "user", "content": "Reverse abc"}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True)
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
        adapters[directory.name] = saved
    policy, ema = adapters["out"], adapters["ema"]
    assert any(not torch.equal(policy[key], ema[key]) for key in policy)  # the EMA adapter is its own weights


# ---------------------------------------------------------------------------------------------------------
# Plain transformers, in an interpreter that never imports sapo
# ---------------------------------------------------------------------------------------------------------

PLAIN_LOAD = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
chat = [{"role": "user", "content": "Reverse abc"}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
assert not [name for name in sys.modules if name == "sapo" or name.startswith("sapo.")]
print(json.dumps({"new": output[0, inputs["input_ids"].shape[1]:].tolist(),
                  "eos": model.generation_config.eos_token_id, "pad": model.generation_config.pad_token_id,
                  "tokenizer": [tokenizer.eos_token_id, tokenizer.pad_token_id],
                  "logits": model(**inputs).logits[0, -1, :8].tolist()}))
"""


def load_without_sapo(directory: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # sapo is not even importable
    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(directory)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pad_token_id" not in result.stderr  # generation_config says how to pad and where to stop
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_policy_and_ema_load_and_generate_without_sapo(full_run):
    loaded = {directory.name: load_without_sapo(directory) for directory in (full_run, full_run / "ema")}
    for result in loaded.values():
        assert [result["eos"], result["pad"]] == result["tokenizer"]
        assert 0 < len(result["new"]) <= 12
        assert result["eos"] not in result["new"][:-1]  # generation stops at the first end token
    assert loaded["out"]["logits"] != pytest.approx(loaded["ema"]["logits"], abs=1e-5)  # two models, not one copy
