"""The BLAS the kernels call (SciPy's OpenBLAS, through Numba's np.dot) runs on one thread, always.

THE THREADING RULE (threads.py) gives every thread to charlstm's own team. BLAS runs the batched
products (input terms, logits, weight gradients, the gradient passed down) inside the team's
threads, one share of rows or positions each, on the calling thread. Two reasons, both measured: OpenBLAS's workers spin for about 0.1 s after
each product and took a core from the team (a dWh product followed by the backward loop took 37
ms where the two alone took 24, at H=256, B=32 on 2 cores); and its results depend on its thread
count (the weight gradients at B=50, T=50 differ in the last bits on 1 and 2 threads), so a run
whose thread count the governor changes would not train the same bytes.

OPENBLAS_NUM_THREADS is read only when the library loads; importing this module sets the count to
one after (set_threads(1) at the bottom).
Where the library or its functions are not found (another SciPy build), it does nothing.
"""
import ctypes
import glob
import os

import scipy
import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba calls)

# OpenBLAS's thread-count functions: SciPy 1.13 and later ship it with its symbols prefixed (its
# scipy-openblas build), SciPy 1.11 and 1.12 with plain ones.
_PREFIXES = ("scipy_", "")


def _find_functions():
    """(set, get): the thread-count functions of SciPy's OpenBLAS, or (None, None)."""
    folder = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
    for path in sorted(glob.glob(os.path.join(folder, "*openblas*"))):
        try:
            library = ctypes.CDLL(path)  # already loaded: the same handle, no second copy
        except OSError:
            continue
        for prefix in _PREFIXES:
            set_, get = (getattr(library, f"{prefix}openblas_{verb}_num_threads", None) for verb in ("set", "get"))
            if set_ is not None and get is not None:
                return set_, get
    return None, None


_set, _get = _find_functions()


def threads():
    """BLAS's thread count now (None when it cannot be read)."""
    return _get() if _get is not None else None


def set_threads(n):
    """Run BLAS on n threads from now on (benchmarks measuring BLAS itself; charlstm keeps 1)."""
    if _set is not None:
        _set(max(1, n))


set_threads(1)
