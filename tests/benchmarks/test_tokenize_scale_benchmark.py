"""benchmarks/tokenize_scale.py on a few records: the synthetic chats are valid, seeded, and every one is kept."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark

from sapo.data import examples_from_records

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tokenize_scale.py"


@pytest.fixture(scope="module")
def tokenize_scale():
    yield from load_benchmark("tokenize_scale")


def test_records_are_seeded_demonstrations(tokenize_scale):
    assert tokenize_scale.make_record(random.Random(3)) == tokenize_scale.make_record(random.Random(3))
    records = [tokenize_scale.make_record(random.Random(seed)) for seed in range(50)]
    examples = examples_from_records(records)  # every record is a valid chat ending with an assistant turn
    assert {len(r["messages"]) for r in records} >= {2, 4, 6}
    assert all(example.response["content"] for example in examples)


@pytest.mark.slow  # about 15 s: `-m slow` or `-m benchmark`
def test_command_reports_every_record_kept():
    result = subprocess.run([sys.executable, str(SCRIPT), "--records", "40", "--num_proc", "2"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines()
                             if line.startswith("TOKENIZE_SCALE_RESULT "))[len("TOKENIZE_SCALE_RESULT "):])
    assert report["kept"] == 40 and report["num_proc"] == 2 and report["tokens_kept"] > 40 * 50
    assert re.fullmatch(r"tokenize_scale: 40 records in [\d.]+ s \(\d+ records/s\)", result.stdout.splitlines()[-1])
