#!/usr/bin/env bash
# Every GPU measurement of this project in one device call (15 minutes in all, 1-2 of them the machine's start; one
# command may run 10): a fresh one-GPU machine (H100/H200) with torch, transformers, accelerate, peft, pytest, numpy,
# pandas and pyarrow but no registry access. The script ends within BUDGET (default 540 s) plus a kill margin.
#
#   python benchmarks/gpu_wheels.py .whl                 # here, with pip access: the wheels the machine lacks
#   bash benchmarks/gpu_check.sh .whl [LOG_DIR]          # there, from anywhere
#
# 1. installs the wheels of WHEEL_DIR (datasets, trl, the transformers/peft versions this project needs, and their
#    missing requirements) into a fresh scratch folder, offline, ahead of the machine's own packages;
# 2. runs the parts below in order of value, each under its own time limit, all of them within BUDGET, so that a
#    slow part costs the parts after it, never the ones before it:
#    cuda_tests  every test that skips without CUDA ("cuda" in its name), FlexAttention's pair kernels included;
#    ratio       benchmarks/speed.py --config gpu, phases trl then sapo: SAPO-DPO vs TRL's DPOTrainer step and peak
#                memory ratios (what `sapo train` does: generation_engine auto, default rounds), then, in the sapo
#                phase's warm process (its compiled decode step reused), generation alone at one round's 64 rows,
#                sampled and greedy, both engines;
#    gen256      sampled generation alone at 256 rows (static engine, then generate): the 50k tokens/s target;
#    pairs       benchmarks/pair_scoring.py: one step's pair scoring as separate rows, packed under the dense mask,
#                packed under FlexAttention's block mask (what `ratio` used: pair_attention auto);
#    memory      benchmarks/memory.py, the copies' memory options, most telling first.
# Every measurement is printed (RESULT {...}) and appended to LOG_DIR/results.jsonl the moment it is taken, so a
# part cut by its limit keeps what it measured; each part's log is LOG_DIR/<part>.log (6 files in all, within the
# device's 8 files back). All parts share one inductor cache (a scratch folder under /tmp), so kernels compiled by
# one process are loaded, not rebuilt, by the next. The
# summary prints every measured row. Exit status: 0 if every part ran and passed.
#
# Checking the script on a CPU machine (the dry run: --dry_run shapes, ten times the limits, no GPU needed):
#   DRY_RUN=1 bash benchmarks/gpu_check.sh - LOG_DIR          # WHEEL_DIR "-": the installed packages
#   FAIL_COMPILE=1 makes torch.compile raise in the benchmarks (the decode step compiled even on the CPU), to show
#   that the "auto" engine's fallback to generate reports itself; PARTS=gen256,ratio runs a subset.
#   benchmarks/emulate_device.sh builds a scratch venv with the device's transformers and runs this there.
set -uo pipefail

WHEELS=${1:?usage: bash benchmarks/gpu_check.sh WHEEL_DIR [LOG_DIR]}
LOGS=${2:-${OUT:-gpu_check_logs}}
mkdir -p "$LOGS" && LOGS=$(cd "$LOGS" && pwd) || exit 2  # absolute: the script moves to the repository root
[ "$WHEELS" = - ] || WHEELS=$(cd "$WHEELS" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then  # the machine's python3, or (dry run here) the repository's venv if python3 lacks torch
    PYTHON=python3
    if ! python3 -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; fi
fi
RESULTS=$LOGS/results.jsonl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one inductor cache for every part, outside LOG_DIR (= $OUT on the device, where only 8 files come back)
TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d /tmp/sapo-inductor.XXXXXX)} || exit 2
export TORCHINDUCTOR_CACHE_DIR
BUDGET=${BUDGET:-540}  # seconds for every part together: a 10-minute command with a minute's margin
PARTS=${PARTS:-cuda_tests,ratio,gen256,pairs,memory}
failed=0
last_status=0

DRY=()
SCALE=1  # the parts' limits are sized for the GPU; a dry run on a (shared) CPU gets ten times as long
if [ "${DRY_RUN:-0}" = 1 ]; then
    DRY=(--dry_run)
    SCALE=10
    BUDGET=$((BUDGET * SCALE))
fi
FAIL=()
[ "${FAIL_COMPILE:-0}" = 1 ] && FAIL=(--compile on --fail_compile)

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

part() {  # part NAME SECONDS COMMAND...: COMMAND within min(SECONDS, what BUDGET leaves), output kept in LOGS/NAME.log
    local name=$1 limit=$2 left=$((BUDGET - SECONDS))
    shift 2
    wanted "$name" || return 0
    limit=$((limit * SCALE))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped, the time budget ($BUDGET s) is spent"
        failed=1
        return
    fi
    echo "=== $name (limit ${limit} s, ${SECONDS} s elapsed)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local status=${PIPESTATUS[0]}
    last_status=$status
    echo "=== $name: exit status $status at ${SECONDS} s$([ "$status" -eq 124 ] && echo ' (time limit: its rows so far are kept)')"
    [ "$status" -eq 0 ] || failed=1
}

if [ "$WHEELS" != - ]; then
    SITE=$(mktemp -d /tmp/sapo-site.XXXXXX) || exit 2  # a fresh folder per run: two runs never share one
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "installing the wheels of $WHEELS failed"; exit 2; }
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PYTHON" -c "import sys, torch, transformers, trl, datasets, peft, accelerate, sapo; \
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', \
transformers.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__, '| peft', peft.__version__, \
'| accelerate', accelerate.__version__); assert torch.cuda.is_available() or '${DRY_RUN:-0}' == '1', 'no CUDA device'" \
    || exit 2

SPEED=("$PYTHON" benchmarks/speed.py --config gpu --jsonl "$RESULTS" "${DRY[@]}" "${FAIL[@]}")
part cuda_tests 120 "$PYTHON" -m pytest -v -p no:cacheprovider -o addopts="" -rs -k cuda tests/generation/test_generation.py \
    tests/test_trainer.py tests/test_pair_attention.py
wanted cuda_tests && "$PYTHON" benchmarks/benchlog.py --pytest cuda_tests "$LOGS/cuda_tests.log" "$last_status" "$RESULTS"
part ratio 240 "${SPEED[@]}" --phases trl,sapo --gen_after_sapo --gen_modes sampled,greedy --gen_engines static,hf \
    --gen_repeats 2
part gen256 80 "${SPEED[@]}" --phases gen --gen_round_sizes 256 --gen_modes sampled --gen_engines static,hf \
    --gen_repeats 1
part pairs 50 "$PYTHON" benchmarks/pair_scoring.py --config gpu --repeats 5 --jsonl "$RESULTS" "${DRY[@]}"
part memory 80 "$PYTHON" benchmarks/memory.py --jsonl "$RESULTS" "${DRY[@]}" \
    --options default,bf16,policy-only,offload,lora,bf16+offload

echo "=== summary (${SECONDS} s): every measured row of $RESULTS"
"$PYTHON" benchmarks/benchlog.py "$RESULTS"
echo "--- CUDA tests"
grep -E "(FAILED|ERROR)( |$)" "$LOGS/cuda_tests.log" 2>/dev/null | grep -v "^=" | head -n 20  # each failing test, named
tail -n 1 "$LOGS/cuda_tests.log" 2>/dev/null
echo "targets (issue 14): sapo/trl step ratio <= 1.0, generation >= 50k new tokens/s at 256 rows, peak memory <= 1.3x TRL"
exit $failed
