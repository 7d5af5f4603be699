# The GPU worker image: CUDA runtime, a CUDA build of torch, supir_core and the Celery worker.
# Weights are not inside: mount them read-only at /models and point SUPIR_SDXL_CHECKPOINT / SUPIR_CHECKPOINT there.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv $VIRTUAL_ENV \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin supir
WORKDIR /app
COPY pyproject.toml README.md ./
COPY supir_core ./supir_core
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
RUN pip install ".[worker]"

USER 10001
VOLUME ["/models"]
ENV SUPIR_WORKER_HEALTH_PORT=8081 SUPIR_WORKER_METRICS_PORT=9100
EXPOSE 9100 8081
HEALTHCHECK --interval=30s --timeout=3s --start-period=300s --retries=3 CMD ["python", "-m", "worker.health"]
# one process per GPU: the pool process loads the weights after the fork
CMD ["celery", "-A", "worker.tasks", "worker", "--pool", "prefork", "--concurrency", "1", "--queues", "supir", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
