#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU test lane, run the benchmarks at the paper
# shapes and summarize them; everything is written under $OUT (default: benchmarks/results/<date>).
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
# Expects torch, triton, pytest and pytest-benchmark installed (the package is installed with --no-deps).
# Every step has its own time limit; together they stay under 9 minutes (build 120 s, tests 120 s,
# benchmarks 300 s), so the whole call fits in 10 minutes even when a step hangs. The build's longest file is
# csrc/attention.cu (every attention kernel variant: about 2 minutes per architecture for its one nvcc process on
# a busy 2-core machine), so it gets the larger share.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  python3 -c "import pytest, pytest_benchmark; print('pytest', pytest.__version__, 'pytest-benchmark', pytest_benchmark.__version__)"
  nvcc --version 2>/dev/null | tail -1
} 2>&1 | tee "$OUT/env.txt"

# Build for this GPU's architecture only (faster than the default "80;90"); the CUDA build is required.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
export DALLE_KERNELS_CUDA=1 DALLE_KERNELS_CUDA_ARCHS=${DALLE_KERNELS_CUDA_ARCHS:-${ARCH:-80;90}}
timeout 120 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -c "import dalle_kernels._C as c; print('extension built against CUDA runtime', c.cuda_runtime_version())" \
  2>&1 | tee -a "$OUT/build.log"

# GPU test lane: compiled Triton and CUDA kernels, bigger shapes, bf16 (root conftest.py: --device=cuda).
timeout 120 python3 -m pytest -q -p no:cacheprovider tests --device=cuda -rfE --durations=10 2>&1 \
  | tee "$OUT/tests_gpu.log" | tail -25

# Benchmarks at the paper shapes (attention: providers triton, cuda, torch, dense, sdpa_mask, flex), one JSON per file so that a file that runs out of time loses only itself.
# pytest-benchmark reports the median of many rounds; the benchmarks synchronize inside the timed function.
run_bench() {  # name, time limit in seconds
  timeout "$2" python3 -m pytest -q -p no:cacheprovider "benchmarks/bench_$1.py" --device=cuda \
    --benchmark-json="$OUT/bench_$1.json" --benchmark-max-time=0.5 --benchmark-columns=median,iqr,rounds \
    --benchmark-sort=name 2>&1 | tee "$OUT/bench_$1.log" | tail -40
}
run_bench attention 150
run_bench logit_laplace 60
run_bench orthogonalize 45
run_bench powersgd 45

jsons=$(ls "$OUT"/bench_*.json 2>/dev/null)
if [ -n "$jsons" ]; then
  # shellcheck disable=SC2086
  python3 benchmarks/summarize.py $jsons | tee "$OUT/summary.md"
else
  echo "no benchmark JSON written (see $OUT/bench_*.log)" | tee "$OUT/summary.md"
fi
