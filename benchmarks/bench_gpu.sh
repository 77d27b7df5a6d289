#!/usr/bin/env bash
# One script for a GPU machine that reaches no package registry (system torch >= 2.11, transformers >= 5.17;
# no fastapi/pydantic there, so only the engine is imported). Random weights: latency needs no trained values.
# Runs the CUDA tests, the bf16 benchmark on SmolLM2's and Llama-2-7B's shapes, and the mixed-policy batch; under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_weights.py -k "gpu or cuda" 2>&1 | tee "$out/gpu-tests.log"
for shape in smollm2-135m llama-2-7b; do
  timeout 200 $PY -m server.bench --device cuda --random-weights --model "$shape" --new-tokens 128 --repeats 3 \
    --json | tee "$out/bench-$shape.json"
done
$PY benchmarks/summarize_gpu.py "$out"/bench-*.json || true
# Mixed policies in one batch (4 full + 4 skip:8 + 4 pairs) against 12 x full, batched and CUDA-stream groups.
for mode in batched streams; do
  timeout 120 $PY benchmarks/bench_mixed.py --device cuda --model llama-2-7b --group-mode "$mode" | tee "$out/mixed-$mode.txt"
done
