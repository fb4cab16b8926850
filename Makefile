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

.PHONY: env demo test test-fast bench lint clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra test --python $(PYTHON) --compile-bytecode
	$(VENV)/bin/python -m compileall -q drp_flows
	touch $@

env: $(VENV)/.synced

# Prefect creates its home folder but not the parents
$(PREFECT_HOME):
	mkdir -p $@

demo: env | $(PREFECT_HOME)
	$(VENV)/bin/drp demo --data data

# The whole suite against real parts: .ci/provision starts a single-node Slurm, PostgreSQL and
# Chromium where this machine can run them (root, Debian) and makes their tests required there
# (DRP_REQUIRE_*=1); a part it cannot run here is skipped, each test named in the summary (-ra).
test: env | $(PREFECT_HOME)
	required=$$(bash .ci/provision) && env $$required $(VENV)/bin/python -m pytest -ra --durations=25

# The inner loop: the unit tests (no campaign, no Prefect server, no Slurm), under 3 minutes.
test-fast: env | $(PREFECT_HOME)
	$(VENV)/bin/python -m pytest -ra -m "not e2e" --durations=10

bench: env | $(PREFECT_HOME)
	$(VENV)/bin/python bench/overhead.py
	$(VENV)/bin/python bench/isr.py
	$(VENV)/bin/python bench/global_calib.py
	$(VENV)/bin/python bench/steps.py
	$(VENV)/bin/python bench/planning.py
	$(VENV)/bin/python bench/scale.py
	$(VENV)/bin/python bench/transfer.py

lint: env
	$(VENV)/bin/ruff check drp_flows tests bench

clean:
	rm -rf data build $(VENV) $(TOOLS)
