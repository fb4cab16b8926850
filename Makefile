# drp-flows: `make demo` runs a whole three-site campaign on this machine, `make test` the tests.
# Both build the environment from uv.lock first (Python 3.11 and make are all they need).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
export PREFECT_HOME ?= $(CURDIR)/build/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)

.PHONY: env demo test bench lint slurm services chromium clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra test --python $(PYTHON)
	touch $@

env: $(VENV)/.synced

# Prefect creates its home folder but not the parents
$(PREFECT_HOME):
	mkdir -p $@

demo: env | $(PREFECT_HOME)
	$(VENV)/bin/drp demo --data data

# A PostgreSQL server with a drp_test database, for the PostgreSQL registry test.
services:
	@bash .ci/postgres.sh || echo "make test: no PostgreSQL here; the PostgreSQL test will be skipped"

# A real single-node Slurm for the Slurm site test, when this machine allows it (root, Debian).
slurm:
	@bash .ci/slurm.sh || echo "make test: no Slurm here; the Slurm test will be skipped"

# Debian's Chromium and ChromeDriver for the UI test, when this machine allows it (root, Debian).
chromium:
	@bash .ci/chromium.sh || echo "make test: no Chromium here; the UI test will be skipped"

test: env slurm services chromium | $(PREFECT_HOME)
	$(VENV)/bin/python -m pytest -ra

bench: env | $(PREFECT_HOME)
	$(VENV)/bin/python bench/overhead.py
	$(VENV)/bin/python bench/isr.py
	$(VENV)/bin/python bench/global_calib.py
	$(VENV)/bin/python bench/steps.py
	$(VENV)/bin/python bench/transfer.py

lint: env
	$(VENV)/bin/ruff check drp_flows tests bench

clean:
	rm -rf data build $(VENV) $(TOOLS)
