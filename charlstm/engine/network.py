"""The whole network over one window: layers, output, loss and gradients, calling the kernels.

This is the Python layer of the engine: a handful of kernel calls per layer per window (never per
step), with every array preallocated in a Workspace for one (config, B, T).
"""
import numpy as np

from charlstm.engine import blas  # noqa: F401  (from its import on, BLAS runs on one thread: see blas.py)
from charlstm.engine import grid, kernels, packed, recurrent
from charlstm.engine.layout import views
from charlstm.engine.threads import team


class Workspace:
    """Every array one window needs, allocated once. Per layer l (shapes as in kernels.py):
    gates (L, T, B, G), h and c (L, T+1, B, H), tc (L, T, B, H); shared across layers:
    P (N, V), dA (T, B, G), dH (T, B, H), dh and dc (B, H), layer 0's transposed Wx (V, G), and
    the Wh of the layer at work packed forward and backward (packed.py).

    With dropout, `masks` (L, N, H) holds this step's dropout masks (charlstm.engine.dropout; the caller
    fills them before forward) and `dropped` (L, N, H) each layer's outputs through its mask, as
    the layer above or the softmax sees them. Without, both are None.

    With weight drop, `weight_masks` (L, G, H) holds this window's masks on each layer's Wh (the
    caller fills them before forward) and `Wd` (L, G, H) each Wh through its mask, made once per
    window by forward: the Wh the packers read, forward and backward, so a step costs what it did
    without. Without, both are None."""

    def __init__(self, config, batch_size, seq_length, dropout=False, weight_drop=False):
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
        self.scratch = zeros(B, row)  # each stream's recurrent product (recurrent.py)
        self.grid = grid.choose(B, H, config.dtype, team.most)  # how the recurrent loops are cut (grid.py)
        # A weight gradient dZ^T X is cut by positions across the team (_weight_grad): the shares
        # after the first sum into these, one each, and are added in order.
        self.partial, self.partial_out = zeros(team.most - 1, G, H), zeros(team.most - 1, V, H)
        self.masks = zeros(L, T * B, H) if dropout else None
        self.dropped = zeros(L, T * B, H) if dropout else None
        self.weight_masks = zeros(L, G, H) if weight_drop else None
        self.Wd = zeros(L, G, H) if weight_drop else None

    def recurrent(self, l, Wh):
        """Layer l's recurrent weights as this window uses them: Wh through its weight-drop mask
        (what forward left in Wd), or Wh itself without weight drop."""
        return Wh if self.Wd is None else self.Wd[l]

    def output_up(self, l):
        """Layer l's outputs at every position, (N, H), as the layer above (or the softmax, for the
        top layer) sees them: through the dropout mask once forward has applied it."""
        if self.masks is not None:
            return self.dropped[l]
        return self.h[l, 1:].reshape(-1, self.config.hidden)

    def top(self):
        """The top layer's outputs as the softmax sees them, (N, H)."""
        return self.output_up(self.config.layers - 1)

    def drop(self, l, lo, hi):
        """Apply layer l's dropout mask to its outputs at positions lo..hi-1 (no-op without dropout)."""
        if self.masks is not None:
            h = self.h[l, 1:].reshape(-1, self.config.hidden)
            np.multiply(h[lo:hi], self.masks[l, lo:hi], out=self.dropped[l, lo:hi])

    def drop_grad(self, l, dH, lo, hi):
        """dH (N, H), the gradient arriving at layer l's dropped outputs, becomes the gradient at its
        outputs at positions lo..hi-1: the mask again (no-op without dropout)."""
        if self.masks is not None:
            dH[lo:hi] *= self.masks[l, lo:hi]


def _peep(w, l, ws):
    return w.get(f"l{l}.p", ws.no_peep)


