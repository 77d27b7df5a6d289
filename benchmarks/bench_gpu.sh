#!/usr/bin/env bash
# `make bench-gpu`: for a GPU machine that reaches no package registry (system torch >= 2.11 with triton,
# transformers >= 5; no fastapi/pydantic there). About 11 minutes in all, more than one device call (600 s), so a
# session runs it in two: the CUDA tests alone (GPU_BENCH_S=0 GPU_HTTP_S=0; 3 min at most), then the rest
# (GPU_TEST_S=0): the real checkpoint, every in-process figure of issue #14 in one script, one table,
# bench-gpu.json (into $OUT when it is set, so that it comes back from the device; else docs/results/, commit it),
# then, where the web stack's wheels were fetched into .whl/ (benchmarks/bench_gpu_http.sh says how), the real
# server through HTTP.
# Check it on a CPU first: python benchmarks/bench_gpu.py --smoke --out /tmp/bench-gpu.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
# Each phase's budget in seconds; 0 leaves the phase out (one device call runs 600 s at most: see above). The
# benchmark starts no section past its budget and still prints its table; a section running over is cut 60 s later.
tests_s=${GPU_TEST_S:-180} bench_s=${GPU_BENCH_S:-220} http_s=${GPU_HTTP_S:-150}
if [ "$tests_s" != 0 ]; then
    # each test named as it runs, and one that hangs cut alone (where pytest-timeout is installed), so a cut log
    # still says which test it was
    per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
    timeout "$tests_s" $PY -m pytest -v $per_test -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_weights.py \
        tests/test_transfer.py -k "gpu or cuda" 2>&1 | tee "$out/gpu-tests.log"
fi
# SmolLM2's real checkpoint, where both parts and the checksum reached this machine (benchmarks/fetch_gpu_wheels.sh):
# captured bf16 decode steps against eager ones on trained weights; it reads the GGUF through the `gguf` wheel.
ckpt_s=${GPU_CKPT_S:-90}
if [ "$ckpt_s" != 0 ] && [ -f .gpu/smollm2.gguf.sha256 ] && [ -f .ckpt/smollm2.gguf.part-00 ] \
        && [ -f .ckpt/smollm2.gguf.part-01 ] && [ -d .whl ]; then
    ckpt=/tmp/painters-ckpt
    mkdir -p "$ckpt" && cat .ckpt/smollm2.gguf.part-* >"$ckpt/smollm2.gguf"
    if [ "$(sha256sum <"$ckpt/smollm2.gguf" | cut -d' ' -f1)" = "$(cut -d' ' -f1 .gpu/smollm2.gguf.sha256)" ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        PYTHONPATH="/tmp/site:$PYTHONPATH" PAINTERS_GPU_GGUF="$ckpt/smollm2.gguf" PAINTERS_CACHE_DIR="$ckpt/cache" \
            timeout "$ckpt_s" $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k real_checkpoint 2>&1 \
            | tee "$out/gpu-checkpoint.log"
    else
        echo "the reassembled checkpoint does not match .gpu/smollm2.gguf.sha256: the real-checkpoint test is left out"
    fi
else
    echo "no complete SmolLM2 checkpoint in .ckpt/ (benchmarks/fetch_gpu_wheels.sh): the real-checkpoint test is left out"
fi
if [ "$bench_s" != 0 ]; then
    if [ -n "${OUT:-}" ] && [[ " $* " != *" --out "* ]]; then  # on the device machine: the JSON must come back
        set -- --out "$OUT/bench-gpu.json" "$@"
    fi
    timeout $((bench_s + 60)) $PY benchmarks/bench_gpu.py --budget-s "$bench_s" "$@" 2>&1 | tee "$out/bench-gpu.log"
fi
if [ "$http_s" = 0 ]; then
    echo "GPU_HTTP_S=0: the HTTP figures are left out"
elif [ -d .whl ]; then
    OUT="$out" timeout "$http_s" bash benchmarks/bench_gpu_http.sh
else
    echo "no .whl/: the HTTP figures are left out (see benchmarks/bench_gpu_http.sh)"
fi
