# kdpipe for the CPU: Python slim, PyTorch's CPU wheels, kdpipe[export,tracking] pinned by constraints.txt.
#
#   docker build -t kdpipe:cpu .
#   docker run --rm -v "$PWD:/work" kdpipe:cpu run stages.yaml --json > summary.json
#
# Paths: /work is the working directory; mount the folder that holds your stages.yaml (and, at the paths it names
# relative to itself, the data). Runs go to /work/runs/<name> unless --out or KDPIPE_OUT says otherwise; the dataset
# cache to /work/.cache. Configs and data may be mounted read-only elsewhere, e.g.
#   -v ./configs:/work/configs:ro -v ./data:/work/data:ro -v ./runs:/work/runs -e KDPIPE_OUT=/work/runs/exp1
# The image runs as the unprivileged user kdpipe (uid 1000); for a bind mount owned by another user add
#   --user "$(id -u):$(id -g)".
# Exit codes: 0 ok, 2 config error, 3 data error, 4 gate failed, 5 stage crashed, 130 interrupted.
FROM python:3.11-slim-bookworm

# PyTorch's CPU wheel index: there constraints.txt's torch and torchvision pins resolve to the +cpu builds (the
# Linux wheels on PyPI bring several GB of CUDA libraries a CPU image has no use for).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kdpipe
COPY pyproject.toml constraints.txt README.md ./
COPY docker/install.sh docker/install.sh
COPY kdpipe kdpipe
COPY examples examples
RUN sh docker/install.sh /opt/kdpipe export,tracking --extra-index-url "${TORCH_INDEX_URL}" \
    && rm -rf build kdpipe.egg-info \
    && kdpipe --version

RUN useradd --create-home --no-log-init --uid 1000 --user-group kdpipe \
    && mkdir -p /work \
    && chown kdpipe:kdpipe /work

# Caches under the mounted /work (kept between runs) or /tmp, never in a home folder an arbitrary --user lacks.
ENV XDG_CACHE_HOME=/work/.cache \
    KDPIPE_CACHE=/work/.cache/kdpipe \
    HF_HOME=/work/.cache/huggingface \
    TORCH_HOME=/work/.cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib

LABEL org.opencontainers.image.title="kdpipe (CPU)" \
      org.opencontainers.image.description="Knowledge distillation pipeline: kdpipe run stages.yaml. Mount your project at /work." \
      org.opencontainers.image.licenses="Apache-2.0"

USER 1000:1000
WORKDIR /work
HEALTHCHECK --interval=10m --timeout=2m --start-period=30s --retries=1 CMD ["kdpipe", "doctor"]
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
