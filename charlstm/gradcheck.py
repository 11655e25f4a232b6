"""Central-difference check of the whole loss's gradient, in float64, on random data.

Every parameter tensor and the initial state h0, c0 are checked: for each entry, the analytic
gradient from the kernels against (loss(w + eps) - loss(w - eps)) / 2 eps. The error of a tensor is
max |analytic - numeric| / max |analytic or numeric| over its entries: relative to the tensor's
scale, so entries near zero (where finite differences are all rounding) cannot dominate it.
eps = 1e-4 balances truncation (~eps^2) against rounding (~1e-16 / eps). With dropout, one set of
masks is drawn and held fixed, and with weight drop one mask on Wh: the loss is then a smooth
function of the weights.
"""
import numpy as np

from charlstm.engine import network
from charlstm.config import ModelConfig
from charlstm.engine.dropout import fill_masks, fill_weight_masks
from charlstm.model import layout, param_count

EPS = 1e-4
TOLERANCE = 1e-6
VOCAB = "abcdefghijk"


def relative_error(analytic, numeric):
    return float(np.max(np.abs(analytic - numeric)) / max(np.max(np.abs(analytic)), np.max(np.abs(numeric)), 1e-12))


def gradcheck(hidden=8, layers=2, peepholes=True, batch_size=3, seq_length=5, seed=0, dropout=0.0, weight_drop=0.0):
    """Returns {tensor name: max relative error}, for every parameter tensor and 'h0', 'c0'."""
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype="float64")
    rng = np.random.default_rng(seed)
    params = rng.uniform(-0.5, 0.5, param_count(config))
    x = rng.integers(0, len(VOCAB), (seq_length, batch_size))
    y = rng.integers(0, len(VOCAB), (seq_length, batch_size))
    state = rng.uniform(-0.5, 0.5, (2, layers, batch_size, hidden))  # h0, c0
    ws = network.Workspace(config, batch_size, seq_length, dropout=dropout > 0, weight_drop=weight_drop > 0)
    if dropout > 0:
        fill_masks(ws.masks, dropout, seed, 0)
    if weight_drop > 0:
        fill_weight_masks(ws.weight_masks, weight_drop, seed, 0)

    def loss():
        network.forward(params, ws, x, state[0], state[1])
        return network.loss(params, ws, y)

    loss()
    grads, dstate = np.zeros_like(params), np.zeros_like(state)
    network.backward(params, grads, ws, x, dstate[0], dstate[1])

    def numeric(flat):
        out = np.zeros_like(flat)
        for j in range(flat.size):
            saved = flat[j]
            flat[j] = saved + EPS
            up = loss()
            flat[j] = saved - EPS
            down = loss()
            flat[j] = saved
            out[j] = (up - down) / (2 * EPS)
        return out

    errors = {}
    for slot in layout(config):
        span = slice(slot.offset, slot.offset + slot.size)
        errors[slot.name] = relative_error(grads[span], numeric(params[span]))
    for k, name in enumerate(("h0", "c0")):
        errors[name] = relative_error(dstate[k].ravel(), numeric(state[k].reshape(-1)))
    return errors
