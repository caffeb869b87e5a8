#!/usr/bin/env bash
# The GPU check (~5 min on one GPU): the device tests with CUDA as the test device, then the device benchmark
# (the packaged default on the GPU beside the CPU: the same perplexity within 0.01, the same greedy text,
# reading and decoding speed), written to bench/results/device-cuda.json. Needs `bash scripts/setup.sh` and
# `longmem data books` first; exits non-zero when torch sees no GPU.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')"
LONGMEM_TEST_DEVICE=cuda python3 -m pytest -q tests/test_devices.py
python3 bench/device_throughput.py --device cuda --out bench/results/device-cuda.json
