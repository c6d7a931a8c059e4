# syntax=docker/dockerfile:1.7
# Images of convnext-serve, one target each:
#   service      GPU serving on NVIDIA's TensorRT image: ONNX Runtime (CUDA/TensorRT providers) + TensorRT, no torch
#   service-cpu  CPU serving on python:3.11-slim with ONNX Runtime (CPU)
#   train        training and export with torch (torchrun-capable); also runs the one-shot `prepare` step
# Build: docker build --target service -t convnext-serve:gpu .
# The base image supplies CUDA 13 userspace and the NVIDIA container runtime set-up. The TensorRT the service uses is
# the pinned `tensorrt-cu13` wheel of the gpu extra (11.4, strongly typed: see export/tensorrt.py), installed in
# /opt/venv, which does not see the base image's own TensorRT; engines record the version they were built with.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.10-py3
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TINI_VERSION=v0.19.0
ARG TINI_SHA256=93dcc18adc78c65a028a84799ecf8ad40c936fdfc5f2a57b1acda5a8117fa82c

# ---- tini, verified by checksum (PID 1: forwards SIGTERM to the service and reaps zombies) ----
FROM ${PYTHON_IMAGE} AS tini
ARG TINI_VERSION
ARG TINI_SHA256
ADD --checksum=sha256:${TINI_SHA256} --chmod=755 \
    https://github.com/krallin/tini/releases/download/${TINI_VERSION}/tini-amd64 /tini

# ---- GPU serving dependencies in a venv (the CPU onnxruntime wheel conflicts with onnxruntime-gpu: left out) ----
FROM ${TENSORRT_IMAGE} AS gpu-deps
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python3 -m venv /opt/venv \
    && python3 deploy/requirements.py serve gpu --without onnxruntime > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py ./
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

# ---- service: GPU serving image ----
FROM ${TENSORRT_IMAGE} AS service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CONVNEXT_HOST=0.0.0.0 \
    CONVNEXT_PORT=8000 \
    CONVNEXT_REPOSITORY=/models \
    CONVNEXT_ENGINE=tensorrt \
    CONVNEXT_PROVIDER=cuda \
    CONVNEXT_PRECISION=fp16
COPY --from=tini /tini /usr/local/bin/tini
COPY --from=gpu-deps /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models && chown convnext /models
WORKDIR /app
COPY --chown=convnext deploy/entrypoint.py deploy/healthcheck.py deploy/
USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s --retries=3 CMD ["python", "/app/deploy/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/tini", "--", "python", "/app/deploy/entrypoint.py"]
CMD ["serve"]

# ---- CPU serving dependencies ----
FROM ${PYTHON_IMAGE} AS cpu-deps
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python -m venv /opt/venv \
    && python deploy/requirements.py serve > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py ./
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

# ---- service-cpu: CPU serving image ----
FROM ${PYTHON_IMAGE} AS service-cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CONVNEXT_HOST=0.0.0.0 \
    CONVNEXT_PORT=8000 \
    CONVNEXT_REPOSITORY=/models \
    CONVNEXT_ENGINE=onnxruntime \
    CONVNEXT_PROVIDER=cpu \
    CONVNEXT_PRECISION=fp32
COPY --from=tini /tini /usr/local/bin/tini
COPY --from=cpu-deps /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models && chown convnext /models
WORKDIR /app
COPY --chown=convnext deploy/entrypoint.py deploy/healthcheck.py deploy/
USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 CMD ["python", "/app/deploy/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/tini", "--", "python", "/app/deploy/entrypoint.py"]
CMD ["serve"]

# ---- train: training + export with torch (CUDA wheels from PyPI); runs `prepare` and torchrun jobs ----
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONUNBUFFERED=1 \
    CONVNEXT_REPOSITORY=/models
COPY --from=tini /tini /usr/local/bin/tini
RUN useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models /runs /data && chown convnext /models /runs /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
RUN python deploy/requirements.py train export > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY model/ model/
COPY export/ export/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py ./
COPY deploy/entrypoint.py deploy/healthcheck.py deploy/
RUN pip install --no-cache-dir --no-deps .
USER 10001
VOLUME ["/models"]
ENTRYPOINT ["/usr/local/bin/tini", "--"]
CMD ["python", "-m", "training", "--help"]
