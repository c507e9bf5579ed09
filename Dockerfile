# m2das: M2D-AS pre-training in a CUDA container.
#
#   docker build -t m2das .
#   docker run --rm --gpus all --shm-size=16g -v /path/to/audio:/audio:ro \
#       -v /path/to/data:/data m2das prepare
#
# The torch wheel brings its own CUDA 13 user-space libraries and cuDNN, so the
# base only has to provide the CUDA runtime flavour the NVIDIA container
# toolkit expects (driver requirement labels, compat libraries). Pin by digest
# (nvidia/cuda:TAG@sha256:...) where builds must be bit-for-bit repeatable.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG M2DAS_VERSION=0.1.0
ARG M2DAS_UID=1000
LABEL org.opencontainers.image.title="m2das" \
      org.opencontainers.image.description="M2D-AS audio pre-training that survives preemption: prepare, train, submit" \
      org.opencontainers.image.version="${M2DAS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Versions come from whichever Ubuntu or Debian release BASE_IMAGE is (the
# local test build uses Debian bookworm), so apt packages are not pinned here;
# the Python stack below is pinned by pyproject.toml.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# Non-root user, uid = gid = M2DAS_UID. Ubuntu images already own uid and gid
# 1000 ("ubuntu"): free them first.
RUN if user="$(getent passwd "${M2DAS_UID}")"; then userdel --remove "${user%%:*}" || true; fi \
    && if group="$(getent group "${M2DAS_UID}")"; then groupdel "${group%%:*}"; fi \
    && groupadd --gid "${M2DAS_UID}" m2das \
    && useradd --create-home --uid "${M2DAS_UID}" --gid "${M2DAS_UID}" --shell /bin/bash m2das \
    && mkdir -p /audio /data /runs /metadata \
    && chown m2das:m2das /audio /data /runs /metadata

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "${VIRTUAL_ENV}"

# pip settings for builds that must use a mirror or local wheel folders
# (docker/build-local.sh passes them). pip ignores empty values, so the
# defaults mean the public PyPI. Build args only: they do not stay in the image.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CONSTRAINT=
ARG PIP_CERT=

# Dependencies first: this layer (several GB, mostly torch) is rebuilt only when
# pyproject.toml changes, not on every source edit.
COPY pyproject.toml /opt/m2das/pyproject.toml
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/opt/m2das/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Source last.
COPY README.md /opt/m2das/README.md
COPY m2das /opt/m2das/m2das
COPY launch /opt/m2das/launch
COPY docker/entrypoint.sh /opt/m2das/docker/entrypoint.sh
RUN pip install --no-deps /opt/m2das \
    && rm -rf /opt/m2das/build /opt/m2das/*.egg-info \
    && m2das --help > /dev/null

# Caches go to /tmp so any uid (docker --user, Apptainer) can write them.
ENV XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    M2DAS_AUDIO_DIR=/audio \
    M2DAS_DATA_DIR=/data \
    M2DAS_RUNS_DIR=/runs \
    M2DAS_METADATA_DIR=/metadata \
    M2DAS_LAUNCH_DIR=/opt/m2das/launch

VOLUME ["/audio", "/data", "/runs", "/metadata"]
USER ${M2DAS_UID}:${M2DAS_UID}
WORKDIR /runs

# tini reaps zombies and forwards SIGTERM/SIGUSR1 to the trainer (only to it:
# DataLoader workers must keep running while it saves a checkpoint).
# TINI_SUBREAPER: no warning where tini is not PID 1 (Apptainer, pyxis).
ENV TINI_SUBREAPER=1
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/m2das/docker/entrypoint.sh"]
CMD ["help"]
