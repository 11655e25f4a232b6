#!/usr/bin/env bash
# Run the fast part of the test suite on 64-bit ARM Linux (aarch64), under QEMU user-mode emulation.
#
#   bash ci/aarch64.sh [REPO [EXTRA PYTEST ARGS...]]
#
# REPO defaults to the repository this script lives in. Needs root (apt-get, debootstrap, mount,
# chroot) and the package registries (Debian's mirror, PyPI); nothing else is downloaded.
#
# Phases (each prints its elapsed time, and a table of all of them comes at the end):
#   1. host packages: QEMU user-mode emulation, binfmt support and debootstrap, from Debian
#   2. binfmt: let the kernel run aarch64 ELF files through QEMU
#   3. rootfs: an arm64 Debian (the host's own mirror and suite) with python3 + python3-venv
#   4. wheels: the host's pip downloads aarch64 wheels of the project's dependencies + test extra
#   5. venv: installs them offline into a venv of the arm64 Python
#   6. project: a copy of the repo in the root, pip install -e (no deps, no build isolation)
#   7. tests: python -m pytest -q -m "not slow", on a fresh Numba cache
#   8. smoke: tests/test_kernels.py -k float32 compiled for named ARM cores (other vector shapes)
# The script exits with the fast suite's pytest status (or the smoke's, when the suite passed).
#
# Environment:
#   CHARLSTM_ARM64_ROOT     where the arm64 root filesystem lives (default /tmp/charlstm-arm64-root).
#                           A complete one is reused, so a developer's rerun skips debootstrap; CI
#                           starts on a fresh machine and builds it (about 5 minutes).
#   CHARLSTM_ARM64_MIRROR   Debian mirror and suite for debootstrap (default: the host's own, read
#   CHARLSTM_ARM64_SUITE    from /etc/apt/sources.list and /etc/apt/sources.list.d/)
#   CHARLSTM_TEST_SLOWDOWN  passed to the tests, which scale their wall-clock deadlines by it
#                           (default 10: QEMU runs aarch64 code about ten times slower)
#   CHARLSTM_ARM64_CPUS     named cores for the smoke (default "neoverse-v1 apple-m1"; a name this
#                           LLVM does not know is skipped with a note; empty: no smoke)
#   CHARLSTM_ARM64_MODE     "prefix" forces the fallback used where binfmt cannot be registered (to
#                           test it); by default the script registers binfmt and uses a chroot
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "${1:-$HERE/..}" && pwd)
shift $(( $# > 0 ? 1 : 0 ))
EXTRA_PYTEST_ARGS=("$@")
ROOT=${CHARLSTM_ARM64_ROOT:-/tmp/charlstm-arm64-root}
ROOT=${ROOT%/}
export CHARLSTM_TEST_SLOWDOWN=${CHARLSTM_TEST_SLOWDOWN:-10}
CPUS=${CHARLSTM_ARM64_CPUS-neoverse-v1 apple-m1}
HOST_PYTHON=${HOST_PYTHON:-python3}
VENV=/opt/charlstm-venv          # inside the arm64 root
WHEELS=/opt/charlstm-wheels      # inside the arm64 root

[[ $(id -u) == 0 ]] || { echo "ci/aarch64.sh: needs root (apt-get, debootstrap, mount, chroot)" >&2; exit 2; }
[[ -f $REPO/pyproject.toml ]] || { echo "ci/aarch64.sh: $REPO has no pyproject.toml" >&2; exit 2; }
[[ $ROOT == /*/* ]] || { echo "ci/aarch64.sh: CHARLSTM_ARM64_ROOT must be an absolute path below /" >&2; exit 2; }

# Every mount this script makes (proc, sys and dev inside the root, binfmt_misc) goes in a private
# mount namespace: they vanish with the script however it ends, and are never seen by anyone else,
# so an `rm -rf` of the root elsewhere cannot reach through a bind mount into the host's /dev.
# (The binfmt registration itself is kernel-wide and stays, as it should.)
if [[ -z ${_CHARLSTM_ARM64_NS:-} ]] && unshare --mount --propagation private true 2>/dev/null; then
    export _CHARLSTM_ARM64_NS=1
    exec unshare --mount --propagation private -- bash "${BASH_SOURCE[0]}" "$REPO" "${EXTRA_PYTEST_ARGS[@]}"
fi

# ---- phase timing ----------------------------------------------------------------------------
T_START=$(date +%s)
PHASE= PHASE_T0=0
TIMES=()
end_phase() {
    [[ -n $PHASE ]] || return 0
    local dt=$(( $(date +%s) - PHASE_T0 ))
    TIMES+=("$(printf '  %-34s %3dm%02ds' "$PHASE" $((dt / 60)) $((dt % 60)))")
    echo "=== aarch64: $PHASE took ${dt}s"
    PHASE=
}
phase() { end_phase; PHASE=$1; PHASE_T0=$(date +%s); echo; echo "=== aarch64: $PHASE"; }

# Every process started under the root carries this token in its environment (the tests pass
# os.environ on to their subprocesses): what a failed test leaves running (a `train --steps 100000`
# whose test timed out, say) is found by it and killed, rather than eating the CPU of the tests
# after it, or outliving the script.
RUN_TOKEN="$$-$RANDOM$RANDOM"   # not exported: only what in_root starts has it
kill_leftovers() {
    local pid pids=()
    for pid in $(grep -lzx "CHARLSTM_ARM64_RUN=$RUN_TOKEN" /proc/[0-9]*/environ 2>/dev/null \
                 | cut -d/ -f3); do
        pids+=("$pid")
    done
    (( ${#pids[@]} == 0 )) && return 0
    echo "killing ${#pids[@]} process(es) left running under the root: $(for p in "${pids[@]}"; do
        tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-100; echo -n '; '; done)"
    kill -9 "${pids[@]}" 2>/dev/null || true
}

MOUNTS=()   # mount points inside the root, unmounted in reverse order on exit
finish() {
    local rc=$?
    end_phase
    kill_leftovers
    local i
    for (( i = ${#MOUNTS[@]} - 1; i >= 0; i-- )); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
    local dt=$(( $(date +%s) - T_START ))
    echo
    echo "=== aarch64: times"
    printf '%s\n' "${TIMES[@]}"
    printf '  %-34s %3dm%02ds\n' "total" $((dt / 60)) $((dt % 60))
    exit "$rc"
}
trap finish EXIT

# Nothing may be mounted below the root when it is deleted (rm would follow into the mounted tree).
unmount_below_root() {
    local m
    for m in $(findmnt -rn -o TARGET | grep -E "^$ROOT(/|$)" | sort -r); do umount -l "$m"; done
    ! findmnt -rn -o TARGET | grep -qE "^$ROOT(/|$)"
}

# ---- 1. host packages ------------------------------------------------------------------------
phase "host packages (qemu, binfmt, debootstrap)"
# Debian 12 calls the statically linked emulators qemu-user-static; later releases fold them into
# qemu-user (with qemu-user-binfmt). Take whichever this host's apt offers.
if ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null \
        || ! { command -v qemu-aarch64-static || command -v qemu-aarch64; } >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }
    QEMU_PKGS=(qemu-user-static)
    c=$(candidate qemu-user-static)
    if [[ -z $c || $c == "(none)" ]]; then QEMU_PKGS=(qemu-user qemu-user-binfmt); fi
    apt-get install -y -q --no-install-recommends "${QEMU_PKGS[@]}" binfmt-support debootstrap \
        binutils xz-utils zstd >/dev/null   # binutils, xz, zstd: debootstrap's unpacking of .debs
fi
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
"$QEMU" --version | head -1

# ---- 2. binfmt -------------------------------------------------------------------------------
phase "binfmt registration"
# In a container /proc/sys/fs/binfmt_misc is often not mounted, so the package's postinst could not
# register QEMU; mount it and register now (update-binfmts, else the binfmt.d line written by hand).
BINFMT=/proc/sys/fs/binfmt_misc
binfmt_ok() { [[ -f $BINFMT/qemu-aarch64 ]] && head -1 "$BINFMT/qemu-aarch64" | grep -q enabled; }
FORCED=${CHARLSTM_ARM64_MODE:-}
if [[ $FORCED != prefix ]] && ! binfmt_ok; then
    mountpoint -q "$BINFMT" || mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null || true
fi
if [[ $FORCED != prefix ]] && ! binfmt_ok && [[ -w $BINFMT/register ]]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64 2>/dev/null || true
    if ! binfmt_ok && [[ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]]; then
        cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register" 2>/dev/null || true
    fi
fi
if [[ $FORCED != prefix ]] && binfmt_ok; then
    MODE=chroot
    echo "binfmt: $(tr '\n' ' ' < "$BINFMT/qemu-aarch64")"
    # Without the F flag the kernel opens the interpreter inside the chroot: it must be there too.
    grep -q '^flags:.*F' "$BINFMT/qemu-aarch64" || echo "binfmt: no F flag; $QEMU is copied into the root"
else
    # No binfmt (an unprivileged container): no chroot either. QEMU runs the arm64 Python itself,
    # with the root as its library prefix (-L), and the venv's `python` is a host shell script that
    # does the same, so the tests' subprocesses (sys.executable) still start.
    MODE=prefix
    echo "binfmt: cannot register qemu-aarch64 here; running python through $QEMU -L $ROOT"
fi

# ---- 3. arm64 root filesystem ---------------------------------------------------------------
phase "arm64 rootfs (debootstrap)"
MARK=$ROOT/.charlstm-rootfs
# "complete": both debootstrap stages ran (usable by both modes); "unpacked": the first stage and a
# plain unpacking of the .debs, without maintainer scripts (only the prefix mode can use it).
if [[ -f $MARK ]] && { [[ $(cat "$MARK") == complete ]] || [[ $MODE == prefix ]]; }; then
    echo "reusing $ROOT ($(cat "$MARK")); delete it to rebuild"
else
    mirror_and_suite() {  # the host's Debian archive: the entry whose suite is the host's codename
        "$HOST_PYTHON" - <<'EOF'
import glob, re
codename = ""
for line in open("/etc/os-release"):
    if line.startswith("VERSION_CODENAME="):
        codename = line.split("=", 1)[1].strip().strip('"')
entries = []  # (uri, suites)
for path in sorted(glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list")):
    for line in open(path):
        fields = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(fields) >= 3 and fields[0] == "deb":
            entries.append((fields[1], [fields[2]]))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.startswith(("#", " ")):
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("uris"):
            entries.append((fields["uris"][0], fields.get("suites", [])))
for uri, suites in entries:
    if codename in suites:
        print(uri, codename)
        break
else:
    print("http://deb.debian.org/debian", codename or "bookworm")
EOF
    }
    read -r HOST_MIRROR HOST_SUITE < <(mirror_and_suite)
    MIRROR=${CHARLSTM_ARM64_MIRROR:-$HOST_MIRROR}
    SUITE=${CHARLSTM_ARM64_SUITE:-$HOST_SUITE}
    echo "debootstrap: $SUITE from $MIRROR into $ROOT"
    unmount_below_root || { echo "something is still mounted below $ROOT; not deleting it" >&2; exit 2; }
    rm -rf --one-file-system "$ROOT"
    # minbase + python3-venv: the smallest system with a Python that can make a venv (ensurepip
    # installs pip from the wheel Debian ships, offline). --foreign: only unpack here; the second
    # stage runs arm64 binaries (maintainer scripts) and so needs the emulator.
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv \
        "$SUITE" "$ROOT" "$MIRROR" > "$ROOT.debootstrap.log" 2>&1 \
        || { tail -30 "$ROOT.debootstrap.log"; exit 1; }
    if [[ $MODE == chroot ]]; then
        if ldd "$QEMU" >/dev/null 2>&1; then :; else cp "$QEMU" "$ROOT/usr/bin/"; fi  # static: usable inside
        chroot "$ROOT" /debootstrap/debootstrap --second-stage >> "$ROOT.debootstrap.log" 2>&1 \
            || { tail -30 "$ROOT.debootstrap.log"; [[ -f $ROOT/debootstrap/debootstrap.log ]] \
                 && tail -30 "$ROOT/debootstrap/debootstrap.log"; exit 1; }
        echo complete > "$MARK"
    else
        # No emulator for the kernel, so no second stage: unpack every downloaded package's files
        # the way debootstrap's first stage does (keeping /bin -> usr/bin and the like).
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
            dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT"
        done
        echo unpacked > "$MARK"
    fi
    rm -f "$ROOT"/var/cache/apt/archives/*.deb
fi

# How to run a command under the arm64 root, in either mode: in_root ENV... -- CMD ARGS...
# The environment is built from scratch: the host's (OPENBLAS_CORETYPE for an x86 core, say) must
# not reach the arm64 programs; nor its PYTHONDONTWRITEBYTECODE: every test subprocess imports
# NumPy, Numba and SciPy, which costs about 7 CPU seconds under emulation when compiled from source
# each time and under 3 from .pyc files (written on the first import; all under the root).
in_root() {
    local env=(HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 CHARLSTM_ARM64_RUN="$RUN_TOKEN")
    while [[ $1 != -- ]]; do env+=("$1"); shift; done
    shift
    if [[ $MODE == chroot ]]; then
        chroot "$ROOT" /usr/bin/env -i "${env[@]}" PATH=$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
    else
        # Paths stay the host's (QEMU looks an absolute path up below -L first, else on the host).
        env -i "${env[@]}" PATH="$ROOT$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" QEMU_LD_PREFIX="$ROOT" "$@"
    fi
}
if [[ $MODE == chroot ]]; then
    # What Python, Numba and the tests need from the kernel: /proc (QEMU itself reads
    # /proc/self/maps), /sys, /dev with /dev/shm (multiprocessing's semaphores).
    mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
    mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
    mount -t sysfs sysfs "$ROOT/sys" && MOUNTS+=("$ROOT/sys")
    mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev" && MOUNTS+=("$ROOT/dev")
    in_root -- /bin/true || { echo "binfmt is registered but $ROOT/bin/true does not run" >&2; exit 1; }
    PY=(python3)
else
    PY=("$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3")
fi
PYVER=$(in_root -- "${PY[@]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
GLIBC=$(in_root -- "${PY[@]}" -c 'import platform; print(platform.libc_ver()[1])')
echo "arm64 root: $(in_root -- "${PY[@]}" -c 'import platform; print(platform.machine(), platform.python_version())'), glibc $GLIBC"
[[ $(printf '%s\n' 3.10 "$PYVER" | sort -V | head -1) == 3.10 ]] \
    || { echo "the arm64 root's Python is $PYVER; charlstm needs >= 3.10" >&2; exit 1; }

# ---- 4. wheels -------------------------------------------------------------------------------
phase "aarch64 wheels (host pip download)"
# The requirements: pyproject's dependencies, its test extra and its build backend (for the
# editable install), less MPI: mpi4py builds from source against an MPI library and mpich's wheel
# is an MPI; the MPI tests skip without them.
mapfile -t REQS < <("$HOST_PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import re, sys, tomllib
pyproject = tomllib.load(open(sys.argv[1], "rb"))
project = pyproject["project"]
seen = set()
for req in (project["dependencies"] + project["optional-dependencies"]["test"]
            + pyproject.get("build-system", {}).get("requires", [])):
    req = req.split(";")[0].strip()          # markers: the arm64 root is Linux, as is the host
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()
    if name not in ("mpi4py", "mpich") and name not in seen:
        seen.add(name)
        print(req)
EOF
)
echo "requirements: ${REQS[*]}"
rm -rf "$ROOT$WHEELS" && mkdir -p "$ROOT$WHEELS"
# Every manylinux tag the root's glibc can load (pip expands only the legacy manylinux2014 tag to
# the older ones by itself, not manylinux_2_N): manylinux_2_N down to 2_17, and manylinux2014.
PLATFORMS=(--platform manylinux2014_aarch64)
for (( n = ${GLIBC#2.}; n >= 17; n-- )); do PLATFORMS+=(--platform "manylinux_2_${n}_aarch64"); done
"$HOST_PYTHON" -m pip download -q --disable-pip-version-check --dest "$ROOT$WHEELS" \
    --only-binary=:all: "${PLATFORMS[@]}" \
    --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" "${REQS[@]}"
printf '%s\n' "${REQS[@]}" > "$ROOT$WHEELS/requirements.txt"
ls "$ROOT$WHEELS" | grep '\.whl$' | sed 's/^/  /'

# ---- 5. venv ---------------------------------------------------------------------------------
phase "arm64 venv (offline pip install)"
VENV_MARK=$ROOT$VENV/.charlstm-wheels
WANT="$MODE $(ls "$ROOT$WHEELS" | sort | tr '\n' ' ')"
if [[ -f $VENV_MARK && $(cat "$VENV_MARK") == "$WANT" ]]; then
    echo "reusing $VENV (same wheels)"
else
    rm -rf "${ROOT:?}$VENV"
    if [[ $MODE == chroot ]]; then
        in_root -- python3 -m venv "$VENV"
        VPY=$VENV/bin/python
    else
        in_root -- "${PY[@]}" -m venv --without-pip "$ROOT$VENV"
        # The venv's python becomes a host script: QEMU with the root as prefix and argv[0] kept,
        # so sys.executable is this script and the tests' subprocesses go through it too.
        rm "$ROOT$VENV/bin/python"
        printf '#!/bin/sh\nexec %s -L %s -0 "$0" %s "$@"\n' "$QEMU" "$ROOT" "$ROOT$VENV/bin/python3" \
            > "$ROOT$VENV/bin/python"
        chmod +x "$ROOT$VENV/bin/python"
        # pip itself, from the wheel Debian ships (ensurepip would start a subprocess of its own)
        pipwhl=$(ls "$ROOT"/usr/share/python-wheels/pip-*.whl | head -1)
        in_root -- "$ROOT$VENV/bin/python" "$pipwhl/pip" install -q --no-index "$pipwhl"
        VPY=$ROOT$VENV/bin/python
        WHEELS_AT=$ROOT$WHEELS
    fi
    # --no-compile: pyc files are written on first import anyway; compiling every module of SciPy
    # and matplotlib up front costs minutes under emulation.
    in_root -- "$VPY" -m pip install -q --disable-pip-version-check --no-index --no-compile \
        --find-links "${WHEELS_AT:-$WHEELS}" -r "${WHEELS_AT:-$WHEELS}/requirements.txt"
    echo "$WANT" > "$VENV_MARK"
fi
if [[ $MODE == chroot ]]; then VPY=$VENV/bin/python; else VPY=$ROOT$VENV/bin/python; fi
in_root -- "$VPY" -c 'import numba, llvmlite.binding as ll, numpy
print("numba", numba.__version__, "numpy", numpy.__version__, "llvm", ".".join(map(str, ll.llvm_version_info)),
      "triple", ll.get_process_triple(), "host cpu", ll.get_host_cpu_name())'

# ---- 6. project ------------------------------------------------------------------------------
phase "project (copy, pip install -e)"
# A copy of the work tree (uncommitted edits included; not .git, caches or build leftovers)
# installed editable, so `charlstm --version` finds its metadata. A copy rather than a bind mount:
# the install writes charlstm.egg-info, and the tests may write where they run; the caller's tree
# stays untouched. The copy is made afresh each run.
rm -rf "${ROOT:?}/src" && mkdir -p "$ROOT/src"
tar -C "$REPO" --exclude=./.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=./build \
    --exclude=.pytest_cache --exclude='./checkpoints/*' -cf - . | tar -C "$ROOT/src" -xf -
if [[ $MODE == chroot ]]; then SRC=/src; else SRC=$ROOT/src; fi
in_root -- "$VPY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation \
    -e "$SRC"
in_root -- /bin/sh -c 'cd /; exec "$0" -m charlstm --version' "$VPY"

TMPROOT=/tmp/charlstm-aarch64      # in the root (chroot mode) or on the host (prefix mode)
rm -rf "${ROOT:?}$TMPROOT" "$TMPROOT"
pytest_in_root() {  # pytest_in_root NAME ENV... -- PYTEST ARGS...: each run on a fresh Numba cache
    local name=$1 env=(); shift
    while [[ $1 != -- ]]; do env+=("$1"); shift; done
    shift
    if [[ $MODE == chroot ]]; then mkdir -p "$ROOT$TMPROOT/$name"; else mkdir -p "$TMPROOT/$name"; fi
    local TIMEFORMAT="pytest $name: %0R s wall, %0U s user + %0S s sys CPU (this process and the tests' subprocesses)"
    time in_root NUMBA_CACHE_DIR="$TMPROOT/$name/numba-cache" TMPDIR="$TMPROOT/$name" \
        CHARLSTM_TEST_SLOWDOWN="$CHARLSTM_TEST_SLOWDOWN" "${env[@]}" -- \
        /bin/sh -c 'cd "$0" && exec "$@"' "$SRC" "$VPY" -m pytest -q -p no:cacheprovider "$@"
    local rc=$?
    kill_leftovers
    return $rc
}

# ---- 7. tests --------------------------------------------------------------------------------
phase "fast suite under emulation"
echo "CHARLSTM_TEST_SLOWDOWN=$CHARLSTM_TEST_SLOWDOWN"
set +e
pytest_in_root suite -- -m "not slow" --durations=25 "${EXTRA_PYTEST_ARGS[@]}"
STATUS=$?
set -e
echo "fast suite: pytest exit status $STATUS"

# ---- 8. smoke on named cores -----------------------------------------------------------------
phase "named-core smoke (test_kernels.py, float32)"
# A fresh cache per core, so every kernel is compiled for it: that is the point (SVE on
# neoverse-v1, the wider feature set of apple-m1), and the cost (the whole file takes about 4 CPU
# minutes a core under emulation); float32 alone, where the vector shapes matter most, halves it.
SMOKE=0
for cpu in $CPUS; do
    # LLVM warns, and carries on with a generic core, when it does not know a name: skip those.
    known=$(in_root -- "$VPY" -c 'import sys, llvmlite.binding as ll
ll.initialize_native_target(); ll.initialize_native_asmprinter()
ll.Target.from_default_triple().create_target_machine(cpu=sys.argv[1])' "$cpu" 2>&1)
    if grep -q "not a recognized processor" <<< "$known"; then echo "$cpu: this LLVM does not know it; skipped"; continue; fi
    echo "--- NUMBA_CPU_NAME=$cpu"
    set +e
    pytest_in_root "smoke-$cpu" NUMBA_CPU_NAME="$cpu" -- tests/test_kernels.py -k float32
    rc=$?
    set -e
    [[ $rc == 0 ]] || SMOKE=$rc
done
end_phase

if [[ $STATUS == 0 && $SMOKE != 0 ]]; then STATUS=$SMOKE; echo "the fast suite passed, the named-core smoke did not"; fi
exit "$STATUS"
