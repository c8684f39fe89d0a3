# edgefleet: `make demo` and `make test` set up everything they need, then run.
# Setup is idempotent: system packages are installed only when absent, the virtual
# environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefleet-installed

# Debian packages the suite uses: a C compiler TVM links with, the aarch64 cross compiler
# the Raspberry Pi and Jetson profiles name, mosquitto for the MQTT tests, PostgreSQL for
# the fleet's PostgreSQL tests, systemd (systemd-analyze verify) and shellcheck for the
# agent's install files, python3-venv for the virtual environment, chromium for the
# dashboard's browser tests, and for the emulated arm64 boards (tests/test_board_arm64.py,
# compiler/emulation) qemu's user-mode emulator registered with binfmt_misc and debootstrap
# to build their Debian userland.
SYSTEM_PACKAGES := python3-venv gcc g++ gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
	mosquitto mosquitto-clients postgresql systemd shellcheck chromium \
	qemu-user-static binfmt-support debootstrap

.PHONY: setup system-packages test lint demo bench conformance clean dashboard-assets screenshots \
	cli-reference mutate

setup: system-packages $(STAMP)

system-packages:
	@.ci/ensure-system-packages $(SYSTEM_PACKAGES)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	# onnx2tf converts ONNX sources for LiteRT (compiler/onnx_to_tf.py). Its metadata pins
	# exact, older TensorFlow / ONNX Runtime / numpy releases, which would downgrade the
	# compiler's; it runs on the ones pyproject.toml installs, so it comes without its pins.
	$(BIN)/python -m pip install --quiet --no-deps "onnx2tf==1.29.24" \
		"onnx_graphsurgeon==0.6.1" "sng4onnx==2.0.1" "tf_keras>=2.16,<2.22"
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

# Mutation testing of the safety-critical modules, each with the tests that cover it
# (docs/mutation.md); not part of `make test`. TARGETS="rollout-gate authorisation" runs some.
mutate: setup
	nice -n 5 $(BIN)/python .ci/mutate.py $(TARGETS)

# The public TUF conformance suite against edgefleet's client (`edgefleet ota tuf-client`).
# It is not on PyPI: point TUF_CONFORMANCE at a checkout of
# https://github.com/theupdateframework/tuf-conformance (it needs faketime too).
TUF_CONFORMANCE ?= ../tuf-conformance

conformance: setup
	@test -f $(TUF_CONFORMANCE)/pyproject.toml || { echo "set TUF_CONFORMANCE to a checkout of theupdateframework/tuf-conformance"; exit 1; }
	@.ci/ensure-system-packages faketime
	@test -x $(TUF_CONFORMANCE)/env/bin/pytest || { $(PYTHON) -m venv $(TUF_CONFORMANCE)/env && $(TUF_CONFORMANCE)/env/bin/pip install --quiet -e $(TUF_CONFORMANCE); }
	cd $(TUF_CONFORMANCE) && ./env/bin/pytest tuf_conformance -q -p no:cacheprovider --entrypoint "$(abspath $(BIN))/edgefleet ota tuf-client"

# The dashboard's browser libraries (fleet/dashboard/static/vendor/, committed): exactly the
# versions fleet/dashboard/package-lock.json pins, from the npm registry, copied by vendor.mjs.
dashboard-assets:
	cd fleet/dashboard && npm ci --ignore-scripts --no-audit --no-fund && node vendor.mjs

# The dashboard's screenshots in docs/images/, taken by its browser test.
screenshots: setup
	EDGEFLEET_SCREENSHOTS=docs/images $(BIN)/pytest tests/test_dashboard.py

# docs/cli.md, every command's --help, from the typer app (tests/test_cli_reference.py
# fails when it is stale).
cli-reference: setup
	$(BIN)/python -m edgefleet.cli_reference

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
