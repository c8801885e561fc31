# catalog: the production image. Two stages:
#   build   - the hash-pinned runtime lock into /opt/venv (--require-hashes), then the project as a wheel
#             (--no-deps), everything byte-compiled; pip runs from a throwaway tools venv, so /opt/venv
#             holds no pip, setuptools or build cache.
#   runtime - the base image + /opt/venv + gunicorn.conf.py, run as 10001:10001 with a read-only root
#             filesystem (writes only to /tmp and PROMETHEUS_MULTIPROC_DIR=/tmp/metrics).
# Build:  podman build -t catalog:dev --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# Run:    podman run --read-only --tmpfs /tmp -p 8080:8080 \
#           -v ./api-keys:/var/run/secrets/catalog/api-keys:ro catalog:dev
# Migrate (init container): the same image with the arguments `catalog db upgrade`.

# Any Debian-based image with python3 (3.11+) and python3 -m venv; the tests build a local one.
# checkov:skip=CKV_DOCKER_7:the base image is this ARG, pinned to a version tag; checkov cannot resolve ARGs
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

# The build backend (pyproject's build-system) is not in the runtime lock: pinned here by hash.
ARG SETUPTOOLS_REQUIREMENT="setuptools==84.2.1 --hash=sha256:ca140b45d5325a9478f880e351484f62fef15f336462e449ca0c03c873d589c2"

# Optional: a package index (mirror) for this build stage only; unset = PyPI. Never in the runtime stage.
ARG PIP_INDEX_URL

# No pip cache in any layer (nothing to clean up, nothing to leak into the runtime stage).
ENV PIP_NO_CACHE_DIR=1
# No call home for a newer pip, no interactive prompt in a build.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

WORKDIR /src

# 1. The runtime lock alone (its own layer: rebuilt only when the lock changes). pip runs from a
#    throwaway venv (/opt/build-tools) against /opt/venv, which is created without pip.
COPY requirements/main.txt requirements/main.txt
RUN python3 -m venv /opt/build-tools \
 && python3 -m venv --without-pip /opt/venv \
 && /opt/build-tools/bin/python -m pip --python /opt/venv/bin/python install \
      --require-hashes --no-deps --only-binary :all: -r requirements/main.txt

# 2. The project as a wheel (no dependency resolution: the lock above is the whole environment).
COPY pyproject.toml README.md ./
COPY src/ src/
RUN printf '%s\n' "${SETUPTOOLS_REQUIREMENT}" > /tmp/build-requirements.txt \
 && /opt/build-tools/bin/python -m pip install \
      --require-hashes --no-deps --only-binary :all: -r /tmp/build-requirements.txt \
 && /opt/build-tools/bin/python -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/build-tools/bin/python -m pip --python /opt/venv/bin/python install --no-deps /tmp/wheels/*.whl \
 && /opt/venv/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

FROM ${BASE_IMAGE} AS runtime

# The service account (fixed IDs, so Kubernetes runAsUser/fsGroup 10001 match the files); no pip,
# setuptools or wheel left from the base image (the app's venv has none either); the interpreter's
# standard library byte-compiled (official python images ship it without .pyc files, and a read-only
# root filesystem could not cache them; a file that does not compile only stays uncompiled).
RUN groupadd --system --gid 10001 catalog \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin catalog \
 && if python3 -m pip --version >/dev/null 2>&1; then \
      python3 -m pip uninstall --yes --no-cache-dir pip setuptools wheel >/dev/null 2>&1 || true; \
    fi \
 && { python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
        >/dev/null || true; }

COPY --from=build /opt/venv /opt/venv

# The app's console scripts (gunicorn, catalog) come first on PATH.
ENV PATH="/opt/venv/bin:${PATH}"
# Bytecode is compiled at build time and the root filesystem is read-only: never try to write .pyc.
ENV PYTHONDONTWRITEBYTECODE=1
# JSON log lines reach stdout (and the log collector) at once, not when a buffer fills.
ENV PYTHONUNBUFFERED=1
# Worker metric files of prometheus-client's multiprocess mode: on the /tmp emptyDir, emptied at start.
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
# Default database: an embedded SQLite file in writable /tmp (Kubernetes sets a PostgreSQL URL).
ENV CATALOG_DATABASE_URL=sqlite:////tmp/catalog.db

# gunicorn reads ./gunicorn.conf.py (wsgi_app, bind 0.0.0.0:$PORT, gthread workers, graceful_timeout).
WORKDIR /app
COPY gunicorn.conf.py ./
COPY --chmod=0555 docker/entrypoint.sh /usr/local/bin/catalog-entrypoint

# OCI labels from the build (`--build-arg VERSION=… REVISION=$(git rev-parse HEAD) SOURCE=<repo URL>`);
# late in the file, so a new commit rebuilds only these metadata layers.
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG SOURCE=unknown
# Refuse empty build info. Running this also keys the layer cache of podman/buildah (4.3 at least) on
# the values: they cache LABEL and ENV by their unexpanded text and would keep an earlier build's labels.
RUN test -n "${VERSION}" && test -n "${REVISION}" && test -n "${SOURCE}"
LABEL org.opencontainers.image.title="catalog" \
      org.opencontainers.image.description="Product catalog REST microservice (Flask, gunicorn)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# /version and catalog_app_info name the commit this image was built from.
ENV CATALOG_COMMIT=${REVISION}

USER 10001:10001
EXPOSE 8080

# For plain docker/podman runs (Kubernetes uses its own probes); /livez never checks dependencies.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/livez', timeout=2)"]

# The entrypoint empties (or creates) the metrics directory, then execs the command: gunicorn becomes
# PID 1 and receives SIGTERM itself (stops accepting, drains in-flight requests within graceful_timeout,
# exits 0). Any other command (`catalog db upgrade` in an init container) runs the same way.
ENTRYPOINT ["/usr/local/bin/catalog-entrypoint"]
CMD ["gunicorn"]
