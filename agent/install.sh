#!/bin/sh
# Install the edgefleet agent on a fresh board that has python3 (3.11+) and nothing else:
#
#   sudo sh install.sh [--package SPEC] [options of `edgefleet agent install`]
#
# SPEC is what pip installs into the agent's venv: edgefleet[agent] (the default), a
# version (edgefleet==0.2.0), or a wheel or source folder (./edgefleet.whl); `edgefleet
# agent install` gives it the [agent] extra unless it names extras.
# A throwaway bootstrap venv gets edgefleet without its extras, just enough to run
# `edgefleet agent install`, which does the rest. pip reads PIP_INDEX_URL, PIP_FIND_LINKS,
# PIP_NO_INDEX and the like from the environment in both steps, for offline boards.
set -eu

PYTHON=${PYTHON:-python3}
PACKAGE='edgefleet[agent]'
if [ "${1:-}" = "--package" ]; then
    PACKAGE=${2:?--package needs a value}
    shift 2
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: edgefleet needs Python 3.11 or later; $PYTHON is older or missing." >&2
    echo "Install one (apt install python3.11 python3.11-venv) and run again with PYTHON=python3.11." >&2
    exit 1
fi

BOOTSTRAP=$(mktemp -d "${TMPDIR:-/tmp}/edgefleet-bootstrap.XXXXXX")
trap 'rm -rf "$BOOTSTRAP"' EXIT
trap 'exit 130' INT TERM

if ! "$PYTHON" -m venv "$BOOTSTRAP"; then
    echo "install.sh: '$PYTHON -m venv' failed: install python3-venv (or python3.11-venv)." >&2
    exit 1
fi
echo "install.sh: bootstrapping from ${PACKAGE%%\[*}"
"$BOOTSTRAP/bin/python" -m pip install --quiet "${PACKAGE%%\[*}"
"$BOOTSTRAP/bin/edgefleet" agent install --package "$PACKAGE" "$@"
