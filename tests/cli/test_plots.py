"""Tests for `sapo plot`: one PNG per metric group present, runs overlaid, clear errors."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from sapo.cli import plot as plots
from sapo.cli.plot import load_metrics, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PANEL_WIDTH_PX = 500  # figsize 5 inches per panel at dpi 100


def dpo_row(step: int) -> dict:
    return {
        "step": step, "epoch": step / 100, "loss": 0.69 - 0.01 * step, "grad_norm": 1.0, "learning_rate": 5e-7,
        "rewards/chosen": 0.01 * step, "rewards/rejected": -0.01 * step, "rewards/margins": 0.02 * step,
        "rewards/accuracies": min(1.0, 0.5 + 0.05 * step), "logps/chosen": -20.0, "logps/rejected": -25.0,
        "buffer/size": min(64.0, 8.0 * step), "buffer/mean_times_sampled": 1.0 + 0.1 * step,
        "segment/replaced_length": 200.0 + step, "segment/start": 10.0, "segment/identical_fraction": 0.0,
        "time/generation_share": 0.6,
    }


def orpo_row(step: int) -> dict:
    row = dpo_row(step)
    row["nll_loss"] = 1.5 - 0.05 * step
    return row


def write_metrics(run: Path, rows: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def two_runs(tmp_path) -> list[Path]:
    dpo, orpo = tmp_path / "sapo-dpo", tmp_path / "sapo-orpo"
    summary = {"step": 10, "train_loss": 0.6, "train_runtime": 12.0}  # Trainer's final row: not a training row
    write_metrics(dpo, [dpo_row(s) for s in range(1, 11)] + [summary])
    # ORPO run without buffer/segment/time metrics, and a row still being written at the end
    orpo_rows = [{k: v for k, v in orpo_row(s).items() if not k.startswith(("buffer/", "segment/", "time/"))}
                 for s in range(2, 12, 2)]
    write_metrics(orpo, orpo_rows, tail='{"step": 12, "loss"')
    return [dpo, orpo]


def test_plot_two_runs_writes_every_group(two_runs, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figures"
    written = plot_runs(two_runs, out)
    names = ["loss", "rewards", "accuracy", "buffer", "segment", "generation_share"]
    assert written == [out / f"{name}.png" for name in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in names)
    panels = {"loss": 2, "rewards": 3, "accuracy": 1, "buffer": 2, "segment": 2, "generation_share": 1}
    for path in written:
        width, height = png_size(path)
        assert path.stat().st_size > 10_000, f"{path} looks empty"
        assert width == PANEL_WIDTH_PX * panels[path.stem] and height > 200


def test_figures_follow_the_metrics_present(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "minimal"
    write_metrics(run, [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5} for s in (1, 2, 3)])
    written = plot_runs([run], tmp_path / "out")
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    assert png_size(written[0])[0] == PANEL_WIDTH_PX  # no nll_loss: the loss figure has one panel


def test_load_metrics_rows(two_runs) -> None:
    dpo_rows = load_metrics(two_runs[0])
    assert [r["step"] for r in dpo_rows] == list(range(1, 11))  # the train_loss summary row is left out
    assert [r["step"] for r in load_metrics(two_runs[1] / "metrics.jsonl")] == [2, 4, 6, 8, 10]


def test_resumed_run_keeps_the_last_value_per_step(tmp_path) -> None:
    run = tmp_path / "resumed"
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3)] + [{"step": s, "loss": 0.5} for s in (2, 3, 4)]
    write_metrics(run, rows)
    assert plots._series(load_metrics(run), "loss") == ([1.0, 2.0, 3.0, 4.0], [1.0, 0.5, 0.5, 0.5])


def test_errors_name_the_file(tmp_path, caplog) -> None:
    missing = tmp_path / "no-run"
    with pytest.raises(ValueError, match=r"no-run/metrics\.jsonl: no such file"):
        plot_runs([missing], tmp_path / "out")
    empty = tmp_path / "empty-run"
    write_metrics(empty, [])
    with pytest.raises(ValueError, match=r"empty-run/metrics\.jsonl: is empty"):
        plot_runs([empty], tmp_path / "out")
    summary_only = tmp_path / "summary-only"
    write_metrics(summary_only, [{"step": 1, "train_runtime": 0.3}])
    with pytest.raises(ValueError, match=r"summary-only/metrics\.jsonl: has no training rows .*no evaluation rows"):
        load_metrics(summary_only)
    broken = tmp_path / "broken"
    write_metrics(broken, [{"step": 1, "loss": 1.0}], tail="{oops\n" + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    # sapo.metrics' one rule for a damaged file: an unreadable line before the last is dropped with a warning
    with caplog.at_level("WARNING", logger="sapo.metrics"):
        assert [row["step"] for row in load_metrics(broken)] == [1, 2]
    assert "broken/metrics.jsonl:2: dropping an unreadable line" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_matplotlib_says_how_to_install(two_runs, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'sapo-align\[plot\]'"):
        plot_runs(two_runs, tmp_path / "out")


def test_main_default_out_dir(two_runs, capsys) -> None:
    pytest.importorskip("matplotlib")
    assert plots.main([str(p) for p in two_runs]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(two_runs[0] / "plots" / f"{n}.png")
                       for n in ("loss", "rewards", "accuracy", "buffer", "segment", "generation_share")]
    assert all(Path(p).is_file() for p in printed)


def test_runs_of_an_older_sapo_plot_under_the_new_names(tmp_path) -> None:
    """sapo logged `rewards/real` and `logps/real` before it took TRL's names: such a run reads as today's, and a
    figure overlays old and new runs on the same panels."""
    pytest.importorskip("matplotlib")
    old_row = {"step": 1, "loss": 0.7, "rewards/real": 0.5, "logps/real": -3.0, "eval_dev_logps/real_per_token": -1.0}
    old = write_metrics(tmp_path / "old", [old_row, {"step": 2, "loss": 0.6, "rewards/real": 0.25}])
    new = write_metrics(tmp_path / "new", [{"step": 1, "loss": 0.7, "rewards/chosen": 0.1}])
    rows = load_metrics(old)
    assert rows[0] == {"step": 1, "loss": 0.7, "rewards/chosen": 0.5, "logps/chosen": -3.0,
                       "eval_dev_logps/chosen_per_token": -1.0}
    assert plots._series(rows, "rewards/chosen") == ([1.0, 2.0], [0.5, 0.25])
    assert (tmp_path / "out" / "rewards.png") in plot_runs([old.parent, new.parent], tmp_path / "out")


def test_main_usage_errors(tmp_path) -> None:
    from sapo.errors import UsageError

    with pytest.raises(UsageError, match="metrics.jsonl: no such file"):
        plots.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        plots.main([])


def test_eval_curves_one_line_per_run_and_eval_set(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    single, named = tmp_path / "single", tmp_path / "named"
    write_metrics(single, [dpo_row(1), {"step": 2, "eval_loss": 0.6, "eval_rewards/accuracies": 0.7},
                           {"step": 4, "eval_loss": 0.5, "eval_rewards/accuracies": 0.8}])
    write_metrics(named, [{"step": 2, "eval_dev_loss": 0.7, "eval_test_loss": 0.9, "eval_dev_runtime": 1.0}])
    rows = load_metrics(named)  # evaluation rows alone are enough to plot
    assert plots._named_series(rows, "eval_loss") == [("", [], []), ("dev", [2.0], [0.7]), ("test", [2.0], [0.9])]
    assert plots._named_series(load_metrics(single), "eval_loss") == [("", [2.0, 4.0], [0.6, 0.5])]
    written = plot_runs([single, named], tmp_path / "out")
    assert tmp_path / "out" / "eval.png" in written
    assert png_size(tmp_path / "out" / "eval.png")[0] == 2 * PANEL_WIDTH_PX  # loss and accuracy panels
