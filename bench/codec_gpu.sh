#!/usr/bin/env bash
# One-shot GPU check of the codec (< 3 minutes on one H100/H200): CuPy-vs-torch byte equality on CUDA, then
# bits per parameter, throughput and achieved memory bandwidth at 10M and 100M parameters.
#   bash bench/codec_gpu.sh [OUT_DIR]      (needs torch with CUDA and cupy-cuda12x: pip install -e '.[gpu]')
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
# 1. byte equality (and the CPU/GPU selection agreement), at most 60 s
timeout 60 python -m pytest tests/kernels/test_cupy_backend.py -q -p no:cacheprovider | tee "$out/codec_gpu_tests.txt"
# 2. benchmark, with its own wall-clock guard below the timeout
timeout 150 python -m bench.codec --gpu --sizes 10M,100M --repeats 3 --threads 0 --max-seconds 120 \
    --json "$out/codec_gpu.json" | tee "$out/codec_gpu.txt"
