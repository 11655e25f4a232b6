"""The optimizers and gradient clipping over the flat buffers (params, grads and every optimizer
state array share one layout, so each update is one loop over the arrays).

    value clipping (char-rnn, torch-rnn, min-char-rnn): g = clamp(g, -clip, clip), elementwise
    norm clipping (TF/PyTorch examples):                g *= clip / max(||g||, clip), global L2 norm
    Adagrad (min-char-rnn):    mem += g*g;  w -= lr * g / sqrt(mem + eps)
    RMSprop (char-rnn, PyTorch): ms = alpha*ms + (1-alpha)*g*g;  w -= lr * g / (sqrt(ms) + eps)
    Adam (torch-rnn, PyTorch):   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;  at step t = 1, 2, ...
                                 w -= lr/(1-b1^t) * m / (sqrt(v / (1-b2^t)) + eps)

Adagrad's eps defaults to 1e-20 (TrainConfig.adagrad_eps), not min-char-rnn's 1e-8: min-char-rnn's
loss is a sum over its 25 steps, ours is the mean over B*T positions (SPEC §2), so our gradients are
~B*T times smaller and 1e-8 under the root outweighs `mem` for most weights, damping their steps.
Measured at 2x256, B=T=50, lr 0.02, 1200 steps: 2.253 nats with 1e-8, 1.837 with 1e-20 (PyTorch's
Adagrad, which adds 1e-10 outside the root, is the same as 1e-20 inside it).

RMSprop's and Adam's eps stay at PyTorch's, char-rnn's and torch-rnn's 1e-8, outside the root: those
tools average their loss too, so their eps was chosen at our gradients' scale, and 1e-8 outside the
root is 1e-16 inside it, 10^8 times less than the 1e-8 that damped Adagrad. It changes a step only
where the gradient's running RMS is below ~1e-7. RMSprop's alpha defaults to char-rnn's 0.95
(`-decay_rate`), the recipe RMSprop users bring; PyTorch's default is 0.99 (--rmsprop-alpha 0.99).
Adam's form is PyTorch's; torch-rnn's (Torch7 optim.adam) adds eps to sqrt(v) before the bias
correction: the same as PyTorch's with eps / sqrt(1-b2^t) in place of eps (3e-7 at t = 1).

Every update reads and writes float32 (or float64) arrays in place; scalars arrive as Python floats
and are cast with `like`, so float32 math stays float32.
"""
import math

import numpy as np

from charlstm.config import OPTIMIZER_STATE
from charlstm.engine.jit import kernel, like
from charlstm.engine.threads import team

# Entries per share of the loops over the flat buffers below. A fixed cut, not one per thread: the
# team's threads split the clip and the update (serial, they were the largest serial part of a
# step on many cores), and the sum of squares adds the same parts in the same order on any machine.
CHUNK = 1 << 16


def _by_chunks(n, work):
    """work(lo, hi, slot) for entries lo..hi-1 of chunk `slot`, every chunk of 0..n-1, on the team."""
    team.run(work, [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)])


