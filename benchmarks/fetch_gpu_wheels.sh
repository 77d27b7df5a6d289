#!/usr/bin/env bash
# Prepares what `make bench-gpu` carries to a GPU machine that reaches no registry (run it here, where pip reaches
# PyPI): .whl/ holds the web stack the GPU image lacks (and `gguf`, to read a checkpoint), as CPython 3.12 x86-64
# wheels (the image's Python); .gpu/tokenizer holds SmolLM2's tokenizer for the HTTP figures on random weights of its
# shape. SmolLM2's real checkpoint (94 MiB, over one call's 64 MiB carry limit) is split into .ckpt/smollm2.gguf.part-00
# and -01 with its checksum in .gpu/smollm2.gguf.sha256: carried over two calls back to back (the first part stays on
# the warm machine), make bench-gpu reassembles it for the bf16 real-checkpoint test. All git-ignored; a device run
# names them in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
grep -qx '/.ckpt/' .git/info/exclude 2>/dev/null || echo /.ckpt/ >>.git/info/exclude
# the versions this project's venv runs; --no-deps: each one the image lacks is named
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.55.0 httptools==0.9.0
  sse-starlette==3.7.1 httpx-sse==0.4.3 platformdirs==4.14.9 opentelemetry-api==1.45.2 typing-extensions==4.16.0
  anyio==4.16.0 gguf==0.19.0"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
$PY - <<'PY'
from server.model.loader import load_model  # noqa: F401 -- resolves the embedded alias the same way the server does
from server.model.loader import local_source
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained(str(local_source("smollm2-135m"))).save_pretrained(".gpu/tokenizer")
PY
gguf=$($PY -c 'from server.model.loader import resolve_gguf; print(resolve_gguf("smollm2-135m"))')
mkdir -p .ckpt
rm -f .ckpt/smollm2.gguf.part-*
split -n 2 -d "$gguf" .ckpt/smollm2.gguf.part-
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1 "  smollm2.gguf"}' >.gpu/smollm2.gguf.sha256
du -sh .whl .gpu .ckpt/*
