# The tensorwire server. Two stages on one base image: the first installs the server
# and its dependencies into a virtual environment, the second copies only that
# environment, so no build tools, sources or caches reach the image.
#
#   GPU (default):  docker build -t tensorwire .
#   CPU only:       docker build -t tensorwire:cpu --build-arg BASE_IMAGE=python:3.11-slim .
#   A base image made here, without a registry: README.md, "Deploy".
#
# The base must have Python 3.11 or newer with venv; useradd; and either torch 2.13.0
# already (the PyTorch CUDA runtime images: kept, never reinstalled) or a package
# index that has it (TORCH_INDEX_URL, CPU wheels by default).
#
# No "# syntax=" line: it would make BuildKit fetch a frontend image from a registry,
# and builds must work offline with BuildKit and with the classic builder alike.

ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
# Where pip finds torch when the base has none: CPU wheels, not PyPI's CUDA ones.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Another index (a mirror), or PIP_NO_INDEX=1 to install from wheelhouse/ alone (an
# offline build; README.md, "Deploy"). Empty: not given. They reach pip as options:
# pip would read empty PIP_* variables from the environment as bad values.
ARG PIP_INDEX_URL=
ARG PIP_NO_INDEX=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore lets through only the package's sources and wheelhouse/, if any.
COPY . .
# --system-site-packages: the base's own torch (and numpy) count as installed, so
# pip leaves a CUDA base's torch as it is. The two distributions, client/ (tensorwire)
# and server/ (tensorwire-server, which pins torch==2.13.0), install together.
# Then out go what only builds: torch's C++ headers and test binaries (145 MB of a
# CPU wheel; the server compiles no extensions), pip and setuptools.
RUN python3 -m venv --system-site-packages /opt/tensorwire \
    && env -u PIP_INDEX_URL -u PIP_NO_INDEX /opt/tensorwire/bin/pip install \
        --no-cache-dir --find-links /src/wheelhouse \
        ${PIP_NO_INDEX:+--no-index} ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} \
        --extra-index-url "${TORCH_INDEX_URL}" ./client ./server \
    && /opt/tensorwire/bin/python -c \
        "import torch, tensorwire_server; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    && rm -rf /opt/tensorwire/lib/python3*/site-packages/torch/include \
        /opt/tensorwire/lib/python3*/site-packages/torch/test \
    && /opt/tensorwire/bin/python -m pip uninstall --quiet --yes pip setuptools

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="tensorwire" \
      org.opencontainers.image.description="tensorwire server: NumPy arrays in, torch on the GPU, NumPy arrays out, over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# /var/cache/tensorwire: the compile cache's mount point (TENSORWIRE_COMPILE_CACHE_DIR in
# docker-compose.yml and deploy/kubernetes), the server's own, so that a volume mounted
# there starts writable by it. No C++ compiler: docs/server.md, "Compiled models".
RUN groupadd --system --gid 10001 tensorwire \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /home/tensorwire --create-home --shell /usr/sbin/nologin tensorwire \
    && install -d -o 10001 -g 10001 -m 0700 /var/cache/tensorwire
COPY --from=build /opt/tensorwire /opt/tensorwire
# Settings come from TENSORWIRE_* variables (docs/operations.md); flags after the
# image name win over them. Listen on every address of the container, in plain text
# only if TENSORWIRE_INSECURE=true says so (else TENSORWIRE_TLS_CERT and _KEY), and
# answer health checks in plain text on 50052 for HEALTHCHECK and Kubernetes probes;
# large payloads travel on the data plane's 50053 (with gRPC's TLS) when it is
# published, else through gRPC; the KServe v2 REST API (HTTP, with gRPC's TLS and
# tokens) answers on 8000, as Triton's and KServe's images do.
# MALLOC_*: resident memory steady under load (docs/operations.md, "Memory").
ENV PATH=/opt/tensorwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    TENSORWIRE_HOST=0.0.0.0 \
    TENSORWIRE_PORT=50051 \
    TENSORWIRE_HEALTH_PORT=50052 \
    TENSORWIRE_DATA_PORT=50053 \
    TENSORWIRE_HTTP_PORT=8000
USER 10001:10001
WORKDIR /home/tensorwire
EXPOSE 50051 50052 50053 8000
# Loading models can take minutes: failures only count after the start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "tensorwire_server.probe"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tensorwire-server"]
