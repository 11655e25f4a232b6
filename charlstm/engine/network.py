"""The whole network over one window: layers, output, loss and gradients, calling the kernels.

This is the Python layer of the engine: a handful of kernel calls per layer per window (never per
step), with every array preallocated in a Workspace for one (config, B, T).
"""
import numpy as np

from charlstm.engine import blas  # noqa: F401  (from its import on, BLAS runs on one thread: see blas.py)
from charlstm.engine import batched, bf16, grid, kernels, packed, recurrent
from charlstm.engine.layout import views
from charlstm.engine.target import BF16_PRODUCT
from charlstm.engine.threads import team

PRECISIONS = ("f32", "bf16")


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
    without. Without, both are None.

    With precision "bf16" the products' operands are bfloat16 (bf16.py): Wf and Wb hold bfloat16
    (uint16) in the layout of the machine's product (target.BF16_PRODUCT: pairs for dot, singles for
    widen), `hx` (L, T+1, B, Kx) and `dAx` (T, B, G) are h's and dA's operand copies (bfloat16 bits
    for dot, rounded float32 for widen; Kx = H, rounded up to even for dot), and the batched
    products (batched.py) get their operands, packing and padded outputs: `inputs` (N, Kx) the
    layer below's outputs through dropout, rounded (with dropout; else hx is that); `dAT` (G, Nx)
    dA transposed; `columns` (Ub, Nx, W) an (N, H) operand packed by columns; `wide` (N, 4*U*W) and
    `wide_grad` (G, Ub*W) the products' outputs with their pad columns. In float32 hx is h and dAx is
    dA, and none of the rest exists."""

    def __init__(self, config, batch_size, seq_length, dropout=False, weight_drop=False, precision="f32"):
        L, H, V = config.layers, config.hidden, config.vocab_size
        B, T, G = batch_size, seq_length, 4 * config.hidden
        zeros = lambda *shape: np.zeros(shape, dtype=config.dtype)
        N = T * B
        self.config, self.B, self.T = config, B, T
        self.gates, self.tc = zeros(L, T, B, G), zeros(L, T, B, H)
        self.h, self.c = zeros(L, T + 1, B, H), zeros(L, T + 1, B, H)
        self.P = zeros(T * B, V)
        self.dA, self.dH = zeros(T, B, G), zeros(T, B, H)
        self.dh, self.dc = zeros(B, H), zeros(B, H)
        self.WxT0, self.dWxT0 = zeros(V, G), zeros(V, G)
        self.no_peep = zeros(0)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.precision, self.bf16 = precision, precision == "bf16"
        dtype = np.float32 if self.bf16 else config.dtype  # bfloat16 accumulates in float32
        if self.bf16 and np.dtype(config.dtype) != np.float32:
            raise ValueError("precision bf16 needs a float32 model")
        forward_shape, backward_shape, row = packed.packed_shapes(H, dtype)
        if not self.bf16:
            self.Wf, self.Wb = zeros(*forward_shape), zeros(*backward_shape)  # the layer's Wh, packed (packed.py)
            self.hx, self.dAx = self.h, self.dA  # the products read h and dA themselves
        else:
            pairs = BF16_PRODUCT == "dot"
            self.pairs, operand = pairs, np.uint16 if pairs else np.float32
            U, _, _, W = forward_shape
            Ub = backward_shape[0]
            Kx, Nx = (H + H % 2, N + N % 2) if pairs else (H, N)
            self.Wf = np.zeros((U, 4, Kx, W), np.uint16)
            self.Wb = np.zeros(backward_shape, np.uint16)
            self.hx, self.dAx = np.zeros((L, T + 1, B, Kx), operand), np.zeros((T, B, G), operand)
            self.inputs = np.zeros((N, Kx), operand) if dropout else None
            self.dAT, self.columns = np.zeros((G, Nx), operand), np.zeros((Ub, Nx, W), np.uint16)
            self.wide, self.wide_grad = np.zeros((N, 4 * U * W), np.float32), np.zeros((G, Ub * W), np.float32)
        self.scratch = zeros(B, row)  # each stream's recurrent product (recurrent.py)
        # how the recurrent loops are cut (grid.py), from what the products read
        self.grid = grid.choose(B, H, "bfloat16" if self.bf16 else config.dtype, team.most)
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
        elif ws.bf16:
            _input_terms_bf16(ws, l, w[f"l{l}.Wx"], w[f"l{l}.b"])
        else:
            X, Wx, b, A = ws.output_up(l - 1), w[f"l{l}.Wx"], w[f"l{l}.b"], ws.gates[l].reshape(N, G)

            def input_terms(lo, hi):  # the layer below's outputs through its dropout, then times Wx
                ws.drop(l - 1, lo, hi)
                kernels.project_input(X[lo:hi], Wx, b, A[lo:hi])
            _by_rows(N, input_terms)
        ws.h[l, 0], ws.c[l, 0] = h0[l], c0[l]
        if ws.bf16:
            bf16.round_rows(ws.h[l, 0], ws.hx[l, 0], 0, ws.B)
        if ws.Wd is not None:  # weight drop: one mask for the whole window, before Wh is packed
            np.multiply(w[f"l{l}.Wh"], ws.weight_masks[l], out=ws.Wd[l])
        Wh, peep = ws.recurrent(l, w[f"l{l}.Wh"]), _peep(w, l, ws)
        cut = ws.grid  # the recurrent grid's cells, each packing a part of Wh first (grid.py)
        team.together(lambda rank, threads, sync: recurrent.forward_grid(
            ws.gates[l], Wh, ws.Wf, peep, ws.h[l], ws.hx[l], ws.c[l], ws.tc[l], ws.scratch, rank, threads, cut.groups,
            cut.unit_groups, sync), cut.cells)


def _input_terms_bf16(ws, l, Wx, b):
    """Layer l's input terms in bfloat16 (batched.py): its input through the layer below's dropout,
    rounded (without dropout hx[l-1] already holds it), Wx packed by rows, then the product by
    rows of positions and the gates put in order with the bias."""
    N, A = ws.T * ws.B, ws.gates[l].reshape(ws.T * ws.B, -1)
    U, _, Kx, W = ws.Wf.shape
    team.run(lambda lo, hi, slot: bf16.pack_rows(Wx, ws.Wf, lo, hi, ws.pairs), team.shares(U, 1))
    X = ws.hx[l - 1, 1:].reshape(N, Kx) if ws.inputs is None else ws.inputs
    panels = ws.Wf.reshape(4 * U, Kx, W)

    def share(lo, hi):
        if ws.inputs is not None:
            ws.drop(l - 1, lo, hi)
            bf16.round_rows(ws.output_up(l - 1), ws.inputs, lo, hi)
        batched.product_rows(X, panels, ws.wide, lo, hi)
        batched.scatter_gates(ws.wide, b, A, lo, hi, W)
    _by_rows(N, share)


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


def _weight_grad_bf16(ws, X, dW, transpose):
    """dW (G, H) = dA^T @ X (N, H) in bfloat16 (batched.py): dA's operand copy transposed into dAT
    (once per layer: `transpose`), X packed by columns, then the product by rows of dW."""
    G, Ub = dW.shape[0], ws.columns.shape[0]
    if transpose:
        dAx2 = ws.dAx.reshape(-1, G)
        team.run(lambda lo, hi, slot: batched.transpose_part(dAx2, ws.dAT, lo, hi), team.shares(G, SHARE_COLUMNS))
    team.run(lambda lo, hi, slot: bf16.pack_columns(X, ws.columns, lo, hi, ws.pairs), team.shares(Ub, 1))

    def share(lo, hi):
        _into(ws.dAT, ws.columns, ws.wide_grad, dW, lo, hi)
    _by_rows(G, share)


def _passed_down_bf16(ws, l, Wx):
    """The layer below's dloss/dh (N, H) = dA @ Wx in bfloat16, then its dropout: Wx packed by
    columns (Wb is free: layer l's recurrent backward is done), the product by rows of positions."""
    N, G = ws.T * ws.B, Wx.shape[0]
    dH2, dAx2 = ws.dH.reshape(N, -1), ws.dAx.reshape(N, G)
    team.run(lambda lo, hi, slot: bf16.pack_columns(Wx, ws.Wb, lo, hi, ws.pairs), team.shares(ws.Wb.shape[0], 1))

    def share(lo, hi):
        _into(dAx2, ws.Wb, ws.wide, dH2, lo, hi)
        ws.drop_grad(l - 1, dH2, lo, hi)
    _by_rows(N, share)


def _into(x, panels, wide, out, lo, hi):
    """Rows lo..hi-1 of out (R, C) = x @ the panels (batched.product_rows): straight into out when
    its rows are exactly the panels' columns (C a multiple of the panel pairs' width), else through
    the padded `wide` and a copy of the real columns."""
    if out.shape[1] == panels.shape[0] * panels.shape[2]:
        batched.product_rows(x, panels, out, lo, hi)
    else:
        batched.product_rows(x, panels, wide, lo, hi)
        batched.copy_columns(wide, out, lo, hi)


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
            ws.gates[l], ws.c[l], ws.tc[l], peep, Wh, ws.Wb, ws.dH, ws.dA, ws.dAx, ws.dh, ws.dc, ws.scratch, rank,
            threads, cut.groups, cut.unit_groups, sync), cut.cells)
        if ws.bf16:
            _weight_grad_bf16(ws, ws.h[l, :-1].reshape(N, H), g[f"l{l}.Wh"], transpose=True)
        else:
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
        elif ws.bf16:
            _weight_grad_bf16(ws, ws.output_up(l - 1), g[f"l{l}.Wx"], transpose=False)
            _passed_down_bf16(ws, l, w[f"l{l}.Wx"])
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
