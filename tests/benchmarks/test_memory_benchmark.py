"""benchmarks/memory.py --dry_run: every memory option trained for real (tiny Qwen2), its copies counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_benchmark
from torch import nn

from sapo import tiny

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def memory():
    yield from load_benchmark("memory")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "results.json"
    completed = subprocess.run([sys.executable, str(BENCHMARK), "--dry_run", "--use_cpu", "--json", str(out)],
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def lora_adapter_numel(shape: dict, rank: int) -> int:
    """r * (in + out) for q, k, v, o of every layer, from the shape alone."""
    head_dim = shape["hidden"] // shape["heads"]
    q_out, kv_out = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    per_layer = rank * ((shape["hidden"] + q_out) + 2 * (shape["hidden"] + kv_out) + (q_out + shape["hidden"]))
    return per_layer * shape["layers"]


@pytest.mark.slow  # the dry run takes about 50 s: `-m slow` or `-m benchmark`
def test_copy_bytes_of_every_option(memory, dry_run):
    data, _ = dry_run
    r = data["results"]
    assert list(r) == list(memory.OPTIONS)
    default = r["default"]
    fp32 = 4
    # The policy is an fp32 full fine-tune whose size follows from the shape alone.
    shape = memory.speed.Shape(**data["shape"])
    expected_policy = memory.speed.parameter_count(shape, tiny.build_tokenizer()) * fp32
    assert default["policy_bytes"] == default["trainable_bytes"] == expected_policy

    # default: two whole fp32 modules on the training device
    assert default["copies_form"] == {"ema": "module", "ref": "module"}
    assert default["copies_dtypes"] == ["float32"]
    assert default["copies_device_bytes"] == 2 * expected_policy and default["copies_host_bytes"] == 0

    # copies_dtype=bfloat16: still modules, exactly half the bytes
    assert r["bf16"]["copies_form"] == {"ema": "module", "ref": "module"}
    assert r["bf16"]["copies_dtypes"] == ["bfloat16"]
    assert r["bf16"]["copies_device_bytes"] * 2 == default["copies_device_bytes"]
    assert r["bf16"]["copies_host_bytes"] == 0

    # offload: nothing resident, the same bytes in the offload store, held as plain tensors (no modules)
    for name, factor in (("offload", 1), ("bf16+offload", 2)):
        assert r[name]["copies_form"] == {"ema": "tensors", "ref": "tensors"}, name
        assert r[name]["copies_device_bytes"] == 0, name
        assert r[name]["copies_host_bytes"] * factor == default["copies_device_bytes"], name
    assert r["bf16+offload"]["copies_dtypes"] == ["bfloat16"]

    # LoRA: the copies are the adapters only (EMA and reference), a small fraction of the full copies
    lora = r["lora"]
    adapters = lora_adapter_numel(data["shape"], lora["lora_rank"]) * fp32
    assert lora["trainable_bytes"] == adapters
    assert lora["copies_form"] == {"ema": "tensors", "ref": "tensors"}
    assert lora["copies_device_bytes"] == 2 * adapters and lora["copies_host_bytes"] == 0
    assert lora["copies_device_bytes"] < 0.05 * default["copies_device_bytes"]

    # the baseline has no copies at all and trains on as many sequences per step as SAPO's policy forward
    base = r["policy-only"]
    assert base["recipe"] == "sft" and base["copies_form"] == {"ema": None, "ref": None}
    assert base["copies_device_bytes"] == base["copies_host_bytes"] == 0
    assert base["batch"] == 2 * default["batch"]

    for name, result in r.items():
        assert result["device"] == "cpu" and result["memory_kind"] == "cpu peak RSS delta", name
        assert result["peak_mib"] > 0 and result["step_mean_s"] > 0, name
        assert len(result["all_steps_s"]) == data["settings"]["steps"] and result["steps_timed"] == 1, name


@pytest.mark.slow  # the dry run takes about 50 s: `-m slow` or `-m benchmark`
def test_printed_table_and_ratios(memory, dry_run):
    data, stdout = dry_run
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| option |"))
    assert "peak (MiB, process peak RSS growth)" in lines[header] and "s/step" in lines[header]
    assert lines[header].count("|") == lines[header + 1].count("|") == 7
    rows = [line.split(" | ") for line in lines[header + 2:header + 2 + len(memory.OPTIONS)]]
    assert [row[0][2:] for row in rows] == list(memory.OPTIONS)
    assert all(len(row) == 6 for row in rows)
    # eager decoding on a CPU: nothing compiled, and CUDA graphs say why they were not captured
    assert all(row[5] == "0 frames, 0 recompiles, 0 graph breaks, CUDA graphs not captured: not compiled |"
               for row in rows if row[0][2:] != "policy-only")
    ratios = {line.split(":")[0]: float(line.split("copies ")[1].split("x")[0])
              for line in lines if ": device-resident copies " in line}
    assert ratios == pytest.approx({"default": 1.0, "bf16": 0.5, "offload": 0.0, "bf16+offload": 0.0,
                                    "lora": ratios["lora"], "policy-only": 0.0})
    assert 0 < ratios["lora"] < 0.05
    assert "CPU run" in stdout


def test_placement_on_a_gpu_run_is_the_tensors_device(memory):
    """Classification without a GPU: on a CUDA run, host tensors are 'host' whatever the path, device ones not."""
    cuda = torch.device("cuda", 0)
    host = SimpleNamespace(device=torch.device("cpu"))
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert memory.placement(host, cuda, in_offload_store=True) == "host"
    assert memory.placement(host, cuda, in_offload_store=False) == "host"
    assert memory.placement(on_gpu, cuda, in_offload_store=True) == "device"  # a bug would show as resident
    assert memory.placement(host, torch.device("cpu"), in_offload_store=False) == "device"
    assert memory.placement(host, torch.device("cpu"), in_offload_store=True) == "host"


def test_copy_memory_counts_aliased_and_tied_storage_once(memory):
    from sapo.ema import ShadowWeights

    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    module[1].weight = module[0].weight  # tied: one storage
    names = [name for name, _ in module.named_parameters()]
    ema = ShadowWeights.parameters_of(module, names)  # aliases the module's parameters
    ref = ShadowWeights(["w"], [torch.zeros(3, dtype=torch.bfloat16)])
    counted = memory.copy_memory(module, ema, None, ref, torch.device("cpu"), offload_store=True)
    assert counted["copies_device_bytes"] == 10 * 4 * 4  # the module's copy is never in the offload store
    assert counted["copies_host_bytes"] == 3 * 2  # a moduleless copy with offloading on is
    assert counted["copies_form"] == {"ema": "module", "ref": "tensors"}
    assert counted["copies_dtypes"] == ["bfloat16", "float32"]
