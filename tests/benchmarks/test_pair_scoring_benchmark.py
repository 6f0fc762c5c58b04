"""benchmarks/pair_scoring.py on speed.py's dry-run shapes: every layout runs, agrees with separate rows, and is
reported as it is measured (printed and appended as a JSON line)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmark  # a benchmark script at tiny size; `-m "not benchmark"` skips these

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pair_scoring.py"


@pytest.mark.parametrize("config", ["cpu", pytest.param("gpu", marks=pytest.mark.slow)])  # gpu shapes: 17 s
def test_dry_run_reports_tokens_times_and_agreement(config, tmp_path):
    results = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", config, "--dry_run", "--repeats", "1",
                             "--jsonl", str(results)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fewer = re.search(r"packed (\d+) \(\d+ padded\): ([\d.]+)% fewer", result.stdout)
    assert fewer and float(fewer.group(2)) > 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["layout"] for row in rows] == ["separate", "packed-dense", "packed-flex"]
    assert [row["name"] for row in rows] == [f"pairs-{config}/{row['layout']}" for row in rows]
    for row in rows:
        assert row["max_logp_difference"] < (5e-2 if config == "gpu" else 1e-4)  # the gpu shape runs in bf16
        assert row["step_mean_s"] > 0 and f"{row['layout']:<13} policy fwd+bwd" in result.stdout
    assert rows[0]["max_logp_difference"] == 0.0 and rows[0]["ratio_to_separate"] == 1.0
    assert rows[2]["compile"]["graph_breaks"] == 0


def test_an_unknown_layout_is_named(capsys):
    spec = importlib.util.spec_from_file_location("pair_scoring_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--dry_run", "--layouts", "separate,sparse"])
    assert exit_info.value.code == 2 and "unknown layouts: sparse" in capsys.readouterr().err
