# syntax=docker/dockerfile:1.7
# Images of convnext-serve, one target each:
#   service      GPU serving: python:3.11-slim + CUDA 13 runtime, cuDNN 9, TensorRT 11 and onnxruntime-gpu, all as pip
#                wheels (the way PyTorch's wheels ship CUDA); no torch. The host needs only the NVIDIA driver >= 580
#                (CUDA 13) and the NVIDIA Container Toolkit, which mounts the driver into the container.
#   service-cpu  CPU serving on python:3.11-slim with ONNX Runtime (CPU)
#   train        training and export with torch (torchrun-capable); also runs the one-shot `prepare` step
# Build: docker build --target service -t convnext-serve:gpu .
# The GPU build needs https://pypi.nvidia.com (or a mirror: --build-arg NVIDIA_PYPI_URL=...): tensorrt-cu13 and
# tensorrt-cu13-libs on PyPI are placeholders that fetch the real TensorRT libraries from there at install time.
# deploy/check_nvidia_index.py stops the build early with what to do when it is unreachable.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TINI_VERSION=v0.19.0
# The sha256 of each of tini v0.19.0's release binaries (amd64 and arm64 hosts: `docker buildx build --platform ...`).
ARG TINI_SHA256_AMD64=93dcc18adc78c65a028a84799ecf8ad40c936fdfc5f2a57b1acda5a8117fa82c
ARG TINI_SHA256_ARM64=07952557df20bfd2a95f9bef198b445e006171969499a1d361bd9e6f8e5e0e81
ARG NVIDIA_PYPI_URL=https://pypi.nvidia.com

# ---- tini for the target platform, verified by checksum (PID 1: forwards SIGTERM to the service, reaps zombies) ----
# Both binaries are fetched and checked (a few KiB each); BuildKit's TARGETARCH picks the image's own.
FROM ${PYTHON_IMAGE} AS tini
ARG TINI_VERSION
ARG TINI_SHA256_AMD64
ARG TINI_SHA256_ARM64
ARG TARGETARCH
ADD --checksum=sha256:${TINI_SHA256_AMD64} --chmod=755 \
    https://github.com/krallin/tini/releases/download/${TINI_VERSION}/tini-amd64 /tini-amd64
ADD --checksum=sha256:${TINI_SHA256_ARM64} --chmod=755 \
    https://github.com/krallin/tini/releases/download/${TINI_VERSION}/tini-arm64 /tini-arm64
RUN case "${TARGETARCH}" in \
        amd64|arm64) mv "/tini-${TARGETARCH}" /tini ;; \
        *) echo "no tini checksum for TARGETARCH=${TARGETARCH:-unset}: the images are built for amd64 and arm64" >&2; \
           exit 1 ;; \
    esac

# ---- GPU serving dependencies in a venv: onnxruntime-gpu[cuda,cudnn] + tensorrt-cu13 + cuda-python, no CPU onnxruntime ----
FROM ${PYTHON_IMAGE} AS gpu-deps
ARG NVIDIA_PYPI_URL
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/check_nvidia_index.py deploy/gpu-constraints.txt deploy/
COPY deploy/build-requirements.txt deploy/build-requirements.txt
COPY locks/service-gpu-constraints.txt locks/service-gpu-constraints.txt
# The CUDA/cuDNN wheels are pinned to the CUDA 13.0 builds (deploy/gpu-constraints.txt); pip takes TensorRT's real
# wheels from NVIDIA's index (a binary wheel there wins over the placeholder sdist on PyPI).
# Not hash-locked like service-cpu (locks/service-cpu.txt): the NVIDIA-index wheels cannot be hashed where the lock is
# made (that index is unreachable there), so exact pins are what holds: pyproject.toml's, deploy/gpu-constraints.txt's,
# and for what both images install (FastAPI, Starlette, AnyIO, NumPy, ...), the CPU lock's versions
# (locks/service-gpu-constraints.txt, which `make lock` derives from locks/service-cpu.txt).
# PyPI has onnxruntime-gpu for x86-64 only (Linux aarch64 CUDA builds are on Microsoft's own feed, microsoft/onnxruntime
# issues 27005 and 27944): other platforms stop here first, saying so, rather than at pip's "no matching distribution".
ARG TARGETARCH
RUN if [ "${TARGETARCH}" != "amd64" ]; then \
        echo "the GPU service installs onnxruntime-gpu, which PyPI has for x86-64 (amd64) only: build it with" \
             "--platform linux/amd64 (for ${TARGETARCH:-this platform}, onnxruntime-gpu would come from Microsoft's" \
             "own package feed instead of PyPI)" >&2; \
        exit 1; \
    fi \
    && python deploy/check_nvidia_index.py --index-url "${NVIDIA_PYPI_URL}" \
    && python -m venv /opt/venv \
    && python deploy/requirements.py serve gpu > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${NVIDIA_PYPI_URL}" \
        -c deploy/gpu-constraints.txt -c locks/service-gpu-constraints.txt -r /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r deploy/build-requirements.txt \
    && /opt/venv/bin/pip check
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py convnext_common.py convnext_files.py convnext_serve.py ./
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation --check-build-dependencies .

