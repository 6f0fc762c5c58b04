"""Two CPU processes (torchrun, gloo) per engine: DDP, FSDP2, DeepSpeed ZeRO-2/3, DDP with offloaded bf16 copies,
and the SPIN recipe under DDP, FSDP2 and ZeRO-3.

Each run checks, on every rank, that the EMA equals its formula over the gathered policy, that the reference
forward through the engine equals a plain model with the reference's weights and leaves the policy as it was,
that whole weights agree across ranks, that sharded copies hold a shard per rank, and that the final weights
agree with the DDP run. Sharded engines and DDP are then resumed from their per-rank checkpoint state.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed  # two-process torchrun runs; `-m "not distributed"` skips these
SLOW = pytest.mark.slow  # beyond the default suite's core (DDP, FSDP2, ZeRO-3, torchrun of the CLI): `-m distributed`
# runs every test of this file

WORKER = Path(__file__).parent / "workers" / "distributed_train.py"
SHARDED = {"fsdp2", "fsdp2-keep-gathered", "zero3", "zero3-by-path"}
NEEDS_DEEPSPEED = {"zero2", "zero3", "zero3-by-path", "zero3-spin"}


def torchrun(engine, out, steps, *extra):
    torchrun_bin = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun_bin is None:
        pytest.skip("torchrun not installed")
    if engine in NEEDS_DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install -e '.[dev]')")
    result = subprocess.run([torchrun_bin, "--standalone", "--nproc_per_node", "2", str(WORKER), str(out), str(steps),
                             engine, *extra], capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "Error" in line and "ChildFailedError" not in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) or result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def final_weights(out):
    return {name: load_file(str(out / name)) for name in ("model.safetensors", "ema/model.safetensors")}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, torchrun("ddp", out, 4)


def check_run(reports, engine, bf16_copies=False):
    expected_engine = engine.split("-")[0] if engine in SHARDED else "replicated"
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["engine"] for r in reports] == [expected_engine] * 2
    for key in ("policy", "ema", "ref"):
        assert reports[0][key] == reports[1][key], key
    assert reports[0]["buffer"] != reports[1]["buffer"]  # each rank augments its own data shard
    assert [r["shared_prefix"] for r in reports] == [True, True]  # probed in the engine when sharded
    tolerance = 5e-3 if bf16_copies else 1e-6
    for report in reports:
        assert report["ema_error"] < tolerance
        assert report["ref_error"] < tolerance
        assert report["policy_restored_error"] == 0.0
        assert report["ref_differs_from_policy"] > 1e-3  # the check above compared two different models
    for report in reports:  # decoding is communication-free; sharded copies are gathered once per round
        traffic = report["generation_traffic"]
        assert traffic["rounds"] >= 1 and traffic["collectives_while_decoding"] == 0
        expected_gathers = traffic["parameters"] if engine in SHARDED or engine == "ddp-offload" else 0
        assert traffic["gathers_per_round"] == expected_gathers
    if engine in SHARDED:  # each rank holds about half of every copy
        locals_ = [r["local_ema_numel"] for r in reports]
        assert all(n < 0.6 * reports[0]["full_numel"] for n in locals_)
        assert sum(locals_) >= reports[0]["full_numel"]
    else:
        assert all(r["local_ema_numel"] == r["full_numel"] for r in reports)
    if bf16_copies:
        assert all(r["ema_dtype"] == "torch.bfloat16" for r in reports)


# Every engine scores pairs packed around their shared prefix; sharded engines cannot apply the head outside the
# engine's forward, so they read the packed rows' full logits: the same numbers up to float summation order.
SCORING_PATHS_ATOL = 3e-5


def assert_close_to(out, reference_out, atol):
    ours, theirs = final_weights(out), final_weights(reference_out)
    for file, weights in theirs.items():
        for name, tensor in weights.items():
            if name in ours[file]:
                torch.testing.assert_close(ours[file][name].float(), tensor.float(), atol=atol, rtol=0)


def test_ddp_agrees_across_ranks_and_resumes_from_its_own_buffers(ddp_run, tmp_path):
    out, first = ddp_run
    check_run(first, "ddp")
    state = out / "checkpoint-4" / "sapo_state"
    assert (state / "replay_buffer_rank0.safetensors").exists() and (state / "replay_buffer_rank1.safetensors").exists()
    resumed_out = tmp_path / "run"
    shutil.copytree(out, resumed_out)
    resumed = torchrun("ddp", resumed_out, 6, "true")
    assert [r["step"] for r in resumed] == [6, 6]
    check_run(resumed, "ddp")
    for rank in (0, 1):  # each rank's buffer continued from its own checkpointed entries
        assert resumed[rank]["buffer"][:len(first[rank]["buffer"])] == first[rank]["buffer"]


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_engines_match_ddp_and_resume_from_per_rank_shards(engine, ddp_run, tmp_path):
    out = tmp_path / "run"
    first = torchrun(engine, out, 4)
    check_run(first, engine)
    assert_close_to(out, ddp_run[0], atol=SCORING_PATHS_ATOL)
    state = out / "checkpoint-4" / "sapo_state"
    for rank in (0, 1):
        assert (state / f"ema_rank{rank}.safetensors").exists()
        assert (state / f"reference_rank{rank}.safetensors").exists()

    resumed = torchrun(engine, out, 6, "true")
    assert [r["step"] for r in resumed] == [6, 6]
    check_run(resumed, engine)
    for rank in (0, 1):
        assert resumed[rank]["buffer"][:len(first[rank]["buffer"])] == first[rank]["buffer"]


@SLOW
@pytest.mark.parametrize("engine", ["zero2", "fsdp2-keep-gathered"])
def test_more_engine_settings_match_ddp(engine, ddp_run, tmp_path):
    """ZeRO-2; FSDP2 keeping weights gathered after forward (the reference must not see the policy's)."""
    out = tmp_path / "run"
    check_run(torchrun(engine, out, 4), engine)
    assert_close_to(out, ddp_run[0], atol=SCORING_PATHS_ATOL)


@SLOW
def test_zero3_model_loaded_by_path_is_partitioned_as_it_loads_and_trains_the_same(ddp_run, tmp_path):
    out = tmp_path / "run"
    reports = torchrun("zero3-by-path", out, 4)
    assert all(r["partitioned_at_load"] for r in reports)  # zero.Init: never whole on a rank
    check_run(reports, "zero3-by-path")
    assert_close_to(out, ddp_run[0], atol=SCORING_PATHS_ATOL)


@SLOW
def test_offloaded_bf16_copies_train_like_full_precision_ones(ddp_run, tmp_path):
    out = tmp_path / "run"
    check_run(torchrun("ddp-offload", out, 4), "ddp-offload", bf16_copies=True)
    assert_close_to(out, ddp_run[0], atol=5e-3)


@SLOW
def test_spin_under_sharded_engines_trains_like_ddp(tmp_path):
    """SPIN's opponent (the reference) generates whole responses: gathered like the EMA, refreshed per iteration."""
    runs = {}
    for engine in ("ddp-spin", "fsdp2-spin", "zero3-spin"):
        out = tmp_path / engine
        reports = torchrun(engine, out, 4)
        assert [r["spin_iteration"] for r in reports] == [1, 1]  # the opponent was refreshed once
        assert [r["shared_prefix"] for r in reports] == [True, True]
        for key in ("policy", "ref"):
            assert reports[0][key] == reports[1][key], (engine, key)
        for report in reports:
            assert report["ref_error"] < 1e-6 and report["policy_restored_error"] == 0.0
        runs[engine] = out
    for engine in ("fsdp2-spin", "zero3-spin"):
        ours = load_file(str(runs[engine] / "model.safetensors"))
        for name, tensor in load_file(str(runs["ddp-spin"] / "model.safetensors")).items():
            if name in ours:
                torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The command a user types
# ---------------------------------------------------------------------------------------------------------


def torchrun_cli(tmp_path, model_dir, *extra):
    from sapo import tasks

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in tasks.make_suite(32, 0)["train"]))
    torchrun_bin = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun_bin, "--standalone", "--nproc_per_node", "2", "-m", "sapo.cli", "train",
               "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
               str(tmp_path / "out"), "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
               "--token_generate_length", "4", "--max_length", "64", "--max_prompt_length", "48",
               "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "true", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_torchrun_of_the_cli_on_cpus_is_one_coordinated_job(tmp_path, model_dir):
    """No --use_cpu: sapo joins the CPU processes into one gloo job instead of two runs writing one directory."""
    result = torchrun_cli(tmp_path, model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    state = out / "checkpoint-4" / "sapo_state"
    assert (state / "replay_buffer_rank0.safetensors").exists() and (state / "replay_buffer_rank1.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # one writer: each step logged once
    assert (out / "model.safetensors").exists() and (out / "ema" / "model.safetensors").exists()


@SLOW
def test_fsdp_asked_for_on_cpus_is_refused_before_anything_is_written(tmp_path, model_dir):
    result = torchrun_cli(tmp_path, model_dir, "--fsdp", "full_shard", "--fsdp_config", '{"fsdp_version": 2}')
    assert result.returncode != 0
    assert "sapo: error: FSDP was asked for but accelerate set up" in result.stderr
    assert "[rank0]: Traceback" not in result.stderr  # torchrun's own ChildFailedError report is not ours
    assert not (tmp_path / "out").exists()


@SLOW
def test_deepspeed_on_cpus_is_refused_as_an_uncoordinated_launch(tmp_path, model_dir):
    """Accelerate counts one process for DeepSpeed without GPUs: two lone writers, refused on every rank."""
    config = '{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}'
    result = torchrun_cli(tmp_path, model_dir, "--deepspeed", config)
    assert result.returncode != 0
    assert result.stderr.count("sapo: error: the launcher started 2 processes but accelerate joined 1") == 2
    assert not (tmp_path / "out").exists()


@SLOW
@pytest.mark.parametrize("mode,skipped", [("one", 0), ("none", 3)])
def test_a_step_without_signal_is_skipped_on_every_rank_together_or_on_none(tmp_path, mode, skipped):
    """Rank 0's generator reproduces its data (every pair dropped: it trains on stand-ins); rank 1's writes real
    rewrites (`one`) or also reproduces its data (`none`). Under DDP the gradient is averaged over ranks, so a rank
    that skipped alone would leave the others' update half-applied and the ranks' weights apart."""
    torchrun_bin = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun_bin is None:
        pytest.skip("torchrun not installed")
    worker = Path(__file__).parent / "workers" / "signal_train.py"
    result = subprocess.run([torchrun_bin, "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path), mode],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["skipped"] for r in reports] == [skipped, skipped]
    assert reports[0]["after"] == reports[1]["after"] and reports[0]["ema"] == reports[1]["ema"]
    assert (reports[0]["after"] == reports[0]["before"]) == (skipped == 3)
