"""Every decoder-only architecture transformers can build from a config: shared-prefix pair scoring is exact where
it is used (log-probs and gradients equal two plain forwards on sequences longer than the model's window), and
otherwise the model falls back to separate rows; `sapo train` runs or refuses with one clear line.

Models are built tiny from each config's defaults (hidden 32, 2 layers, the tiny tokenizer's vocabulary, windows
of 8 tokens). What cannot be built offline or at a tiny size is skipped with the reason."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from sapo import tasks, tiny
from sapo.cli import main
from sapo.logprobs import (
    hidden_state_scoring_is_exact,
    packed_response_token_logps,
    response_token_logps,
)
from sapo.pair_attention import attend_pairs_densely, attend_pairs_with_flex, flex_refusal
from sapo.recipes import pad_pair_sequences
from sapo.scoring import shared_prefix_refusal

VOCAB = len(tiny.build_tokenizer())
WINDOW = 8
SIZES = {
    "hidden_size": 32, "n_embd": 32, "d_model": 32, "n_embed": 32, "embedding_dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "ffn_hidden_size": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "head_dim": 8, "rotary_dim": 4, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
    "kv_lora_rank": 16, "q_lora_rank": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": VOCAB, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256,
}
"""Tiny values for the size fields of transformers' configs (set only where a config has the field set)."""

WINDOWS = ("sliding_window", "sliding_window_size", "attention_window_size", "window_size", "local_attention",
           "attention_chunk_size")
"""Set to `WINDOW` wherever a config has the field, even unset (Phi-3, Starcoder2 and Mixtral default to no window,
their released checkpoints have one), except where `use_sliding_window` turns windows off (Qwen2 and Qwen3)."""

OVERRIDES: dict[str, dict] = {
    "mamba2": {"head_dim": 16},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2},
    "bamba": {"attn_layer_indices": [1]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "local"], "axial_pos_shape": [8, 32],
                 "axial_pos_embds_dim": [16, 16]},
}
"""Per-architecture fields the generic sizes leave inconsistent."""

MAX_PARAMETERS = 3_000_000  # a config whose tiny build is still large (a byte-level sub-model) is not tiny


def shrink(config, overrides: dict) -> None:
    """Set the tiny sizes on `config` and its text sub-config, cutting per-layer lists to the layer count."""
    for name, value in {**SIZES, **overrides}.items():
        if name in overrides or getattr(config, name, None) is not None:
            with contextlib.suppress(Exception):
                setattr(config, name, value)
    if getattr(config, "use_sliding_window", True) is not False:
        for name in WINDOWS:
            if hasattr(config, name) and name not in overrides:
                with contextlib.suppress(Exception):
                    setattr(config, name, WINDOW)
    layers = getattr(config, "num_hidden_layers", None)
    for name in ("layer_types", "mlp_layer_types", "layers_block_type"):
        kinds = getattr(config, name, None)
        if isinstance(kinds, list) and layers and len(kinds) != layers and name not in overrides:
            distinct = list(dict.fromkeys(kinds))  # keep one of each kind, the first layer's first
            setattr(config, name, (distinct * layers)[:layers])
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        shrink(text, overrides)
    for name, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        if hasattr(config, name):
            setattr(config, name, value)
    config.use_cache = False


