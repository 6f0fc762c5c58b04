import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sapo
from sapo.cli import main as sapo_main
from sapo.cli.demo import main
from sapo.demo_kit import report
from sapo.demo_kit.progress import StageProgress, format_duration

TINY = ["--n_train", "64", "--n_heldout", "12", "--hidden_size", "32", "--num_layers", "1", "--sft_steps", "5",
        "--sft_batch_size", "8", "--sapo_steps", "3", "--sapo_batch_size", "4"]


def test_demo_pipeline_in_miniature(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--output_dir", str(out), *TINY]) == 0
    summary = json.loads((out / "demo_results.json").read_text())
    assert 0.0 <= summary["before"]["score"] <= 1.0 and 0.0 <= summary["after"]["score"] <= 1.0
    assert len(summary["before"]["scores"]) == len(summary["after"]["scores"]) == 12
    assert set(summary["change"]) == {"overall", "arithmetic", "string", "constraint"}
    for path in ("sft/model.safetensors", "sapo/model.safetensors", "sapo/ema/model.safetensors",
                 "sapo/metrics.jsonl", "train.jsonl", "heldout.jsonl",
                 "sapo/checkpoint-3/sapo_state/replay_buffer_rank0.safetensors"):
        assert (out / path).exists(), path
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 12
    printed = capsys.readouterr().out
    assert "SFT (before)" in printed and "SAPO (after)" in printed and str(out / "sapo") in printed
    assert "{'loss'" not in printed  # a summary, not the Trainer's raw log rows
    assert (out / "sft" / "metrics.jsonl").exists()  # the SFT warm-up is the `sft` recipe of the same trainer
    assert main(["--output_dir", str(out), *TINY]) == 0  # a second run into the same directory replaces the first


def _next_commands(printed: str) -> list[list[str]]:
    """The commands under "Next:" as argv lists, each starting with the program the demo found for `sapo` (this
    Python's `sapo` script, named `sapo` only where the PATH finds that one)."""
    tail = printed[printed.index("\nNext:\n"):].splitlines()[2:]
    commands = [shlex.split(line) for line in tail if line.strip() and not line.strip().startswith("#")]
    program = Path(sys.executable).with_name("sapo")
    found = shutil.which("sapo")
    expected = "sapo" if found and os.path.samefile(found, program) else str(program.absolute())
    assert all(argv[0] == expected for argv in commands), (expected, commands)
    return commands


def _checkout_env() -> dict[str, str]:
    """The environment with this checkout's sapo first on the Python path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(sapo.__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _console(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`sapo ARGV` as a user runs it, with this checkout's sapo first on the path."""
    return subprocess.run([sys.executable, "-m", "sapo.cli", *argv], cwd=cwd, env=_checkout_env(),
                          capture_output=True, text=True, timeout=600)


def _run_demo_console(tmp_path: Path) -> list[list[str]]:
    """The tiny demo through the console command (stdout a pipe, as in a log file); returns its next commands."""
    result = _console(["demo", "--output_dir", "runs/demo", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout
    assert "\r" not in printed  # a log file gets whole lines, not carriage-return redraws
    for label, total in (("SFT", "5/5 steps"), ("judging SFT", "12/12 prompts"), ("SAPO", "3/3 steps"),
                         ("judging SAPO", "12/12 prompts")):
        assert re.search(rf"^ +{label} \[#+\] {total}  elapsed \d+:\d\d  ETA \d+:\d\d$", printed, re.M), label
    assert re.search(r"^overall +12 +[01]\.\d{3} +[01]\.\d{3} +[+-]\d\.\d{3} +\d\.\d{3}  \w", printed, re.M), printed
    assert "SAPO policy vs SFT: " in printed
    commands = _next_commands(printed)
    assert [argv[1] for argv in commands] == ["plot", "inspect", "eval"]
    return commands


def _check_outputs(name: str, stdout: str, tmp_path: Path) -> None:
    if name == "plot":
        assert (tmp_path / "runs/demo/sapo/plots/loss.png").stat().st_size > 0
    elif name == "inspect":
        assert "SAPO replay buffer" in stdout and "── entry 0:" in stdout and "rejected:" in stdout
    else:
        assert re.search(r"^runs/demo/sapo +[01]\.\d{3}", stdout, re.M), stdout
        assert "runs/demo/sft vs runs/demo/sapo" in stdout


def test_demo_console_then_its_next_commands(tmp_path, capsys, monkeypatch):
    """The demo through `python -m sapo.cli demo`, then every command it prints, as printed, from the same directory
    (run in this process through the `sapo` entry point to stay fast; the slow variant spawns each one)."""
    commands = _run_demo_console(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        capsys.readouterr()
        assert sapo_main(argv[1:]) == 0, argv
        _check_outputs(argv[1], capsys.readouterr().out, tmp_path)


@pytest.mark.slow
def test_demo_console_then_its_next_commands_each_spawned(tmp_path):
    for argv in _run_demo_console(tmp_path):  # exactly as printed: the program too
        result = subprocess.run(argv, cwd=tmp_path, env=_checkout_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
        _check_outputs(argv[1], result.stdout, tmp_path)


def test_the_printed_program_is_sapo_only_where_the_path_finds_this_one(tmp_path, monkeypatch):
    """After `make demo` the venv is not activated: its `sapo` is printed by path, relative under the working
    directory (`.venv/bin/sapo`)."""
    script = Path(sys.executable).with_name("sapo")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sapo on it
    assert report.runnable_sapo(tmp_path) == str(script.absolute())
    assert report.runnable_sapo(script.parents[1]) == f"{script.parent.name}/sapo"
    monkeypatch.setenv("PATH", str(script.parent))
    assert report.runnable_sapo(tmp_path) == "sapo"


# ------------------------------------------------------------------------------------------------
# The closing report (sapo.demo_kit.report)
# ------------------------------------------------------------------------------------------------


def test_paired_difference_mean_and_standard_error():
    change = report.paired_difference([0.0, 1.0, 0.5, 0.5], [1.0, 1.0, 0.5, 0.0])  # differences 1, 0, 0, -0.5
    assert change["n"] == 4 and change["mean"] == pytest.approx(0.125)
    sd = math.sqrt(((0.875 ** 2) + 2 * (0.125 ** 2) + (0.625 ** 2)) / 3)
    assert change["se"] == pytest.approx(sd / 2)
    assert math.isnan(report.paired_difference([0.2], [0.3])["se"])
    with pytest.raises(ValueError, match="3 scores before but 2 after"):
        report.paired_difference([0, 0, 0], [0, 0])


def test_verdict_calls_a_change_within_two_standard_errors_noise():
    assert report.verdict({"mean": 0.01, "se": 0.007}) == "within noise"
    assert report.verdict({"mean": -0.02, "se": 0.007}) == "drop beyond noise"
    assert report.verdict({"mean": 0.02, "se": 0.007}) == "gain beyond noise"
    assert report.verdict({"mean": 0.0, "se": 0.0}) == "no change"
    assert report.verdict({"mean": 0.1, "se": math.nan}) == "too few prompts to tell"
    assert "within 2 standard errors" in report.conclusion({"mean": 0.01, "se": 0.007}, "SAPO", "SFT")


def test_score_table_rows_per_family_in_suite_order():
    records = [{"task": "string"}, {"task": "arithmetic"}, {"task": "arithmetic"}, {"task": "string"}]
    table = report.score_table(records, {"before": [1.0, 0.0, 0.0, 1.0], "after": [1.0, 1.0, 1.0, 0.0]})
    rows = table.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["overall", "arithmetic", "string"]
    assert rows[1].split()[1:6] == ["2", "0.000", "1.000", "+1.000", "0.000"]
    assert rows[0].split()[3] == "0.750" and rows[0].split()[4] == "+0.250"


def test_score_table_warns_that_one_family_beyond_noise_can_be_chance():
    records = [{"task": "arithmetic"}] * 4 + [{"task": "string"}] * 4
    before, after = [0, 0, 0, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 1]  # arithmetic +0.75 ± 0.25, string 0 ± 0.58
    table = report.score_table(records, {"before": before, "after": after})
    assert "gain beyond noise" in table.splitlines()[3] and table.endswith("the overall row is the one to read)")
    quiet = report.score_table(records, {"before": before, "after": before[:4] + after[4:]})
    assert "can be chance" not in quiet


def test_next_commands_survive_paths_with_spaces(tmp_path):
    base = tmp_path / "my runs"
    commands = report.next_commands(sft_dir=base / "sft", sapo_dir=base / "sapo", heldout=base / "heldout.jsonl",
                                    max_new_tokens=40)
    assert shlex.split(commands[1][0]) == ["sapo", "inspect", str(base / "sapo")]
    assert shlex.split(commands[2][0])[-4:] == ["--data", str(base / "heldout.jsonl"), "--max_new_tokens", "40"]


# ------------------------------------------------------------------------------------------------
# Progress lines (sapo.demo_kit.progress)
# ------------------------------------------------------------------------------------------------


def test_progress_in_a_log_writes_a_line_every_ten_percent():
    stream = io.StringIO()  # not a TTY
    progress = StageProgress("SFT", 600, "steps", stream=stream, log_interval=0.0)
    for step in range(1, 601):
        progress.update(step)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].split()[:3] == ["SFT", "[" + "#" * 2 + "." * 18 + "]", "60/600"]
    assert lines[-1].split()[2] == "600/600" and lines[-1].endswith("ETA 0:00")


def test_progress_in_a_log_writes_a_short_stage_as_one_line():
    stream = io.StringIO()
    progress = StageProgress("judging SFT", 600, "prompts", stream=stream, log_interval=3600.0)
    for done in range(64, 664, 64):
        progress.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "600/600 prompts" in lines[0]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_terminal_redraws_one_line():
    stream = _Terminal()
    progress = StageProgress("SAPO", 100, "steps", stream=stream, min_interval=3600.0)
    for step in range(1, 101):
        progress.update(step)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("100/100 steps  elapsed 0:00  ETA 0:00\n")  # first and last draw


def test_progress_eta_unknown_before_the_first_step_and_durations_read_at_a_glance():
    assert StageProgress("SFT", 10, "steps", stream=io.StringIO()).line().endswith("ETA ?")
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]
    with pytest.raises(ValueError, match="total must be >= 1"):
        StageProgress("SFT", 0, "steps")


def test_demo_help_says_what_each_flag_sets_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps of the SFT warm-up (default: 600)" in text
    assert "tokens the EMA model rewrites per response (segment G) (default: 6)" in text