# ---- service: GPU serving image ----
FROM ${PYTHON_IMAGE} AS service
# NVIDIA_*: what the NVIDIA Container Toolkit mounts (libcuda + nvidia-smi) and the driver it requires: it refuses
# to start the container on a driver older than CUDA 13 (>= 580) with "unsatisfied condition: cuda>=13.0".
# LD_LIBRARY_PATH: where the nvidia-* wheels put libcudart/cuBLAS/cuFFT/cuRAND/cuDNN, for ONNX Runtime's CUDA
# provider (it links them by name and the wheels set no rpath); TensorRT's wheel loads its own libraries.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0" \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    CONVNEXT_HOST=0.0.0.0 \
    CONVNEXT_PORT=8000 \
    CONVNEXT_GRPC_PORT=8001 \
    CONVNEXT_REPOSITORY=/models \
    CONVNEXT_ENGINE=tensorrt \
    CONVNEXT_PROVIDER=cuda \
    CONVNEXT_PRECISION=fp16 \
    CONVNEXT_HOST_CHECK=hold
LABEL org.opencontainers.image.description="convnext-serve GPU service: needs NVIDIA driver >= 580 (CUDA 13), compute capability >= 7.5"
COPY --from=tini /tini /usr/local/bin/tini
COPY --from=gpu-deps /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models && chown convnext /models
WORKDIR /app
COPY --chown=convnext deploy/entrypoint.py deploy/healthcheck.py deploy/host_check.py deploy/
USER 10001
VOLUME ["/models"]
EXPOSE 8000
EXPOSE 8001
# The start period is k8s's startup allowance (2600 s): the host check (at most 600 s), then the service's own bound on
# its first engine build (1970 s: opening, a TensorRT build included, and warm-up); a success within it counts at once.
HEALTHCHECK --interval=15s --timeout=3s --start-period=2600s --retries=3 CMD ["python", "/app/deploy/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/tini", "--", "python", "/app/deploy/entrypoint.py"]
CMD ["serve"]

# ---- CPU serving dependencies ----
FROM ${PYTHON_IMAGE} AS cpu-deps
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/requirements.py
COPY locks/service-cpu.txt locks/service-cpu.txt
COPY deploy/build-requirements.txt deploy/build-requirements.txt
ARG TARGETARCH
# Exactly the files of locks/service-cpu.txt (every package pinned with its sha256, `make lock`); then, with no index,
# pyproject's serve + cpu pins must already be met: a lock older than pyproject.toml stops the build.
# `make lock` compiles that lock for x86-64 only: on arm64 some wheels' hashes are missing from it and pip's refusal
# reads like tampering, so other platforms stop here first, saying so.
RUN if [ "${TARGETARCH}" != "amd64" ]; then \
        echo "service-cpu installs locks/service-cpu.txt, locked for x86-64 (amd64) only: build it with" \
             "--platform linux/amd64, or re-lock for ${TARGETARCH:-this platform} too (Makefile: lock)" >&2; \
        exit 1; \
    fi \
    && python -m venv /opt/venv \
    && python deploy/requirements.py serve cpu > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --upgrade pip==25.3 \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r locks/service-cpu.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index -r /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r deploy/build-requirements.txt \
    && /opt/venv/bin/pip check
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py convnext_common.py convnext_files.py convnext_serve.py ./
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation --check-build-dependencies .

# ---- service-cpu: CPU serving image ----
FROM ${PYTHON_IMAGE} AS service-cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CONVNEXT_HOST=0.0.0.0 \
    CONVNEXT_PORT=8000 \
    CONVNEXT_GRPC_PORT=8001 \
    CONVNEXT_REPOSITORY=/models \
    CONVNEXT_ENGINE=auto \
    CONVNEXT_PROVIDER=cpu \
    CONVNEXT_PRECISION=fp32
COPY --from=tini /tini /usr/local/bin/tini
COPY --from=cpu-deps /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models && chown convnext /models
WORKDIR /app
COPY --chown=convnext deploy/entrypoint.py deploy/healthcheck.py deploy/host_check.py deploy/
USER 10001
VOLUME ["/models"]
EXPOSE 8000
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 CMD ["python", "/app/deploy/healthcheck.py"]
ENTRYPOINT ["/usr/local/bin/tini", "--", "python", "/app/deploy/entrypoint.py"]
CMD ["serve"]

# ---- train: training + export with torch (CUDA wheels from PyPI); runs `prepare` and torchrun jobs ----
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONUNBUFFERED=1 \
    CONVNEXT_REPOSITORY=/models
COPY --from=tini /tini /usr/local/bin/tini
# gcc: `--compile` builds native code at run time (Triton's CUDA launcher with $CC/gcc, Inductor's CPU kernels with
# g++); training refuses --compile at start where neither is found (training/run.py: compile_toolchain_problem).
# libc6-dev (the C headers) at exactly the image's own libc6.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 g++=4:12.2.0-3 \
        "libc6-dev=$(dpkg-query --show --showformat='${Version}' libc6)" \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/convnext convnext \
    && mkdir -p /models /runs /data && chown convnext /models /runs /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/requirements.py deploy/build-requirements.txt deploy/
RUN python deploy/requirements.py train export cpu > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --require-hashes -r deploy/build-requirements.txt
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY service/ service/
COPY training/ training/
COPY bench/ bench/
COPY convnext_cli.py convnext_common.py convnext_files.py convnext_serve.py ./
COPY deploy/entrypoint.py deploy/healthcheck.py deploy/host_check.py deploy/
RUN pip install --no-cache-dir --no-deps --no-build-isolation --check-build-dependencies .
USER 10001
VOLUME ["/models"]
ENTRYPOINT ["/usr/local/bin/tini", "--"]
CMD ["python", "-m", "training", "--help"]
