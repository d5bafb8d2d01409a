# Image of the `orders` service.
#
#   docker build -t orders:latest .
#   docker run --rm -p 8000:8000 -e ORDERS_DATABASE_URL=... -e ORDERS_JWT_SECRET=... orders:latest
#
# No `# syntax=` line and no BuildKit-only instruction: the built-in Dockerfile frontend,
# the legacy builder and podman/buildah all build it without pulling a frontend image.
#
# Two stages: `builder` installs the package and its pinned dependencies
# (constraints.txt) into a virtualenv; `runtime` copies only that virtualenv onto a
# fresh slim base, so no pip cache, build tool or source tree ends up in the image.
# Every runtime dependency ships a manylinux wheel for CPython 3.11, so no compiler
# and no apt packages are needed. Both stages must use the same base image: the
# venv's interpreter is a symlink to the base image's python3 (/usr/local/bin in the
# official image, /usr/bin in a Debian one).
#
# BASE_IMAGE: any Debian-like image with CPython 3.11+ whose `python3 -m venv` works
# (the official slim image; or, where no registry is reachable, the one .ci/image
# makes with mmdebstrap). For fully reproducible builds, pin it by digest as well
# (python:3.11-slim-bookworm@sha256:...) in your registry mirror.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src
# Dependency metadata first, then the code (see .dockerignore for what is left out).
COPY constraints.txt pyproject.toml ./
COPY orders ./orders
# A regular (non-editable) install: the venv is self-contained and the source tree
# is not needed at run time. pip byte-compiles the installed modules, which matters
# because the runtime root filesystem is read-only.
# PIP_CONFIG_FILE: pip settings for this build only, e.g. a CA bundle behind a
# TLS-intercepting proxy (`podman build --volume DIR:/mnt:ro --build-arg
# PIP_CONFIG_FILE=/mnt/pip.conf`, as .ci/image does). Unset, pip uses its defaults.
# The runtime stage declares no such argument: none of it reaches the image.
# pip and setuptools leave the venv afterwards: nothing at run time needs them.
ARG PIP_CONFIG_FILE
RUN pip install --no-cache-dir -c constraints.txt . \
 && pip uninstall --yes pip setuptools


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="orders" \
      org.opencontainers.image.description="Order microservice (FastAPI)"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}" \
    ORDERS_HOST=0.0.0.0 \
    ORDERS_PORT=8000

# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it and the
# manifests can name it (runAsUser: 10001).
RUN groupadd --system --gid 10001 orders \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orders

COPY --from=builder /opt/venv /opt/venv

# Nothing is written here: settings come from the environment (an optional .env in
# this directory is read too). The only writable path needed at run time is /tmp.
WORKDIR /app

USER 10001:10001

EXPOSE 8000

# Liveness only (the process answers); readiness is Kubernetes' /readyz probe.
# Kubernetes ignores HEALTHCHECK; it is for `docker run` and compose. It asks the
# port the server listens on (ORDERS_PORT), not a fixed 8000.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ORDERS_PORT', '8000'), timeout=2)"]

# Exec form: `orders` (uvicorn) is PID 1 and receives SIGTERM directly, with no
# shell in between to swallow it. `orders serve` honours ORDERS_* (host, port,
# workers, shutdown grace). The migration Job overrides this with `orders migrate`.
CMD ["orders", "serve"]
