#!/usr/bin/env bash
# The CUDA check on a lent GPU machine (issue 25): installs what `make device-wheels` carried (.device:
# wheels and packed MNIST), the project in editable mode without dependencies, then runs
# benchmarks/device_check.py, which writes its JSON into --out (default $OUT, the folder the device tool
# brings back). --dry-run does the same on this CPU with the project's .venv, on a few points.
#
#   benchmarks/device_check.sh [--dry-run] [--rehearse] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=() out="${OUT:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run | --rehearse) dry_run+=("$1") ;;
        --out) out="$2"; shift ;;
        *) echo "device_check.sh: unknown argument $1; use --dry-run, --rehearse or --out DIR" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$out" ]]; then
    echo "device_check.sh: give --out DIR (on the device machine \$OUT is set)" >&2
    exit 2
fi

if [[ ${#dry_run[@]} -gt 0 ]]; then
    python="${PYTHON:-.venv/bin/python}"
else
    if ! compgen -G ".device/wheels/*.whl" >/dev/null || [[ ! -f .device/mnist-packed.npz ]]; then
        echo "device_check.sh: .device/wheels or .device/mnist-packed.npz is missing; run \`make device-wheels\` here and name .device in the device tool's carry" >&2
        exit 2
    fi
    # GitPython (imported by foolbox) needs no git executable for what foolbox uses.
    export GIT_PYTHON_REFRESH=quiet PYTHONUNBUFFERED=1 INVARBENCH_HOME=/tmp/invarbench-home
    site=/tmp/invarbench-site
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .device/wheels/*.whl
    export PYTHONPATH="$site"
    python3 -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
    python3 -m invarbench.cli data fetch mnist --from .device/mnist-packed.npz
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python="python3"
fi
exec "$python" benchmarks/device_check.py --out "$out" "${dry_run[@]}"
