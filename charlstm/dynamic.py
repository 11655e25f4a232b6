"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"): the
model keeps learning from the text it has just scored.

The text is one stream from zero state, cut into segments of n characters. Each segment is first
scored (its loss counts before the weights have seen it), then backpropagated within the segment,
then the weights move by the paper's RMS rule with a global prior:

    theta <- theta - eta * g / (RMS + eps) + lambda * decrate * (theta_0 - theta)
    decrate = min(RMS / mean(RMS), 1 / lambda)

g (P,) is the gradient of the segment's mean loss, theta_0 the checkpoint's weights, RMS (P,) a
per-parameter gradient scale from training (gradient_scale.py) and mean(RMS) its mean over all P
parameters. With lambda = 0 there is no pull back to theta_0.

A segment is a training step of the engine's one-stream path: network.forward, loss and backward
over a Workspace of B = 1 stream and T = n steps (the team's unit shares, one meeting a step),
with h and c carried from one segment to the next, no dropout, no clipping. The static score is
the same pass without backward and update, so with eta = lambda = 0 both are the same bytes.
With precision "bf16" the Workspaces round the products' operands to bfloat16 (engine/network.py);
the weights, their update and the carried state stay float32.
"""
import json
import math
import time
from dataclasses import dataclass

import numpy as np

from charlstm.engine import network, recurrent
from charlstm.engine.jit import is_cached, kernel
from charlstm.engine.threads import Governor, team, use
from charlstm.errors import UserError
from charlstm.evaluate import Score, feed_text

SHARE = 1 << 15  # parameters per share of the update on the team, at least


class Diverged(Exception):
    """A segment's loss became NaN or infinite (the steps were too large)."""

    def __init__(self, position):
        super().__init__(position)
        self.position = position  # predictions scored before the segment that diverged


class Segments:
    """One stream of ids, fed in any number of pieces, scored in segments of n predictions from
    zero state. With `learn`, each segment is then backpropagated and learn(params, grads) runs
    (it may change params in place: the next segment runs on what it leaves). `precision`: the
    products' operands, as network.Workspace takes it."""

    def __init__(self, params, config, n, learn=None, precision="f32"):
        L, H = config.layers, config.hidden
        self.params, self.config, self.n, self.learn, self.precision = params, config, n, learn, precision
        self.grads = np.zeros_like(params) if learn is not None else None
        self.h, self.c = np.zeros((L, 1, H), config.dtype), np.zeros((L, 1, H), config.dtype)  # carried
        self.workspaces = {}  # T -> network.Workspace: n, and the last segment's length
        self.pending = np.zeros(0, np.int32)  # ids not yet predicted, after the one that predicts the first
        self.total, self.count = 0.0, 0  # nats summed in float64, predictions made
        self.governor = Governor()  # threads per segment, by measurement, as training's steps (threads.py)

    def feed(self, ids):
        """Score every id given all fed before it (the very first is only context), a whole
        segment at a time; a partial segment waits for more ids or finish()."""
        seq = np.concatenate([self.pending, np.asarray(ids, dtype=np.int32)])
        start = 0
        while len(seq) - start > self.n:  # n inputs and the n targets they predict
            self._segment(seq[start:start + self.n + 1])
            start += self.n
        self.pending = seq[start:]

    def finish(self):
        """Score the last, shorter segment (and learn from it: `sample --adapt` samples after it),
        and hand the team back with the threads it had (the governor may have left it on one)."""
        if len(self.pending) > 1:
            self._segment(self.pending)
            self.pending = self.pending[-1:]
        use(self.governor.most)

    def score(self):
        return self.total / self.count if self.count else math.nan

    def _segment(self, ids):
        """ids (T+1,): inputs ids[:-1] and their targets ids[1:], one training step at B = 1."""
        self.governor.run(lambda: self._step(ids))

    def _step(self, ids):
        T = len(ids) - 1
        if T not in self.workspaces:
            self.workspaces[T] = network.Workspace(self.config, 1, T, precision=self.precision)
        ws = self.workspaces[T]
        x, y = ids[:-1].reshape(T, 1), ids[1:].reshape(T, 1)
        network.forward(self.params, ws, x, self.h, self.c)
        loss = network.loss(self.params, ws, y)  # scored before the weights see the segment
        if not math.isfinite(loss):
            raise Diverged(self.count)
        self.total += loss * T
        self.count += T
        if self.learn is not None:
            network.backward(self.params, self.grads, ws, x)
            self.learn(self.params, self.grads)
        self.h[:] = ws.h[:, -1]
        self.c[:] = ws.c[:, -1]


# ---------------------------------------------------------------------------------------- the rule

class Rule:
    """The update after each segment, with its per-parameter rates computed once:
    theta <- theta - step * g + pull * (theta_0 - theta), step = eta / (RMS + eps),
    pull = lambda * decrate = min(lambda * RMS / mean(RMS), 1). Without a pull (lambda = 0) the
    update reads two arrays fewer: it is bound by memory, 3 ms a segment at 2x256."""

    def __init__(self, settings, rms, theta0):
        rms = np.asarray(rms, dtype=np.float64)
        dtype = theta0.dtype
        self.theta0 = theta0
        self.step = (settings.eta / (rms + settings.eps)).astype(dtype)
        self.pull = np.minimum(settings.lam * rms / rms.mean(), 1.0).astype(dtype) if settings.lam > 0 else None

    def __call__(self, params, grads):
        if self.pull is None:
            work = lambda lo, hi, slot: descend(params[lo:hi], grads[lo:hi], self.step[lo:hi])
        else:
            work = lambda lo, hi, slot: descend_and_pull(params[lo:hi], grads[lo:hi], self.step[lo:hi],
                                                         self.theta0[lo:hi], self.pull[lo:hi])
        team.run(work, team.shares(len(params), SHARE))


@kernel
def descend(w, g, step):
    """w -= step * g, in place, all (P,) of one dtype (elementwise: the same values however the
    parameters are cut across threads)."""
    for j in range(w.shape[0]):
        w[j] -= step[j] * g[j]


@kernel
def descend_and_pull(w, g, step, w0, pull):
    """w += pull * (w0 - w) - step * g, in place, as descend."""
    for j in range(w.shape[0]):
        w[j] += pull[j] * (w0[j] - w[j]) - step[j] * g[j]


# ---------------------------------------------------------------------------------------- files

@dataclass
class Result:
    score: Score
    seconds: float


def _run(text, segments, progress, desc, settings):
    start = time.perf_counter()
    try:
        feed_text(text, segments, progress, desc)
    except Diverged as e:
        raise UserError(f"{text.path}: the loss became NaN or infinite after {e.position:,} characters of "
                        f"dynamic evaluation: its steps are too large; try a smaller --eta (now {settings.eta:g})") from None
    return Result(Score(segments.score(), segments.count, text.skipped), time.perf_counter() - start)


def evaluate_dynamic(params, config, text, settings, rms, progress=True, precision="f32"):
    """`text` (evaluate.Text) scored statically and dynamically in segments of settings.segment
    (a config.DynamicConfig), RMS (P,) from gradient_scale, products in `precision`:
    (static Result, dynamic Result). params is only read."""
    static = _run(text, Segments(params, config, settings.segment, precision=precision), progress, "static", settings)
    dynamic = _run(text, Segments(params.copy(), config, settings.segment, Rule(settings, rms, params), precision),
                   progress, "dynamic", settings)
    return static, dynamic


def adapt(params, config, text, settings, rms, progress=True, precision="f32"):
    """The weights after dynamic evaluation of `text` (a copy: params is only read), and the
    Result of that pass (the score while reading), products in `precision`."""
    theta = params.copy()
    result = _run(text, Segments(theta, config, settings.segment, Rule(settings, rms, params), precision), progress,
                  "adapting", settings)
    return theta, result


def run_ids(params, config, ids, settings, rms=None):
    """One pass over ids (N,) held in memory, in segments of settings.segment: static with rms
    None, else dynamic. Returns the Result and the weights after it (a copy; params is only
    read). Raises Diverged if the loss becomes NaN or infinite."""
    theta = params.copy()
    segments = Segments(theta, config, settings.segment, None if rms is None else Rule(settings, rms, params))
    start = time.perf_counter()
    segments.feed(ids)
    segments.finish()
    return Result(Score(segments.score(), segments.count), time.perf_counter() - start), theta


def report_dynamic(static, dynamic, path, settings, source, as_json=False, skipping=False):
    """The static and the dynamic score side by side, with the seconds each pass took: text for
    people, or (as_json) one JSON object for programs."""
    if as_json:
        out = {"chars": dynamic.score.chars,
               **{name: {"nats_per_char": r.score.nats_per_char, "bits_per_char": r.score.bits_per_char,
                         "perplexity": r.score.perplexity, "seconds": r.seconds}
                  for name, r in (("static", static), ("dynamic", dynamic))},
               "segment": settings.segment, "eta": settings.eta, "lambda": settings.lam, "eps": settings.eps,
               "rms": source}
        if skipping:
            out["skipped"] = dynamic.score.skipped
        return json.dumps(out)
    s, d = static.score, dynamic.score
    skipped = f" ({s.skipped:,} skipped: not in the vocabulary)" if s.skipped else ""
    return "\n".join([
        f"{path}: {s.chars:,} characters scored{skipped}",
        f"dynamic evaluation: {settings.describe()}; RMS from {source}",
        f"{'':<12}{'static':>10}{'dynamic':>10}",
        f"{'nats/char':<12}{s.nats_per_char:>10.5f}{d.nats_per_char:>10.5f}",
        f"{'bits/char':<12}{s.bits_per_char:>10.5f}{d.bits_per_char:>10.5f}",
        f"{'perplexity':<12}{s.perplexity:>10.4f}{d.perplexity:>10.4f}",
        f"{'seconds':<12}{static.seconds:>10.1f}{dynamic.seconds:>10.1f}",
    ])


def kernels_cached():
    """Whether the kernels of a dynamic pass are in Numba's disk cache (so no compile is coming)."""
    return is_cached(recurrent.forward_grid, recurrent.backward_grid, descend)
