"""Who owns threads: the engine's Team, and the Governor that decides how many threads run.

THE THREADING RULE. Every multi-threaded kernel call of the engine runs on `team`: plain Python
threads, each calling a nogil kernel on a fixed share of the work. Nothing else runs threads on
the hot paths: no Numba parallel kernel exists in the package (tests/test_jit.py checks), and
BLAS keeps to one thread inside whichever team thread calls it (blas.py says why).
  - The recurrent loops: `together` runs one kernel call per thread over the cells of the grid
    (grid.py: stream groups x unit groups, at most `most` cells); a cell's threads meet once a
    step inside the kernel on a spin barrier (recurrent.py, barrier.py). Sampling is the same with
    one stream (stream_kernels.py).
  - The window's batched work: `run` cuts it by rows, positions or columns (network.py), or the
    flat buffers by fixed chunks (optim.py); threads take the shares as they come free.
Work is always cut for `most` threads, however many run, so results do not depend on the count:
a run the governor moves between counts trains the same bytes (tests/test_threads.py checks a run
switching every step against a steady one, byte for byte).

HOW MANY. Two threads splitting work wait for each other where they meet. Alone on the machine,
two threads are faster. Beside another busy process, the thread that loses its core holds the
other up: on 2 cores, per-step barriers once fell to a quarter of idle speed, where one thread,
which needs no partner, kept about 60% (bench at H=256, Intel Xeon 2.8 GHz: B=1 13.1k -> 3.2k
chars/s on two threads, 7.9k on one; B=32 45.5k -> 13.9k, 20.6k on one).

So each thread must earn its place by measurement. Work is cut into `most` shares, so with k
threads the busiest works ceil(most/k) of them, and only the counts that lower that number can be
faster: `ladder` (1, 2, 3, 4, 6, 8, 16 of 16). `Governor` starts at the top rung and times the work
at its current count; every PROBE_EVERY seconds (longer where probing would take more than
PROBE_SHARE of the time) it times PROBE_UNITS units at a neighbouring rung, below and above by
turns, and moves there if they ran faster; when the last few units took twice the usual (another
process started) it tries the rung below at once. So beside a process that takes some cores it
walks down rung by rung to the fastest count, and back up when the process leaves.
"""
import itertools
import math
import queue
import statistics
import threading
import time
from collections import deque

import numba
import numpy as np

from charlstm.engine import barrier
from charlstm.engine.barrier import ABORT, SYNC_SIZE

PROBE_EVERY = 2.0  # seconds between probes of a neighbouring thread count (the first comes sooner),
PROBE_SHARE = 0.05  # or more: at most this share of the time goes to probing (a slower count)
PROBE_UNITS = 8  # units run at the probed count per probe; the first is not counted (waking threads)
WARMUP = 5  # units not timed at the start (compiling, caches filling)
SURGE = 2.0  # the last SURGE_UNITS units taking this many times the usual mean trigger a probe at once
SURGE_UNITS = 4
MARGIN = 0.9  # the probed count's mean must be this much lower to take over
# Spins (barrier.wait_for: ~13 us of `pause`, then sched_yield each) a helper waits for its next job
# before it sleeps: a step's team calls come well within this, so a helper sleeps between steps
# only when it is not used (one thread running) or the caller is busy elsewhere.
HELPER_SPINS = 2000


def use(threads):
    """Run the team on `threads` threads from now on (BLAS stays on one)."""
    team.size = max(1, min(threads, team.most))


