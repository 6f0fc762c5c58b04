"""benchmarks/gpu_check.sh and benchmarks/benchlog.py: measurements kept as they are taken, compiles reported, the
dry run's fallback path reporting itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import benchlog  # noqa: E402

CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def test_each_measurement_is_appended_as_one_json_line_and_summarised(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    benchlog.emit("gpu/sapo", {"step_mean_s": 1.5, "peak_mib": float("nan"), "engine": "static"}, results)
    assert capsys.readouterr().out.startswith('RESULT {"name": "gpu/sapo"')
    assert len(results.read_text().splitlines()) == 1  # on disk before anything else runs
    benchlog.emit("gpu/ratio", {"step_ratio": 0.9}, results)
    capsys.readouterr()
    with open(results, "a") as handle:
        handle.write('{"name": "cut by a ki')  # a line a kill interrupted
    rows = benchlog.read_results(results)
    assert [row["name"] for row in rows] == ["gpu/sapo", "gpu/ratio"] and rows[0]["peak_mib"] is None
    assert benchlog.main([str(results)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gpu/sapo") and "step_mean_s 1.5" in printed[0] and "engine static" in printed[0]
    assert "step_ratio 0.9" in printed[1] and printed[2] == "(2 rows)"


def test_a_test_part_becomes_one_row_of_counts(tmp_path):
    log = tmp_path / "cuda_tests.log"
    log.write_text("sss.\nSKIPPED [3] tests/generation/test_generation.py:511: needs CUDA\n"
                   "1 passed, 3 skipped, 9 deselected in 4.20s\n")
    results = tmp_path / "results.jsonl"
    assert benchlog.main(["--pytest", "cuda_tests", str(log), "0", str(results)]) == 0
    row = benchlog.read_results(results)[0]
    assert row == {"name": "cuda_tests", "exit_status": 0, "passed": 1, "skipped": 3, "deselected": 9}
    assert benchlog.pytest_counts("2 failed, 1 error in 0.5s") == {"failed": 2, "error": 1}
    assert benchlog.pytest_counts("killed before the end") == {}


def test_compile_watch_counts_graph_breaks_recompiles_and_says_why_no_cuda_graphs():
    def step(x, scale):
        y = x.sin()
        torch._dynamo.graph_break()
        return y * scale

    watch = benchlog.CompileWatch()
    compiled = torch.compile(step, backend="eager", dynamic=False)
    compiled(torch.ones(3), 2.0)
    compiled(torch.ones(5), 2.0)  # a new shape under dynamic=False: recompiles both frames
    report = watch.report(torch.device("cpu"), compiled=True)
    assert report["graph_breaks"] >= 1 and report["recompiles"] >= 1
    assert report["dynamo_frames"] == 2 + report["recompiles"]
    assert report["cuda_graphs"] == "not captured: cpu" and not report["compile_failed"]
    failed = benchlog.CompileWatch().report("cuda:0", compiled=True, compile_error="RuntimeError: boom")
    assert failed["compile_failed"] and failed["cuda_graphs"] == "not captured: compile failed (RuntimeError: boom)"
    assert benchlog.compile_cell(failed).startswith("COMPILE FAILED; 0 frames, 0 recompiles, 0 graph breaks")
    assert benchlog.CompileWatch().report("cuda:0", compiled=False)["cuda_graphs"] == "not captured: not compiled"


def run_check(tmp_path: Path, parts: str, **env: str) -> subprocess.CompletedProcess:
    """gpu_check.sh's dry run from another directory, with a relative LOG_DIR."""
    environment = {**os.environ, "DRY_RUN": "1", "PARTS": parts, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(CHECK), "-", "logs"], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=1200)


def test_the_dry_run_starts_offline_from_anywhere_and_summarises_even_without_rows(tmp_path):
    completed = run_check(tmp_path, parts="none")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| transformers" in completed.stdout  # the environment line
    assert f"every measured row of {tmp_path / 'logs' / 'results.jsonl'}" in completed.stdout
    assert "no measurement was taken" in completed.stdout
    assert (tmp_path / "logs").is_dir()


@pytest.mark.slow
def test_the_cheapest_part_with_a_failing_compile_reports_the_fallback(tmp_path):
    """gen256 on dry-run shapes with torch.compile made to raise: the static engine's rows say the compile failed
    (JSON line, table, summary) and the warning names what decoded instead."""
    completed = run_check(tmp_path, parts="gen256", FAIL_COMPILE="1")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = {row["name"]: row for row in map(json.loads, (tmp_path / "logs" / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"gen/4/sampled/static", "gen/4/sampled/hf"}
    static = rows["gen/4/sampled/static"]["compile"]
    assert static["compile_failed"] and "--fail_compile" in static["cuda_graphs"]
    assert rows["gen/4/sampled/hf"]["compile"]["cuda_graphs"] == "not captured: cpu"
    assert "torch.compile of the decode step failed" in completed.stdout
    summary = completed.stdout.split("=== summary")[1]
    assert "gen/4/sampled/static" in summary and "COMPILE FAILED" in summary and "(2 rows)" in summary


@pytest.mark.slow
def test_the_emulated_device_runs_the_cheapest_part_with_its_own_transformers_shadowed(tmp_path):
    """benchmarks/emulate_device.sh: a scratch venv with the device image's transformers (built once in runs/, from
    the package registry), the carried wheels installed ahead of it, torch.compile failing."""
    environment = {**os.environ, "PARTS": "gen256", "HOST_PYTHON": sys.executable}
    environment.pop("PYTHONPATH", None)  # nothing of this environment leaks into the emulated one
    completed = subprocess.run(["bash", str(ROOT / "benchmarks" / "emulate_device.sh"), str(tmp_path / "logs")],
                               cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=2400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "transformers (image) 5.17.0" in completed.stdout  # the venv holds the device's version...
    import transformers

    assert f"| transformers {transformers.__version__} |" in completed.stdout  # ...and the carried wheel shadows it
    rows = benchlog.read_results(tmp_path / "logs" / "results.jsonl")
    static = next(row for row in rows if row["name"].endswith("/sampled/static"))
    assert static["compile"]["compile_failed"]
