#!/usr/bin/env bash
# gpu_check.sh's dry run in an emulation of the GPU machine's software, as close as a CPU machine allows:
#
#   bash benchmarks/emulate_device.sh [LOG_DIR]          # default runs/device-dry-run; PARTS=... as gpu_check.sh
#
# 1. a scratch venv (runs/device-venv, git-ignored; VENV=... elsewhere) holding what the device image has:
#    transformers 5.17, accelerate, peft, pytest, numpy, pandas, pyarrow, and torch 2.13 CPU from the local wheel
#    (the device has torch 2.11 with CUDA 13 and Python 3.12; here the venv gets this machine's python3);
# 2. the carried wheels (benchmarks/gpu_wheels.py, for this Python) in runs/device-wheels, which gpu_check.sh
#    installs into a scratch folder ahead of the venv's packages, as on the device (transformers shadowed);
# 3. gpu_check.sh with DRY_RUN=1 and FAIL_COMPILE=1 (unless FAIL_COMPILE=0): torch.compile raises, so the run
#    shows the "auto" engine falling back to generate and saying so (warning, table, results.jsonl).
# Steps 1 and 2 run once (kept for later runs); they need the package registry, step 3 does not.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
LOGS=${1:-runs/device-dry-run}
VENV=${VENV:-runs/device-venv}
WHEELS=${WHEELS:-runs/device-wheels}
DEVICE_TRANSFORMERS=${DEVICE_TRANSFORMERS:-5.17.0}
PY=$VENV/bin/python
if [ ! -x "$PY" ] || ! "$PY" -c "import transformers, torch, accelerate, peft, pytest, pandas, pyarrow" 2>/dev/null; then
    python3 -m venv "$VENV" || exit 2
    "$PY" -m pip install -q "torch==2.13.0" "transformers==$DEVICE_TRANSFORMERS" accelerate peft pytest numpy pandas \
        pyarrow || { echo "building the scratch venv $VENV failed"; exit 2; }
fi
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    PYTHON_VERSION=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    HOST=${HOST_PYTHON:-.venv/bin/python}  # the project's environment: the carried versions are the ones it has
    "$HOST" benchmarks/gpu_wheels.py "$WHEELS" --python-version "$PYTHON_VERSION" || exit 2
fi
"$PY" -c "import sys, torch, transformers; print('emulated device: python', sys.version.split()[0], '| torch', \
torch.__version__, '| transformers (image)', transformers.__version__)"
DRY_RUN=1 FAIL_COMPILE=${FAIL_COMPILE:-1} PYTHON="$(cd "$VENV" && pwd)/bin/python" bash benchmarks/gpu_check.sh "$WHEELS" "$LOGS"
