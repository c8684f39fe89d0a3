# edgefleet: `make demo` and `make test` set up everything they need, then run.
# Setup is idempotent: system packages are installed only when absent, the virtual
# environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefleet-installed

# Debian packages the suite uses: a C compiler TVM links with, the aarch64 cross compiler
# the Raspberry Pi and Jetson profiles name, mosquitto for the MQTT tests, python3-venv
# for the virtual environment.
SYSTEM_PACKAGES := python3-venv gcc g++ gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
	mosquitto mosquitto-clients

.PHONY: setup system-packages test lint demo bench clean

setup: system-packages $(STAMP)

system-packages:
	@.ci/ensure-system-packages $(SYSTEM_PACKAGES)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	@touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/pytest

demo: setup
	$(BIN)/edgefleet demo

bench: setup
	@set -e; found=0; for script in bench/*_bench.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script"; $(BIN)/python "$$script"; \
	done; \
	[ $$found -eq 1 ] || echo "No benchmarks yet: bench/*_bench.py arrive with the compiler, OTA, fleet and agent issues."

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