class Team:
    """The engine's own threads: plain Python threads, each running a nogil kernel on a fixed share
    of the work, so no thread pool spins between calls. The calling thread works the first share;
    `size - 1` helpers, started once, work the others.

    Work is always cut into the same shares, as many as there are threads (`most`), whatever
    `size` says; with fewer threads running, a thread works several shares in turn. So every call
    does the very same arithmetic on 1 thread or on all (a product split by positions sums its
    halves in one order), and a run the governor moves between counts trains the same bytes.

    `run(work, shares)` calls work(lo, hi, slot) for each share (lo, hi), slot being the share's
    index. `together(work, cells)` calls work(rank, threads, sync) once on each of `size` threads
    (at most `cells`) at the same time, for kernels whose threads meet inside (barrier.meet on a
    row of `sync`, (most + 1, SYNC_SIZE)). Both return when all are done, raising the first error
    any raised."""

    def __init__(self, most):
        self.most = most  # the threads there are (the cores Numba was told of)
        self.size = most  # the threads used now (use() and the Governor set it)
        self._inbox = [None]  # one queue per helper thread, started when first needed
        self._posted = [None]  # per helper: jobs posted to it (a doorbell it spins on before sleeping)
        # The meeting counters of a together() call: one per stream group of the recurrent grid
        # (grid.py: at most `most` groups) and one for all, each on lines of its own.
        self._sync = np.zeros((most + 1, SYNC_SIZE), np.int64)

    def shares(self, n, smallest):
        """Cut 0..n-1 into at most `most` contiguous shares of near-equal size, none smaller than
        `smallest` unless there is only one: [(lo, hi), ...]. Even sizes, not whole kernel calls:
        at B = 50 with 8 rows a call, 25 + 25 beat 32 + 18."""
        count = max(1, min(self.most, n // smallest))
        return [(round(i * n / count), round((i + 1) * n / count)) for i in range(count)]

    def run(self, work, shares):
        """Shares are taken in turn as threads come free, not dealt out in advance, and the call
        ends when every share is done, not every helper: a helper that starts late (woken from
        sleep, or on a core another process holds, or behind the others for the GIL) takes fewer
        shares, or none, instead of holding the others up. A share writes only its own outputs,
        so who runs it changes nothing."""
        n = len(shares)
        take = itertools.count().__next__  # atomic under the GIL
        done, errors = np.zeros(16, np.int64), []

        def work_shares(rank):
            slot = take()
            while slot < n:
                try:
                    work(*shares[slot], slot)
                except BaseException as e:  # the caller raises it once every share is done
                    errors.append(e)
                barrier.ring(done)
                slot = take()
        self._post(work_shares, max(1, min(self.size, n)))
        work_shares(0)
        barrier.wait_for(done, n, 0)
        if errors:
            raise errors[0]

    def together(self, work, cells=None):
        if self._sync.shape[0] < self.most + 1:  # `most` was raised (tests simulate bigger machines)
            self._sync = np.zeros((self.most + 1, SYNC_SIZE), np.int64)
        threads, sync = min(self.size, cells or self.size), self._sync  # no thread without a cell
        sync[:] = 0

        finished, errors = np.zeros(16, np.int64), []

        def work_meeting(rank):
            try:
                work(rank, threads, sync)
            except BaseException as e:
                sync[:, ABORT] = 1  # the others stop waiting at their next meeting
                errors.append(e)
            barrier.ring(finished)
        self._post(work_meeting, threads)
        work_meeting(0)
        barrier.wait_for(finished, threads, 0)  # every thread: they all hold the call's sync
        if errors:
            raise errors[0]

    def _post(self, job, threads):
        """Start job(rank) on helpers 1..threads-1 (the caller works rank 0). The caller then waits
        spinning (barrier.wait_for) rather than sleeping: a sleeping caller took 0.5 ms a call to
        wake on this VM, 10 ms a step at the defaults."""
        for helper in range(1, threads):
            self._start(helper)
            self._inbox[helper].put(job)
            barrier.ring(self._posted[helper])

    def _start(self, helper):
        while len(self._inbox) <= helper:
            self._inbox.append(queue.SimpleQueue())
            self._posted.append(np.zeros(16, np.int64))
            threading.Thread(target=self._serve, args=(len(self._inbox) - 1,), daemon=True,
                             name=f"charlstm-team-{len(self._inbox) - 1}").start()

    def _serve(self, helper):
        inbox, posted, taken = self._inbox[helper], self._posted[helper], 0
        while True:
            barrier.wait_for(posted, taken + 1, HELPER_SPINS)  # then sleep in get() if none came
            job = inbox.get()
            taken += 1
            job(helper)  # it catches what its work raises, for the caller


team = Team(numba.config.NUMBA_NUM_THREADS)


def ladder(most):
    """The thread counts worth running when work is cut into `most` shares, smallest first.

    With k threads the busiest works ceil(most / k) shares, and the others wait for it where they
    meet; so a count that does not lower that number is no faster than the smallest count giving
    it, only one more thread to wait for (of 16 shares, 7 threads work 3 each, as 6 do; 9 to 15
    work 2, as 8 do). So the ladder keeps k where ceil(most / k) < ceil(most / (k - 1)), and
    k = 1: most = 16 gives [1, 2, 3, 4, 6, 8, 16]."""
    return [k for k in range(1, most + 1) if k == 1 or -(-most // k) < -(-most // (k - 1))]


class Governor:
    """Runs units of work (callables) on the rung of `ladder(most)` that measures fastest, found by
    walking: from the top, it times a few units at a neighbouring rung now and then, and moves
    there when they ran faster."""

    def __init__(self, most=None):
        self.most = most or team.size
        self.rungs = ladder(self.most)
        self.current = self.most
        self.recent = deque(maxlen=16)  # seconds per unit at the current count
        self.units = 0
        self.decided = -math.inf  # time.perf_counter() of the last probe's decision
        self.gap = PROBE_EVERY  # seconds from a decision to the next probe
        self.trial = None  # the count a probe runs, while one runs
        self.probing = []  # seconds per unit at the trial count, while a probe runs
        self.upward = False  # where both neighbours exist, whether the next periodic probe goes up
        use(self.current)

    def run(self, work):
        """Call work() on the count the measurements favour; returns what it returns."""
        if self.most == 1:
            return work()
        if self.trial is None:
            self.trial = self._trial_due()
            if self.trial is not None:
                use(self.trial)
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        self.units += 1
        if self.trial is not None:
            self.probing.append(seconds)
            if len(self.probing) == PROBE_UNITS:
                self._decide(self.probing[1:])
        elif self.units > WARMUP:
            self.recent.append(seconds)
        return result

    def _trial_due(self):
        """The count to probe now, or None. After a surge (another process started), the rung
        below; else, once the gap has passed, a neighbour: below and above by turns (see _decide),
        whichever exists at the ends of the ladder (so with most = 2, always the other count)."""
        if len(self.recent) < 2 * SURGE_UNITS:
            return None
        surge = self._surged()
        if not surge and time.perf_counter() - self.decided < self.gap:
            return None
        rung = self.rungs.index(self.current)
        below = self.rungs[rung - 1] if rung > 0 else None
        above = self.rungs[rung + 1] if rung + 1 < len(self.rungs) else None
        if below is None or above is None:
            return below or above
        return above if self.upward and not surge else below

    def _surged(self):
        """Whether the last SURGE_UNITS units took SURGE times the usual (another process started)."""
        recent = list(self.recent)
        return statistics.mean(recent[-SURGE_UNITS:]) > SURGE * statistics.mean(recent[:-SURGE_UNITS])

    def _decide(self, probe):
        """Move to the trial count if its probe beat the current count's recent mean. Means, not
        medians: a thread that loses its core stalls a step now and then for a whole time slice
        (5 ms steps with a 220 ms one among them), and those stalls are the collapse. The next
        probe goes the other way after one that stayed, the same way after one that moved (a walk
        down or up takes one probe a rung)."""
        recent = list(self.recent)
        usual = max(statistics.mean(recent), statistics.mean(recent[-SURGE_UNITS:]))  # after a surge: the surge
        moved = statistics.mean(probe) < MARGIN * usual
        self.upward = (self.trial > self.current) == moved
        if moved:
            self.current = self.trial
            self.recent = deque(probe, maxlen=self.recent.maxlen)
        elif self._surged():  # no neighbour escapes it: time this count afresh (the units before
            self.recent.clear()  # say nothing of now, and kept, they would set off a probe every unit)
        self.gap = max(PROBE_EVERY, sum(self.probing) / PROBE_SHARE)
        self.trial, self.probing = None, []
        self.decided = time.perf_counter()
        use(self.current)
