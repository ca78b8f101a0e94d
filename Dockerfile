# vgim-dist for GPU nodes: CUDA 13 runtime (torch 2.11.0's cu130 wheels), the package in /opt/venv,
# installed by scripts/setup.sh, the same script CI runs.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    VENV=/opt/venv \
    EXTRAS="" \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
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

RUN useradd --create-home --uid 1000 vgim && mkdir -p /opt/vgim/runs && chown vgim /opt/vgim/runs
USER 1000

ENTRYPOINT ["/opt/vgim/scripts/entrypoint.sh"]
CMD ["--help"]