def sum_of_squares(g):
    """sum(g*g) in float64: the squared global norm, and non-finite iff some entry is NaN or inf.
    Summed by chunks, and the chunks' sums in order."""
    parts = [0.0] * -(-g.shape[0] // CHUNK)

    def part(lo, hi, slot):
        parts[slot] = _sum_of_squares(g[lo:hi])
    _by_chunks(g.shape[0], part)
    return sum(parts)


@kernel
def _sum_of_squares(g):
    total = 0.0
    for j in range(g.shape[0]):
        total += np.float64(g[j]) * np.float64(g[j])
    return total


@kernel
def clip_values(g, clip):
    """Clamp every entry of g to [-clip, clip], in place."""
    hi = like(g[0], clip)
    for j in range(g.shape[0]):
        g[j] = min(max(g[j], -hi), hi)


@kernel
def scale(g, factor):
    f = like(g[0], factor)
    for j in range(g.shape[0]):
        g[j] *= f


@kernel
def adagrad_update(w, g, mem, lr, eps):
    """mem += g*g; w -= lr * g / sqrt(mem + eps), in place."""
    lr_, eps_ = like(w[0], lr), like(w[0], eps)
    for j in range(w.shape[0]):
        mem[j] += g[j] * g[j]
        w[j] -= lr_ * g[j] / np.sqrt(mem[j] + eps_)


@kernel
def rmsprop_update(w, g, ms, lr, alpha, eps):
    """ms = alpha*ms + (1-alpha)*g*g; w -= lr * g / (sqrt(ms) + eps), in place."""
    lr_, alpha_, rest, eps_ = like(w[0], lr), like(w[0], alpha), like(w[0], 1.0 - alpha), like(w[0], eps)
    for j in range(w.shape[0]):
        ms[j] = alpha_ * ms[j] + rest * g[j] * g[j]
        w[j] -= lr_ * g[j] / (np.sqrt(ms[j]) + eps_)


@kernel
def adam_update(w, g, m, v, step_size, beta1, beta2, root_bc2, eps):
    """m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; w -= step_size * m / (sqrt(v)/root_bc2 + eps),
    in place. The caller folds in the bias corrections: step_size = lr/(1-b1^t), root_bc2 =
    sqrt(1-b2^t) (as PyTorch does: the same as m_hat / (sqrt(v_hat) + eps))."""
    step_, eps_, root_ = like(w[0], step_size), like(w[0], eps), like(w[0], root_bc2)
    b1, b2, rest1, rest2 = like(w[0], beta1), like(w[0], beta2), like(w[0], 1.0 - beta1), like(w[0], 1.0 - beta2)
    for j in range(w.shape[0]):
        m[j] = b1 * m[j] + rest1 * g[j]
        v[j] = b2 * v[j] + rest2 * g[j] * g[j]
        w[j] -= step_ * m[j] / (np.sqrt(v[j]) / root_ + eps_)


def new_state(name, params):
    """The optimizer's state for a fresh run: {array name: zeros like params}, in checkpoint order."""
    return {key: np.zeros_like(params) for key in OPTIMIZER_STATE[name]}


def update(params, grads, state, t, lr, cfg):
    """One step of optimizer cfg.optim on params, in place: `state` is its new_state dict, `t` the
    1-based number of this step (Adam's bias correction), `lr` the rate in force (schedule.lr_at).
    Elementwise, so cut into chunks across the team it gives the same bytes."""
    _by_chunks(params.shape[0], _updater(params, grads, state, t, lr, cfg))


def clip_and_update(params, grads, state, t, lr, cfg, sumsq):
    """clip_gradients, then update, chunk by chunk in one team call (a training step's end)."""
    clip, step = _clipper(grads, cfg.clip, cfg.clip_mode, sumsq), _updater(params, grads, state, t, lr, cfg)

    def chunk(lo, hi, slot):
        if clip is not None:
            clip(lo, hi)
        step(lo, hi, slot)
    _by_chunks(params.shape[0], chunk)


def _updater(params, grads, state, t, lr, cfg):
    """The update of entries lo..hi-1, as work for _by_chunks."""
    if cfg.optim == "adagrad":
        mem = state["adagrad"]
        return lambda lo, hi, slot: adagrad_update(params[lo:hi], grads[lo:hi], mem[lo:hi], lr, cfg.adagrad_eps)
    if cfg.optim == "rmsprop":
        ms = state["rmsprop"]
        return lambda lo, hi, slot: rmsprop_update(params[lo:hi], grads[lo:hi], ms[lo:hi], lr, cfg.rmsprop_alpha,
                                                   cfg.rmsprop_eps)
    if cfg.optim == "adam":
        # Bias corrections in float64 here, not in the float32 loop: 1 - 0.999^t needs the digits.
        bc1, bc2 = 1.0 - cfg.adam_beta1 ** t, 1.0 - cfg.adam_beta2 ** t
        m, v = state["adam_m"], state["adam_v"]
        return lambda lo, hi, slot: adam_update(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], lr / bc1,
                                                cfg.adam_beta1, cfg.adam_beta2, math.sqrt(bc2), cfg.adam_eps)
    raise ValueError(f"unknown optimizer {cfg.optim!r}")  # config and checkpoint checks rule this out


def clip_gradients(grads, clip, mode, sumsq):
    """Clip `grads` in place (mode 'value' or 'norm'; clip 0 turns clipping off). `sumsq` is
    sum_of_squares(grads), computed once by the caller for its NaN check too."""
    work = _clipper(grads, clip, mode, sumsq)
    if work is not None:
        _by_chunks(grads.shape[0], lambda lo, hi, slot: work(lo, hi))


def _clipper(grads, clip, mode, sumsq):
    """The clipping of entries lo..hi-1 (work(lo, hi)), or None where nothing is clipped."""
    if clip <= 0:
        return None
    if mode == "value":
        return lambda lo, hi: clip_values(grads[lo:hi], clip)
    norm = math.sqrt(sumsq)
    if norm > clip:
        return lambda lo, hi: scale(grads[lo:hi], clip / norm)
    return None
