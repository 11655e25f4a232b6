"""How charlstm compiles its kernels, and the typed math they share.

`kernel` is njit with the package's flags and a disk cache that fails soft (and is written under a
file lock, so processes that start together cannot corrupt it). `tanh`, `sigmoid` and `like` are
typed per dtype: in float32 the nonlinearities are rational approximations that vectorize (libm
calls do not) and `like` keeps scalar constants in float32; float64 keeps the exact functions, for
the gradient checks.

No kernel is parallel (parallel=True): the engine's threads are its own (threads.py). Numba's
parallel kernels were where its cache crashed: a cached kernel calling a parallel one, loaded in a
fresh process, jumped into a thread pool that was never launched (numba#8578), and a parfor's body
cached as optimized a second time rounded differently from the copy the compiling process ran,
so a cold and a warm run trained different bytes. tests/test_jit.py checks that none exists.
"""
import hashlib
import math
import os
import sys
from contextlib import contextmanager

import numpy as np
from numba import njit, types
from numba.core.caching import FunctionCache
from numba.extending import overload

from charlstm.engine import files
from charlstm.engine.target import BF16_PRODUCT, SHAPE

# One place for the fastmath flags. No `nnan`/`ninf`: the trainer must see NaN and inf.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})


def kernel(fn, **options):
    """njit with the package's flags (plus `options`, e.g. parallel=True), cached on disk.

    This is njit(cache=True) with a cache that fails soft: a cache Numba cannot place (no writable
    folder: NUMBA_CACHE_DIR, the package's __pycache__ and ~/.cache all refused), read (garbage or
    foreign files) or write (disk full) means compiling in memory with one warning on stderr,
    never an exception from the import or the first call.
    """
    # error_model="numpy": no zero-division check, which would stop the gate loops vectorizing.
    dispatcher = njit(fastmath=set(FASTMATH), error_model="numpy", nogil=True, **options)(fn)
    global _disk_cache
    if _disk_cache:
        try:
            dispatcher._cache = _SoftCache(dispatcher.py_func)  # what cache=True does, softened
        except Exception as e:  # RuntimeError "cannot cache function ...: no locator available"
            _disk_cache = False
            _cache_warning(f"found no writable folder: {_short(e)}; set NUMBA_CACHE_DIR to one")
    return dispatcher


def _engine_digest():
    """A hash of the engine's sources (charlstm/engine/*.py): what every cached kernel was built from."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


ENGINE_DIGEST = _engine_digest()
_disk_cache = True  # False once Numba found no folder to cache in: then no kernel tries again
_warned = False


class _SoftCache(FunctionCache):
    """Numba's per-function disk cache; any error reading or writing it disables it (for this
    kernel) and the kernel is compiled in memory, as with cache=False."""

    def _index_key(self, sig, codegen):
        # Numba keys an entry on the signature, the target (triple, CPU, features) and the code;
        # the micro-kernel's shape is a Python-level choice it cannot see, and a forced one
        # (CHARLSTM_KERNEL_SHAPE) must never load kernels compiled for another; nor a forced
        # bfloat16 product (CHARLSTM_BF16_PRODUCT) kernels packed for the other. Numba also sees
        # only the kernel's own file, yet caches it with its callees from other files linked in:
        # after an edit of bf16.py, recurrent.backward_grid kept loading the old pack_columns
        # (5x slower) until the cache was cleared. ENGINE_DIGEST, of every engine source, retires
        # every entry when any of them changes.
        return super()._index_key(sig, codegen) + (SHAPE.name, BF16_PRODUCT, ENGINE_DIGEST)

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # e.g. UnpicklingError from a garbage .nbi/.nbc file
            self.disable()
            _cache_warning(f"unreadable files in {self.cache_path}: {_short(e)}; delete them to rebuild the cache")
            return None

    def save_overload(self, sig, data):
        # Numba picks a new entry's data file by reading the index, taking the first free name and
        # writing the index back: two processes compiling different signatures of one kernel at
        # once can both take `.1.nbc`, leaving an index entry pointing at the other's machine code
        # (a crash on the next load, numba#4807). Under the lock the read-modify-write is whole.
        try:
            with _cache_lock(self.cache_path):
                super().save_overload(sig, data)
        except Exception as e:  # e.g. OSError: no space left on device
            self.disable()
            _cache_warning(f"cannot write to {self.cache_path}: {_short(e)}")


@contextmanager
def _cache_lock(folder):
    """An exclusive lock on one file in the cache folder, held while a kernel is saved; it waits
    for another process's save (readers need none: Numba replaces index and data files atomically,
    and under the lock an index entry never changes which signature its data file holds)."""
    os.makedirs(folder, exist_ok=True)
    held = files.lock(os.path.join(folder, "charlstm-cache.lock"), wait=True)
    try:
        yield
    finally:
        held.release()


def _cache_warning(reason):
    """One line on stderr, once per process (above a progress bar, if one is showing)."""
    global _warned
    if not _warned:
        _warned = True
        from tqdm import tqdm
        tqdm.write(f"charlstm: cannot use the Numba cache ({reason}); compiling in memory", file=sys.stderr)


def _short(e):
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- nonlinearities, typed per dtype

def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _is_float32(x):
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(tanh, inline="always", jit_options={"fastmath": set(FASTMATH), "error_model": "numpy"})
def _tanh_impl(x):
    if _is_float32(x):
        def tanh32(x):
            # Eigen's float32 rational approximation (13/6): |error| ~ 1e-7, no libm call.
            clamp = np.float32(7.90531110763549805)
            x = min(max(x, -clamp), clamp)
            x2 = x * x
            p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
            p = x2 * p + np.float32(-8.60467152213735e-11)
            p = x2 * p + np.float32(5.12229709037114e-08)
            p = x2 * p + np.float32(1.48572235717979e-05)
            p = x2 * p + np.float32(6.37261928875436e-04)
            p = x2 * p + np.float32(4.89352455891786e-03)
            q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
            q = x2 * q + np.float32(2.26843463243900e-03)
            q = x2 * q + np.float32(4.89352518554385e-03)
            return x * p / q
        return tanh32
    return lambda x: math.tanh(x)


@overload(sigmoid, inline="always", jit_options={"fastmath": set(FASTMATH), "error_model": "numpy"})
def _sigmoid_impl(x):
    if _is_float32(x):
        def sigmoid32(x):
            half = np.float32(0.5)
            return half + half * tanh(half * x)
        return sigmoid32
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def like(x, value):
    """`value` as a scalar of x's type (a bare float literal would promote float32 math to float64)."""
    return type(x)(value)


@overload(like, inline="always")
def _like_impl(x, value):
    scalar_type = x
    return lambda x, value: scalar_type(value)


def inline_kernel(fn):
    """`kernel` inlined into its callers by Numba (inline="always"), for the callees of entry points
    whose sums must not depend on the cache: Numba runs a callee's own in-process copy, but caches
    the copy linked into the caller and optimized again with it, and under fastmath the two can
    round differently (the one-stream backward did, between a cold and a warm process). Inlined at
    Numba's level there is one copy."""
    return kernel(fn, inline="always")


def is_cached(*dispatchers):
    """Whether Numba's on-disk cache already holds these kernels (so no compile is coming)."""
    try:
        return all(os.path.exists(d._cache._cache_file._index_path) for d in dispatchers)
    except AttributeError:
        return True
