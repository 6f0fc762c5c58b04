"""Two CPU processes (torchrun, gloo): per-rank buffers, identical policy/EMA/reference, per-rank resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "distributed_train.py"


def torchrun(*args):
    torchrun_bin = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun_bin is None:
        pytest.skip("torchrun not installed")
    result = subprocess.run([torchrun_bin, "--standalone", "--nproc_per_node", "2", str(WORKER), *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def reports(out):
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_processes_agree_and_resume_from_their_own_buffers(tmp_path):
    out = tmp_path / "run"
    torchrun(out, 4)
    first = reports(out)
    assert [r["world_size"] for r in first] == [2, 2]
    for key in ("policy", "ema", "ref"):
        assert first[0][key] == first[1][key], key
    assert first[0]["buffer"] != first[1]["buffer"]  # each rank augments its own data shard
    state = out / "checkpoint-4" / "sapo_state"
    assert (state / "replay_buffer_rank0.safetensors").exists() and (state / "replay_buffer_rank1.safetensors").exists()

    torchrun(out, 6, "true")
    resumed = reports(out)
    assert [r["step"] for r in resumed] == [6, 6]
    for key in ("policy", "ema", "ref"):
        assert resumed[0][key] == resumed[1][key], key
    for rank in (0, 1):  # each rank's buffer continued from its own checkpointed entries
        assert resumed[rank]["buffer"][:len(first[rank]["buffer"])] == first[rank]["buffer"]
