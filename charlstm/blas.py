"""The thread count of the BLAS the kernels call (SciPy's OpenBLAS, through Numba's np.dot), read
and set while running. OPENBLAS_NUM_THREADS is read only when the library loads; this changes it
later, for the stretches where Numba's own threads should have the cores to themselves.

Where the library or its functions are not found (another SciPy build), every call is a no-op.
"""
import contextlib
import ctypes
import glob
import os

import scipy
import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba calls)

_SET, _GET = "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"


def _find_library():
    folder = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
    for path in sorted(glob.glob(os.path.join(folder, "*openblas*"))):
        try:
            library = ctypes.CDLL(path)  # already loaded: the same handle, no second copy
        except OSError:
            continue
        if hasattr(library, _SET) and hasattr(library, _GET):
            return library
    return None


_library = _find_library()
_AT_LOAD = getattr(_library, _GET)() if _library is not None else None  # OPENBLAS_NUM_THREADS's count


def threads():
    """BLAS's thread count now (None when it cannot be read)."""
    return getattr(_library, _GET)() if _library is not None else None


def set_threads(n):
    """Run BLAS on n threads from now on (at most the count it loaded with)."""
    if _library is not None:
        getattr(_library, _SET)(max(1, min(n, _AT_LOAD)))


@contextlib.contextmanager
def limited_to(n):
    """Run the block with BLAS on at most n threads, then restore the count."""
    before = threads()
    if before is None or before <= n:
        yield
        return
    set_threads(n)
    try:
        yield
    finally:
        set_threads(before)
