#!/usr/bin/env bash
# Everything we run on a lent GPU machine, in as few calls as possible.
#   scripts/gpu_session.sh one     # one GPU: kernels and tiny kernel, every strategy at P = 1, magi, benchmarks
#   scripts/gpu_session.sh tests   # GPU tests: kernels on CUDA, every strategy on 2 and 4 GPUs, ring-flash-attn
#   scripts/gpu_session.sh bench   # kernel benchmark, sequence-parallel benchmark, nanoTabPFN step timings
#   scripts/gpu_session.sh kernels # one GPU: kernels (ffa included), every strategy at P = 1, magi, memory
#   scripts/gpu_session.sh capacity  # one GPU: inference at 3x10^6 rows, training near the largest size
#   scripts/gpu_session.sh checkpoint_large  # one GPU: a checkpointed training step at 1.2x10^6 rows
#   scripts/gpu_session.sh one_gpu_cudnn     # one GPU: every strategy at P = 2 and 4 (staged gloo), cuDNN blocks
#   scripts/gpu_session.sh fa4_kernels       # one GPU, flash-attn-4 installed: kernel tests, FA4 vs cuDNN errors, timings
#   scripts/gpu_session.sh fa4_model         # one GPU, flash-attn-4 installed: nanoTabPFN step and inference, FA4 vs cuDNN
#   scripts/gpu_session.sh tabular_models    # one GPU, .whl_tabular/ carried: TabPFN and TabICL, own paths vs Mosaic
#   scripts/gpu_session.sh wave_final        # one GPU: one_gpu_cudnn (shorter limits), then tabular_models
#   scripts/gpu_session.sh hier_kernels      # one GPU: hierarchical at P = 4 under each block kernel (cuDNN's gradients)
#   scripts/gpu_session.sh tabular_next      # one GPU, .whl_tabular/ carried: TabICL offload under Mosaic, largest rows
#   scripts/gpu_session.sh tabpfn_ceiling    # one GPU, .whl_tabular/ carried: TabPFN's largest rows, each path
#   scripts/gpu_session.sh tabular_one_gpu_P4  # one GPU, .whl_tabular/ carried: a rank's memory at P = 4
#   scripts/gpu_session.sh tabicl_1500k      # one GPU, .whl_tabular/ carried: TabICL at 1.5x10^6 rows
#   scripts/gpu_session.sh hier_cudnn        # one GPU: hierarchical at P = 4, cuDNN blocks only
#   scripts/gpu_session.sh tabicl_1m         # one GPU, .whl_tabular/ carried: TabICL at 10^6 rows, each path warmed
#   scripts/gpu_session.sh tabular_fair      # one GPU, .whl_tabular/ carried: 50k and 100k rows, each case warmed at its size
#   scripts/gpu_session.sh tabicl_profile    # one GPU, .whl_tabular/ carried: TabICL's paths at 300k rows profiled
# Logs and JSON go to $OUT. Expects the wheels of ../shared/wheels copied to .whl/ (ring-flash-attn, flash-attn,
# MagiAttention with its JIT cache); every step has a time limit so one slow step cannot eat the call.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L | grep -c '^GPU')
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 || { echo "=== $name FAILED ($?)"; status=1; }
}

