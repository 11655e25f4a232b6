"""How many threads repeated work (training steps, eval windows) runs on, chosen by measurement.

Two threads splitting one step wait for each other at every barrier (Numba's per-step parfors at
B = 1, OpenBLAS's per-step products at B > 1). Alone on the machine, two threads are faster. Beside
another busy process, the thread that loses its core holds the other up at every barrier, and on
2 cores a step fell to a quarter of its idle speed, where one thread, which needs no partner, keeps
about 60% (bench at H=256, Intel Xeon 2.8 GHz: B=1 13.1k -> 3.2k chars/s on two threads, 7.9k on
one; B=32 45.5k -> 13.9k, 20.6k on one). Waiting passively instead of spinning (OMP_WAIT_POLICY,
OpenBLAS's thread timeout) did not help: it cost up to 3x when idle.

So each thread must earn its place by measurement: `Governor` times the work at its current count
and, every PROBE_EVERY seconds (longer where probing would take more than PROBE_SHARE of the time)
or at once when the last few units took twice the usual (another process started), times
PROBE_UNITS units at the other count and keeps the faster.

Results do not depend on the count (the one-stream kernels keep their unit blocks, set by the
thread pool's size, whatever runs them; OpenBLAS splits a product by rows and columns, never along
the summed dimension; tests/test_threads.py checks a run switching counts every step against a
steady one byte for byte), so switching keeps runs exact.
"""
import math
import statistics
import time
from collections import deque
from contextlib import contextmanager

import numba

from charlstm import blas

PROBE_EVERY = 2.0  # seconds between probes of the other thread count (the first comes sooner),
PROBE_SHARE = 0.05  # or more: at most this share of the time goes to probing (a slower count)
PROBE_UNITS = 8  # units run at the other count per probe; the first is not counted (waking threads)
WARMUP = 5  # units not timed at the start (compiling, caches filling)
SURGE = 2.0  # the last SURGE_UNITS units taking this many times the usual mean trigger a probe at once
SURGE_UNITS = 4
MARGIN = 0.9  # the other count's mean must be this much lower to take over


def use(threads):
    """Run Numba's kernels and BLAS on `threads` threads from now on."""
    numba.set_num_threads(threads)
    blas.set_threads(threads)


@contextmanager
def single_threaded_kernels():
    """Run Numba's parallel kernels (validation, samples) on the calling thread only: between the
    trainer's products OpenBLAS's threads spin on the cores, and fighting them made validation
    2.5x slower on 2 cores than one thread is."""
    count = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(count)


class Governor:
    """Runs units of work (callables) on 1 or `most` threads, whichever measures faster."""

    def __init__(self, most=None):
        self.most = most or numba.get_num_threads()
        self.current = self.most
        self.recent = deque(maxlen=16)  # seconds per unit at the current count
        self.units = 0
        self.decided = -math.inf  # time.perf_counter() of the last probe's decision
        self.gap = PROBE_EVERY  # seconds from a decision to the next probe
        self.probing = []  # seconds per unit at the other count, while a probe runs
        use(self.current)

    @property
    def other(self):
        return 1 if self.current == self.most else self.most

    def run(self, work):
        """Call work() on the count the measurements favour; returns what it returns."""
        if self.most == 1:
            return work()
        probing = bool(self.probing) or self._probe_due()
        if probing and not self.probing:
            use(self.other)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.units += 1
        if probing:
            self.probing.append(seconds)
            if len(self.probing) == PROBE_UNITS:
                self._decide(self.probing[1:])
        elif self.units > WARMUP:
            self.recent.append(seconds)
        return result

    def _probe_due(self):
        if len(self.recent) < 2 * SURGE_UNITS:
            return False
        recent = list(self.recent)
        surge = statistics.mean(recent[-SURGE_UNITS:]) > SURGE * statistics.mean(recent[:-SURGE_UNITS])
        return surge or time.perf_counter() - self.decided >= self.gap

    def _decide(self, probe):
        """Keep the other count if its probe beat the current count's recent mean. Means, not
        medians: a thread that loses its core stalls a step now and then for a whole time slice
        (5 ms steps with a 220 ms one among them), and those stalls are the collapse."""
        recent = list(self.recent)
        usual = max(statistics.mean(recent), statistics.mean(recent[-SURGE_UNITS:]))  # after a surge: the surge
        if statistics.mean(probe) < MARGIN * usual:
            self.current = self.other
            self.recent = deque(probe, maxlen=self.recent.maxlen)
        self.gap = max(PROBE_EVERY, sum(self.probing) / PROBE_SHARE)
        self.probing = []
        self.decided = time.perf_counter()
        use(self.current)
