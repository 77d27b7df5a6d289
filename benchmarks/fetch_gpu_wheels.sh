#!/usr/bin/env bash
# Prepares what `make bench-gpu`'s HTTP part carries to a GPU machine that reaches no registry (run it here, where pip
# reaches PyPI): .whl/ holds the web stack the GPU image lacks, as CPython 3.12 x86-64 wheels (the image's Python),
# and .gpu/tokenizer holds SmolLM2's tokenizer (its 98 MB weights are over the transfer limit: the GPU runs random
# weights of its shape). Both are git-ignored; a device run names them in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
# the versions this project's venv runs; --no-deps: each one the image lacks is named
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.55.0 httptools==0.9.0
  sse-starlette==3.7.1 httpx-sse==0.4.3 platformdirs==4.14.9 opentelemetry-api==1.45.2 typing-extensions==4.16.0
  anyio==4.16.0"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
$PY - <<'PY'
from server.model.loader import load_model  # noqa: F401 -- resolves the embedded alias the same way the server does
from server.model.loader import local_source
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained(str(local_source("smollm2-135m"))).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
