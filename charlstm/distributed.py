"""Data-parallel training over MPI: `mpiexec -n N charlstm train ...` trains what one process would
train on the same B streams, with the work split over N ranks (processes, on one machine or many).

    streams    rank r trains streams [r*b, (r+1)*b) of the B, b = B / N (N must divide B), on its
               own Workspace; the state's h and c are (L, B, H) on every rank, each rank keeping
               its own share current, and rank 0 gathers the others' shares before it saves.
    reduction  a small Iallreduce started before backward sums the ranks' losses and stop
               votes; during backward, one Iallreduce per parameter group sums that group's span
               of the ranks' flat gradient buffers (params' layout), started as soon as backward
               has finished the group (out, then the layers top down), so the sums travel while
               backward computes the layers below; all are waited for after backward (Reduction).
               Each rank's gradient is the mean over its b*T positions, so the sum / N is one
               process's mean over B*T; it is formed before the NaN check, clipping (a global
               norm must see the global gradient) and Adagrad, so every rank applies the same
               update. Params and Adagrad's memory start as rank 0's (broadcast), so all ranks
               hold the same bits at every step; a checksum compared every CHECK_EVERY steps and
               at every save says so.
    agreement  a rank waiting in a collective for a rank that has left hangs, so every branch
               depends only on what all ranks share: the step count, the reduced loss, the
               summed stop votes (the time limit, and each of train.STOP_SIGNALS: mpiexec forwards
               SIGINT and SIGTERM to every rank), and what rank 0 broadcasts (a setup error,
               "best" after validating).
    rank 0     alone validates, samples, prints, writes metrics.jsonl and checkpoints, which hold
               the whole job's state in the one-process format: a run resumes on any N dividing B.
    faults     an exception in any rank after setup ends the whole job with MPI_Abort, as mpiexec
               (hydra) ends it when a rank is killed; the checkpoints are written atomically by
               rank 0, so the last one stays intact, and rank 0 prints the resume command at the
               start (a rank killed by a signal takes rank 0 with it before it can say anything).
"""
import sys
import threading
import time
import traceback
import zlib
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np
from mpi4py import MPI

from charlstm.engine.dropout import fill_masks, fill_weight_masks
from charlstm.errors import UserError
from charlstm.model import layout
from charlstm.optim import scale
from charlstm.engine.threads import team
from charlstm.train import STOP_SIGNALS, Trainer, read_corpus, train_step

CHECK_EVERY = 100  # steps between comparisons of the ranks' parameter checksums
VOTES = ("time limit", *STOP_SIGNALS)  # stop reasons a rank can vote for, first one wins
ABORT_GRACE = 0.5  # seconds for mpiexec to pass on a rank's last words before MPI_Abort ends the job


class RanksDiverged(Exception):
    pass


