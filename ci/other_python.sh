#!/usr/bin/env bash
# The fast tests on a newer Python than the development one, with the newest releases of everything.
#
#   bash ci/other_python.sh [X.Y [EXTRA PYTEST ARGS...]]
#
# X.Y defaults to 3.13. A fresh venv of that Python gets charlstm with its test extra (wheels only:
# a dependency with no wheel for that Python fails here), then the fast tests on a fresh Numba cache
# (ci/venv_tests.sh); exits with pytest's status. Needs PyPI (or pip's cache) and Python X.Y:
# pythonX.Y on PATH, in pyenv, or $CHARLSTM_PYTHON.
set -euo pipefail
VERSION=${1:-3.13}
shift $(( $# > 0 ? 1 : 0 ))
NAME=python$VERSION
source "$(dirname "${BASH_SOURCE[0]}")/venv_tests.sh"

install_into() {
    "$1" -m pip install --quiet --disable-pip-version-check --only-binary :all: -e "$REPO[test]"
}

venv_tests "$VERSION" "$@"
