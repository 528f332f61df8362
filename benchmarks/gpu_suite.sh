#!/usr/bin/env bash
# One call on a GPU machine: build (CUDA extension required), run the GPU test lane, run the benchmarks at the
# paper shapes, and write everything under $OUT (default: benchmarks/results/<date>). Finishes in a few minutes.
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"
  nvcc --version | tail -1
} | tee "$OUT/env.txt"

DALLE_KERNELS_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -c "import dalle_kernels._C as c; print('extension built against CUDA runtime', c.cuda_runtime_version())" \
  | tee -a "$OUT/build.log"

# GPU test lane: compiled Triton + CUDA kernels, bigger shapes, bf16.
timeout 240 python3 -m pytest -q -p no:cacheprovider tests --device=cuda -x 2>&1 | tee "$OUT/tests_gpu.log" | tail -5

# Benchmarks at the paper shapes (pytest-benchmark; median of many rounds, synchronized inside the timed function).
timeout 300 python3 -m pytest -q -p no:cacheprovider benchmarks --device=cuda \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,iqr,rounds \
  --benchmark-sort=name 2>&1 | tee "$OUT/benchmarks.log" | tail -60
python3 benchmarks/summarize.py "$OUT/benchmarks.json" | tee "$OUT/summary.md"
