# syntax=docker/dockerfile:1
# dispatch-retention: the image the Kubernetes CronJob runs (docs/deploy.md).
#
#   docker build -t REGISTRY/dispatch-retention:VERSION .
#
# Both stages use the same base image: the virtualenv built in the first one points at its
# Python (/usr/local/bin/python3.11), so keep the two FROM lines identical. Pin the base by
# digest in your registry mirror if your policy requires it (python:3.11-slim-trixie@sha256:...).
# .ci/ship-checks lints this file (hadolint, checkov) and replays its install recipe.

# ---- builder: the wheel, and a virtualenv with the locked dependencies plus the wheel ----
FROM python:3.11-slim-trixie AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The dependencies first (their layer survives source changes): exact versions, every file
# checked against its hash, wheels only (no compiler in either stage).
COPY requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements.lock

# Then the project itself, as a wheel, without letting pip pull anything the lock does not pin.
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/dispatch_retention-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/dispatch-retention --help > /dev/null

# ---- runtime: slim Python, the virtualenv, the config; no compilers, no root ----
# checkov:skip=CKV_DOCKER_2:a batch job (CronJob/Job) has no long-running process to probe; Kubernetes tracks it by its exit code
FROM python:3.11-slim-trixie

LABEL org.opencontainers.image.title="dispatch-retention" \
      org.opencontainers.image.description="GDPR retention batch job for the Messaging API's dispatches"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DISPATCH_RETENTION_CONFIG=/app/config/retention.toml

# A numeric, unprivileged user without a home or a login shell (Kubernetes: runAsUser 10001).
RUN groupadd --system --gid 10001 dispatch \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dispatch

# Owned by root and read-only for the job: nothing in the image is writable at run time
# (Kubernetes mounts the root filesystem read-only and gives the job an emptyDir on /tmp).
COPY --from=builder /opt/venv /opt/venv
# config/retention.toml is a symlink to this file; copying the target does not depend on how
# the builder treats symlinks (.ci/ship-checks checks that the two are the same).
COPY src/dispatch_retention/retention.toml /app/config/retention.toml

WORKDIR /app
USER 10001:10001

# Exec form: the job is PID 1 and gets the SIGTERM itself (it finishes the chunk in progress,
# then exits 143). No HEALTHCHECK: a batch job is judged by its exit code.
ENTRYPOINT ["dispatch-retention"]
CMD ["run"]
