#!/usr/bin/env bash
# The GPU check of issue 22 (docs/speed.md#gpu-path), in one command: 3 seeds each of
# `train --preset fast-gpu` and `--preset best-gpu` as whole timed processes, the previous
# host-data path once for comparison, ResNet-20 training/evaluation throughput with MFU against
# the measured bf16 matmul peak, and the ratio to this machine's CPU. Prints the table and
# writes benchmarks/results-gpu.json. Needs torch (and numpy, Pillow, matplotlib, tqdm); the
# project itself need not be installed: src/ is put on PYTHONPATH here.
#
#   benchmarks/gpu.sh --data DIR             # DIR: a data root holding MNIST/raw/, or a folder
#                                            # with the four MNIST .gz files (MNIST_DATA=DIR too)
#   benchmarks/gpu.sh --data DIR --dry-run   # on any machine, CPU included: the whole script
#                                            # with tiny settings (a smoke test of the script)
#   benchmarks/gpu.sh --help                 # every option (seeds, extra recipe flags, compile)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "gpu.sh: no python with torch found (tried python3, python); set PYTHON=/path/to/python" >&2
    exit 1
fi
exec "$python" "$here/gpu.py" "$@"
