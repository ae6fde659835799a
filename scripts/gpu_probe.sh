#!/usr/bin/env bash
# First look at a GPU machine: versions, the kernel tests on CUDA, the kernel benchmark.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.device_count())"
for p in packages/*/; do python3 -m pip install -q --no-deps --no-build-isolation -e "$p" >/dev/null 2>&1 || echo "install failed: $p"; done
python3 -m pytest -q -x packages/mosaic-core/tests/test_kernels.py -k cuda 2>&1 | tail -25
cd benchmarks && python3 bench_kernels.py --out "$OUT/kernels.json"
} 2>&1 | tee "$OUT/probe.log"
