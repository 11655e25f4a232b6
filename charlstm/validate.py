"""Validation loss: the validation split read as one stream from zero state, on its own state.

It never touches the training streams' h and c. Long validation splits are scored on a bounded
prefix (VAL_MAX_CHARS), and the output says how many characters were scored.
"""
import numpy as np

from charlstm import network

VAL_MAX_CHARS = 200_000
VAL_WINDOW = 256  # steps per kernel call; the state carries across calls


def validation_loss(params, config, val_ids):
    """Mean nats over the predictions of positions 2..n of val_ids[:VAL_MAX_CHARS] from zero state.
    Returns (loss, chars scored), or (None, 0) when there is nothing to score."""
    ids = np.asarray(val_ids[:VAL_MAX_CHARS], dtype=np.int32)
    n_pred = len(ids) - 1
    if n_pred < 1:
        return None, 0
    L, H = config.layers, config.hidden
    h = np.zeros((L, 1, H), dtype=config.dtype)
    c = np.zeros_like(h)
    total, ws = 0.0, None
    for start in range(0, n_pred, VAL_WINDOW):
        T = min(VAL_WINDOW, n_pred - start)
        if ws is None or ws.T != T:
            ws = network.Workspace(config, 1, T)
        x = ids[start:start + T].reshape(T, 1)
        y = ids[start + 1:start + T + 1].reshape(T, 1)
        network.forward(params, ws, x, h, c)
        total += network.loss(params, ws, y) * T
        h[:], c[:] = ws.h[:, -1], ws.c[:, -1]
    return total / n_pred, n_pred