setup() {
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  for p in packages/*/; do python3 -m pip install -q --no-deps --no-build-isolation -e "$p" >/dev/null || status=1; done
  # MagiAttention goes into the image's own site-packages: its JIT cache names that path.
  if ls .whl/magi_attention-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .whl/magi_attention-*.whl .whl/debugpy-*.whl .whl/einops-*.whl
    mkdir -p ~/.cache && tar -xzf .whl/magi_jit_cache_sm90.tar.gz -C ~/.cache
  fi
  if ls .whl/flash_attn-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/flash_attn-*.whl \
      .whl/ring_flash_attn-*.whl && export PYTHONPATH=/tmp/site
  fi
  python3 -c "import mosaic; print('backends', mosaic.available_backends())"
  python3 -m mosaic > "$OUT/doctor.txt" 2>&1 || status=1  # the doctor on this GPU (#27)
}

one() {  # about 9 minutes on one H200; the limits keep the call inside 10
  step kernels 100 python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py packages/mosaic-core/tests/test_tiny.py -k "cuda or tiny"
  step check_P1 80 torchrun --nproc_per_node=1 tests/gpu/check_backends.py --out "$OUT"
  step magi 90 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --out "$OUT"
  step magi_bench 100 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --bench --out "$OUT"
  step bench_memory 40 bash -c "cd benchmarks && python3 bench_memory.py --out $OUT/memory.json"
  step bench_kernels 40 bash -c "cd benchmarks && python3 bench_kernels.py --shapes features_b150k_L11 features_b655k_L6 --out $OUT/kernels.json"
  step bench_capacity 170 bash -c "cd benchmarks && python3 bench_capacity.py --time-limit 100 --modes inference_whole inference train checkpoint --out $OUT/capacity.json"
  # The multi-GPU benchmark's code path on one GPU (every strategy runs its one-rank plan; auto's pick).
  step bench_sp_P1 30 bash -c "cd benchmarks && torchrun --nproc_per_node=1 bench_sp.py --shapes tabpfn_b5_L64k \
    --reps 2 --no-baselines --out $OUT"
}

memory() {  # one GPU: the kernels again, the memory and feature-attention benchmark, inference at 10^6 rows
  step kernels 120 python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py packages/mosaic-core/tests/test_tiny.py -k "cuda or tiny"
  step bench_memory 60 bash -c "cd benchmarks && python3 bench_memory.py --out $OUT/memory.json"
  step bench_kernels 60 bash -c "cd benchmarks && python3 bench_kernels.py --shapes features_b150k_L11 features_b655k_L6 --out $OUT/kernels.json"
  step bench_inference 200 bash -c "cd benchmarks && python3 bench_capacity.py --modes inference_whole inference \
    --inference-rows-list 150000 1000000 --out $OUT/inference.json"
}

kernels() {  # about 9 minutes on one H200
  step kernels 150 python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py packages/mosaic-core/tests/test_tiny.py -k "cuda or tiny"
  step bench_memory 90 bash -c "cd benchmarks && python3 bench_memory.py --out $OUT/memory.json --snapshot /tmp/snapshots"
  for f in /tmp/snapshots/*.pickle; do echo "== $f"; python3 benchmarks/memory_peak.py "$f"; done > "$OUT/memory_peak.txt"
  step check_P1 80 torchrun --nproc_per_node=1 tests/gpu/check_backends.py --out "$OUT"
  step magi 90 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --out "$OUT"
  step magi_bench 150 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --bench --out "$OUT"
  step ffa_kernel 90 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --ffa-kernel --out "$OUT"
}

capacity() {  # about 8 minutes on one H200: single steps at large sizes (each grows as rows^2); the first,
  # small size of each list is the untimed warm-up that compiles the kernels
  step inference_3M 420 bash -c "cd benchmarks && python3 bench_capacity.py --modes inference \
    --inference-rows-list 150000 3000000 --time-limit 400 --out $OUT/inference_3M.json"
  step train_large 150 bash -c "cd benchmarks && python3 bench_capacity.py --modes train \
    --rows 20000 ${TRAIN_ROWS:-800000} --time-limit 140 --out $OUT/train_large.json"
}

checkpoint_large() {  # about 5 minutes: one checkpointed training step near a million rows
  step checkpoint_large 330 bash -c "cd benchmarks && python3 bench_capacity.py --modes checkpoint \
    --rows 20000 ${CHECKPOINT_ROWS:-1200000} --time-limit 320 --out $OUT/checkpoint_large.json"
}

tests() {
  step kernels 300 python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py packages/mosaic-core/tests/test_tiny.py -k "cuda or tiny"
  for world in 2 4; do
    [ "$world" -le "$GPUS" ] || continue
    step "check_P$world" 600 torchrun --nproc_per_node=$world tests/gpu/check_backends.py --out "$OUT"
    [ -f tests/gpu/check_ring_flash_attn.py ] && step "ring_flash_attn_P$world" 300 \
      torchrun --nproc_per_node=$world tests/gpu/check_ring_flash_attn.py --out "$OUT"
    [ -f tests/gpu/check_magi.py ] && step "magi_P$world" 300 \
      torchrun --nproc_per_node=$world tests/gpu/check_magi.py --out "$OUT"
  done
}

bench() {
  step bench_kernels 300 bash -c "cd benchmarks && python3 bench_kernels.py --out $OUT/kernels.json"
  step bench_sp 600 bash -c "cd benchmarks && torchrun --nproc_per_node=$GPUS bench_sp.py --out $OUT"
  local train=examples/nanotabpfn/train.py args="--batch-size 1 --features 10 --out-dir $OUT/nanotabpfn"
  step nanotabpfn_150k_P$GPUS 300 torchrun --nproc_per_node=$GPUS $train --rows 150000 $args --bench-steps 10
  step nanotabpfn_150k_P1 300 python3 $train --rows 150000 $args --bench-steps 5 --bench-warmup 1
  step nanotabpfn_1M_P$GPUS 600 torchrun --nproc_per_node=$GPUS $train --rows 1000000 $args --checkpoint-layers \
    --bench-steps 3 --bench-warmup 1
}

# FlashAttention-4 (issue 24). flash-attn-4 is installed by ../shared/wheels/fa4's two calls (README there);
# the phases after it run with it installed, every comparison against cuDNN in the same call.
kernel_tests() {  # the kernel tests on CUDA (fa4's run where flash-attn-4 is installed)
  step kernels 200 python3 -m pytest -q packages/mosaic-core/tests/test_kernels.py \
    packages/mosaic-core/tests/test_tiny.py packages/mosaic-core/tests/test_fa4_kernel.py -k "cuda or tiny or fa4"
}

one_gpu_cudnn() {  # every strategy at P = 2 and 4 on one GPU (gloo, CUDA staged through the host), cuDNN blocks
  for world in 2 4; do
    step "one_gpu_P${world}_cudnn" 200 env MOSAIC_KERNEL=cudnn torchrun --nproc_per_node=$world \
      tests/gpu/check_backends.py --one-gpu --out "$OUT"
  done
}

tabular_wheels() {  # tabpfn, tabicl and what the image lacks of their needs, once per machine
  [ -d /tmp/tab/tabpfn ] || python3 -m pip install -q --no-index --no-deps --target /tmp/tab .whl_tabular/*.whl
}

tabular_models() {  # TabPFN v2.6 and TabICL forward, the packages' own paths and Mosaic's, 50k to 300k rows
  tabular_wheels
  step tabular 330 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 50000 100000 300000 --repeats 1 --warmup first --case-limit 120 --out "$OUT/tabular.json"
}

hier_kernels() {  # hierarchical at P = 4 on one GPU under each block kernel: which one a mixed level's gradients need
  for kernel in cudnn flash math; do
    step "one_gpu_P4_hier_$kernel" 60 env MOSAIC_KERNEL=$kernel torchrun --nproc_per_node=4 tests/gpu/check_backends.py \
      --one-gpu --backends hierarchical --cases causal self --out "$OUT"
  done
}

tabular_next() {  # what #26 still lacks: TabICL offloading under Mosaic beside its own, and TabICL's largest rows
  tabular_wheels
  step tabular_offload 120 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 50000 300000 --cases tabicl/offload tabicl/mosaic_offload --repeats 1 --warmup first --case-limit 100 \
    --out "$OUT/tabular_offload.json"
  step tabicl_largest 360 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 50000 1000000 2000000 --cases tabicl/own tabicl/mosaic --repeats 1 --warmup first --case-limit 220 \
    --out "$OUT/tabicl_largest.json"
}

tabpfn_ceiling() {  # TabPFN v2.6's memory ceiling on the card, each path, with one layer (peak memory is one layer's)
  tabular_wheels
  step tabpfn_ceiling 480 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --tabpfn-layers 1 --rows 300000 1150000 1350000 --cases tabpfn/own tabpfn/mosaic tabpfn/memory_saving \
    tabpfn/mosaic_memory_saving --repeats 1 --warmup first --case-limit 100 --out "$OUT/tabpfn_ceiling.json"
}

tabicl_1500k() {  # TabICL between the 10^6 rows it runs and the 2x10^6 where the host ran out of memory; each case
  # warmed at its size (a first call there allocates the pinned host memory of the offloaded outputs), Mosaic first
  tabular_wheels
  step tabicl_1500k 560 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 1500000 --cases tabicl/mosaic tabicl/own --repeats 1 --case-limit 260 --out "$OUT/tabicl_1500k.json"
}

tabicl_1m() {  # TabICL at 10^6 rows (its outputs stay on the card), each case warmed at its size, Mosaic first
  tabular_wheels
  step tabicl_1m 300 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 1000000 --cases tabicl/mosaic tabicl/own --repeats 1 --case-limit 200 --out "$OUT/tabicl_1m.json"
}

tabular_fair() {  # tabular_models' 50k and 100k rows, each case warmed at its size, Mosaic's first (no first-call costs)
  tabular_wheels
  step tabular_fair 400 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 50000 100000 --cases tabicl/mosaic tabicl/own tabicl/mosaic_offload tabicl/offload tabpfn/mosaic \
    tabpfn/own tabpfn/mosaic_memory_saving tabpfn/memory_saving --repeats 1 --case-limit 60 \
    --out "$OUT/tabular_fair.json"
}

tabular_one_gpu_P4() {  # the memory a rank needs at P = 4 (four ranks on one GPU over gloo; times are not P GPUs')
  tabular_wheels
  step tabular_one_gpu_P4 170 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" torchrun --nproc_per_node=4 \
    benchmarks/bench_tabular.py --one-gpu --rows 20000 100000 --cases tabpfn/mosaic tabicl/mosaic --repeats 1 \
    --warmup first --case-limit 150 --out "$OUT/tabular_one_gpu_P4.json"
}

tabicl_profile() {  # why Mosaic's offloading beat TabICL's own 2.7x at 300k rows: the same cases, Mosaic first, profiled
  tabular_wheels
  step tabicl_profile 420 env PYTHONPATH="/tmp/tab:${PYTHONPATH:-}" python3 benchmarks/bench_tabular.py \
    --rows 300000 --cases tabicl/mosaic_offload tabicl/offload tabicl/mosaic tabicl/own --repeats 1 \
    --case-limit 100 --profile "$OUT/profile" --out "$OUT/tabicl_profile.json"
}

hier_cudnn() {  # hierarchical at P = 4 on one GPU with cuDNN blocks: the backward fix of CudnnKernel
  step one_gpu_P4_hier_cudnn 60 env MOSAIC_KERNEL=cudnn torchrun --nproc_per_node=4 tests/gpu/check_backends.py \
    --one-gpu --backends hierarchical --cases causal self --out "$OUT"
}

wave_final() {  # about 8 minutes: every strategy at P = 2 and 4 on one GPU with cuDNN blocks, then the tabular models
  step one_gpu_P2_cudnn 100 env MOSAIC_KERNEL=cudnn torchrun --nproc_per_node=2 tests/gpu/check_backends.py \
    --one-gpu --out "$OUT"
  step one_gpu_P4_cudnn 150 env MOSAIC_KERNEL=cudnn torchrun --nproc_per_node=4 tests/gpu/check_backends.py \
    --one-gpu --out "$OUT"
  tabular_models
}

fa4_kernels() {  # about 9 minutes: kernel tests (fa4 included), correctness against cuDNN's error, kernel timings
  kernel_tests
  step fa4_local 100 torchrun --nproc_per_node=1 tests/gpu/check_magi.py --kernel fa4 --out "$OUT"
  step check_P1_fa4 90 torchrun --nproc_per_node=1 tests/gpu/check_backends.py --baseline-kernel cudnn --out "$OUT"
  step bench_memory 70 bash -c "cd benchmarks && python3 bench_memory.py --out $OUT/memory.json"
  step bench_kernels 120 bash -c "cd benchmarks && python3 bench_kernels.py --packed --out $OUT/kernels.json \
    --shapes rows_b11_L150k_kv75k rows_b11_L50k_kv25k tabpfn_b5_L64k llm_b1_h16_L64k features_b150k_L11"
  step bench_sp_P1 50 bash -c "cd benchmarks && torchrun --nproc_per_node=1 bench_sp.py --shapes tabpfn_b5_L64k \
    --reps 3 --no-baselines --kernels auto cudnn --out $OUT"
}

fa4_model() {  # about 8 minutes: nanoTabPFN's training step and 10^6-row inference, FA4 against cuDNN
  local train=examples/nanotabpfn/train.py args="--rows 150000 --batch-size 1 --features 10 --bench-steps 5 --bench-warmup 1"
  step nanotabpfn_150k_fa4 90 python3 $train $args --out-dir "$OUT/nanotabpfn"
  step nanotabpfn_150k_cudnn 90 python3 $train $args --kernel cudnn --out-dir "$OUT/nanotabpfn"
  step inference_1M 160 bash -c "cd benchmarks && python3 bench_capacity.py --modes inference \
    --inference-rows-list 150000 1000000 --kernels auto cudnn --time-limit 150 --out $OUT/inference.json"
  step one_gpu_P4_fa4 200 torchrun --nproc_per_node=4 tests/gpu/check_backends.py --one-gpu --baseline-kernel cudnn \
    --out "$OUT"
}

setup
for phase in "${@:-tests}"; do "$phase"; done
# At most 8 files come back from a device call: past that, the logs travel as one archive.
if [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
exit $status
