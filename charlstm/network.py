"""The whole network over one window: layers, output, loss and gradients, calling the kernels.

This is the Python layer of the engine: a handful of kernel calls per layer per window (never per
step), with every array preallocated in a Workspace for one (config, B, T).
"""
import numpy as np

from charlstm import blas  # noqa: F401  (from its import on, BLAS runs on one thread: see blas.py)
from charlstm import kernels, packed, recurrent, stream_kernels
from charlstm.model import views
from charlstm.threads import team


class Workspace:
    """Every array one window needs, allocated once. Per layer l (shapes as in kernels.py):
    gates (L, T, B, G), h and c (L, T+1, B, H), tc (L, T, B, H); shared across layers:
    P (N, V), dA (T, B, G), dH (T, B, H), dh and dc (B, H), layer 0's transposed Wx (V, G), and
    the Wh of the layer at work packed forward and backward (packed.py).

    With dropout, `masks` (L, N, H) holds this step's dropout masks (charlstm.dropout; the caller
    fills them before forward) and `dropped` (L, N, H) each layer's outputs through its mask, as
    the layer above or the softmax sees them. Without, both are None."""

    def __init__(self, config, batch_size, seq_length, dropout=False):
        L, H, V = config.layers, config.hidden, config.vocab_size
        B, T, G = batch_size, seq_length, 4 * config.hidden
        zeros = lambda *shape: np.zeros(shape, dtype=config.dtype)
        self.config, self.B, self.T = config, B, T
        self.gates, self.tc = zeros(L, T, B, G), zeros(L, T, B, H)
        self.h, self.c = zeros(L, T + 1, B, H), zeros(L, T + 1, B, H)
        self.P = zeros(T * B, V)
        self.dA, self.dH = zeros(T, B, G), zeros(T, B, H)
        self.dh, self.dc = zeros(B, H), zeros(B, H)
        self.WxT0, self.dWxT0 = zeros(V, G), zeros(V, G)
        self.no_peep = zeros(0)
        forward_shape, backward_shape, row = packed.packed_shapes(H, config.dtype)
        self.Wf, self.Wb = zeros(*forward_shape), zeros(*backward_shape)  # the layer's Wh, packed (packed.py)
        self.scratch = zeros(B, row)  # each stream's recurrent product (recurrent.py, stream_kernels.py)
        # A weight gradient dA^T X is cut by positions across the team (_weight_grad): the shares
        # after the first sum into these, one each, and are added in order.
        self.partial = zeros(team.most - 1, G, H)
        self.masks = zeros(L, T * B, H) if dropout else None
        self.dropped = zeros(L, T * B, H) if dropout else None

    def output_up(self, l):
        """Layer l's outputs at every position, (N, H), as the layer above (or the softmax, for the
        top layer) sees them: through the dropout mask once forward has applied it."""
        if self.masks is not None:
            return self.dropped[l]
        return self.h[l, 1:].reshape(-1, self.config.hidden)

    def top(self):
        """The top layer's outputs as the softmax sees them, (N, H)."""
        return self.output_up(self.config.layers - 1)

    def drop(self, l):
        """Apply layer l's dropout mask to its outputs (no-op without dropout)."""
        if self.masks is not None:
            np.multiply(self.h[l, 1:].reshape(-1, self.config.hidden), self.masks[l], out=self.dropped[l])

    def drop_grad(self, l, dH):
        """dH (N, H), the gradient arriving at layer l's dropped outputs, becomes the gradient at its
        outputs: the mask again (no-op without dropout)."""
        if self.masks is not None:
            dH *= self.masks[l]


def _peep(w, l, ws):
    return w.get(f"l{l}.p", ws.no_peep)


def forward(params, ws, x, h0, c0):
    """Run every layer over the window x (T, B) from state h0, c0 (L, B, H).
    The final state is ws.h[:, -1], ws.c[:, -1]."""
    w, cfg = views(params, ws.config), ws.config
    N, G = ws.T * ws.B, 4 * cfg.hidden
    for l in range(cfg.layers):
        if l == 0:
            kernels.transpose_into(w["l0.Wx"], ws.WxT0)
            kernels.gather_input(ws.WxT0, w["l0.b"], x, ws.gates[0])
        else:
            X, Wx, b, A = ws.output_up(l - 1), w[f"l{l}.Wx"], w[f"l{l}.b"], ws.gates[l].reshape(N, G)
            _by_rows(N, lambda lo, hi: kernels.project_input(X[lo:hi], Wx, b, A[lo:hi]))
        ws.h[l, 0], ws.c[l, 0] = h0[l], c0[l]
        Wh, peep = w[f"l{l}.Wh"], _peep(w, l, ws)
        if ws.B == 1:  # one stream: the team splits each step's units and meets once a step
            H = cfg.hidden
            A, h, c, tc = ws.gates[l].reshape(-1, G), ws.h[l].reshape(-1, H), ws.c[l].reshape(-1, H), ws.tc[l].reshape(-1, H)
            team.together(lambda rank, threads, sync: stream_kernels.forward_one(
                A, Wh, ws.Wf, peep, h, c, tc, ws.scratch[0], rank, threads, team.most, sync))
        else:
            team.run(lambda lo, hi, slot: packed.pack_forward(Wh, ws.Wf, lo, hi), team.shares(ws.Wf.shape[0], 1))
            team.run(lambda lo, hi, slot: recurrent.forward_streams(ws.gates[l], ws.Wf, peep, ws.h[l], ws.c[l], ws.tc[l],
                                                                    lo, hi, ws.scratch),
                     team.shares(ws.B, packed.ROWS))
        ws.drop(l)


