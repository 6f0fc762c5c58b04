#!/usr/bin/env bash
# Every GPU measurement of this project in one call, for a fresh one-GPU machine (H100/H200) that has torch,
# transformers, accelerate, peft, pytest, numpy, pandas and pyarrow but no registry access. Under 8 minutes.
#
#   python benchmarks/gpu_wheels.py .whl                 # here, with pip access: the wheels the machine lacks
#   bash benchmarks/gpu_check.sh .whl [LOG_DIR]          # there, from the repository root
#
# 1. installs the wheels of WHEEL_DIR (datasets, trl, and the transformers/peft versions this project needs, with
#    their missing requirements) into /tmp/sapo-site, offline, ahead of the machine's own packages;
# 2. benchmarks/speed.py --config gpu with its defaults (what `sapo train` does: generation_engine auto = the
#    compiled static engine, default generation rounds): SAPO-DPO vs TRL's DPOTrainer, Qwen2-0.5B shape, bf16,
#    prompt 512 + response 512, 8 pairs, G = 256, step and peak-memory ratios, generation alone per engine;
# 3. the CUDA tests (every test that skips without CUDA has "cuda" in its name);
# 4. benchmarks/memory.py with its defaults (the copies' memory options);
# 5. sampled generation alone at 256 rows (the static engine and generate);
# then prints the ratios. Each part has a time limit, and all of them together BUDGET seconds, so a slow part cannot
# push the script past 8 minutes; every part's log is in LOG_DIR (default: $OUT if set, else ./gpu_check_logs).
# Exit status: 0 if every part ran and passed.
#
# Checking the script itself on a CPU machine: `DRY_RUN=1 BUDGET=3000 bash benchmarks/gpu_check.sh - LOG_DIR` uses the
# installed packages (WHEEL_DIR "-"), needs no GPU, and runs every part on the benchmarks' --dry_run shapes.
set -uo pipefail

WHEELS=${1:?usage: bash benchmarks/gpu_check.sh WHEEL_DIR [LOG_DIR]}
LOGS=${2:-${OUT:-gpu_check_logs}}
PYTHON=${PYTHON:-python3}
SITE=/tmp/sapo-site
mkdir -p "$LOGS"
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
failed=0

BUDGET=${BUDGET:-450}  # seconds from the start for every part together: the whole script stays under 8 minutes

part() {  # part NAME SECONDS COMMAND...: COMMAND within min(SECONDS, what BUDGET leaves), output kept in LOGS/NAME.log
    local name=$1 limit=$2 left=$((BUDGET - SECONDS))
    shift 2
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
    echo "=== $name: exit status $status at ${SECONDS} s"
    [ "$status" -eq 0 ] || failed=1
}

DRY=()
SCALE=1  # the parts' limits are sized for the GPU; a dry run on a (shared) CPU gets ten times as long
if [ "${DRY_RUN:-0}" = 1 ]; then
    DRY=(--dry_run)
    SCALE=10
fi
if [ "$WHEELS" != - ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "installing the wheels of $WHEELS failed"; exit 2; }
    export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PYTHON" -c "import torch, transformers, trl, datasets, peft, accelerate, sapo; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, \
'| trl', trl.__version__, '| datasets', datasets.__version__, '| peft', peft.__version__, \
'| accelerate', accelerate.__version__); assert torch.cuda.is_available() or '${DRY_RUN:-0}' == '1', 'no CUDA device'" \
    || exit 2

part speed 240 "$PYTHON" benchmarks/speed.py --config gpu --gen_repeats 2 --json "$LOGS/speed.json" "${DRY[@]}"
part cuda_tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -rs -k cuda tests/test_generation.py \
    tests/test_trainer.py
part memory 75 "$PYTHON" benchmarks/memory.py --json "$LOGS/memory.json" "${DRY[@]}"
part gen256 90 "$PYTHON" benchmarks/speed.py --config gpu --phases gen --generation_batch_size 256 --gen_modes sampled \
    --gen_repeats 1 --json "$LOGS/gen256.json" "${DRY[@]}"

echo "=== summary (${SECONDS} s)"
grep -h -E "^(SAPO-DPO|TRL DPOTrainer|SAPO generation|SAPO warm-up|  (greedy|sampled)|generation alone|sapo/trl)" \
    "$LOGS/speed.log" 2>/dev/null
echo "--- generation at 256 rows"
grep -h -E "^(  (greedy|sampled)|generation alone)" "$LOGS/gen256.log" 2>/dev/null
echo "--- CUDA tests"
tail -n 3 "$LOGS/cuda_tests.log" 2>/dev/null
echo "--- memory"
tail -n 12 "$LOGS/memory.log" 2>/dev/null
echo "targets (issue 14): sapo/trl step ratio <= 1.0, generation >= 50k new tokens/s at 256 rows, peak memory <= 1.3x TRL"
exit $failed