class Job:
    """This process's place in the MPI job, and the collective steps of starting a run."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.leader = self.rank == 0
        self.launcher = f"mpiexec -n {self.size} "
        self.started = False  # setup done: from here on an error in one rank aborts the job
        self.resume_hint = None
        self.wait_seconds = 0.0  # time inside the reductions' MPI calls (for benchmarks/scaling.py)

    def run(self, train, *args):
        """train(*args, job=self) on this rank: its exit status. Errors before training starts are
        agreed by start() and end every rank as in one process (rank 0 prints the line); any
        exception after that, in any rank, aborts the whole job."""
        try:
            return train(*args, job=self)
        except BaseException as e:
            if not self.started or isinstance(e, SystemExit):
                raise
            self.abort(e)

    def abort(self, error):
        """Say why, in this rank, then end every rank (MPI_Abort)."""
        if isinstance(error, (click.ClickException, RanksDiverged)):
            message = error.format_message() if isinstance(error, click.ClickException) else str(error)
            print(f"Error: rank {self.rank}: {' '.join(message.split())}", file=sys.stderr)
        elif isinstance(error, KeyboardInterrupt):
            print(f"rank {self.rank}: interrupted", file=sys.stderr)
        else:
            traceback.print_exc()
        print(f"rank {self.rank}: ending the job (MPI_Abort)" + (f"; {self.resume_hint}" if self.resume_hint else ""),
              file=sys.stderr, flush=True)
        # mpiexec ends every process at the Abort, and drops what it had not yet passed on from this
        # one's stderr: the lines above were lost in about half the runs on a busy machine.
        time.sleep(ABORT_GRACE)
        self.comm.Abort(1)

    # ------------------------------------------------------------------------------ starting

    def start(self, setup, encoding):
        """setup() on rank 0, which alone owns the run folder (the lock, the metrics log); then its
        model, options and state on every rank, and the corpus loaded by each rank from the same
        path (the first rank of each machine first, so the id cache is written once per machine).
        Returns what setup() returns: other ranks get a FollowerFolder in place of the run folder."""
        shared = None
        if self.leader:
            try:
                model_cfg, cfg, corpus, folder, state = setup()
                self._check_split(cfg.batch_size)
            except BaseException:
                self.comm.bcast(None)  # the others exit quietly; this rank's error is the one line
                raise
            shared = (model_cfg, cfg, str(Path(corpus.path).resolve()), corpus.sha256, str(folder.path), state)
        shared = self.comm.bcast(shared)
        if shared is None:
            raise SystemExit(1)
        model_cfg, cfg, corpus_path, sha256, folder_path, state = shared
        if not self.leader:
            folder = FollowerFolder(folder_path)
            corpus = self._load_corpus(corpus_path, sha256, folder.path.parent / ".corpus-cache", model_cfg.vocab,
                                       encoding)
        else:
            self._load_corpus(None, None, None, None, None)  # its turn in the collective
        self.started = True
        return model_cfg, cfg, corpus, folder, state

    def _check_split(self, batch_size):
        if batch_size % self.size:
            fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
            raise UserError(f"--batch-size {batch_size} does not split evenly over {self.size} MPI ranks: run a "
                            f"number of ranks that divides it ({', '.join(map(str, fits))}) or give a --batch-size "
                            f"that {self.size} divides")

    def _load_corpus(self, path, sha256, cache, vocab, encoding):
        """The corpus on a rank other than 0, which already has it. A failure on any rank is agreed:
        rank 0 reports it in one line, every rank exits."""
        corpus, error = None, None
        for first in (True, False):  # the first rank of each machine writes the id cache, then the rest read it
            if path is not None and (self.node.Get_rank() == 0) == first:
                try:
                    corpus = read_corpus(path, cache, True, vocab=vocab, encoding=encoding)
                    if corpus.sha256 != sha256:
                        raise UserError(f"{path} differs from rank 0's file (sha256); every machine needs the same "
                                        "corpus at the same path")
                except BaseException as e:
                    error = e.format_message() if isinstance(e, click.ClickException) else repr(e)
            self.node.Barrier()
        errors = self.comm.allgather(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message]
        if failed:
            if self.leader:
                raise UserError(f"rank {failed[0][0]}: {failed[0][1]}")
            raise SystemExit(1)
        return corpus

    def trainer(self, model_cfg, cfg, corpus, folder, state, say):
        trainer = RankTrainer(self, model_cfg, cfg, corpus, folder, state, say)
        self.resume_hint = f"resume with: {self.launcher}charlstm train --resume {folder.latest}"
        say(f"MPI: {self.size} ranks, {len(trainer.streams)} streams and {team.size} threads each, "
            f"{self.node.Get_size()} ranks on this machine; if the job dies, {self.resume_hint}")
        return trainer

    def compile_once(self, trainer):
        """The first rank of each machine compiles the step's kernels into Numba's disk cache (one
        step on copies, nothing kept), while the others on the machine wait, then load them. Always,
        not only when the LSTM kernels are missing: ranks compiling any kernel at once (the mask
        fill, say) left a Numba cache that crashed a later process."""
        if self.node.Get_rank() == 0:
            s, cfg, streams = trainer.state, trainer.cfg, trainer.streams
            x, y = trainer.batcher.window(0)
            if cfg.dropout > 0:
                fill_masks(trainer.ws.masks, cfg.dropout, cfg.seed, 0, (streams.start, len(streams), cfg.batch_size))
            if cfg.weight_drop > 0:  # the mask fill's kernel compiles here too
                fill_weight_masks(trainer.ws.weight_masks, cfg.weight_drop, cfg.seed, 0)
            share = slice(streams.start, streams.stop)
            state_copy = {name: a.copy() for name, a in s.optim_state.items()}
            train_step(s.params.copy(), np.zeros_like(s.params), state_copy, trainer.ws, x, y,
                       s.h[:, share].copy(), s.c[:, share].copy(), cfg, 1, cfg.lr)
            scale(np.ones(1, s.params.dtype), 1.0)  # the reduction's kernel
        self.node.Barrier()

    # ------------------------------------------------------------------------------ while training

    def check_identical(self, state):
        """Compare the ranks' params and optimizer state by checksum; rank 0 raises if they differ."""
        digest = zlib.crc32(state.params)
        for name in sorted(state.optim_state):
            digest = zlib.crc32(state.optim_state[name], digest)
        digests = self.comm.allgather(digest)
        if self.leader and len(set(digests)) > 1:
            raise RanksDiverged(f"the ranks' parameters differ at step {state.step} (crc32 by rank: "
                                f"{', '.join(f'{d:08x}' for d in digests)}); this is a bug in charlstm, please report it")

    def gather_state(self, state, streams):
        """Rank 0's h and c (L, B, H) receive every rank's current share of the streams."""
        for a in (state.h, state.c):
            mine = np.ascontiguousarray(a[:, streams.start:streams.stop])  # (L, b, H)
            shares = np.empty((self.size, *mine.shape), a.dtype) if self.leader else None  # (N, L, b, H)
            self.comm.Gather(mine, shares, root=0)
            if self.leader:
                a[:] = shares.transpose(1, 0, 2, 3).reshape(a.shape)  # stream n*b + j is shares[n, :, j]


