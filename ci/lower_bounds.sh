#!/usr/bin/env bash
# The fast tests on the oldest releases that pyproject.toml admits, so that its lower bounds stay true.
#
#   bash ci/lower_bounds.sh [EXTRA PYTEST ARGS...]
#
# ci/lowest_pins.py reads the bounds: the oldest Python of requires-python, and each `name>=V` of the
# build system, the dependencies and the extras the tests use, pinned to `name==V`. A fresh venv of
# that Python gets exactly those, wheels only (a bound with no wheel for that Python fails here: raise
# it), then charlstm itself, editable, with no dependencies and the pinned setuptools as its build
# backend. Then the fast tests on a fresh Numba cache (ci/venv_tests.sh); exits with pytest's status.
# Needs PyPI (or pip's cache) and the oldest Python: pythonX.Y on PATH, in pyenv, or $CHARLSTM_PYTHON.
set -euo pipefail
NAME=lower_bounds
source "$(dirname "${BASH_SOURCE[0]}")/venv_tests.sh"

mapfile -t LOWEST < <("$HOST_PYTHON" "$REPO/ci/lowest_pins.py" "$REPO/pyproject.toml" test export plot mpi)
[[ ${#LOWEST[@]} -gt 1 ]] || exit 2  # lowest_pins.py said why
echo "$NAME: Python ${LOWEST[0]}; ${LOWEST[*]:1}"

install_into() {
    # wheel: what setuptools before 70.1 asks for to build (an isolated build would add it itself).
    "$1" -m pip install --quiet --disable-pip-version-check --only-binary :all: "${LOWEST[@]:1}" wheel
    "$1" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$REPO"
}

venv_tests "${LOWEST[0]}" "$@"
