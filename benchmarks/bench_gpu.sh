#!/usr/bin/env bash
# One script for a GPU machine that reaches no package registry (system torch >= 2.11, transformers >= 5.17;
# no fastapi/pydantic there, so only the engine is imported). Random weights: latency needs no trained values.
# Runs the CUDA tests, then the bf16 benchmark on SmolLM2's and Llama-2-7B's shapes; well under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
for shape in smollm2-135m llama-2-7b; do
  timeout 200 $PY -m server.bench --device cuda --random-weights --model "$shape" --new-tokens 128 --repeats 3 \
    --json | tee "$out/bench-$shape.json"
done
$PY benchmarks/summarize_gpu.py "$out"/bench-*.json || true
