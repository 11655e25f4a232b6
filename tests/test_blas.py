"""blas.limited_to: the one-stream training steps run BLAS on one thread and must give it back."""
import pytest

from charlstm import blas


def test_limited_to_sets_and_restores_the_thread_count():
    before = blas.threads()
    if before is None:
        pytest.skip("this SciPy's OpenBLAS exports no thread-count functions")
    with blas.limited_to(1):
        assert blas.threads() == 1
    assert blas.threads() == before


def test_limited_to_restores_after_an_error():
    before = blas.threads()
    with pytest.raises(RuntimeError):
        with blas.limited_to(1):
            raise RuntimeError("inside")
    assert blas.threads() == before
