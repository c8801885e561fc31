# catalog — `make run` serves the API locally, `make test` runs the whole suite. Nothing else is needed
# but Python 3.11+: the venv, uv and every dependency come from the hash-pinned locks in requirements/.

PYTHON ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
PORT ?= 8080

export CATALOG_DATABASE_URL ?= sqlite:///var/catalog.db
export CATALOG_API_KEYS_DIR ?= var/api-keys
export PROMETHEUS_MULTIPROC_DIR ?= var/metrics

.PHONY: run test lint typecheck install install-dev install-tools lock bench clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

install: $(UV)
	$(UV) pip sync --quiet --python $(VENV)/bin/python --require-hashes requirements/main.txt
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .

install-dev: $(UV)
	$(UV) pip sync --quiet --python $(VENV)/bin/python --require-hashes requirements/dev.txt
	$(UV) pip install --quiet --python $(VENV)/bin/python --no-deps -e .

run: install
	mkdir -p var
	$(VENV)/bin/catalog dev-keys
	$(VENV)/bin/catalog db upgrade
	$(VENV)/bin/catalog db seed
	rm -rf "$(PROMETHEUS_MULTIPROC_DIR)" && mkdir -p "$(PROMETHEUS_MULTIPROC_DIR)"
	exec $(VENV)/bin/gunicorn --bind 127.0.0.1:$(PORT)

test: install-dev lint typecheck
	$(VENV)/bin/pytest

lint: install-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: install-dev
	$(VENV)/bin/mypy

lock: $(UV)
	$(UV) pip compile --quiet pyproject.toml --universal --python-version 3.11 --generate-hashes -o requirements/main.txt
	$(UV) pip compile --quiet requirements/dev.in --universal --python-version 3.11 --generate-hashes -o requirements/dev.txt

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
