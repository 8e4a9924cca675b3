# classify-app worker image. CUDA-capable: the PyPI torch wheel carries the CUDA runtime, so a
# GPU is used when the container runs with one (NVIDIA container toolkit, `--gpus all` or a
# Kubernetes `nvidia.com/gpu` limit); without one the same image runs on the CPU.
# `--build-arg TORCH=cpu` builds an image for CPU-only nodes instead, with PyTorch's CPU wheels:
# each worker's RSS is about 300 MB smaller (the CUDA libraries are never mapped; README,
# "Performance").
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH=cuda
RUN if [ "$TORCH" = cpu ]; then \
        pip install torch==2.13.0+cpu torchvision==0.28.0+cpu \
            --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install torch==2.14.1 torchvision==0.29.1; \
    fi
WORKDIR /src
COPY setup.cfg pyproject.toml README.md LICENSE ./
COPY classify_app ./classify_app
COPY agents ./agents
COPY models ./models
COPY tables ./tables
# classify_app/dev (local broker, MongoDB server, sample images) is left out by .dockerignore.
RUN pip install ".[worker]"
# Pillow's resize vectorised with AVX2 (x86-64 since 2013): decoding and resizing a photo costs
# a third less CPU, with the same labels (README, "Performance"). `--build-arg PILLOW_SIMD=0`
# keeps Pillow (other CPUs).
ARG PILLOW_SIMD=1
COPY scripts/pillow-simd.sh ./scripts/
RUN if [ "$PILLOW_SIMD" = 1 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev libjpeg62-turbo-dev zlib1g-dev \
        && scripts/pillow-simd.sh /opt/venv/bin/python; \
    fi

FROM python:3.11-slim

# librocksdb is statically linked into rocksdict; libgomp is torch's OpenMP runtime; pillow-simd
# links the system's libjpeg (Pillow's wheel carries its own).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libjpeg62-turbo \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 classify
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=134217728:glibc.malloc.arena_max=1 \
    CLASSIFY_DATADIR=/var/lib/classify \
    CLASSIFY_WEB_BIND=0.0.0.0
RUN mkdir -p /var/lib/classify && chown classify /var/lib/classify
USER classify
WORKDIR /home/classify
VOLUME /var/lib/classify
EXPOSE 6066
# Set CLASSIFY_BROKER (e.g. kafka://kafka:9092) and CLASSIFY_MONGO_URI (empty: table-only);
# the web port serves the API, /metrics, /healthz, /readyz and /openapi.json.
CMD ["faust", "-A", "classify_app", "worker", "--web-port", "6066", "--loglevel", "info"]
