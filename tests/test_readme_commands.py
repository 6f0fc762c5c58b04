"""Every shell command of README.md and docs/getting-started.md (their bash blocks, and the benchmark commands their
figures cite) and of the comments in examples/ is accounted for: run here on a tiny local model (the command as
printed, plus flags that shrink it), run at tiny size by another named test, or excluded with the reason it cannot
run on a CPU in the suite. A command added to those files without an
entry below fails `test_every_documented_command_is_run_covered_or_excluded`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY_TRAIN_FLAGS, write_preference_records

from sapo import tasks, tiny
from sapo.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "getting-started.md")
EXAMPLES = ROOT / "examples"

EVAL_FLAGS = ["--n", "4", "--max_new_tokens", "8", "--batch_size", "4", "--quiet"]

# Commands run by `test_documented_command_runs` in a workspace that holds what they name (run.yaml, ./sft,
# data.jsonl, runs/demo/..., runs/a, runs/b): command -> flags appended (a repeated flag overrides the command's).
RUN = {
    "sapo train --config run.yaml": TINY_TRAIN_FLAGS,
    "sapo train --config run.yaml --beta 0.05": TINY_TRAIN_FLAGS,
    "sapo train --model_name_or_path ./sft --dataset_name data.jsonl --output_dir out --max_steps 1000":
        TINY_TRAIN_FLAGS,
    "sapo train --config run.yaml --recipe dpo": TINY_TRAIN_FLAGS,
    "python -m sapo train --config run.yaml": TINY_TRAIN_FLAGS,
    "sapo eval runs/demo/sft runs/demo/sapo --suite heldout --n 300 --output runs/eval.json": EVAL_FLAGS,
    "sapo eval runs/demo/sft runs/demo/sapo-cli --data runs/demo/heldout.jsonl": EVAL_FLAGS,
    "sapo plot runs/a runs/b": [],
    "sapo plot runs/demo/sapo-cli": [],
    "sapo inspect runs/a": [],
    "sapo inspect runs/demo/sapo-cli": [],
}

EXAMPLE_RUN = "tests/test_examples.py::test_example_trains_on_a_cpu_with_tiny_sizes"
DEMO_RUN = "tests/cli/test_demo.py::test_demo_pipeline_in_miniature"
SPEED_RUN = "tests/benchmarks/test_speed_benchmark.py::test_cpu_dry_run_reports_ratio_generation_warmup_and_ema_share"

# Commands another test runs at tiny size: command -> that test.
COVERED = {
    "sapo --version": "tests/cli/test_cli.py::test_sapo_version_prints_the_installed_version",
    "make demo": DEMO_RUN,  # `make demo` is `sapo demo --output_dir runs/demo` after an install
    "sapo demo --output_dir runs/demo": DEMO_RUN,
    "sapo train --config examples/lora-single-gpu.yaml": EXAMPLE_RUN,
    "sapo train --config examples/demo.yaml": EXAMPLE_RUN,
    "torchrun --nproc_per_node 8 -m sapo.cli train --config run.yaml":
        "tests/test_distributed.py::test_torchrun_of_the_cli_on_cpus_is_one_coordinated_job",  # 2 CPU processes
    # the benchmark runs README's figures cite (an hour of CPU each), run end to end at tiny shapes
    "benchmarks/speed.py --config cpu --phases sapo,trl --repeats 2": SPEED_RUN,
    "benchmarks/speed.py --config cpu --repeats 2": SPEED_RUN,
    "benchmarks/memory.py --json memory.json":
        "tests/benchmarks/test_memory_benchmark.py::test_copy_bytes_of_every_option",
    "benchmarks/quality.py --full":
        "tests/benchmarks/test_quality_benchmark.py::test_benchmark_writes_tables_json_and_png",
}

EIGHT_GPUS = "needs 8 GPUs; the accelerate config is read by tests/test_examples.py and the engine runs on 2 CPU " \
             "processes in tests/test_distributed.py"

# Commands that cannot run in the suite: command -> why.
EXCLUDED = {
    "pip install sapo-align": "installs from PyPI (network); CI installs the clone with `make test`",
    "pip install -e .": "installs the clone (network for dependencies); `make test` does it in CI",
    "pip install 'sapo-align[peft,plot]'": "installs from PyPI (network)",
    "make test": "is the suite itself (what CI runs, .ci/run)",
    ".venv/bin/python -m pytest": "is the suite itself",
    ".venv/bin/python -m pytest -m 'not slow and not distributed and not benchmark'": "is the suite itself",
    ".venv/bin/python -m pytest -m slow": "is the suite itself (its slow-marked part)",
    ".venv/bin/python -m pytest -m distributed": "is the suite itself (its distributed-marked part)",
    ".venv/bin/python -m pytest -m benchmark": "is the suite itself (its benchmark-marked part)",
    "python -m pytest -q -p no:cacheprovider --ignore=tests/test_losses.py --ignore=tests/test_speed_benchmark.py":
        "is the suite itself, on the dependency floors (a dated record in getting-started)",
    "accelerate launch --config_file examples/accelerate/zero3-8gpu.yaml -m sapo.cli train --config run.yaml":
        EIGHT_GPUS,
    "accelerate launch --config_file examples/accelerate/zero3-8gpu.yaml -m sapo.cli train --config "
    "examples/mistral-7b-sapo-dpo.yaml": f"{EIGHT_GPUS}; the run config trains at tiny size in {EXAMPLE_RUN}",
    "accelerate launch --config_file examples/accelerate/zero3-8gpu.yaml -m sapo.cli train --config "
    "examples/llama3-8b-sapo-orpo.yaml": f"{EIGHT_GPUS}; the run config trains at tiny size in {EXAMPLE_RUN}",
    "accelerate launch --config_file examples/accelerate/ddp-8gpu.yaml -m sapo.cli train --config run.yaml":
        EIGHT_GPUS,
    "accelerate launch --config_file examples/accelerate/zero2-8gpu.yaml -m sapo.cli train --config run.yaml":
        EIGHT_GPUS,
    "accelerate launch --config_file examples/accelerate/fsdp2-8gpu.yaml -m sapo.cli train --config run.yaml":
        EIGHT_GPUS,
}

COMMAND_START = re.compile(r"^(sapo|python|pip|make|accelerate|torchrun)\b")


def normalized(line: str) -> str:
    """The command without its trailing comment or a parenthesised note after two spaces, one space between words."""
    line = re.sub(r"\s{2,}\(.*$", "", line)
    return shlex.join(shlex.split(line, comments=True))


def joined_lines(lines: list[str]) -> list[str]:
    """Lines with their backslash continuations joined."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out


