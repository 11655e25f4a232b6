# Sourced by ci/lower_bounds.sh and ci/other_python.sh: the fast tests in a fresh venv of a given
# Python, each phase timed. The caller sets NAME (for messages) and defines install_into VENV_PYTHON.
#
#   venv_tests X.Y [EXTRA PYTEST ARGS...]
#
# runs: find Python X.Y, make a venv in a temporary folder (removed at the end, however it ends),
# install_into it, the fast tests (-m "not slow") from the repository on a fresh NUMBA_CACHE_DIR in
# that folder, then a table of the phases' times. Returns pytest's status.
#
# Python X.Y is $CHARLSTM_PYTHON if set, else pythonX.Y on PATH, else pyenv's newest X.Y.*.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST_PYTHON=${HOST_PYTHON:-python3}  # reads pyproject.toml (tomllib: Python 3.11 or later)

T_START=$SECONDS PHASE= PHASE_T0=$SECONDS TIMES=()
end_phase() {
    [[ -n $PHASE ]] && TIMES+=("$(printf '  %-10s %3dm%02ds' "$PHASE" $(((SECONDS - PHASE_T0) / 60)) $(((SECONDS - PHASE_T0) % 60)))")
    PHASE=
}
phase() { end_phase; PHASE=$1 PHASE_T0=$SECONDS; echo "=== $NAME: $1"; }
times_table() {
    end_phase
    echo "=== $NAME: times"
    printf '%s\n' "${TIMES[@]}"
    printf '  %-10s %3dm%02ds\n' total $(((SECONDS - T_START) / 60)) $(((SECONDS - T_START) % 60))
}

find_python() {
    local version=$1 candidate
    if [[ -n ${CHARLSTM_PYTHON:-} ]]; then
        echo "$CHARLSTM_PYTHON"
        return
    fi
    for candidate in "$(command -v "python$version" || true)" \
                     $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".* 2>/dev/null | sort -V -r); do
        [[ -d $candidate ]] && candidate=$candidate/bin/python
        # (a pyenv shim exists for every version, and says so on stderr when its version is not chosen)
        if [[ -x $candidate ]] && "$candidate" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$version')" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "$NAME: found no Python $version (not on PATH, not in pyenv); set CHARLSTM_PYTHON to one" >&2
    return 1
}

venv_tests() {
    local version=$1 python work status=0
    shift
    phase venv
    python=$(find_python "$version")
    work=$(mktemp -d "${TMPDIR:-/tmp}/charlstm-$NAME.XXXXXX")
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" EXIT
    "$python" -m venv "$work/venv"
    "$work/venv/bin/python" --version

    phase install
    install_into "$work/venv/bin/python"
    "$work/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
        | grep -iE '^(numpy|numba|llvmlite|scipy|click|tqdm|pytest|setuptools|safetensors|matplotlib|mpi4py|mpich) ' \
        | tr -s ' ' | paste -sd ' ' | sed "s/^/$NAME: /"

    phase tests
    # From the repository, so that the tests are this checkout's; charlstm itself comes from the
    # venv (installed by install_into), never from a PYTHONPATH of the caller's. The venv's bin/
    # first on PATH: the MPI tests' mpiexec is the venv's MPICH, the one its mpi4py loads.
    (cd "$REPO" && env -u PYTHONPATH PATH="$work/venv/bin:$PATH" NUMBA_CACHE_DIR="$work/numba-cache" \
        "$work/venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$@") || status=$?

    phase cleanup
    rm -rf "$work"
    times_table
    return "$status"
}
