"""benchmarks/pair_scoring.py on speed.py's dry-run shapes: both layouts run and agree, and the report says so."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pair_scoring.py"


@pytest.mark.parametrize("config", ["cpu", "gpu"])
def test_dry_run_reports_tokens_times_and_agreement(config):
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", config, "--dry_run", "--repeats", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fewer = re.search(r"shared_prefix (\d+) \(\d+ padded\): ([\d.]+)% fewer", result.stdout)
    assert fewer and float(fewer.group(2)) > 0
    assert re.search(r"process CPU time: separate [\d.]+ ms, shared_prefix [\d.]+ ms", result.stdout)
    difference = float(re.search(r"log-prob difference between the layouts: ([\d.e+-]+)", result.stdout).group(1))
    assert difference < (5e-2 if config == "gpu" else 1e-4)  # the gpu shape runs in bf16
