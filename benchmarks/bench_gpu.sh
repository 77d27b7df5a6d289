#!/usr/bin/env bash
# `make bench-gpu`: for a GPU machine that reaches no package registry (system torch >= 2.11 with triton,
# transformers >= 5; no fastapi/pydantic there, so only the engine is imported). Under 8 minutes: the CUDA tests
# (2 min at most), then every figure of issue #14 in one script, one table, docs/results/bench-gpu.json (commit it).
# Check it on a CPU first: python benchmarks/bench_gpu.py --smoke --out /tmp/bench-gpu.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_weights.py -k "gpu or cuda" 2>&1 | tee "$out/gpu-tests.log"
timeout 390 $PY benchmarks/bench_gpu.py "$@" 2>&1 | tee "$out/bench-gpu.log"
