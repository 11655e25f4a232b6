"""Adagrad and gradient clipping over the flat buffers (params, grads and Adagrad's memory share one
layout, so each is one loop over one array).

    value clipping (char-rnn, torch-rnn, min-char-rnn): g = clamp(g, -clip, clip), elementwise
    norm clipping (TF/PyTorch examples):                g *= clip / max(||g||, clip), global L2 norm
    Adagrad (min-char-rnn):                             mem += g*g;  w -= lr * g / sqrt(mem + eps)

eps defaults to 1e-20 (TrainConfig.adagrad_eps), not min-char-rnn's 1e-8: min-char-rnn's loss is a
sum over its 25 steps, ours is the mean over B*T positions (SPEC §2), so our gradients are ~B*T
times smaller and 1e-8 under the root outweighs `mem` for most weights, damping their steps. Measured
at 2x256, B=T=50, lr 0.02, 1200 steps: 2.253 nats with 1e-8, 1.837 with 1e-20 (PyTorch's Adagrad,
which adds 1e-10 outside the root, is the same as 1e-20 inside it).
"""
import math

import numpy as np

from charlstm.jit import kernel, like

@kernel
def sum_of_squares(g):
    """sum(g*g) in float64: the squared global norm, and non-finite iff some entry is NaN or inf."""
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


def clip_gradients(grads, clip, mode, sumsq):
    """Clip `grads` in place (mode 'value' or 'norm'; clip 0 turns clipping off). `sumsq` is
    sum_of_squares(grads), computed once by the caller for its NaN check too."""
    if clip <= 0:
        return
    if mode == "value":
        clip_values(grads, clip)
    else:
        norm = math.sqrt(sumsq)
        if norm > clip:
            scale(grads, clip / norm)
