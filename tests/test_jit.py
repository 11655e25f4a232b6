"""jit.py's threading rule, checked on the package itself: every parallel kernel is the parallel
variant of a threaded_kernel (an entry point), and a kernel cannot call a threaded_kernel."""
import importlib
import pkgutil

import numpy as np
import pytest
from numba.core.errors import TypingError
from numba.core.registry import CPUDispatcher

import charlstm
from charlstm import jit, stream_kernels


def package_objects():
    for info in pkgutil.iter_modules(charlstm.__path__):
        if info.name in ("__main__", "cli"):
            continue
        module = importlib.import_module(f"charlstm.{info.name}")
        yield from ((f"{info.name}.{name}", value) for name, value in vars(module).items())


def test_every_parallel_kernel_is_an_entry_point():
    entry_points = {id(v.parallel) for _, v in package_objects() if isinstance(v, jit.threaded_kernel)}
    assert entry_points  # the one-stream kernels are threaded
    parallel = [name for name, v in package_objects()
                if isinstance(v, CPUDispatcher) and v.targetoptions.get("parallel")]
    assert parallel == [], f"parallel kernels outside threaded_kernel: {parallel}"
    assert all(isinstance(v.parallel, CPUDispatcher) and v.parallel.targetoptions.get("parallel")
               for _, v in package_objects() if isinstance(v, jit.threaded_kernel))


def test_a_kernel_cannot_call_a_threaded_kernel():
    def calls_an_entry_point(W, WT):
        stream_kernels.transpose_split(W, WT, 2)

    with pytest.raises(TypingError):
        jit.kernel(calls_an_entry_point)(np.zeros((2, 2)), np.zeros((2, 2)))


def test_both_variants_give_the_same_bits():
    W = np.random.default_rng(0).standard_normal((37, 21))
    out = {blocks: np.zeros((21, 37)) for blocks in (1, 3)}
    for blocks, WT in out.items():
        stream_kernels.transpose_split(W, WT, blocks)
    assert (out[1] == W.T).all() and (out[3] == W.T).all()
