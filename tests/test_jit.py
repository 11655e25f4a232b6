"""The threading rule, checked on the package itself: no kernel is a Numba parallel kernel (the
engine's threads are threads.Team's), and the team's threads meet inside kernels correctly."""
import importlib
import pkgutil
import threading

import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

import charlstm
from charlstm.engine import barrier, jit
from charlstm.engine.threads import Team

from tests.conftest import seconds


def package_objects():
    for info in pkgutil.walk_packages(charlstm.__path__, prefix="charlstm."):
        if info.name.rsplit(".", 1)[-1] in ("__main__", "cli", "distributed", "mpi"):  # mpi4py: an optional extra
            continue
        module = importlib.import_module(info.name)
        yield from ((f"{info.name}.{name}", value) for name, value in vars(module).items())


def test_no_kernel_is_parallel():
    kernels = [(name, v) for name, v in package_objects() if isinstance(v, CPUDispatcher)]
    assert len(kernels) > 20  # the scan sees the package's kernels
    parallel = [name for name, v in kernels if v.targetoptions.get("parallel")]
    assert parallel == [], f"Numba parallel kernels: {parallel}"


@jit.kernel
def _pass_the_baton(log, rounds, rank, threads, sync):
    """Round r: thread r % threads writes r into log[r]; everyone meets; every thread checks that
    log[0..r] are all written. Returns how many entries a thread found missing (0 when the meeting
    orders the writes before the reads)."""
    missing = 0
    for r in range(rounds):
        if r % threads == rank:
            log[r] = r
        if not barrier.meet(sync, r + 1, threads):
            return -1
        for k in range(r + 1):
            if log[k] != k:
                missing += 1
    return missing


@pytest.mark.parametrize("size", [1, 2, 3])
def test_threads_meet_once_a_round(size):
    team = Team(3)
    team.size = size
    log, missing = np.full(2000, -1, np.int64), {}
    team.together(lambda rank, threads, sync: missing.__setitem__(rank, _pass_the_baton(log, 2000, rank, threads, sync)))
    assert missing == {rank: 0 for rank in range(size)}
    assert (log == np.arange(2000)).all()


def test_an_error_in_one_thread_stops_the_others_waiting():
    """A thread that fails before its kernel leaves the others at a meeting no one else will come
    to: they must give up, and the error must reach the caller (not a hang)."""
    team = Team(2)
    log, returned = np.full(10, -1, np.int64), {}

    def work(rank, threads, sync):
        if rank == 1:
            raise ValueError("helper failed")
        returned[rank] = _pass_the_baton(log, 10, rank, threads, sync)

    result = []
    runner = threading.Thread(target=lambda: result.append(pytest.raises(ValueError, team.together, work)))
    runner.start()
    runner.join(timeout=seconds(30))
    assert not runner.is_alive() and result and "helper failed" in str(result[0].value)
    assert returned == {0: -1}  # thread 0 gave up at its first meeting