# Positions per share of a batched product, at least: below this BLAS's call costs more than half.
SHARE_ROWS = 64


def _by_rows(n, product):
    """product(lo, hi) for the team's shares of rows 0..n-1: a batched product (BLAS, on one thread
    in each) cut by the rows of its result."""
    team.run(lambda lo, hi, slot: product(lo, hi), team.shares(n, SHARE_ROWS))


def _pack_columns(M, P):
    """packed.pack_columns on the team, each thread packing whole panels."""
    team.run(lambda lo, hi, slot: packed.pack_columns(M, P, lo, hi), team.shares(P.shape[0], 1))


def _weight_grad(ws, X, dW):
    """dW (G, D) = dA^T @ X over the window's N positions, X (N, D): cut by positions across the
    team, each share's product summed into its own array (the first into dW), then the shares
    added in order (threads.Team: the same cut and order on any thread count)."""
    N, G = ws.T * ws.B, 4 * ws.config.hidden
    dA = ws.dA.reshape(N, G)
    shares = team.shares(N, SHARE_ROWS)
    parts = [dW] + [ws.partial[i] for i in range(len(shares) - 1)]
    team.run(lambda lo, hi, slot: kernels.weight_grad(dA[lo:hi], X[lo:hi], parts[slot]), shares)
    for part in parts[1:]:
        dW += part


def loss(params, ws, y):
    """Mean cross-entropy in nats over the window's N positions, y (T, B) targets. Leaves
    dloss/dlogits in ws.P for backward."""
    w = views(params, ws.config)
    return kernels.softmax_xent(ws.top(), w["out.W"], w["out.b"], y.reshape(-1), ws.P)


def backward(params, grads, ws, x, dh0=None, dc0=None, ready=None):
    """Fill `grads` (same layout as params) with the gradient of the last loss() call.
    Gradients stop at the window's start (truncated BPTT); dh0, dc0 (L, B, H), if given, receive
    dloss/dh0 and dloss/dc0 (the gradient check uses them). ready, if given, is called with a
    parameter group's name ("out", then "l{L-1}" down to "l0") as soon as backward has written that
    group's last gradient and will not touch its span of `grads` again (under MPI its sum starts)."""
    ready = ready or (lambda group: None)
    w, g, cfg = views(params, ws.config), views(grads, ws.config), ws.config
    N, H, G = ws.T * ws.B, cfg.hidden, 4 * cfg.hidden
    dA2, dH2 = ws.dA.reshape(N, G), ws.dH.reshape(N, H)
    # forward: logits = Htop @ Wy.T + by
    kernels.matmul(ws.P, w["out.W"], dH2)
    ws.drop_grad(cfg.layers - 1, dH2)
    kernels.weight_grad(ws.P, ws.top(), g["out.W"])
    kernels.column_sums(ws.P, g["out.b"])
    ready("out")
    for l in reversed(range(cfg.layers)):
        ws.dh[:] = 0
        ws.dc[:] = 0
        Wh, peep = w[f"l{l}.Wh"], _peep(w, l, ws)
        if ws.B == 1:
            gates, c, tc = ws.gates[l].reshape(-1, G), ws.c[l].reshape(-1, H), ws.tc[l].reshape(-1, H)
            team.together(lambda rank, threads, sync: stream_kernels.backward_one(
                gates, c, tc, peep, Wh, ws.Wb, dH2, dA2, ws.dh[0], ws.dc[0], ws.scratch[0], rank, threads, team.most,
                sync))
        else:
            _pack_columns(Wh, ws.Wb)
            team.run(lambda lo, hi, slot: recurrent.backward_streams(ws.gates[l], ws.c[l], ws.tc[l], peep, ws.Wb, ws.dH,
                                                                     ws.dA, ws.dh, ws.dc, lo, hi, ws.scratch),
                     team.shares(ws.B, packed.ROWS))
        _weight_grad(ws, ws.h[l, :-1].reshape(N, H), g[f"l{l}.Wh"])
        kernels.column_sums(dA2, g[f"l{l}.b"])
        if cfg.peepholes:
            kernels.peephole_grad(ws.dA, ws.c[l], g[f"l{l}.p"])
        if l == 0:
            kernels.gather_input_grad(ws.dA, x, ws.dWxT0)
            kernels.transpose_into(ws.dWxT0, g["l0.Wx"])
        else:
            _weight_grad(ws, ws.output_up(l - 1), g[f"l{l}.Wx"])
            # the layer below's dloss/dh, from its output's use here: dH = dA @ Wx
            Wx = w[f"l{l}.Wx"]
            _by_rows(N, lambda lo, hi: kernels.matmul(dA2[lo:hi], Wx, dH2[lo:hi]))
            ws.drop_grad(l - 1, dH2)
        if dh0 is not None:
            dh0[l], dc0[l] = ws.dh, ws.dc
        ready(f"l{l}")
