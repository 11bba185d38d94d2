#!/usr/bin/env bash
# One lease on a GPU machine (DESIGN §6.4, issue "Validate and tune on a real GPU"): build with CUDA,
# run the whole test suite on the GPU, compute-sanitizer on the CUDA kernels' tests, then the
# benchmark. Logs and results go to $OUT (default ./gpu_out). Usage: bash bench/gpu_validate.sh [quick]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
t0=$(date +%s)
SEQKERNELS_CUDA=1 SEQKERNELS_CUDA_ARCHS="8.0;9.0" MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.txt"
python3 -m seqkernels info | tee "$OUT/info.txt"
# The GPU-marked tests first (every backend on CUDA tensors, the large-shape GPU cases): short, and
# the part a lease must not miss. Then the rest of the suite while the time allows (its CPU and
# interpreter grids do not need the GPU and take most of a lease).
timeout ${GPU_TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/ -m cuda -rf \
  > "$OUT/pytest_cuda_marked.log" 2>&1; echo "pytest -m cuda rc=$?" | tee -a "$OUT/device.txt"; tail -15 "$OUT/pytest_cuda_marked.log"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/ -m "not cuda" -rf \
  -k "not emulat and not static and not sanitiz" \
  > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rest rc=$?" | tee -a "$OUT/device.txt"; tail -15 "$OUT/pytest_gpu.log"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
      tests/ -m cuda -k "cuda and not emulat and not slow" > "$OUT/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?" | tee -a "$OUT/device.txt"
  done
fi
python3 -m seqkernels check > "$OUT/check.txt" 2>&1; tail -3 "$OUT/check.txt"
for dt in bfloat16 float16; do
  timeout ${BENCH_TIMEOUT:-240} python3 -m seqkernels bench ${1:+--quick} --dtype $dt --out "$OUT/bench" > "$OUT/bench_$dt.txt" 2>&1
  echo "bench $dt rc=$?" | tee -a "$OUT/device.txt"
done