class FollowerFolder:
    """Rank 0's run folder as the other ranks see it: its paths; they write nothing."""

    def __init__(self, path):
        self.path = Path(path)
        self.latest = self.path / "latest.npz"

    def log(self, record):
        pass

    def close(self):
        pass


def group_spans(config):
    """{group: slice of the flat buffer} for the parameter groups network.backward names to its
    `ready` hook ("l0", ..., "out"): a group's slots are adjacent in the layout, so its span is one
    slice."""
    spans = {}
    for slot in layout(config):
        group = slot.name.split(".")[0]
        spans[group] = slice(spans[group].start if group in spans else slot.offset, slot.offset + slot.size)
    return spans


class Reduction:
    """train_step's `reduce` on one rank: turns its gradients and loss into the job's means.

    The loss and stop votes go out before backward; each parameter group's gradients go out (an
    in-place Iallreduce on the group's span of the flat buffer) as soon as backward has finished
    them, and finish() waits for all. MPICH advances non-blocking collectives only inside MPI
    calls, and backward's kernels make none for tens of milliseconds: testing only at the layer
    boundaries, the sums hardly moved during backward (2x256 over 1 Gbit/s: each step still waited
    26 ms of the 28 the whole sum takes). So while sums are in flight a small thread tests them
    every PROGRESS_PERIOD seconds (backward's kernels hold no GIL), which costs next to nothing;
    MPICH's own progress thread (MPIR_CVAR_ASYNC_PROGRESS) would spin on a core of its own. It
    needs MPI_THREAD_MULTIPLE (mpi4py's default); without it the sums move at the boundaries only.
    With `overlap` off (benchmarks/scaling.py --no-overlap), one Allreduce over the whole buffer
    after backward instead. Either way every rank receives the same sums (the checksums say so);
    the two ways may round them differently."""

    PROGRESS_PERIOD = 0.0005

    def __init__(self, job, config, stop_votes, overlap=True):
        self.job, self.stop_votes, self.overlap = job, stop_votes, overlap
        self.spans = group_spans(config)
        self.votes = np.zeros(1 + len(VOTES))  # the loss, then a vote for each stop reason: this rank's, then summed
        self.grads, self.requests = None, []
        self.lock = threading.Lock()  # guards requests between the caller and the progress thread
        self.in_flight = threading.Event()
        if overlap and MPI.Query_thread() == MPI.THREAD_MULTIPLE:
            threading.Thread(target=self._drive_progress, daemon=True, name="charlstm-mpi-progress").start()

    def _drive_progress(self):
        while True:
            self.in_flight.wait()
            while self.in_flight.is_set():
                with self.lock:
                    MPI.Request.Testall(self.requests)
                time.sleep(self.PROGRESS_PERIOD)

    @contextmanager
    def _waiting(self):
        """Counts the time inside MPI calls into job.wait_seconds (for benchmarks/scaling.py)."""
        start = time.perf_counter()
        yield
        self.job.wait_seconds += time.perf_counter() - start

    def begin(self, grads, loss):
        """Before backward: send this rank's loss and stop votes; grads (P,) is the buffer it fills."""
        self.grads = grads
        self.votes[0] = loss
        self.votes[1:] = self.stop_votes()
        with self._waiting(), self.lock:
            self.requests = [self.job.comm.Iallreduce(MPI.IN_PLACE, self.votes, MPI.SUM)]
        self.in_flight.set()

    def ready(self, group):
        """backward has finished `group`'s gradients: start their sum, and advance the sums in flight."""
        if self.overlap:
            with self._waiting(), self.lock:
                self.requests.append(self.job.comm.Iallreduce(MPI.IN_PLACE, self.grads[self.spans[group]], MPI.SUM))
                MPI.Request.Testall(self.requests)

    def finish(self):
        """After backward: wait for every sum; grads become the job's mean gradient. Returns the job's
        mean loss."""
        self.in_flight.clear()
        with self._waiting(), self.lock:
            if not self.overlap:
                self.job.comm.Allreduce(MPI.IN_PLACE, self.grads, MPI.SUM)
            MPI.Request.Waitall(self.requests)
        scale(self.grads, 1.0 / self.job.size)
        self.grads, self.requests = None, []
        return float(self.votes[0]) / self.job.size

    def agreed_stop(self):
        """The stop reason the last step's summed votes agree on (the first voted for), or None."""
        return next((name for name, n in zip(VOTES, self.votes[1:]) if n), None)


