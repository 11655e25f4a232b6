"""BLAS runs on one thread whatever the thread count (blas.py: THE THREADING RULE)."""
import pytest

from charlstm.engine import blas, threads


def test_blas_stays_on_one_thread():
    if blas.threads() is None:
        pytest.skip("this SciPy's OpenBLAS exports no thread-count functions")
    for count in (2, 1, 2):
        threads.use(count)
        assert blas.threads() == 1
