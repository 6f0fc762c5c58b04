"""benchmarks/speed.py end to end on its dry-run shapes: every phase runs and the report has its promised lines."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_cpu_dry_run_reports_ratio_generation_and_ema_share():
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", "cpu", "--dry_run"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    ratio = re.fullmatch(r"sapo/trl step ratio: (\d+\.\d\d)", lines[-1])
    assert ratio and float(ratio.group(1)) > 0
    ema = next(line for line in lines if line.startswith("SAPO EMA update"))
    share = float(re.search(r"([\d.]+)% of the mean step", ema).group(1))
    assert 0 < share < 100
    assert "greedy rows identical to generate: 2/2" in result.stdout
