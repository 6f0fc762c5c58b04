"""The start-weights fingerprint sees every byte, ignores where the files live, and ignores trained adapters."""

import shutil

import torch

from sapo.run.start_weights import PIECE, StartWeights, files_fingerprint, tensors_fingerprint, weight_files
from sapo.tiny import build_model


def test_files_fingerprint_sees_one_byte_anywhere_and_not_the_path(tmp_path, model_dir):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert [p.name for p in weight_files(copy)] == ["model.safetensors"]
    assert files_fingerprint(weight_files(copy)) == files_fingerprint(weight_files(model_dir))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert files_fingerprint(weight_files(copy)) != files_fingerprint(weight_files(model_dir))


def test_a_file_longer_than_one_piece_is_hashed_whole(tmp_path):
    big = tmp_path / "model.safetensors"
    big.write_bytes(b"\0" * (PIECE + 10))
    before = files_fingerprint([big])
    with open(big, "r+b") as handle:
        handle.seek(PIECE + 5)
        handle.write(b"\1")
    assert files_fingerprint([big]) != before


def test_models_in_memory_are_hashed_by_their_tensors_at_once(tokenizer, model_dir):
    first, same, other = (build_model(tokenizer, hidden_size=32, seed=s) for s in (0, 0, 1))
    start = StartWeights(first)
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # training changes the model after the trainer was created
    assert start.fingerprint() == StartWeights(same).fingerprint() != StartWeights(other).fingerprint()
    assert tensors_fingerprint(same) != tensors_fingerprint(first)


def test_a_model_loaded_from_a_directory_is_hashed_by_its_files(model_dir):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert StartWeights(loaded).fingerprint() == "files:" + files_fingerprint(weight_files(model_dir))


def test_lora_adapters_are_left_out(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_model(tokenizer, hidden_size=32, seed=0)
    plain = tensors_fingerprint(base)
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert tensors_fingerprint(adapted) == tensors_fingerprint(adapted.get_base_model()) == plain