def architectures() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@cache
def build(model_type: str):
    """(model, None) or (None, why it cannot be built tiny offline)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception as error:
            return None, f"its default config does not build: {type(error).__name__}: {first_line(error)}"
        if getattr(config, "is_encoder_decoder", False):
            return None, "an encoder-decoder model"
        try:
            shrink(config, OVERRIDES.get(model_type, {}))
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if size > MAX_PARAMETERS:
                return None, f"{size:,} parameters at the smallest sizes set here"
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).float().eval()
            batch = long_pairs()
            with torch.no_grad():
                response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                     use_hidden_states=False)
        except ImportError as error:
            return None, f"needs an extra package: {first_line(error) or type(error).__name__}"
        except Exception as error:
            return None, f"does not build or run at tiny sizes: {type(error).__name__}: {first_line(error)}"
    return model, None


def first_line(error: BaseException) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), "")[:160]


def model_or_skip(model_type: str):
    model, reason = build(model_type)
    if model is None:
        pytest.skip(f"{model_type}: {reason}")
    return model


def long_pairs() -> dict[str, torch.Tensor]:
    """Two pairs whose sequences (about 40 tokens) are several windows long, with shared prefixes past one window."""
    ids = [(11 * i + 5) % (VOCAB - 7) + 7 for i in range(80)]
    return pad_pair_sequences([(ids[:12], ids[12:40], ids[12:22] + ids[50:66]),
                               (ids[:6], ids[40:70], ids[66:80])], pad_token_id=0)


def scores_and_gradients(model, batch, packed: bool, use_hidden_states: bool):
    """The response tokens' log-probs, and the gradient of a fixed weighting of them, packed or separate."""
    model.zero_grad()
    args = (batch["attention_mask"], batch["loss_mask"])
    if packed:
        logps = packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"], *args,
                                            use_hidden_states=use_hidden_states)
    else:
        logps = response_token_logps(model, batch["input_ids"], *args, use_hidden_states=use_hidden_states)
    weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def uses_hidden_states(model) -> bool:
    """The head choice `sapo.scoring.PairScoring` makes."""
    try:
        return hidden_state_scoring_is_exact(model, torch.tensor([[5, 6, 7, 8]]))
    except Exception:
        return False


DEFAULT_MATRIX = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "starcoder2", "gemma", "gemma2", "cohere2",
                  "gpt2", "gpt_neo", "gpt_neox", "gptj", "bloom", "falcon", "mpt", "opt", "llama4_text", "gpt_oss",
                  "olmo2", "phi", "stablelm", "bert", "mamba"}
"""The architectures the default suite checks (each kind of attention, position and head); `-m slow` checks all."""


def matrix() -> list:
    return [name if name in DEFAULT_MATRIX else pytest.param(name, marks=pytest.mark.slow) for name in architectures()]


@pytest.mark.parametrize("model_type", matrix())
def test_shared_prefix_scoring_is_exact_where_used(model_type):
    """Where packing is chosen, packed scores and gradients equal the separate rows' on sequences 5 windows long;
    where it is refused, the reason is one line and the separate rows score and train."""
    model = model_or_skip(model_type)
    hidden = uses_hidden_states(model)
    batch = long_pairs()
    refusal = shared_prefix_refusal(model, 0, use_hidden_states=hidden)
    separate, separate_grads = scores_and_gradients(model, batch, packed=False, use_hidden_states=hidden)
    assert torch.isfinite(separate).all() and separate_grads
    if refusal is not None:
        assert "\n" not in refusal and refusal
        return
    packed, packed_grads = scores_and_gradients(model, batch, packed=True, use_hidden_states=hidden)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)
    assert packed_grads.keys() == separate_grads.keys()
    for name, grad in separate_grads.items():  # summed over ~100 tokens: a relative term for the rounding
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if flex_refusal(model) is None:  # the same rows through FlexAttention's block mask (a CPU: no gradients)
        assert attend_pairs_with_flex(model) is None
        try:
            with torch.no_grad():
                flex = packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                                   batch["attention_mask"], batch["loss_mask"],
                                                   use_hidden_states=hidden)
        finally:
            attend_pairs_densely(model)
        torch.testing.assert_close(flex, separate, atol=1e-5, rtol=0)


# -- `sapo train` on each architecture ------------------------------------------------------------------------------

