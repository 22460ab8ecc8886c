# syntax=docker/dockerfile:1
# The moebert inference service. CPU image by default; the GPU variant (CUDA torch, onnxruntime-gpu, triton):
#   docker build -t moebert:cpu .
#   docker build -t moebert:gpu --build-arg VARIANT=gpu .
# Models are mounted (read-only) and named in MOEBERT_SERVE_MODELS, e.g. "sst2=/models/sst2,squad=/models/squad".
# For --backend onnx, export first: `moebert export-onnx /models/sst2 --quantize` writes /models/sst2/onnx/.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1

WORKDIR /app

# Dependencies first (cached across code changes). The CPU wheel index keeps the image ~1 GB smaller.
RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install "torch==${TORCH_VERSION}" "triton>=3.2" "onnxruntime-gpu[cuda,cudnn]>=1.20"; \
    else \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    fi

COPY pyproject.toml README.md ./
COPY moebert ./moebert
COPY moebert_cli ./moebert_cli
COPY kernels ./kernels
COPY server ./server
# `training` is not shipped: the server never imports it. uvloop + httptools: uvicorn's fast loop and parser.
RUN pip install ".[serve]" "uvloop>=0.19" "httptools>=0.6" \
    && if [ "$VARIANT" = "gpu" ]; then pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps "onnxruntime-gpu[cuda,cudnn]>=1.20"; fi

RUN useradd --create-home --uid 10001 moebert
USER moebert

# The GPU image still defaults to the CPU device: set MOEBERT_SERVE_DEVICE=cuda when a GPU is attached.
ENV MOEBERT_SERVE_HOST=0.0.0.0 \
    MOEBERT_SERVE_PORT=8000 \
    MOEBERT_SERVE_DEVICE=cpu
EXPOSE 8000

# Ready = models loaded and warmed up (503 before, and while draining after SIGTERM).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"]

# SIGTERM (docker stop): readiness turns 503, in-flight requests are answered, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["moebert", "serve"]
