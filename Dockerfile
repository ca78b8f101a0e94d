# vgim-dist for GPU nodes: CUDA 13 runtime (torch 2.11.0's cu130 wheels), the package in /opt/venv,
# installed by scripts/setup.sh, the same script CI runs.
#
# BASE is the only thing that changes between the GPU image and the CPU check of the same layers
# (scripts/image_check.sh builds this file on a Debian base: --build-arg BASE=... --build-arg PYTHON_VERSION=3.11).
# PYTHON_VERSION is the base's own Python 3 (Ubuntu 24.04: 3.12).
ARG BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG PYTHON_VERSION=3.12

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GIT_PYTHON_REFRESH=quiet \
    VENV=/opt/venv \
    EXTRAS="" \
    PYTHON=python${PYTHON_VERSION} \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget \
       "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vgim

# Dependencies first, in a layer of their own: it survives edits to the source.
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
RUN DEPS_ONLY=1 bash scripts/setup.sh && rm -rf /var/lib/apt/lists/* /root/.cache/pip

COPY vgim_dist vgim_dist
COPY configs configs
COPY cluster cluster
COPY scripts scripts
RUN bash scripts/setup.sh && rm -rf /root/.cache/pip

# Ubuntu's images since 23.04 hold a user `ubuntu` with uid 1000: it makes way for the image's own user.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 vgim && mkdir -p /opt/vgim/runs && chown vgim /opt/vgim/runs
USER 1000

ENTRYPOINT ["/opt/vgim/scripts/entrypoint.sh"]
CMD ["--help"]