REPRESENTATIVE = ["llama", "mistral", "bloom", "falcon", "gemma2", "phi3", "gpt2", "gpt_neox", "mamba"]
"""One architecture per outcome: packs (llama, gpt_neox, gpt2's learned absolute positions, falcon's rotary), a
sliding window (mistral, phi3), layers of two kinds (gemma2), ALiBi (bloom)."""


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    rows = [{"messages": row["messages"]} for row in tasks.make_suite(8, 0, seed=1)["train"]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def saved_model(model_type: str, directory: Path) -> Path:
    model = model_or_skip(model_type)
    model.save_pretrained(directory)
    tiny.build_tokenizer().save_pretrained(directory)
    return directory


def train_arguments(model_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    """`sapo train` for 1 step of 2 pairs with short generations."""
    return ["train", "--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--token_generate_length", "4",
            "--max_length", "64", "--max_prompt_length", "48", "--use_cpu", "true", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def sapo_train(*arguments: str) -> subprocess.CompletedProcess:
    """The console script, as a user types it."""
    sapo = Path(sys.executable).with_name("sapo")
    return subprocess.run([str(sapo), *arguments], capture_output=True, text=True, timeout=600)


def fallback_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "scoring pairs as separate rows" in line]


def train_in_process(arguments: list[str], capsys, caplog) -> tuple[int, str]:
    """`sapo.cli:main` (the console script's entry point) in this process, which saves the interpreter's start:
    its exit code and what it printed and logged."""
    with caplog.at_level("INFO", logger="sapo.scoring"):
        code = main(arguments)
    captured = capsys.readouterr()
    return code, captured.out + captured.err + caplog.text


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_sapo_train_runs_on_each_kind_of_attention(model_type, tmp_path, dataset_file, capsys, caplog):
    """Trains; says once that it scores separate rows exactly where packing is refused."""
    model_dir = saved_model(model_type, tmp_path / "model")
    code, text = train_in_process(train_arguments(model_dir, dataset_file, tmp_path / "out"), capsys, caplog)
    assert code == 0, text[-3000:]
    assert "sapo: trained 1 step" in text
    model, _ = build(model_type)
    refusal = shared_prefix_refusal(model, 0, use_hidden_states=uses_hidden_states(model))
    assert len(fallback_lines(text)) == (refusal is not None), text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", architectures())
def test_sapo_train_runs_or_refuses_in_one_line_on_every_architecture(model_type, tmp_path, dataset_file):
    result = sapo_train(*train_arguments(saved_model(model_type, tmp_path / "model"), dataset_file, tmp_path / "out"))
    if result.returncode == 0:
        assert "sapo: trained 1 step" in result.stdout, result.stdout[-3000:]
        assert len(fallback_lines(result.stderr)) <= 1
        return
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len([line for line in result.stderr.splitlines() if line.startswith("sapo: error:")]) == 1, (
        result.stderr[-3000:])


# -- the two cases of issue 22 --------------------------------------------------------------------------------------

def first_training_row(out: Path) -> dict:
    return next(row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row)


def window_16_mistral():
    """Issue 22's model: a window (16) longer than the old probe's pairs (12 tokens), so the old probe passed."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=16, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2)).eval()


@pytest.mark.parametrize("model_type", ["mistral", "bloom"])
def test_windowed_and_alibi_models_train_as_with_separate_rows(model_type, tmp_path, capsys, caplog):
    """A sliding window of 16 tokens under pairs of about 60 tokens (once scored with full attention, so log-probs
    and gradients differed from `--pair_scoring separate`), and ALiBi (once a crash at setup): with the default
    scoring, one step at learning rate 0 gives the separate rows' numbers, and says why in one line."""
    model_dir = tmp_path / "model"
    model = window_16_mistral() if model_type == "mistral" else model_or_skip(model_type)
    model.save_pretrained(model_dir)
    tiny.build_tokenizer().save_pretrained(model_dir)
    letters = "abcdefghijklmnopqrstuvwxyz"
    dataset = tmp_path / "long.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": "repeat: " + (letters[i:] + letters)[:24]},
        {"role": "assistant", "content": (letters[i:] + letters)[:24]}]}) + "\n" for i in range(4)))
    rows = {}
    for scoring in ("shared_prefix", "separate"):
        arguments = train_arguments(model_dir, dataset, tmp_path / scoring, "--pair_scoring", scoring,
                                    "--learning_rate", "0", "--seed", "3", "--max_length", "96",
                                    "--token_generate_length", "8")
        code, text = train_in_process(arguments, capsys, caplog)
        assert code == 0, text[-3000:]
        assert len(fallback_lines(text)) == (scoring == "shared_prefix"), text[-3000:]
        rows[scoring] = first_training_row(tmp_path / scoring)
        caplog.clear()
    for key in ("logps/chosen", "logps/rejected", "grad_norm", "loss"):
        assert rows["shared_prefix"][key] == pytest.approx(rows["separate"][key], abs=1e-5), key


