# Gateway image: `docker build -t broadcaster-gateway .`
#
# Two stages. The builder installs the project and its dependencies into a virtualenv
# (/opt/venv), byte-compiled there because the final root filesystem may be read-only.
# The final stage is a plain python:slim with that venv copied in: no compilers, no pip
# cache, no sources, a numeric non-root user (so Kubernetes' runAsNonRoot can verify it).
# Both stages use the same base image, so the venv's interpreter path stays valid.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Every dependency ships manylinux wheels for amd64 and arm64; the compiler is only a
# fallback for other platforms, and it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# .dockerignore lets only these in (see there).
COPY pyproject.toml README.md ./
COPY broadcaster ./broadcaster
COPY gateway ./gateway
COPY producers ./producers
# gateway/static/broadcaster-client.js is a symlink to this file; the wheel gets its content
COPY clients/js/broadcaster-client.js ./clients/js/broadcaster-client.js

# Build the wheel, then install it with its dependencies into the venv (pip compiles
# every module to .pyc while installing).
#
# Behind a TLS-intercepting proxy pip must trust the proxy's CA: pass a PEM bundle holding
# it and the public roots (e.g. the host's whole store) as the build secret `ca-bundle`:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt .
# pip then uses it (PIP_CERT) for this step only. A secret, not a build argument: it is
# mounted for this RUN and never stored in a layer or the image's history. Without the
# secret nothing is mounted and pip uses its own bundled roots.
RUN --mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && pip install /wheels/*.whl \
 && broadcaster-gateway --help > /dev/null


FROM ${PYTHON_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 broadcaster \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin broadcaster

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz): Docker has no readiness notion; orchestrators that route
# traffic use /readyz themselves (see docker-compose.yml and deploy/k8s). No curl in the
# slim image, so Python's urllib does the request; a non-2xx answer raises, exit 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BROADCASTER_PORT', '8000'), timeout=2)"]

# SIGTERM starts the drain (readyz 503, sockets closed 1012 within drain-seconds, exit 0):
# give the container a stop timeout above BROADCASTER_DRAIN_SECONDS (compose:
# stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

CMD ["broadcaster-gateway", "--host", "0.0.0.0"]
