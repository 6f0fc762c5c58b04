"""benchmarks/speed.py end to end on its dry-run shapes: every phase runs and the report has its promised lines."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


@pytest.mark.slow  # about 30 s: `-m slow` or `-m benchmark`
def test_cpu_dry_run_reports_ratio_generation_warmup_and_ema_share(tmp_path):
    results = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", "cpu", "--dry_run", "--jsonl", str(results),
                             "--phases", "trl,sapo", "--gen_after_sapo"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # every measurement as one JSON line, in the order taken (gen in the sapo phase's process, after its row)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    names = [row["name"] for row in rows]
    assert names == ["cpu/trl", "cpu/sapo", *[f"gen/4/{mode}/{engine}" for mode in ("greedy", "sampled")
                                              for engine in ("hf", "static")], "cpu/ratio"]
    assert rows[1]["compile"] == {"dynamo_frames": 0, "recompiles": 0, "graph_breaks": 0,
                                  "cuda_graphs": "not captured: not compiled", "compile_failed": False}
    assert 0 < rows[-1]["step_ratio"] == rows[1]["step_mean_s"] / rows[0]["step_mean_s"]
    compiled = "SAPO compile: 0 frames, 0 recompiles, 0 graph breaks, CUDA graphs not captured: not compiled"
    assert compiled in result.stdout
    lines = result.stdout.strip().splitlines()
    ratio = re.fullmatch(r"sapo/trl step ratio: (\d+\.\d\d)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    ema = next(line for line in lines if line.startswith("SAPO EMA update"))
    share = float(re.search(r"([\d.]+)% of the mean step", ema).group(1))
    assert 0 < share < 100
    # No engine flag: the trainer's own engine, as `sapo train` builds it (auto -> static on CPU, eager), with the
    # run's fixed shapes: rounds of 2 batches of 2 in a dry run, cache max_length 64 + G 16.
    generation = next(line for line in lines if line.startswith("SAPO generation"))
    assert ("engine static (generation_engine auto), compiled decode: False (compiled shape: 4 rows x cache 80)"
            in generation)
    assert "one every 2 steps" in generation
    warmup = next(line for line in lines if line.startswith("SAPO warm-up"))
    assert re.search(r"3 steps, [\d.]+ s; generation rounds: first \(one batch\) [\d.]+ s", warmup)
    assert "SAPO-DPO [static, gen batch 4]" in result.stdout
    assert "generation_engine auto picks static" in result.stdout
    assert "greedy rows identical to generate: 4/4" in result.stdout
    breakdown = next(line for line in lines if line.startswith("SAPO step breakdown"))
    parts = dict(re.findall(r"(generation|policy|reference|ema|other) ([\d.]+)", breakdown))
    assert set(parts) == {"generation", "policy", "reference", "ema", "other"} and float(parts["policy"]) > 0
    reused = int(re.search(r"(\d+)% of the timed steps' pairs reused remembered reference scores", breakdown).group(1))
    assert 0 <= reused < 100  # the dry run's few steps draw few pairs twice
    assert re.search(r"^sapo/trl peak memory ratio: \d+\.\d\d", result.stdout, re.MULTILINE)


def test_token_generate_length_flag_sets_the_segment_of_the_measured_shape():
    from helpers import load_benchmark

    for speed in load_benchmark("speed"):
        options = speed.options_of(speed.parse_args(["--config", "cpu", "--reference_cache", "off"]))
        assert not speed.sapo_config(speed.CONFIGS["cpu"], options, output_dir="unused").cache_reference_logps
        full = speed.shape_of(speed.parse_args(["--config", "cpu", "--token_generate_length", "64"]))
        assert (full.segment, full.response_len) == (64, 128)
        assert speed.shape_of(speed.parse_args(["--config", "cpu"])).segment == 128  # whole response by default
        dry = speed.shape_of(speed.parse_args(["--config", "gpu", "--dry_run", "--token_generate_length", "8"]))
        assert dry.segment == 8 and dry.hidden == 64


def test_timed_calls_are_attributed_to_the_step_they_ran_in():
    """A step may run the reference forward once or not at all: the breakdown sums calls by step, not by count."""
    from helpers import load_benchmark

    for speed in load_benchmark("speed"):
        class Owner:
            def forward(self, value):
                return value * 2

        owner, seconds, step = Owner(), [], {"now": 0}
        speed.timed_calls(owner, "forward", seconds, lambda step=step: step["now"])
        for now, calls in ((0, 1), (1, 0), (2, 2)):  # step 1 made no call
            step["now"] = now
            assert [owner.forward(3) for _ in range(calls)] == [6] * calls
        assert [at for at, _ in seconds] == [0, 2, 2] and all(s >= 0 for _, s in seconds)