def test_the_packing_probe_is_longer_than_a_window_it_must_prove():
    """A window the config did not declare would still fail the probe: Mistral with its window of 8 packs wrong,
    and the probe says so by itself."""
    from sapo.scoring import packing_probe_failure

    model = model_or_skip("mistral")
    assert packing_probe_failure(model, 0, use_hidden_states=True) == (
        "packed rows do not reproduce the separate rows' log-probs")
    assert "sliding_window=8" in shared_prefix_refusal(model, 0, use_hidden_states=True)


def test_the_issue_reproduction_mistral_window_16_and_a_60_token_pair():
    """The reproduction of issue 22: packing moved log-probs by up to 0.19 here; now the model is refused."""
    model = window_16_mistral()
    ids = [(13 * i + 7) % (VOCAB - 7) + 7 for i in range(90)]
    batch = pad_pair_sequences([(ids[:10], ids[10:60], ids[10:30] + ids[60:90])], pad_token_id=0)
    with torch.no_grad():
        packed = packed_response_token_logps(model, batch["packed_input_ids"], batch["prefix_lengths"],
                                             batch["attention_mask"], batch["loss_mask"])
        separate = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert (packed - separate).abs().max() > 1e-3  # what packing would get wrong
    assert "sliding_window=16" in shared_prefix_refusal(model, 0, use_hidden_states=True)


@pytest.mark.parametrize("model_type,fields,reason", [
    ("falcon", {"alibi": True}, "ALiBi"),
    ("mpt", {"attn_config": {"alibi": True}}, "ALiBi"),
    ("llama4_text", {"attention_chunk_size": 8}, "chunked_attention"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding_attention"),
    ("gemma3_text", {}, "sliding_attention"),
])
def test_configs_that_limit_attention_are_refused_before_any_probe(model_type, fields, reason):
    """ALiBi, chunked attention and per-layer windows, as the configs of transformers 5.25 spell them."""
    from sapo.packing import limited_attention

    config = CONFIG_MAPPING[model_type](**fields)
    assert reason in limited_attention(config)
    assert limited_attention(CONFIG_MAPPING["llama"]()) is None


def test_sapo_train_with_flex_pair_attention_trains_as_with_the_dense_mask(tmp_path, dataset_file, capsys, caplog):
    """`sapo train --pair_attention flex` (the console script) on a CPU: the reference's no-grad forward attends
    through FlexAttention, the policy's through the dense mask; at learning rate 0 the first step's log-probs,
    rewards and loss are the dense mask's."""
    model_dir = saved_model("llama", tmp_path / "model")
    rows = {}
    for setting in ("flex", "dense"):
        arguments = train_arguments(model_dir, dataset_file, tmp_path / setting, "--pair_attention", setting,
                                    "--learning_rate", "0", "--seed", "3")
        if setting == "flex":
            result = sapo_train(*arguments)
            assert result.returncode == 0, result.stderr[-3000:]
            text = result.stdout + result.stderr
            assert "pair scoring: packed pairs, FlexAttention without gradients, dense mask with them" in text
        else:
            code, text = train_in_process(arguments, capsys, caplog)
            assert code == 0, text[-3000:]
            assert "pair scoring: packed pairs, dense mask" in text
        rows[setting] = first_training_row(tmp_path / setting)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "loss"):
        assert rows["flex"][key] == pytest.approx(rows["dense"][key], abs=1e-5), key
