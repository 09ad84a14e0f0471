#!/usr/bin/env bash
# GPU check of the CUDA decode path, in one call on a machine with a GPU (no network needed):
#   1. build the extension (torch.utils.cpp_extension JIT, nvcc + ninja) into build/ctxmem_cuda
#   2. run the kernel tests against the torch reference (tests/test_ops_cuda.py: hypothesis over
#      shapes, dtypes, GQA ratios, block sizes, budgets; flash-attention-style tolerance)
#   3. the whole wrapped model on the GPU against stock sdpa and the CPU reference (tests/test_gpu.py)
#   4. whole model, stock HF vs ctxmem, 32K / 128K / 1M (benchmarks/gpu_e2e.py -> gpu_e2e.json)
#   5. benchmark a decode step at 32K / 128K / 1M tokens against stock SDPA over the full cache
#      (benchmarks/gpu_decode.py) and write benchmarks/results/gpu.json
# Targets on an H200: >= 10x faster than full attention at 1M tokens, >= 60% of HBM bandwidth
# on the bytes the op touches.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter (default python3)
#   SKIP_TESTS=1 / SKIP_BENCH=1 / SKIP_E2E=1 # run only part of it; E2E_ARGS="..." for gpu_e2e.py
# Copies the JSON and the logs to $OUT when that is set (the device tool's result folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CTXMEM_CUDA_CACHE=${CTXMEM_CUDA_CACHE:-$PWD/build/ctxmem_cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # the extension's default is "8.0;9.0"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
LOG=${OUT:-build}/gpu_check
mkdir -p "$LOG" benchmarks/results
status=0

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || true
command -v nvcc >/dev/null && nvcc --version | tail -1
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" || exit 1
$PY -c "import ctxmem.ops" || { echo "cannot import ctxmem.ops (missing package on this machine?)"; exit 1; }

echo "== build (arch $TORCH_CUDA_ARCH_LIST, cache $CTXMEM_CUDA_CACHE)"
start=$(date +%s)
if ! $PY -c "import ctxmem.ops.cuda as c; c.build(verbose=True); print('built in', c.cache_dir())" >"$LOG/build.log" 2>&1; then
    tail -60 "$LOG/build.log"
    echo "BUILD FAILED"
    exit 1
fi
grep -E "error|warning" "$LOG/build.log" | grep -v "^ninja" | head -20
echo "built in $(( $(date +%s) - start )) s"

RES=${OUT:-benchmarks/results}
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== the wrapped model on the GPU (tests/test_gpu.py)"
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs -x 2>&1 | tee "$LOG/tests_gpu.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU TESTS FAILED"; status=1; }
fi

if [ -z "${SKIP_E2E:-}" ]; then
    echo "== whole model: stock HF vs ctxmem (benchmarks/gpu_e2e.py)"
    timeout ${E2E_TIMEOUT:-300} $PY benchmarks/gpu_e2e.py --out "$RES/gpu_e2e.json" ${E2E_ARGS:---batch8 --profile} 2>&1 | tee "$LOG/e2e.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "E2E BENCHMARK FAILED"; status=1; }
fi

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== kernel tests against the reference"
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py -rs 2>&1 | tee "$LOG/tests.log" | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "TESTS FAILED"; status=1; }
fi

if [ -z "${SKIP_BENCH:-}" ]; then
    echo "== decode benchmark vs full SDPA"
    timeout ${DECODE_TIMEOUT:-150} $PY benchmarks/gpu_decode.py --out benchmarks/results/gpu.json 2>&1 | tee "$LOG/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "BENCHMARK FAILED"; status=1; }
    [ -n "${OUT:-}" ] && [ -f benchmarks/results/gpu.json ] && cp benchmarks/results/gpu.json "$OUT/"
fi
exit $status
