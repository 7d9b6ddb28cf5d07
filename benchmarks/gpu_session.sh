#!/usr/bin/env bash
# One lent-GPU session's checks, in one call (device time is scarce): install qhl into the
# machine's own Python (its torch/triton, not the pinned CPU wheel), run every Triton kernel test
# natively on CUDA, then the GPU benchmark. Logs and results go to $OUT (or ./gpu_out).
#
#     OUT=/tmp/gpu [GPU_SPEED_ARGS="--skip-stack"] bash benchmarks/gpu_session.sh [TEST_TIMEOUT_S] [BENCH_TIMEOUT_S]
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
$PY -c "import qhl; print('qhl from', qhl.__file__)" || exit 1

# The kernel tests: on CUDA they launch the real kernels (TRITON_INTERPRET stays unset).
timeout "${1:-220}" $PY -m pytest -q -n 8 -p no:cacheprovider -m "not model and not slow" -rfEs \
    --junitxml="$OUT/junit_cuda.xml" \
    tests/test_triton_kernels.py tests/test_w8a8_tensor_triton.py tests/test_gralora_triton.py \
    tests/test_w4ax.py tests/test_hadamard.py tests/test_lowrank.py tests/test_fuse_siblings.py \
    tests/test_gpu_compile.py >"$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|error" "$OUT/pytest_cuda.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -30

cd benchmarks || exit 1
timeout "${2:-300}" $PY gpu_speed.py --out "$OUT/speed_gpu" ${GPU_SPEED_ARGS:-} >"$OUT/gpu_speed.log" 2>&1
echo "gpu_speed rc=$?"
grep -E "ERROR|Error|error" "$OUT/gpu_speed.log" | grep -v "rel. err" | head -10
cat "$OUT/speed_gpu.md" 2>/dev/null | head -60
