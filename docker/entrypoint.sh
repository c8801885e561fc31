#!/bin/sh
# The image's entrypoint: empty PROMETHEUS_MULTIPROC_DIR (creating it on a fresh /tmp, where the metric
# files of an earlier run must not be merged into this one), then exec the command -- gunicorn by
# default, or e.g. `catalog db upgrade` -- so it runs as PID 1 and receives SIGTERM itself.
set -eu
metrics_dir="${PROMETHEUS_MULTIPROC_DIR:?must name the directory for the workers metric files}"
mkdir -p "${metrics_dir}"
find "${metrics_dir}" -mindepth 1 -delete
exec "$@"
