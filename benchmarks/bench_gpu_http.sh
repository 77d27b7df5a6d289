#!/usr/bin/env bash
# Issue #14's HTTP figures on a GPU machine that reaches no package registry: installs the server's missing wheels
# (.whl/, fetched beforehand by benchmarks/fetch_gpu_wheels.sh) into /tmp/site, then runs the real server on
# random SmolLM2-135M and Llama-2-7B shapes with SmolLM2's saved tokenizer (.gpu/tokenizer), 64 streaming clients per
# policy. Both together stop within about 130 s. Writes $OUT/bench-http-<shape>.json and the server's log
# $OUT/serve-<shape>.log (OUT defaults to ./out); the tables go to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-out}
mkdir -p "$out"
wheels=${WHEELS:-.whl} site=${SITE:-/tmp/site}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || exit 2
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
# shape:new tokens:seconds; the timeout's 20 s over the budget only catch a hung stop (the benchmark stops itself)
for run in ${HTTP_RUNS:-smollm2-135m:64:50 llama-2-7b:32:80}; do
    IFS=: read -r shape tokens budget <<<"$run"
    timeout $((budget + 20)) $PY benchmarks/bench_gpu_http.py --shape "$shape" --clients "${HTTP_CLIENTS:-64}" \
        --new-tokens "$tokens" --prompt-len 64 --budget-s "$budget" --json "$out/bench-http-$shape.json" \
        --server-log "$out/serve-$shape.log" ${HTTP_ARGS:-} || status=1
done
exit $status
