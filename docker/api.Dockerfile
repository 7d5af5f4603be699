# The API image: FastAPI + the torch-free corner of supir_core. No torch, no model weights.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin supir
WORKDIR /app
COPY pyproject.toml README.md ./
COPY supir_core ./supir_core
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
RUN pip install ".[api]"

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "api.server", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--proxy-headers"]
