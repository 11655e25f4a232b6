"""The server's engine loop: every active completion advances one character per engine step, all
of them as one batch (sample.Streams, the engine's run_streams), on the engine's threads.

One thread (`Batcher._run`) owns the model's streams and calls the engine; the HTTP side only
submits jobs and reads what they make. Between calls, jobs join (from the queue, up to
`max_streams`) and leave (finished, stopped, or their client gone), so nothing keeps computing for
a client that left for longer than one call. A call runs a few steps at a time, as many as take
about CALL_SECONDS, so joining, leaving and the first characters wait at most that long.

A job replays `charlstm sample` exactly: its prime is fed through the batch (its last character's
step draws the first id), without a prime its first character is drawn uniformly with
rng.integers, and every draw takes the next rng.random() of the job's own generator, in order.
Each stream's arithmetic does not depend on its neighbours (stream_kernels.py), so a seed gives
the same text alone, beside 31 others, or through `charlstm sample`.

A run folder's new checkpoint becomes a new batch: new jobs start on it, jobs already running
finish on the weights they started with (their batch goes when its last job does).
"""
import threading
import time
from collections import deque

import numpy as np

from charlstm.sample import Streams, StopMatcher

CALL_SECONDS = 0.025  # aimed duration of one engine call: the longest a join or a leave waits
MAX_CALL_STEPS = 256
OWN_SHARE = 0.03  # a call's own Python work (planning, handing out) is kept under this share of it
FIRST_DRAWS = 8  # a new job's first call ends this many draws after its prime, so its first
                 # characters come at once; its calls then double (as sample.generate's chunks)
POLL_SECONDS = 1.0  # how often a run folder is checked for a new checkpoint


class Busy(Exception):
    """Every stream and every place in the queue is taken."""


class Job:
    """One completion: its settings and generator, and where its stream stands. Its text goes to
    `outbox` as (job, piece, finish_reason or None), on the engine thread; `reader` is the HTTP
    side's own (where it wants the pieces)."""

    def __init__(self, prime, max_tokens, rng, temperature=1.0, top_k=0, top_p=1.0, stop=(), reader=None):
        self.prime, self.draws_left, self.rng = prime, max_tokens, rng  # prime: text in the model's vocabulary
        self.reader, self.outbox = reader, []
        greedy = temperature == 0
        self.settings = (1.0 if greedy else 1.0 / temperature, top_k, top_p, greedy)
        self.stopper = StopMatcher(stop)
        self.cancelled = False  # set by the HTTP side when the client goes
        self.chars = 0  # characters delivered
        self.count = lambda name, by: None  # the batcher's counters (Batcher.submit sets it)
        self.feed = None  # the ids still to feed before drawing (the prime, or the first drawn char)
        self.steps_left, self.last, self.done_reason = 0, -1, None
        self.call_steps = FIRST_DRAWS  # the most steps this job wants in the next call (then doubled)

    def start(self, streams):
        """Begin (on the engine thread): the prime to feed, or the uniformly drawn first character."""
        self.feed = streams.encode(self.prime)
        if not self.prime and self.draws_left > 0:
            first = int(self.rng.integers(streams.config.vocab_size))
            self.draws_left -= 1
            self.feed = np.array([first])
            if self.emit(streams.decode([first])):
                return  # the first character was a stop string, or all it asked for
        # a step per fed id, then one per further draw (the last drawn id is not fed)
        self.steps_left = len(self.feed) + self.draws_left - 1 if self.draws_left > 0 else 0
        self.call_steps = len(self.feed) + FIRST_DRAWS
        if self.steps_left <= 0:
            self.finish("length")

    def plan(self, n, ids, u):
        """This job's row of a call of n steps: its inputs ids (n,) (-1: the id drawn a step
        before) and the uniforms u (n,) of its draws (-1: none). Returns the steps it takes."""
        k, fed = min(n, self.steps_left), min(n, self.steps_left, len(self.feed))
        ids[:fed] = self.feed[:fed]
        ids[fed:k] = -1
        if fed == 0:
            ids[0] = self.last  # drawn by the call before, not fed yet
        first_draw = max(len(self.feed) - 1, 0)  # the step whose input is the last fed id draws first
        if first_draw < k:
            u[first_draw:k] = self.rng.random(k - first_draw)
        self.feed, self.steps_left = self.feed[fed:], self.steps_left - k
        wanted = self.call_steps - k  # still to go before the draws it waits for
        self.call_steps = wanted if wanted > 0 else 2 * max(k, FIRST_DRAWS)
        return k

    def emit(self, text):
        """Deliver generated text (cut at a stop string); True if that finished the job."""
        piece, stopped = self.stopper.cut(text)
        self.chars += len(piece)
        self.count("chars_generated", len(piece))
        if stopped:
            self.finish("stop", piece)
        elif self.draws_left == 0:
            self.finish("length", piece)
        elif piece:
            self.deliver(piece, None)
        return self.done_reason is not None

    def deliver(self, piece, reason):
        self.outbox.append((self, piece, reason))

    def finish(self, reason, piece=""):
        self.steps_left, self.done_reason = 0, reason
        self.deliver(piece, reason)

    @property
    def done(self):
        return self.done_reason is not None or self.cancelled