def page_commands(text: str) -> list[str]:
    """The commands of a Markdown page's ```bash blocks, and the benchmark commands it cites in its text."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    lines = [line for block in blocks for line in joined_lines(block.splitlines())]
    lines += re.findall(r"`((?:python )?benchmarks/\w+\.py[^`]*)`", re.sub(r"^```.*?^```", "", text,
                                                                           flags=re.MULTILINE | re.DOTALL))
    return [normalized(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def example_commands(text: str) -> list[str]:
    """The commands an example file shows in its comments (`#   sapo train ...`)."""
    comments = [line.lstrip("#") for line in text.splitlines() if line.startswith("#")]
    return [normalized(line) for line in joined_lines(comments) if COMMAND_START.match(line.strip())]


def documented_commands() -> dict[str, str]:
    """Every documented command -> the first file that shows it."""
    found = {}
    for page in PAGES:
        for command in page_commands(page.read_text()):
            found.setdefault(command, page.relative_to(ROOT).as_posix())
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for command in example_commands(path.read_text()):
            found.setdefault(command, path.relative_to(ROOT).as_posix())
    return found


def test_the_extraction_finds_the_commands_of_each_source():
    """The check below can fail: each source contributes commands, continuation lines and comments handled."""
    commands = documented_commands()
    assert commands["sapo plot runs/a runs/b"] == "README.md"
    assert commands["sapo inspect runs/demo/sapo-cli"] == "examples/demo.yaml"
    assert commands["python -m sapo train --config run.yaml"] == "docs/getting-started.md"
    assert commands["benchmarks/quality.py --full"] == "README.md"  # cited in the text, not in a block
    assert "accelerate launch --config_file examples/accelerate/zero3-8gpu.yaml -m sapo.cli train --config " \
           "examples/mistral-7b-sapo-dpo.yaml" in commands
    assert example_commands("# text\n#   sapo eval a b \\\n#       --n 3   # note\n") == ["sapo eval a b --n 3"]


def test_every_documented_command_is_run_covered_or_excluded():
    commands = documented_commands()
    tables = [RUN, COVERED, EXCLUDED]
    new = {c: source for c, source in commands.items() if not any(c in table for table in tables)}
    assert not new, f"documented commands that no test runs and the exclusion table does not name: {new}"
    stale = [c for table in tables for c in table if c not in commands]
    assert not stale, f"table entries no longer documented: {stale}"
    assert not (RUN.keys() & COVERED.keys() or RUN.keys() & EXCLUDED.keys() or COVERED.keys() & EXCLUDED.keys())


@pytest.mark.parametrize("test_id", sorted(set(COVERED.values())))
def test_each_covering_test_exists(test_id):
    file, name = test_id.split("::")
    assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.MULTILINE), test_id


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory holding what the documented commands name, at tiny size: ./sft and runs/demo/sft (a tiny model),
    data.jsonl and runs/demo/{train,heldout}.jsonl, a run.yaml training on them, and trained runs runs/a, runs/b,
    runs/demo/sapo and runs/demo/sapo-cli with a checkpoint to inspect."""
    root = tmp_path_factory.mktemp("workspace")
    tokenizer = tiny.build_tokenizer()
    tiny.save_pair(tiny.build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer,
                   root / "sft")
    write_preference_records(root / "data.jsonl")
    demo = root / "runs" / "demo"
    demo.mkdir(parents=True)
    shutil.copytree(root / "sft", demo / "sft")
    suite = tasks.make_suite(16, 8, seed=3)
    for split in ("train", "heldout"):
        (demo / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in suite[split]))
    (root / "run.yaml").write_text(yaml.safe_dump({"model_name_or_path": "sft", "dataset_name": "data.jsonl",
                                                   "output_dir": "runs/sapo"}))
    argv = ["train", "--config", str(root / "run.yaml"), "--output_dir", str(root / "runs" / "a"),
            *TINY_TRAIN_FLAGS, "--save_strategy", "steps", "--save_steps", "2"]
    with contextlib.chdir(root):  # run.yaml's paths are relative, as a user's are
        assert main(argv) == 0
    for copy in ("runs/b", "runs/demo/sapo", "runs/demo/sapo-cli"):
        shutil.copytree(root / "runs" / "a", root / copy)
    return root


