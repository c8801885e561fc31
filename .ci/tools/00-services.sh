#!/usr/bin/env bash
# Redis and PostgreSQL binaries for the tests (the tests start their own servers or use the local ones).
set -euo pipefail
command -v redis-server >/dev/null || apt-get install -y -qq redis-server
command -v curl >/dev/null || apt-get install -y -qq curl
command -v psql >/dev/null || apt-get install -y -qq postgresql
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
