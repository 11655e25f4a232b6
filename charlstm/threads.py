"""Who owns threads: the engine's Team, and the Governor that decides how many threads run.

THE ENGINE'S THREADS. At B > 1 the recurrent loops (recurrent.py) run on `team`: plain Python
threads, each calling a nogil kernel on a fixed share of the batch's streams for a whole window.
A stream needs nothing from the others, so a share runs start to end with no synchronisation;
the team meets once per kernel call. The window's batched products run on the team too
(packed.py). BLAS runs what is left (the logits and their gradients) on one thread, inside the
caller (blas.py says why).
One stream (B = 1: training, eval, sampling) has no shares to hand out: its per-step sweeps split
Wh's units across Numba's threads (stream_kernels.py, jit.threaded_kernel).

HOW MANY. Two threads splitting work wait for each other where they meet. Alone on the machine,
two threads are faster. Beside another busy process, the thread that loses its core holds the
other up, and on 2 cores the old per-step barriers fell to a quarter of idle speed, where one
thread, which needs no partner, kept about 60% (bench at H=256, Intel Xeon 2.8 GHz: B=1 13.1k ->
3.2k chars/s on two threads, 7.9k on one; B=32 45.5k -> 13.9k, 20.6k on one). Waiting passively
instead of spinning (OMP_WAIT_POLICY) did not help: it cost up to 3x when idle.

So each thread must earn its place by measurement: `Governor` times the work at its current count
and, every PROBE_EVERY seconds (longer where probing would take more than PROBE_SHARE of the time)
or at once when the last few units took twice the usual (another process started), times
PROBE_UNITS units at the other count and keeps the faster.

Results do not depend on the count (a stream's arithmetic is the same whichever share holds it;
the one-stream kernels keep their unit blocks, set by the thread pool's size, whatever runs them;
BLAS always runs on one thread; tests/test_threads.py checks a run switching counts every step against a steady one byte for
byte), so switching keeps runs exact.
"""
import math
import queue
import statistics
import threading
import time
from collections import deque
from contextlib import contextmanager

import numba


PROBE_EVERY = 2.0  # seconds between probes of the other thread count (the first comes sooner),
PROBE_SHARE = 0.05  # or more: at most this share of the time goes to probing (a slower count)
PROBE_UNITS = 8  # units run at the other count per probe; the first is not counted (waking threads)
WARMUP = 5  # units not timed at the start (compiling, caches filling)
SURGE = 2.0  # the last SURGE_UNITS units taking this many times the usual mean trigger a probe at once
SURGE_UNITS = 4
MARGIN = 0.9  # the other count's mean must be this much lower to take over


def use(threads):
    """Run the team and Numba's kernels on `threads` threads from now on (BLAS stays on one)."""
    team.size = max(1, min(threads, team.most))
    numba.set_num_threads(threads)


class Team:
    """The engine's own threads: plain Python threads, each running a nogil kernel on a fixed share
    of the work for a whole window (recurrent.py: a share of the batch's streams; network.py: a
    share of a batched product's rows), so nothing synchronises inside a call and no thread pool
    spins between calls. The calling thread works the first share; `size - 1` helpers, started
    once, work the others.

    Work is always cut into the same shares, as many as there are threads (`most`), whatever
    `size` says; with fewer threads running, a thread works several shares in turn. So every call
    does the very same arithmetic on 1 thread or on all (a product split by positions sums its
    halves in one order), and a run the governor moves between counts trains the same bytes.

    `run(work, shares)` calls work(lo, hi, slot) for each share (lo, hi), slot being the share's
    index, and returns when all are done, raising the first error any raised."""

    def __init__(self, most):
        self.most = most  # the threads there are (the cores Numba was told of)
        self.size = most  # the threads used now (use() and the Governor set it)
        self._inbox = [None]  # one queue per helper thread, started when first needed
        self._done = queue.SimpleQueue()

    def shares(self, n, smallest):
        """Cut 0..n-1 into at most `most` contiguous shares of near-equal size, none smaller than
        `smallest` unless there is only one: [(lo, hi), ...]. Even sizes, not whole kernel calls:
        at B = 50 with 8 rows a call, 25 + 25 beat 32 + 18."""
        count = max(1, min(self.most, n // smallest))
        return [(round(i * n / count), round((i + 1) * n / count)) for i in range(count)]

    def run(self, work, shares):
        threads = max(1, min(self.size, len(shares)))
        for helper in range(1, threads):
            self._start(helper)
            self._inbox[helper].put((work, shares, range(helper, len(shares), threads)))
        error = None
        try:
            for slot in range(0, len(shares), threads):
                work(*shares[slot], slot)
        except BaseException as e:  # still collect the helpers before raising
            error = e
        for _ in range(threads - 1):
            helper_error = self._done.get()
            error = error or helper_error
        if error is not None:
            raise error

    def _start(self, helper):
        while len(self._inbox) <= helper:
            self._inbox.append(queue.SimpleQueue())
            threading.Thread(target=self._serve, args=(len(self._inbox) - 1,), daemon=True,
                             name=f"charlstm-team-{len(self._inbox) - 1}").start()

    def _serve(self, helper):
        inbox = self._inbox[helper]
        while True:
            work, shares, slots = inbox.get()
            try:
                for slot in slots:
                    work(*shares[slot], slot)
                self._done.put(None)
            except BaseException as e:
                self._done.put(e)


team = Team(numba.config.NUMBA_NUM_THREADS)


@contextmanager
def single_threaded_kernels():
    """Run Numba's parallel kernels (validation, samples) on the calling thread only. Measured when
    OpenBLAS still ran threads of its own: they spun on the cores between the trainer's products,
    and fighting them made validation 2.5x slower on 2 cores than one thread was. BLAS now keeps
    to one thread (blas.py), so two may pay again; not yet measured."""
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