def run_command(command: str, extra: list[str], cwd: Path, capsys) -> tuple[int, str]:
    """`sapo ...` in this process; `python -m sapo ...` in a child with this checkout's sources first."""
    words = shlex.split(command)
    if words[0] == "sapo":
        code = main([*words[1:], *extra])
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    assert words[:3] == ["python", "-m", "sapo"], command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, *words[1:], *extra], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout + result.stderr


SLOW = {"python -m sapo train --config run.yaml"}  # a fresh interpreter importing torch and transformers: ~25 s


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in sorted(RUN)])
def test_documented_command_runs(command, workspace, tmp_path, monkeypatch, capsys):
    words = shlex.split(command)
    if words[1] == "plot":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(workspace)
    extra = list(RUN[command])
    out = None
    if "train" in words:  # each training command writes its own directory
        out = tmp_path / "out"
        extra += ["--output_dir", str(out)]
    code, printed = run_command(command, extra, workspace, capsys)
    assert code == 0, printed[-3000:]
    if out is not None:
        assert (out / "model.safetensors").exists()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    elif words[1] == "eval":
        models = [w for w in words[2:] if w.startswith("runs/") and (workspace / w).is_dir()]
        assert all(m in printed for m in models)
        if "--output" in words:
            report = json.loads((workspace / words[words.index("--output") + 1]).read_text())
            assert report
    elif words[1] == "plot":
        assert (workspace / words[2] / "plots" / "loss.png").exists()
    elif words[1] == "inspect":
        assert "SAPO replay buffer" in printed and "entries: 2" in printed and "rejected:" in printed
