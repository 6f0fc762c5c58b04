import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sapo import tasks
from sapo.buffer import ReplayBuffer
from sapo.cli import ModelArguments, build_train_parser, main, parse_train_args
from sapo.config import sapo_fields


@pytest.fixture()
def dataset_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(24, 0, seed=1)["train"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_yaml(tmp_path, model_dir, dataset_file, **extra):
    values = {"model_name_or_path": str(model_dir), "dataset_name": str(dataset_file),
              "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
              "token_generate_length": 4, "max_length": 64, "max_prompt_length": 48, "use_cpu": True,
              "report_to": "none", "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_train_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    names = [f.name for f in sapo_fields()] + [f.name for f in dataclasses.fields(ModelArguments)]
    missing = [name for name in names if f"--{name}" not in text]
    assert not missing
    assert "--config" in text and "--debug" in text


def test_yaml_with_flag_overrides(tmp_path, model_dir, dataset_file):
    config_file = write_yaml(tmp_path, model_dir, dataset_file, beta=0.3, loss_type="ipo")
    model_args, config = parse_train_args(["--config", str(config_file), "--beta", "0.25"])
    assert config.beta == 0.25  # the flag wins over the file
    assert config.loss_type == "ipo"  # the file wins over the default
    assert model_args.model_name_or_path == str(model_dir)


def test_train_from_yaml_writes_outputs(tmp_path, model_dir, dataset_file, capsys):
    config_file = write_yaml(tmp_path, model_dir, dataset_file)
    assert main(["train", "--config", str(config_file), "--loss_type", "orpo", "--beta", "0.05"]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "ema" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert "nll_loss" in rows[0]
    out_text = capsys.readouterr().out
    assert "EMA model" in out_text
    lines = [line for line in out_text.splitlines() if line.startswith("step ")]  # disable_tqdm: short log lines
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3", "step 3/3 end"]
    assert "{'loss'" not in out_text and all(len(line) < 200 for line in lines)
    assert " | buffer/size " in lines[0] and "." not in lines[0].split("buffer/size ")[1].split(" |")[0]


def test_a_default_train_shows_the_bar_evaluations_and_a_summary_not_log_dictionaries(tmp_path, model_dir,
                                                                                     dataset_file):
    """Run as a user types it (a subprocess of the console script, tqdm on, defaults): no raw Trainer log dictionary,
    no DeepSpeed accelerator line, no per-save bars; one line per evaluation and a summary at the end."""
    sapo = Path(sys.executable).with_name("sapo")
    out = tmp_path / "out"
    result = subprocess.run([str(sapo), "train", "--model_name_or_path", str(model_dir), "--dataset_name",
                             str(dataset_file), "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "1",
                             "--eval_dataset_name", str(dataset_file), "--eval_strategy", "steps", "--eval_steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "{'loss'" not in text and "'rewards/margins'" not in text and "Setting accelerator to CPU" not in text
    assert "Writing model shards" not in text
    assert text.count(" eval: loss ") == 2 and "loss=" in text  # one line per evaluation; metrics on the bar
    assert "sapo: trained 4 steps" in result.stdout and f"policy: {out}" in result.stdout
    assert "last training row (step 4): loss " in result.stdout and "last evaluation (step 4): loss " in result.stdout


def test_use_peft_flag_trains_adapters(tmp_path, model_dir, dataset_file):
    pytest.importorskip("peft")
    config_file = write_yaml(tmp_path, model_dir, dataset_file, max_steps=2)
    assert main(["train", "--config", str(config_file), "--use_peft", "--lora_r", "4"]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("extra,message", [
    ({"bta": 0.1}, "unknown option 'bta'; did you mean 'beta'?"),
    ({"max_prompt_length": 64}, "max_prompt_length (64) must be smaller than max_length (64)"),
    ({"loss_type": "kto"}, "loss_type must be one of"),
])
def test_bad_config_is_one_line_error_with_exit_2(tmp_path, model_dir, dataset_file, capsys, extra, message):
    config_file = write_yaml(tmp_path, model_dir, dataset_file, **extra)
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_data_reports_file_and_line(tmp_path, model_dir, dataset_file, capsys):
    dataset_file.write_text(dataset_file.read_text() + "{not json\n")
    config_file = write_yaml(tmp_path, model_dir, dataset_file)
    assert main(["train", "--config", str(config_file)]) == 2
    assert f"{dataset_file}:25: invalid JSON" in capsys.readouterr().err


def test_unknown_flag_and_missing_model(tmp_path, dataset_file, capsys):
    assert main(["train", "--dataset_name", str(dataset_file), "--no_such_flag", "1"]) == 2
    assert "--no_such_flag" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--dataset_name", str(dataset_file), "--model_name_or_path", str(empty),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "directory has no model" in capsys.readouterr().err


def test_top_level_usage(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


CONFIG_REFERENCE_PAGE = Path(__file__).parents[2] / "docs" / "guides" / "config.md"


def test_docs_config_reference_matches_the_dataclasses():
    from sapo.cli import config_reference_markdown

    page = CONFIG_REFERENCE_PAGE.read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    section = page[page.index(start) + len(start):page.index(end)]
    assert section.strip() == config_reference_markdown().strip(), (
        "docs/guides/config.md is stale: run `.venv/bin/python scripts/update_config_reference.py`")


def test_final_output_has_a_model_card_with_the_command(tmp_path, model_dir, dataset_file):
    config_file = write_yaml(tmp_path, model_dir, dataset_file, beta=0.2)
    assert main(["train", "--config", str(config_file), "--attn_implementation", "eager"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"sapo train --config {config_file} --attn_implementation eager" in card
    assert str(dataset_file) in card and str(model_dir) in card
    assert "| `beta` | `0.2` |" in card and "## Final training metrics" in card and "| `loss` |" in card
    assert '| `model_init_kwargs` | `{"attn_implementation": "eager"}` |' in card
    assert "library_name: transformers" in card and "pipeline_tag: text-generation" in card


def test_model_init_kwargs_from_yaml_and_as_a_json_flag(tmp_path, model_dir, dataset_file):
    config_file = write_yaml(tmp_path, model_dir, dataset_file, model_init_kwargs={"attn_implementation": "eager"},
                             ref_model_init_kwargs={"dtype": "float32"})
    _, config = parse_train_args(["--config", str(config_file)])
    assert config.model_init_kwargs == {"attn_implementation": "eager"}
    assert config.ref_model_init_kwargs == {"dtype": "float32"}
    _, config = parse_train_args(["--config", str(config_file), "--model_init_kwargs", '{"dtype": "bfloat16"}'])
    assert config.model_init_kwargs == {"dtype": "bfloat16"}  # the flag wins over the file


def test_dtype_and_attn_implementation_go_into_model_init_kwargs_and_load_the_model(model_dir):
    from sapo.cli import load_model_and_tokenizer, model_init_kwargs

    args = ModelArguments(model_name_or_path=str(model_dir), dtype="bfloat16", attn_implementation="eager")
    kwargs = model_init_kwargs(args, {"revision": "main"})
    assert kwargs == {"revision": "main", "dtype": "bfloat16", "attn_implementation": "eager"}
    model, _ = load_model_and_tokenizer(args, kwargs)
    assert str(model.dtype) == "torch.bfloat16" and model.config._attn_implementation == "eager"
    assert model_init_kwargs(ModelArguments(), None) == {}  # --dtype auto adds nothing


@pytest.mark.parametrize("flags,message", [
    (["--dtype", "bfloat16", "--model_init_kwargs", '{"dtype": "float16"}'],
     "--dtype bfloat16 and model_init_kwargs {'dtype': 'float16'} both set the model's dtype; set it in one place"),
    (["--attn_implementation", "sdpa", "--model_init_kwargs", '{"attn_implementation": "eager"}'],
     "--attn_implementation sdpa and model_init_kwargs {'attn_implementation': 'eager'} both set"),
    (["--model_init_kwargs", '{"trust_remote_code": true}'],
     "model_init_kwargs 'trust_remote_code': `sapo train` sets it itself; use --trust_remote_code"),
    (["--model_init_kwargs", '{"dtype": "bfloat16"'], "SAPOConfig.model_init_kwargs: not valid JSON"),
    (["--model_init_kwargs", '{"attn_implementation": "nonsense"}'],
     "cannot load the model's weights with model_init_kwargs {\"attn_implementation\": \"nonsense\"}"),
])
def test_model_init_kwargs_conflicts_and_refusals_are_one_line(tmp_path, model_dir, dataset_file, capsys, flags,
                                                              message):
    config_file = write_yaml(tmp_path, model_dir, dataset_file)
    assert main(["train", "--config", str(config_file), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_yaml_model_init_kwargs_must_be_a_mapping(tmp_path, model_dir, dataset_file, capsys):
    config_file = write_yaml(tmp_path, model_dir, dataset_file, model_init_kwargs=["eager"])
    assert main(["train", "--config", str(config_file)]) == 2
    assert f"{config_file}: option 'model_init_kwargs' expects a mapping or a string or null, got ['eager']" \
        in capsys.readouterr().err


def test_every_option_in_the_docs_config_reference_is_in_train_help(capsys):
    import re

    page = CONFIG_REFERENCE_PAGE.read_text()
    section = page.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    documented = re.findall(r"^\| `(--[a-z_]+)` \| `([^`]*)` \|", section, flags=re.MULTILINE)
    assert len(documented) > 30
    with pytest.raises(SystemExit):
        build_train_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    parser = build_train_parser()
    defaults = {action.option_strings[0]: action.default for action in parser._actions if action.option_strings}
    for option, default in documented:
        assert option in help_text, option
        assert str(defaults[option]) == default or default == "required", (option, default, defaults[option])


# ---------------------------------------------------------------------------------------------------------
# Every recipe from the command line, on every record format it accepts
# ---------------------------------------------------------------------------------------------------------

RECIPES = ("sapo", "sapo-dpo", "sapo-orpo", "sft", "dpo", "orpo", "spin")
PAIRED_FORMATS = ("preference_text", "preference_conversation")
FORMATS = ("messages", "prompt_completion_text", "prompt_completion_messages", *PAIRED_FORMATS)


def record_in_format(record, shape):
    prompt, answer, wrong = record["messages"][0]["content"], record["messages"][1]["content"], record["rejected"]
    user, assistant = {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}
    return {
        "messages": {"messages": [user, assistant]},
        "prompt_completion_text": {"prompt": prompt, "completion": answer},
        "prompt_completion_messages": {"prompt": [user], "completion": [assistant]},
        "preference_text": {"prompt": prompt, "chosen": answer, "rejected": wrong},
        "preference_conversation": {"chosen": [user, assistant], "rejected": [user, {"role": "assistant",
                                                                                     "content": wrong}]},
    }[shape]


def write_format(tmp_path, shape):
    path = tmp_path / f"{shape}.jsonl"
    rows = [record_in_format(r, shape) for r in tasks.make_suite(8, 0, seed=2)["train"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("shape", FORMATS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_trains_from_the_command_line(tmp_path, model_dir, capsys, recipe, shape):
    data = write_format(tmp_path, shape)
    out = tmp_path / "out"
    argv = ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--recipe", recipe, "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--token_generate_length", "4", "--spin_max_new_tokens", "6", "--max_length", "64",
            "--max_prompt_length", "48", "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true"]
    code = main(argv)
    if recipe in ("dpo", "orpo") and shape not in PAIRED_FORMATS:
        assert code == 2
        assert f"{data}:1: field 'rejected' is missing" in capsys.readouterr().err
        assert not out.exists()
        return
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "model.safetensors").exists()
    assert (out / "ema" / "model.safetensors").exists() == recipe.startswith("sapo")
    assert ("rewards/margins" in rows[0]) == (recipe != "sft")


def test_recipe_defaults_follow_the_paper_and_conflicts_are_errors(capsys):
    from sapo.config import SAPOConfig

    def made(**kwargs):
        return SAPOConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)

    assert (made(recipe="sapo-orpo").loss_type, made(recipe="sapo-orpo").beta) == ("orpo", 0.05)
    assert (made(recipe="orpo").beta, made(recipe="sapo", loss_type="orpo").beta) == (0.05, 0.05)
    assert (made(recipe="sapo-dpo").loss_type, made(recipe="sapo-dpo").beta) == ("sigmoid", 0.1)
    assert made(recipe="sapo-orpo", beta=0.2).beta == 0.2  # given explicitly: kept
    with pytest.raises(ValueError, match="fixes loss_type 'orpo'; got loss_type 'sigmoid'"):
        made(recipe="sapo-orpo", loss_type="sigmoid")
    assert main(["train", "--recipe", "sapo-dpo", "--loss_type", "orpo", "--output_dir", "x"]) == 2
    assert "needs a reference loss" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The command a user types, on checkpoints with real tokenizers and templates, in bf16 mixed precision
# ---------------------------------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello there! 42 apples."}]


def sapo_command() -> str:
    return str(Path(sys.executable).with_name("sapo"))


def real_checkpoint(name, directory):
    import real_tokenizers

    if name == "llama-legacy":  # a legacy SentencePiece LlamaTokenizer: its `legacy` flag must survive saving
        config = real_tokenizers.mistral_tokenizer_config(chat_template=real_tokenizers.ZEPHYR_TEMPLATE)
        tokenizer = real_tokenizers.mistral_sentencepiece(config, hub_layout=False)
        return real_tokenizers.save_checkpoint(tokenizer, directory, architecture="llama")
    if name == "mistral-nemo-native":  # tekken.json: AutoTokenizer gives MistralCommonBackend
        real_tokenizers.build_model(real_tokenizers.mistral_nemo(), architecture="mistral").save_pretrained(directory)
        Path(directory, "tekken.json").write_bytes(real_tokenizers.tekken_file().read_bytes())
        return Path(directory)
    return real_tokenizers.save_named_checkpoint(name, directory)


def chat_ids_of(tokenizer):
    from sapo.data import chat_ids

    return chat_ids(tokenizer, CHAT)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [  # two in the default suite (ChatML, a legacy sentencepiece Llama); all with -m slow
    pytest.param("zephyr", marks=SLOW), "qwen2-chatml", pytest.param("llama3-instruct", marks=SLOW), "llama-legacy",
    pytest.param("mistral-nemo-native", marks=SLOW)])
def test_sapo_train_command_on_a_real_checkpoint_in_bf16(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = real_checkpoint(name, tmp_path / "sft")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say hi {i}."}, CHAT[1]]}) + "\n"
                            for i in range(4)))
    out = tmp_path / "out"
    result = subprocess.run(
        [sapo_command(), "train", "--model_name_or_path", str(checkpoint), "--dataset_name", str(data),
         "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "true",
         "--token_generate_length", "4", "--max_length", "96", "--max_prompt_length", "64", "--use_cpu", "true",
         "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/margins"] == 0.0  # policy == reference at step 0
    AutoModelForCausalLM.from_pretrained(out)
    expected = chat_ids_of(AutoTokenizer.from_pretrained(checkpoint))
    for directory in (out, out / "ema"):  # the saved tokenizer tokenizes like the one trained with
        assert chat_ids_of(AutoTokenizer.from_pretrained(directory)) == expected


# ---------------------------------------------------------------------------------------------------------
# Plain-text data and base models without a chat template
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """A saved tiny model whose tokenizer has no chat template, as a base (not chat-tuned) model's has none."""
    from sapo import tiny

    directory = tmp_path_factory.mktemp("base_model")
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer,
                   directory)
    assert not (directory / "chat_template.jinja").exists()
    return directory


def test_chat_data_for_a_model_without_a_template_is_refused_before_the_weights_are_read(tmp_path, base_model_dir,
                                                                                        dataset_file):
    """`sapo train` as a user types it: the weights file here is garbage, so reaching it would fail otherwise; the
    error is the template one, naming the data file's first record and the fix."""
    model = tmp_path / "base"
    shutil.copytree(base_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not safetensors" * 100)
    out = tmp_path / "out"
    result = subprocess.run([sapo_command(), "train", "--model_name_or_path", str(model), "--dataset_name",
                             str(dataset_file), "--output_dir", str(out), "--use_cpu", "true"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"{dataset_file}:1: the record is conversational (field 'messages' holds chat messages) and the "
            f"tokenizer ({model}) has no chat template to render it: pass --chat_template chatml") in result.stderr
    assert "weights" not in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_plain_text_data_trains_on_the_raw_text_without_a_chat_template(tmp_path, base_model_dir):
    """A base model and prompt/completion strings: SAPO rewrites segments of the raw text (its generation continues
    the raw prompt + response prefix) and trains on `prompt + completion + EOS`, no template marker anywhere."""
    from transformers import AutoTokenizer

    from sapo.cli.inspect import load_entries

    rows = [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
            for r in tasks.make_suite(8, 0, seed=2)["train"]]
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    result = subprocess.run(
        [sapo_command(), "train", "--model_name_or_path", str(base_model_dir), "--dataset_name", str(data),
         "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
         "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48", "--use_cpu", "true",
         "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
         "--disable_tqdm", "true"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "ema" / "model.safetensors").exists()
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([loss for loss in losses if loss is not None]) == 3
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is None
    entries = load_entries(out)
    assert entries and all(e.rejected != e.real for e in entries)  # rewritten segments of the raw responses
    texts = {row["prompt"]: row["completion"] + tokenizer.eos_token for row in rows}
    for entry in entries:  # (the rejected side is the random model's own tokens: any token, markers included)
        prompt, real = tokenizer.decode(entry.prompt), tokenizer.decode(entry.real)
        assert texts[prompt] == real  # exactly the raw text, EOS appended
        assert not any(marker in prompt + real for marker in ("<s>", "<|user|>", "<|assistant|>"))
        assert entry.rejected[:entry.segment_start] == entry.real[:entry.segment_start]
    (snippet,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.DOTALL)
    assert "apply_chat_template" not in snippet  # the card prompts a raw-text model with raw text, and that runs
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]


def test_python_dash_m_sapo_runs_the_command():
    """`python -m sapo` is what `accelerate launch -m sapo train ...` runs."""
    result = subprocess.run([sys.executable, "-m", "sapo", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: sapo {train" in result.stdout


def test_a_run_shorter_than_logging_steps_logs_its_last_step_and_plots(tmp_path, model_dir, dataset_file):
    from sapo.cli.plot import main as plot_main

    config_file = write_yaml(tmp_path, model_dir, dataset_file, logging_steps=10)
    assert main(["train", "--config", str(config_file)]) == 0  # 3 steps, logging every 10
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3]
    assert plot_main([str(tmp_path / "out"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss.png").exists()


def test_a_short_dataset_fills_the_buffer_within_its_epoch(tmp_path, model_dir):
    """Issue #22.4: 48 examples at batch 8 with gradient accumulation 2 and the default generation round (64
    examples) trained a whole epoch on the first batch's 8 pairs; now every example is rewritten in its epoch."""
    data = tmp_path / "short.jsonl"
    rows = [{"messages": r["messages"]} for r in tasks.make_suite(48, 0, seed=2)["train"]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config_file = write_yaml(tmp_path, model_dir, data, max_steps=-1, num_train_epochs=1,
                             per_device_train_batch_size=8, gradient_accumulation_steps=2, save_strategy="epoch")
    assert main(["train", "--config", str(config_file)]) == 0
    state = tmp_path / "out" / "checkpoint-3" / "sapo_state"
    buffer = ReplayBuffer.load(state / "replay_buffer_rank0.safetensors")
    recipe = json.loads((state / "pending_rank0.json").read_text())
    assert recipe["pending"] == [] and len(buffer) + recipe["dropped"] == 48
    assert len({tuple(e.prompt + e.real) for e in buffer.entries()}) == len(buffer)  # each example once


def test_spin_schedule_options_parse_from_flags_and_yaml(tmp_path, model_dir, dataset_file):
    from sapo.cli import parse_train_args

    base = ["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset_file), "--output_dir",
            str(tmp_path / "out"), "--recipe", "spin", "--use_cpu"]
    _, config = parse_train_args([*base, "--spin_preset", "paper"])
    assert (config.spin_iterations, config.spin_betas, config.learning_rate) == (4, [0.1, 0.1, 0.1, 5.0], 5e-7)
    _, config = parse_train_args([*base, "--spin_learning_rates", "1e-6", "2e-7", "--spin_betas", "0.1", "1.0"])
    assert (config.spin_iterations, config.spin_learning_rates, config.beta) == (2, [1e-6, 2e-7], 0.1)
    config_file = tmp_path / "spin.yaml"
    config_file.write_text("spin_betas: [0.1, 0.5, 2.0]\nspin_end_with_eos: true\n")
    _, config = parse_train_args([*base, "--config", str(config_file)])
    assert (config.spin_iterations, config.spin_betas, config.spin_end_with_eos) == (3, [0.1, 0.5, 2.0], True)


def test_sapo_version_prints_the_installed_version():
    from importlib.metadata import version

    result = subprocess.run([sys.executable, "-m", "sapo", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f"sapo {version('sapo-align')}\n"


def test_a_single_lora_target_is_passed_to_peft_as_a_string():
    """TRL's scripts write `lora_target_modules: all-linear` (or `[all-linear]`); peft reads it only as a string."""
    from sapo.cli import lora_config

    assert lora_config(ModelArguments(lora_target_modules=["all-linear"])).target_modules == "all-linear"
    assert lora_config(ModelArguments()).target_modules == "all-linear"
    assert set(lora_config(ModelArguments(lora_target_modules=["q_proj", "v_proj"])).target_modules) == \
        {"q_proj", "v_proj"}