class Batch:
    """The jobs on one model's weights: job i's stream is row i of `streams`."""

    def __init__(self, model, precision, capacity):
        self.model = model
        self.streams = Streams(model.params, model.config, precision, capacity)
        self.jobs = []

    def add(self, job):
        row = len(self.jobs)
        self.streams.reset(row)
        self.jobs.append(job)
        job.start(self.streams)

    def drop_done(self):
        """Remove finished and abandoned jobs, moving the last rows into the gaps; returns those
        abandoned by their clients."""
        gone = [job for job in self.jobs if job.cancelled and job.done_reason is None]
        keep = [i for i, job in enumerate(self.jobs) if not job.done]
        for row, i in enumerate(keep):
            if row != i:
                self.streams.move(i, row)
        self.jobs = [self.jobs[i] for i in keep]
        return gone

    def step(self, n):
        """Advance every job up to n steps in one engine call; deliver what they drew."""
        B = len(self.jobs)
        ids, u = np.zeros((B, n), np.int64), np.full((B, n), -1.0)  # steps past a job's end: id 0, no draw
        taken = [job.plan(n, ids[b], u[b]) for b, job in enumerate(self.jobs)]
        inv_temp, top_k, top_p, greedy = (np.array(column) for column in zip(*(job.settings for job in self.jobs)))
        started = time.perf_counter()
        out = self.streams.step(ids, u, inv_temp, top_k, top_p, greedy)
        self.seconds = time.perf_counter() - started  # the engine's part of the call
        for b, job in enumerate(self.jobs):
            drawn = out[b, :taken[b]]
            drawn = drawn[drawn >= 0]
            if len(drawn):
                job.last = int(drawn[-1])
                job.draws_left -= len(drawn)
                job.emit(self.streams.decode(drawn))


class Batcher:
    """The engine thread, its queue and its counters. The HTTP side calls `submit`, and ends a job
    early by setting its `cancelled`."""

    def __init__(self, source, precision="f32", max_streams=32, max_queue=64, counters=None):
        """post(items) hands the HTTP side a list of (job, piece, finish_reason) once per engine
        call (one wake-up of its event loop for all the streams): set it before `start`."""
        self.source, self.precision = source, precision
        self.outbox, self.post = [], lambda items: None
        self.max_streams, self.max_queue = max_streams, max_queue
        self.counters = counters if counters is not None else {}
        self.batches = [Batch(source.model, precision, max_streams)]
        self.waiting = deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.step_seconds = {}  # batch size -> running mean of one engine step's duration
        self.overhead = 1e-4  # running mean of a call's own Python work (planning and handing out)
        self.thread = threading.Thread(target=self._run, name="charlstm-engine", daemon=True)

    # -------------------------------------------------------------- the HTTP side

    @property
    def active(self):
        return sum(len(b.jobs) for b in self.batches)

    def submit(self, job):
        with self.lock:
            if self.active + len(self.waiting) >= self.max_streams + self.max_queue:
                raise Busy()
            job.count, job.outbox = self.count, self.outbox
            self.waiting.append(job)
            self.lock.notify()

    def count(self, name, by=1):
        self.counters[name] = self.counters.get(name, 0) + by

    def start(self):
        self.warm_up()
        self.thread.start()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=5)

    def warm_up(self):
        """One step of one stream, so the kernels are compiled (or loaded) before the first request."""
        streams = self.batches[0].streams
        streams.step(np.zeros((1, 1), np.int64), np.zeros((1, 1)), [1.0], [0], [1.0], [False])
        streams.reset(0)

    # -------------------------------------------------------------- the engine thread

    def _run(self):
        polled = time.monotonic()
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.active:
                    self.lock.wait(timeout=POLL_SECONDS)
                    if self.source.folder is not None and time.monotonic() - polled >= POLL_SECONDS:
                        break
                if self.stopping:
                    return
                self._admit()
            if self.source.folder is not None and time.monotonic() - polled >= POLL_SECONDS:
                polled = time.monotonic()
                self._reload()
            self._step_all()
            if self.outbox:
                self.post(self.outbox[:])
                self.outbox.clear()

    def _admit(self):
        """Jobs from the queue into the newest batch while there are free streams (lock held)."""
        newest = self.batches[-1]
        while self.waiting and self.active < self.max_streams:
            job = self.waiting.popleft()
            if job.cancelled:
                self.count("streams_cancelled")
                continue
            newest.add(job)

    def _reload(self):
        model = self.source.poll()
        if model is not None:
            batch = Batch(model, self.precision, self.max_streams)
            with self.lock:
                self.batches.append(batch)
            self.count("model_reloads")

    def _step_all(self):
        for batch in list(self.batches):
            self.count("streams_cancelled", len(batch.drop_done()))
            if batch.jobs:
                try:
                    # As many steps as take CALL_SECONDS; fewer while a new job waits for its first
                    # characters, but enough that the call's own work stays under OWN_SHARE of it.
                    B = len(batch.jobs)
                    step = self.step_seconds.get(B) or 1e-4 * B  # a guess until measured
                    floor = self.overhead / OWN_SHARE / step
                    wanted = max(min(job.call_steps for job in batch.jobs), floor)
                    n = int(max(1, min(MAX_CALL_STEPS, CALL_SECONDS / step, wanted,
                                       max(job.steps_left for job in batch.jobs))))
                    started = time.perf_counter()
                    batch.step(n)
                    measured = batch.seconds / n
                    self.step_seconds[B] = 0.8 * step + 0.2 * measured if B in self.step_seconds else measured
                    self.overhead = 0.8 * self.overhead + 0.2 * (time.perf_counter() - started - batch.seconds)
                    self.count("engine_steps", n)
                except Exception as e:  # a bug: end these jobs with the error, keep serving the next
                    for job in batch.jobs:
                        job.finish("error", f"engine error: {e!r}")
                self.count("streams_cancelled", len(batch.drop_done()))
        with self.lock:
            self.batches = [b for b in self.batches[:-1] if b.jobs] + self.batches[-1:]
