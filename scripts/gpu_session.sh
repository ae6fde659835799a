#!/usr/bin/env bash
# Everything we run on a lent multi-GPU machine, in as few calls as possible.
#   scripts/gpu_session.sh tests   # GPU tests: kernels on CUDA, every strategy on 2 and 4 GPUs, ring-flash-attn
#   scripts/gpu_session.sh bench   # kernel benchmark, sequence-parallel benchmark, nanoTabPFN step timings
# Logs and JSON go to $OUT. Expects the wheels of ../shared/wheels copied to .whl/ (ring-flash-attn, flash-attn).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | grep -c '^GPU')
status=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > >(tee "$OUT/$name.log") 2>&1 || { echo "=== $name FAILED"; status=1; }
}

setup() {
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  for p in packages/*/; do python3 -m pip install -q --no-deps --no-build-isolation -e "$p" >/dev/null || status=1; done
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  python3 -c "import mosaic; print('backends', mosaic.available_backends())"
}

tests() {
  step kernels python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py -k cuda
  for world in 2 4; do
    [ "$world" -le "$GPUS" ] || continue
    step "check_P$world" torchrun --nproc_per_node=$world tests/gpu/check_backends.py --out "$OUT"
    [ -f tests/gpu/check_ring_flash_attn.py ] && step "ring_flash_attn_P$world" \
      torchrun --nproc_per_node=$world tests/gpu/check_ring_flash_attn.py --out "$OUT"
  done
}

bench() {
  step bench_kernels bash -c "cd benchmarks && python3 bench_kernels.py --out $OUT/kernels.json"
  step bench_sp bash -c "cd benchmarks && torchrun --nproc_per_node=$GPUS bench_sp.py --out $OUT"
  local train=examples/nanotabpfn/train.py args="--batch-size 1 --features 10 --out-dir $OUT/nanotabpfn"
  step nanotabpfn_150k_P$GPUS torchrun --nproc_per_node=$GPUS $train --rows 150000 $args --bench-steps 10
  step nanotabpfn_150k_P1 python3 $train --rows 150000 $args --bench-steps 5 --bench-warmup 1
  step nanotabpfn_1M_P$GPUS torchrun --nproc_per_node=$GPUS $train --rows 1000000 $args --checkpoint-layers \
    --bench-steps 3 --bench-warmup 1
}

setup
for phase in "${@:-tests}"; do "$phase"; done
exit $status
