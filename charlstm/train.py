"""The training loop: windows -> kernels -> clip -> optimizer, with validation, progress and checkpoints.

Everything a step depends on (params, the optimizer's state, the carried h and c, the step counter
that fixes the data cursor and the lr schedule, the RNG, the metric accumulators) is in every
checkpoint, so a resumed run continues bit for bit where the straight run would have been.
"""
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from charlstm.engine import network
from charlstm.checkpoint import load_checkpoint
from charlstm.config import ModelConfig, check_precision
from charlstm.data import Batcher, file_sha256, load_corpus, split
from charlstm.engine.dropout import fill_masks, fill_weight_masks
from charlstm.errors import UserError
from charlstm.model import init_params, param_count
from charlstm.optim import clip_and_update, new_state, sum_of_squares
from charlstm.runs import RunFolder, check_out, new_run_name
from charlstm.sample import Stream, generate
from charlstm.schedule import dropout_at, lr_at
from charlstm.engine.threads import Governor
from charlstm.validate import validation_loss

EXIT_NONFINITE = 3  # documented in docs/training.md: the loss or gradients became NaN/inf
DEFAULT_TIME_LIMIT = 300.0  # seconds, when none of --steps/--epochs/--time-limit is given
LOG_EVERY = 100  # steps between train-loss lines in metrics.jsonl
EMA = 0.98  # smoothing of the loss shown on the bar
PROGRESS_BYTES = 64 << 20  # corpora this big show a progress bar while they are encoded
PREVIEW_CHARS, PREVIEW_TEMPERATURE = 200, 0.8  # the sample shown at every validation
STOPPING = ("steps", "epochs", "time_limit", "eval_every", "save_every", "keep", "threads")
# Signals that stop a run at the next step boundary, saved, with the resume command printed: Ctrl-C
# everywhere; Ctrl-Break on Windows, taken as Ctrl-C; SIGTERM (kill, a job scheduler) on POSIX.
STOP_SIGNALS = ("SIGINT", "SIGBREAK", "SIGTERM")


class NonFiniteLoss(Exception):
    pass


@dataclass
class State:
    """What a run carries from step to step and stores in its checkpoints."""
    params: np.ndarray
    optim_state: dict  # the optimizer's state arrays by name, each like params (optim.new_state)
    h: np.ndarray  # (L, B, H) carried across windows, zeroed at each epoch start
    c: np.ndarray
    step: int = 0
    chars_seen: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float | None = None
    smoothed_loss: float | None = None
    log_sum: float = 0.0  # train losses since the last metrics line, and how many
    log_count: int = 0
    rng_state: dict | None = None
    elapsed: float = 0.0  # wall-clock seconds of the run before this process (from metrics.jsonl)


def train_step(params, grads, optim_state, ws, x, y, h, c, cfg, t, lr, reduce=None):
    """Forward, backward, clip and an optimizer step (the t-th, 1-based, at rate lr) on one window
    x, y (T, B) from state h, c (L, B, H), which then holds the window's final state. Returns the
    loss; raises NonFiniteLoss, before touching params, if the loss or gradients are NaN or infinite.
    Under MPI, `reduce` (a distributed.Reduction) turns this rank's gradients and loss into the whole
    job's, before they are checked and clipped: reduce.begin(grads, loss) before backward,
    reduce.ready(group) from backward as each parameter group's gradients are final, and
    reduce.finish() after it, which returns the job's loss."""
    network.forward(params, ws, x, h, c)
    loss = network.loss(params, ws, y)
    if reduce is not None:
        reduce.begin(grads, loss)
    network.backward(params, grads, ws, x, ready=None if reduce is None else reduce.ready)
    if reduce is not None:
        loss = reduce.finish()
    sumsq = sum_of_squares(grads)
    if not (math.isfinite(loss) and math.isfinite(sumsq)):
        raise NonFiniteLoss(f"the loss or gradients became {'NaN' if math.isnan(loss + sumsq) else 'infinite'}")
    clip_and_update(params, grads, optim_state, t, lr, cfg, sumsq)
    h[:] = ws.h[:, -1]
    c[:] = ws.c[:, -1]
    return loss