class RankTrainer(Trainer):
    """One rank's Trainer: its share of the streams, the reduction inside each step, and every
    decision (stop, save) taken on what all ranks share."""

    def __init__(self, job, model_cfg, cfg, corpus, folder, state, say):
        b = cfg.batch_size // job.size
        super().__init__(model_cfg, cfg, corpus, folder, state, say, streams=range(job.rank * b, (job.rank + 1) * b))
        self.job = job
        self.reduce = Reduction(job, model_cfg, self.stop_votes)
        self.deadline = None

    def stop_votes(self):
        """This rank's vote for each of VOTES: its clock passed the deadline, a signal arrived."""
        return [self.deadline is not None and time.monotonic() >= self.deadline,
                *(self.stop_requested == name for name in VOTES[1:])]

    def stop_reason(self, total_steps, deadline):
        if total_steps is not None and self.state.step >= total_steps:
            return "done"
        self.deadline = deadline  # read by the next step's vote
        return self.reduce.agreed_stop()

    def step(self):
        loss = super().step()
        if self.state.step % CHECK_EVERY == 0:
            self.job.check_identical(self.state)
        return loss

    def evaluate(self):
        """Rank 0 validates and tells the others whether it was the best so far (a save follows)."""
        if self.job.leader:
            best = super().evaluate()
        else:
            best = False
            self.log_train()  # keeps the metric sums as rank 0 keeps them (its folder writes nothing)
        return self.job.comm.bcast(best, root=0)

    def save(self, best=False):
        self.job.gather_state(self.state, self.streams)
        self.job.check_identical(self.state)
        return super().save(best) if self.job.leader else None

    def has_checkpoint(self):
        return self.job.comm.bcast(super().has_checkpoint() if self.job.leader else None, root=0)