def forward(params, ws, x, h0, c0):
    """Run every layer over the window x (T, B) from state h0, c0 (L, B, H).
    The final state is ws.h[:, -1], ws.c[:, -1]. The top layer's dropout is loss()'s to apply."""
    w, cfg = views(params, ws.config), ws.config
    N, G = ws.T * ws.B, 4 * cfg.hidden
    for l in range(cfg.layers):
        if l == 0:
            kernels.transpose_into(w["l0.Wx"], ws.WxT0)
            b = w["l0.b"]
            team.run(lambda lo, hi, slot: kernels.gather_input(ws.WxT0, b, x[lo:hi], ws.gates[0, lo:hi]),
                     team.shares(ws.T, -(-SHARE_ROWS // ws.B)))
        else:
            X, Wx, b, A = ws.output_up(l - 1), w[f"l{l}.Wx"], w[f"l{l}.b"], ws.gates[l].reshape(N, G)

            def input_terms(lo, hi):  # the layer below's outputs through its dropout, then times Wx
                ws.drop(l - 1, lo, hi)
                kernels.project_input(X[lo:hi], Wx, b, A[lo:hi])
            _by_rows(N, input_terms)
        ws.h[l, 0], ws.c[l, 0] = h0[l], c0[l]
        if ws.Wd is not None:  # weight drop: one mask for the whole window, before Wh is packed
            np.multiply(w[f"l{l}.Wh"], ws.weight_masks[l], out=ws.Wd[l])
        Wh, peep = ws.recurrent(l, w[f"l{l}.Wh"]), _peep(w, l, ws)
        cut = ws.grid  # the recurrent grid's cells, each packing a part of Wh first (grid.py)
        team.together(lambda rank, threads, sync: recurrent.forward_grid(
            ws.gates[l], Wh, ws.Wf, peep, ws.h[l], ws.c[l], ws.tc[l], ws.scratch, rank, threads, cut.groups,
            cut.unit_groups, sync), cut.cells)


# Positions per share of a batched product, at least: below this BLAS's call costs more than half.
SHARE_ROWS = 64
# Columns per share of a column-wise sum, at least.
SHARE_COLUMNS = 64


def _by_rows(n, work):
    """work(lo, hi) for the team's shares of rows 0..n-1: batched work (a BLAS product on one
    thread in each, elementwise work) cut by the rows of its result."""
    team.run(lambda lo, hi, slot: work(lo, hi), team.shares(n, SHARE_ROWS))


def _by_columns(n, work):
    """work(lo, hi) for the team's shares of columns 0..n-1: sums over every row, cut by the
    columns they write, so each column's sum runs in one order whatever the cut."""
    team.run(lambda lo, hi, slot: work(lo, hi), team.shares(n, SHARE_COLUMNS))


def _weight_grad(dZ, X, dW, partial, before=None):
    """dW (R, D) = dZ^T @ X over the window's N positions, dZ (N, R), X (N, D): cut by positions
    across the team, each share's product summed into its own array (the first into dW, the
    others into partial[0], partial[1], ...), then the shares added in order (threads.Team: the
    same cut and order on any thread count). before(lo, hi), if given, runs first in each share."""
    shares = team.shares(dZ.shape[0], SHARE_ROWS)
    parts = [dW] + [partial[i] for i in range(len(shares) - 1)]

    def share(lo, hi, slot):
        if before is not None:
            before(lo, hi)
        kernels.weight_grad(dZ[lo:hi], X[lo:hi], parts[slot])
    team.run(share, shares)
    for part in parts[1:]:
        dW += part


def loss(params, ws, y):
    """Mean cross-entropy in nats over the window's N positions, y (T, B) targets. Leaves
    dloss/dlogits in ws.P for backward. Cut by positions across the team, each share applying
    the top layer's dropout, then its logits and softmax; the shares' sums are added in order."""
    w, L = views(params, ws.config), ws.config.layers
    top, Wy, by, targets, P = ws.top(), w["out.W"], w["out.b"], y.reshape(-1), ws.P
    N = P.shape[0]
    shares = team.shares(N, SHARE_ROWS)
    totals = [0.0] * len(shares)

    def share(lo, hi, slot):
        ws.drop(L - 1, lo, hi)
        totals[slot] = kernels.softmax_xent(top[lo:hi], Wy, by, targets[lo:hi], P[lo:hi], N)
    team.run(share, shares)
    return sum(totals) / N


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
    # forward: logits = Htop @ Wy.T + by. Per share of positions: the gradient passed down (through
    # the top layer's dropout), then its part of Wy's.
    def passed_down(lo, hi):
        kernels.matmul(ws.P[lo:hi], w["out.W"], dH2[lo:hi])
        ws.drop_grad(cfg.layers - 1, dH2, lo, hi)
    _weight_grad(ws.P, ws.top(), g["out.W"], ws.partial_out, before=passed_down)
    kernels.column_sums(ws.P, g["out.b"], 0, ws.P.shape[1])
    ready("out")
    for l in reversed(range(cfg.layers)):
        ws.dh[:] = 0
        ws.dc[:] = 0
        Wh, peep = ws.recurrent(l, w[f"l{l}.Wh"]), _peep(w, l, ws)
        cut = ws.grid
        team.together(lambda rank, threads, sync: recurrent.backward_grid(
            ws.gates[l], ws.c[l], ws.tc[l], peep, Wh, ws.Wb, ws.dH, ws.dA, ws.dh, ws.dc, ws.scratch, rank, threads,
            cut.groups, cut.unit_groups, sync), cut.cells)
        _weight_grad(dA2, ws.h[l, :-1].reshape(N, H), g[f"l{l}.Wh"], ws.partial)
        if ws.Wd is not None:  # forward used Wd = Wh * mask, so dloss/dWh = dloss/dWd * mask
            g[f"l{l}.Wh"] *= ws.weight_masks[l]
        db = g[f"l{l}.b"]

        def column_grads(lo, hi):  # the bias's, and layer 0's one-hot input's
            kernels.column_sums(dA2, db, lo, hi)
            if l == 0:
                kernels.gather_input_grad(ws.dA, x, ws.dWxT0, lo, hi)
        _by_columns(G, column_grads)
        if cfg.peepholes:
            kernels.peephole_grad(ws.dA, ws.c[l], g[f"l{l}.p"])
        if l == 0:
            kernels.transpose_into(ws.dWxT0, g["l0.Wx"])
        else:
            # The layer below's dloss/dh, from its output's use here: dH = dA @ Wx, then its dropout;
            # cut by positions as Wx's gradient is, so both run in one team call.
            Wx = w[f"l{l}.Wx"]

            def passed_down(lo, hi):
                kernels.matmul(dA2[lo:hi], Wx, dH2[lo:hi])
                ws.drop_grad(l - 1, dH2, lo, hi)
            _weight_grad(dA2, ws.output_up(l - 1), g[f"l{l}.Wx"], ws.partial, before=passed_down)
        if dh0 is not None:
            dh0[l], dc0[l] = ws.dh, ws.dc
        ready(f"l{l}")