class Trainer:
    """Trains the streams in `streams` (a range: all B of them, or under MPI one rank's share; the
    state's h and c always hold all B). distributed.RankTrainer adds what ranks must agree on."""
    reduce = None  # train_step's hook: under MPI, a distributed.Reduction summing the ranks' gradients and losses

    def __init__(self, model_cfg, train_cfg, corpus, folder, state, say, streams=None):
        self.model_cfg, self.cfg, self.corpus, self.folder, self.state, self.say = (
            model_cfg, train_cfg, corpus, folder, state, say)
        self.streams = streams or range(train_cfg.batch_size)
        n_train, n_val = split(len(corpus.ids), train_cfg.val_frac)
        self.batcher = Batcher(corpus.ids[:n_train], train_cfg.batch_size, train_cfg.seq_length, self.streams)
        self.val_ids = corpus.ids[n_train:]
        self.ws = network.Workspace(model_cfg, len(self.streams), train_cfg.seq_length,
                                    dropout=train_cfg.dropout > 0, weight_drop=train_cfg.weight_drop > 0,
                                    precision=train_cfg.precision)
        self.grads = np.zeros_like(state.params)
        self.rng = np.random.default_rng(train_cfg.seed)
        if state.rng_state:
            self.rng.bit_generator.state = state.rng_state
        self.stop_requested = None
        self.governor = Governor()  # threads per step, by measurement (threads.py)
        self.started = time.monotonic() - state.elapsed  # the run's clock, continued across resumes

    @property
    def windows_per_epoch(self):
        return self.batcher.windows_per_epoch

    @property
    def lr(self):
        """The lr in force: the one the next step uses."""
        return lr_at(self.cfg, self.state.step // self.windows_per_epoch)

    def step(self):
        """One optimizer step on window k = step mod windows_per_epoch (SPEC §2). Returns the loss."""
        s, cfg = self.state, self.cfg
        k = s.step % self.windows_per_epoch
        if k == 0:  # an epoch starts from zero state
            s.h[:] = 0
            s.c[:] = 0
        x, y = self.batcher.window(k)
        share = slice(self.streams.start, self.streams.stop)
        if cfg.dropout > 0:  # this step's masks: a function of (seed, step), so resume needs nothing saved
            fill_masks(self.ws.masks, dropout_at(cfg, s.step, self.windows_per_epoch), cfg.seed, s.step,
                       (self.streams.start, len(self.streams), cfg.batch_size))
        if cfg.weight_drop > 0:  # the same for every rank: the weights are shared
            fill_weight_masks(self.ws.weight_masks, cfg.weight_drop, cfg.seed, s.step)
        loss = self.governor.run(lambda: train_step(s.params, self.grads, s.optim_state, self.ws, x, y, s.h[:, share],
                                                    s.c[:, share], cfg, s.step + 1, self.lr, self.reduce))
        s.step += 1
        s.chars_seen += cfg.batch_size * cfg.seq_length
        s.log_sum += loss
        s.log_count += 1
        s.smoothed_loss = loss if s.smoothed_loss is None else EMA * s.smoothed_loss + (1 - EMA) * loss
        return loss

    def manifest(self):
        s = self.state
        return {
            "model": self.model_cfg.to_dict(),
            "train": self.cfg.to_dict(),
            "step": s.step,
            "epoch": s.step // self.windows_per_epoch,
            "chars_seen": s.chars_seen,
            "cursor": {"window": s.step % self.windows_per_epoch, "windows_per_epoch": self.windows_per_epoch},
            "corpus": {"path": str(Path(self.corpus.path).resolve()), "size": self.corpus.size,
                       "sha256": self.corpus.sha256},
            "rng": self.rng.bit_generator.state,
            "best_val_loss": None if math.isinf(s.best_val_loss) else s.best_val_loss,
            "lr": self.lr,
            "metrics": {"train_loss_smoothed": s.smoothed_loss, "val_loss": s.last_val_loss,
                        "log_sum": s.log_sum, "log_count": s.log_count},
        }

    def save(self, best=False):
        s = self.state
        return self.folder.save(s.step, self.manifest(), (s.params, s.optim_state, s.h, s.c), self.cfg.keep, best)

    def evaluate(self):
        """Validation loss on its own state; True when it is the best so far."""
        s = self.state
        self.log_train()
        loss, chars = validation_loss(s.params, self.model_cfg, self.val_ids)
        if loss is None:
            return False
        s.last_val_loss = loss
        self.log({"val_loss": loss, "val_bpc": loss / math.log(2), "val_chars": chars})
        self.say(f"step {s.step}: val loss {loss:.4f} nats ({loss / math.log(2):.4f} bits/char) on {chars:,} chars")
        self.say(self.preview())
        if loss < s.best_val_loss:
            s.best_val_loss = loss
            return True
        return False

    def preview(self):
        """A short sample, to see what the model has learnt. Drawn from the run's own RNG (saved in
        every checkpoint), so a resumed run shows the same samples as a straight one."""
        text = "".join(generate(Stream(self.state.params, self.model_cfg), self.rng, PREVIEW_CHARS,
                                temperature=PREVIEW_TEMPERATURE))
        return f"--- sample at step {self.state.step} (temperature {PREVIEW_TEMPERATURE}) ---\n{text}\n---"

    def log_train(self):
        s = self.state
        if s.log_count == 0:
            return
        mean = s.log_sum / s.log_count
        self.log({"epoch": s.step / self.windows_per_epoch, "train_loss": mean, "train_bpc": mean / math.log(2)})
        s.log_sum, s.log_count = 0.0, 0

    def log(self, record):
        """One metrics.jsonl line: record, stamped with the step, chars seen, lr in force and the
        run's wall-clock seconds (`charlstm plot` draws against any of the three)."""
        s = self.state
        self.folder.log({**record, "step": s.step, "chars_seen": s.chars_seen, "lr": self.lr,
                         "time": round(time.monotonic() - self.started, 3)})

    def run(self, total_steps, deadline, bar):
        """Train until total_steps, the deadline or a stop request. Returns the reason it stopped
        and the checkpoint that holds the final state. A run that ends (not one stopped by a
        signal) is validated at its last step, so best.npz and the report cover it."""
        s, cfg = self.state, self.cfg
        start, start_chars = time.monotonic(), s.chars_seen
        saved_at, evaluated_at = s.step, None
        while True:
            reason = self.stop_reason(total_steps, deadline)
            if reason:
                break
            self.step()
            if s.step % LOG_EVERY == 0:
                self.log_train()
            best = False
            if cfg.eval_every and s.step % cfg.eval_every == 0:
                best, evaluated_at = self.evaluate(), s.step
            if best or (cfg.save_every and s.step % cfg.save_every == 0):
                self.save(best)
                saved_at = s.step
            bar.update(1)
            bar.set_postfix_str(self.progress(start, start_chars, deadline), refresh=False)
        best = False
        if reason in ("done", "time limit") and evaluated_at != s.step:
            best = self.evaluate()
        if best or saved_at != s.step or not self.has_checkpoint():
            return reason, self.save(best)
        return reason, self.folder.path / f"step-{s.step:08d}.npz"

    def stop_reason(self, total_steps, deadline):
        """Why the run stops before its next step: "done", "time limit", a signal's name, or None."""
        if total_steps is not None and self.state.step >= total_steps:
            return "done"
        if deadline is not None and time.monotonic() >= deadline:
            return "time limit"
        return self.stop_requested

    def has_checkpoint(self):
        return self.folder.latest.exists()

    def progress(self, start, start_chars, deadline):
        """The bar's postfix: epoch, smoothed loss, speed, and time left under --time-limit."""
        s, now = self.state, time.monotonic()
        rate = (s.chars_seen - start_chars) / max(now - start, 1e-9)
        left = f" {max(deadline - now, 0):.0f}s left" if deadline is not None else ""
        return (f"epoch {s.step / self.windows_per_epoch:.2f} loss {s.smoothed_loss:.3f} "
                f"({s.smoothed_loss / math.log(2):.3f} bpc) {rate / 1000:.1f}k chars/s{left}")


# ---------------------------------------------------------------- starting, resuming, reporting

def bundled_corpus():
    return str(Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt")


def _check_fixed(given, options, fixed, source):
    """Options the user gave that contradict what a checkpoint fixes."""
    clashes = [f"--{k.replace('_', '-')} {options[k]} (checkpoint: {fixed[k]})"
               for k in given if k in fixed and options[k] != fixed[k]]
    if clashes:
        raise UserError(f"{', '.join(clashes)}: these are fixed by {source}; drop them")


def read_corpus(path, cache, quiet, **options):
    """load_corpus, with a progress bar for files big enough to take a while to encode."""
    big = Path(path).is_file() and Path(path).stat().st_size >= PROGRESS_BYTES
    return load_corpus(path, cache, progress=big and not quiet, **options)


def resume_run(path, corpus_path, options, given, encoding, quiet):
    """Model, config, corpus, folder and state of the run that `path` checkpointed."""
    ckpt = load_checkpoint(path)
    model_cfg = ckpt.model_config
    fixed = {k: v for k, v in {**model_cfg.to_dict(), **ckpt.train_config.to_dict()}.items() if k not in STOPPING}
    _check_fixed(given, options, fixed, f"the checkpoint {path}")
    cfg = replace(ckpt.train_config, **{k: options[k] for k in STOPPING if k in given})
    recorded = ckpt.manifest["corpus"]
    corpus_path = corpus_path or recorded["path"]
    if not Path(corpus_path).is_file():
        raise UserError(f"the corpus this run was trained on, {corpus_path}, is gone; give its path: "
                        f"charlstm train CORPUS --resume {path}")
    if Path(corpus_path).stat().st_size != recorded["size"] or file_sha256(corpus_path) != recorded["sha256"]:
        raise UserError(f"{corpus_path} is not the corpus this run was trained on (size or sha256 differs); "
                        f"to train on another text start a new run with --init-from {path}")
    folder = RunFolder(Path(path).resolve().parent)
    corpus = read_corpus(corpus_path, folder.path.parent / ".corpus-cache", quiet, vocab=model_cfg.vocab, encoding=encoding)
    m = ckpt.manifest
    metrics = m.get("metrics", {})
    state = State(ckpt.params.copy(), ckpt.optim_state, ckpt.h.copy(), ckpt.c.copy(), m["step"], m["chars_seen"],
                  m["best_val_loss"] if m.get("best_val_loss") is not None else math.inf, metrics.get("val_loss"),
                  metrics.get("train_loss_smoothed"), metrics.get("log_sum", 0.0), metrics.get("log_count", 0), m["rng"])
    state.elapsed = folder.truncate_log(state.step)
    return model_cfg, cfg, corpus, folder, state


def new_run(corpus_path, options, given, cfg, out, run, init_from, encoding, quiet):
    """Model, corpus, folder and state of a fresh run (from scratch, or from init_from's weights)."""
    corpus_path = corpus_path or bundled_corpus()
    out = Path(out)
    check_out(out)
    cache = out / ".corpus-cache"
    if init_from:
        ckpt = load_checkpoint(init_from)
        model_cfg = ckpt.model_config
        _check_fixed(given, options, model_cfg.to_dict(), f"the checkpoint {init_from}")
        check_precision(cfg.precision, model_cfg.dtype)  # the model is the checkpoint's
        corpus = read_corpus(corpus_path, cache, quiet, vocab=model_cfg.vocab, encoding=encoding)
    else:
        corpus = read_corpus(corpus_path, cache, quiet, encoding=encoding)
        model_cfg = ModelConfig(corpus.vocab, options["hidden"], options["layers"], options["peepholes"], options["dtype"])
    if run is None:
        run = new_run_name(out, Path(corpus_path).stem)
    elif any((out / run).glob("*.npz")):
        raise UserError(f"{out / run} already holds checkpoints; continue it with --resume {out / run / 'latest.npz'} "
                        "or choose another --run")
    folder = RunFolder(out / run)
    rng = np.random.default_rng(cfg.seed)
    params = ckpt.params.copy() if init_from else init_params(model_cfg, rng, cfg.init)
    shape = (model_cfg.layers, cfg.batch_size, model_cfg.hidden)
    state = State(params, new_state(cfg.optim, params), np.zeros(shape, model_cfg.dtype), np.zeros(shape, model_cfg.dtype),
                  rng_state=rng.bit_generator.state)
    return model_cfg, corpus, folder, state


def kernels_cached(ws):
    """Whether the kernels training with workspace ws runs are in Numba's disk cache (so no
    compile is coming)."""
    from charlstm.engine import recurrent
    from charlstm.engine.jit import is_cached

    return is_cached(recurrent.forward_grid, recurrent.backward_grid)


def summary(trainer, total_steps, deadline_s):
    m, cfg, c = trainer.model_cfg, trainer.cfg, trainer.corpus
    n_train = trainer.batcher.windows_per_epoch * cfg.batch_size * cfg.seq_length
    yield (f"corpus {c.path}: {len(c.ids):,} chars, vocab {m.vocab_size}; "
           f"{len(c.ids) - len(trainer.val_ids):,} train / {len(trainer.val_ids):,} validation")
    yield (f"model {m.layers}x{m.hidden} LSTM{' with peepholes' if m.peepholes else ''}, "
           f"{param_count(m):,} parameters, {m.dtype}, precision {cfg.precision}")
    yield (f"{cfg.batch_size} streams x {cfg.seq_length} steps = {cfg.batch_size * cfg.seq_length:,} chars per step, "
           f"{trainer.windows_per_epoch:,} steps per epoch ({n_train:,} chars); {cfg.recipe()}, "
           f"clip {cfg.clip} ({cfg.clip_mode})" + (f", dropout {cfg.dropout}" if cfg.dropout > 0 else "")
           + (f" ramped up over {cfg.dropout_warmup:g} epochs" if cfg.dropout > 0 and cfg.dropout_warmup > 0 else "")
           + (f", weight drop {cfg.weight_drop}" if cfg.weight_drop > 0 else ""))
    stops = []
    if total_steps is not None:
        stops.append(f"at step {total_steps:,}")
    if deadline_s is not None:
        stops.append(f"after {deadline_s:g} s" + (" (the default; set --steps, --epochs or --time-limit)"
                                                  if cfg.steps is None and cfg.epochs is None and cfg.time_limit is None else ""))
    yield f"stopping {' or '.join(stops)}; checkpoints in {trainer.folder.path}"


def start_run(corpus_path, options, given, out, run, resume, init_from, quiet, encoding):
    """Model, config, corpus, folder and state of the run to train: resumed, or new."""
    if resume and init_from:
        raise UserError("--resume continues a run and --init-from starts a new one: give only one")
    if resume:
        return resume_run(resume, corpus_path, options, given, encoding, quiet)
    from charlstm.config import TrainConfig
    cfg = TrainConfig.from_dict(options)
    model_cfg, corpus, folder, state = new_run(corpus_path, options, given, cfg, out, run, init_from, encoding, quiet)
    return model_cfg, cfg, corpus, folder, state


def train(corpus_path, options, given, out, run, resume, init_from, quiet, encoding, job=None):
    """The `charlstm train` command's work. `options` holds every option value by name and
    `given` the names the user set explicitly. Under MPI, `job` is the distributed.Job this
    process is a rank of: only its leader (rank 0) writes anything. Returns the exit status."""
    leader = job is None or job.leader
    quiet = quiet or not leader
    say = (lambda msg: None) if quiet else (lambda msg: tqdm.write(msg, file=sys.stdout))
    start = lambda: start_run(corpus_path, options, given, out, run, resume, init_from, quiet, encoding)
    model_cfg, cfg, corpus, folder, state = job.start(start, encoding) if job else start()
    trainer = (job.trainer if job else Trainer)(model_cfg, cfg, corpus, folder, state, say)
    wpe = trainer.windows_per_epoch
    total = cfg.steps if cfg.steps is not None else (math.ceil(cfg.epochs * wpe) if cfg.epochs is not None else None)
    limit = cfg.time_limit if cfg.time_limit is not None else (DEFAULT_TIME_LIMIT if total is None else None)
    for line in summary(trainer, total, limit):
        say(line)
    if resume:
        say(f"resuming from {resume} at step {state.step:,} (epoch {state.step / wpe:.2f})")
    if not kernels_cached(trainer.ws):
        say("compiling kernels (first run only, about a minute)...")
    if job:  # one rank of each machine compiles, if needed, while the others wait to load its cache
        job.compile_once(trainer)

    handled = stop_signals()

    def request_stop(signum, frame):
        trainer.stop_requested = handled[signum]
    previous = {sig: signal.signal(sig, request_stop) for sig in handled}
    deadline = time.monotonic() + limit if limit is not None else None
    bar = tqdm(total=total, initial=state.step, unit="step", disable=quiet, dynamic_ncols=True, file=sys.stderr,
               smoothing=0.1)
    try:
        reason, path = trainer.run(total, deadline, bar)
    except NonFiniteLoss as e:  # under MPI every rank sees the same reduced gradients, so all stop here
        bar.close()
        if leader:  # flush: the exit is next, and click 8.1's CliRunner reads its stderr unflushed
            print(f"Error: {e} at step {state.step + 1}; nothing was saved from that step, the last good checkpoint "
                  f"is {folder.latest if folder.latest.exists() else 'none'}; try a lower --lr (now {cfg.lr}) "
                  f"or --clip (now {cfg.clip})", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        folder.close()
    best = f"; best val loss {state.best_val_loss:.4f} nats" if math.isfinite(state.best_val_loss) else ""
    if reason in STOP_SIGNALS:
        say(f"stopped by {reason} at step {state.step:,}; saved {path}")
        say(f"resume with: {job.launcher if job else ''}charlstm train --resume {folder.latest}")
    else:
        say(f"finished at step {state.step:,} ({reason}){best}; saved {path}")
    return 0


def stop_signals():
    """{signal number: name} of the STOP_SIGNALS this OS defines and delivers to a handler. Windows
    defines SIGTERM but never delivers it (TerminateProcess runs no handler), and SIGBREAK is
    Windows' alone."""
    return {getattr(signal, name): name for name in STOP_SIGNALS
            if hasattr(signal, name) and not (name == "SIGTERM" and sys.platform == "win32")}
