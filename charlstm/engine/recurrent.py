"""The recurrent half of a layer, and the gate math: its time loop, cut into the cells of the
grid (grid.py: stream groups x unit groups), on Wh packed once per window (packed.py), the gates
computed right after each step's products while they are in cache.

A cell owns some streams and some units. At each step the micro-kernel leaves its streams'
pre-activations of its units (forward) or dloss/dh through Wh for its units (backward) in
`scratch`, panel pair by panel pair over blocks of up to ROWS streams (one stream: the one-row
kernel); then the nonlinearities and the cell update (or the gate gradients) run over its units
of each stream's row, in loops LLVM vectorizes; then it meets its stream group's other cells,
since the next step reads every unit of its streams (with one unit group there is nobody to meet).
A thread runs cells rank, rank + threads, ... (threads.Team.together), each as its owner would,
so the bytes do not depend on the number of threads.

Shapes (kernels.py's letters): A and gates (T, B, G), h and c (T+1, B, H), tc (T, B, H),
dH (T, B, H), dA (T, B, G), dh and dc (B, H), peep (3H,) or length 0; Wf and Wb as packed.py.
The math is kernels.py's docstrings' (reference: tests/reference.py).
"""
from charlstm.engine.barrier import meet
from charlstm.engine.grid import stream_range, unit_blocks
from charlstm.engine.jit import inline_kernel, kernel, sigmoid, tanh
from charlstm.engine.packed import PANELS, pack_columns_any, pack_rows_any, row_product, rows_times_pair, to_operand


@kernel
def forward_grid(A, Wh, Wf, peep, h, hx, c, tc, scratch, rank, threads, groups, unit_groups, sync):
    """One layer over the window, this thread's cells of the grid (grid.py): cells rank,
    rank + threads, ... of groups x unit_groups, cell (s, g) = stream group s, unit group g.

    A (T, B, G)  in: input term + bias; out: the gates i, f, o, g after their nonlinearity
    Wh (G, H);  Wf (U, 4, Kx, W) out: Wh packed (packed.pack_rows_any), each cell packing a part of
        its unit group's blocks: float as Wh, or bfloat16 (uint16; bf16.py)
    h, c (T+1, B, H)  h[0], c[0] in; h[t+1], c[t+1] out;  tc (T, B, H) out: tanh(c_t)
    hx (T+1, B, Kx)  h as the product reads it: h itself for float Wf, else rounded to bfloat16
        (hx[0] in; Kx = H, or H rounded up to even for bfloat16 pairs, its pad zero)
    scratch (B, >= 4 * U * W)  the recurrent products, gate-major per stream: gate q of unit k at
        scratch[s, q * U * W + k]
    sync (groups + 1, SYNC_SIZE)  a meeting counter per stream group, and one for all (_meet)"""
    T, B, G = A.shape
    H = G // 4
    U, _, Kx, W = Wf.shape
    cells = groups * unit_groups
    wf, out, row, width = Wf.reshape(-1), scratch.reshape(-1), scratch.shape[1], U * W
    for cell in range(rank, cells, threads):  # the stream groups split each unit group's packing
        s, g = cell // unit_groups, cell % unit_groups
        b0, b1 = unit_blocks(g, unit_groups, U, PANELS)
        pack_rows_any(Wh, Wf, b0 + s * (b1 - b0) // groups, b0 + (s + 1) * (b1 - b0) // groups, hx)
    first = 0
    if groups > 1:  # a unit group's slice was packed by every stream group's cell: all must be done
        first = 1
        if not meet(sync[groups], 1, threads):
            return
    for t in range(T):
        ht = hx[t].reshape(-1)
        for cell in range(rank, cells, threads):
            s, g = cell // unit_groups, cell % unit_groups
            lo, hi = stream_range(s, groups, B)
            b0, b1 = unit_blocks(g, unit_groups, U, PANELS)
            if hi - lo == 1:  # one row: the one-row kernel keeps a unit block's 4 panels in flight
                for u in range(b0, b1):
                    row_product(ht, lo * Kx, wf, u * 4 * Kx * W, Kx * W, Kx, out, lo * row + u * W, width, 4)
            else:
                # Panel pairs outside, stream blocks inside: a pair's chunk stays in L1 while every
                # block of the cell's streams reads it (packed.rows_times_pair).
                for p in range(4 * b0, 4 * b1, PANELS):  # panel p: unit block p // 4, gate p % 4
                    rows_times_pair(ht, lo, hi, Kx, Kx, wf, p * Kx * W, Kx * W, out, (p % 4) * width + (p // 4) * W,
                                    row, width)
            units_lo, units_hi = min(b0 * W, H), min(b1 * W, H)
            for st in range(lo, hi):
                cell_units(A[t, st], scratch[st], width, peep, c[t, st], c[t + 1, st], h[t + 1, st], tc[t, st],
                           units_lo, units_hi)
                to_operand(h[t + 1, st, units_lo:units_hi], hx[t + 1, st, units_lo:units_hi], Wf)
        if not _meet(sync, t + 1, first, rank, threads, groups, unit_groups):  # step t+1 reads all of h_t
            return


@inline_kernel
def _meet(sync, step, before, rank, threads, groups, unit_groups):
    """A cell's meeting after its `step`-th step (1, 2, ...): none with one unit group (a cell owns
    whole streams), its stream group's counter when every cell has a thread of its own, else
    everyone's counter (a thread running cells of several groups must wait for all of them),
    which `before` meetings (the packing's) have already counted."""
    if unit_groups == 1:
        return True
    if threads == groups * unit_groups:
        return meet(sync[rank // unit_groups], step, unit_groups)
    return meet(sync[groups], before + step, threads)


@inline_kernel
def cell_units(a, z, width, peep, c_prev, c_new, h_new, tc, lo, hi):
    """The gate math of units lo..hi-1 of one stream at one step (B > 1 runs all H units of a stream;
    one stream, stream_kernels.py, a thread's share of them).

    a (G,)  in: the input terms (+ bias); out: the gates i, f, o, g after their nonlinearity
    z       the recurrent products: gate q of unit k at z[q * width + k]
    peep (3H,) or (0,);  c_prev, c_new, h_new, tc (H,): c_{t-1} in; c_t, h_t, tanh(c_t) out
    Through views, so every index in the loops is a loop counter from 0 (Numba's negative-index
    check on an offset index would stop LLVM vectorizing the gate math)."""
    H = c_new.shape[0]
    gate_views = (a[lo:hi], a[H + lo:H + hi], a[2 * H + lo:2 * H + hi], a[3 * H + lo:3 * H + hi],
                  z[lo:hi], z[width + lo:width + hi], z[2 * width + lo:2 * width + hi], z[3 * width + lo:3 * width + hi])
    state_views = (c_prev[lo:hi], c_new[lo:hi], h_new[lo:hi], tc[lo:hi])
    if peep.shape[0] > 0:
        _cell_peep(gate_views, state_views, peep[lo:hi], peep[H + lo:H + hi], peep[2 * H + lo:2 * H + hi])
    else:
        _cell(gate_views, state_views)


@inline_kernel
def _cell(gate_views, state_views):
    """n units of one stream at one step. gate_views: the input terms a_i, a_f, a_o, a_g (n,) (out:
    the gates) and the product's z_i, z_f, z_o, z_g (n,); state_views: c_{t-1}, c_t, h_t, tanh(c_t)."""
    ai, af, ao, ag, zi, zf, zo, zg = gate_views
    c_prev, c_new, h_new, tc_new = state_views
    for j in range(ai.shape[0]):
        i = sigmoid(ai[j] + zi[j])
        f = sigmoid(af[j] + zf[j])
        o = sigmoid(ao[j] + zo[j])
        g = tanh(ag[j] + zg[j])
        cell = f * c_prev[j] + i * g
        tanh_c = tanh(cell)
        ai[j], af[j], ao[j], ag[j] = i, f, o, g
        c_new[j], tc_new[j], h_new[j] = cell, tanh_c, o * tanh_c


@inline_kernel
def _cell_peep(gate_views, state_views, p_i, p_f, p_o):
    """_cell with peepholes p_i, p_f, p_o (n,): i and f see c_{t-1}, o sees the new c_t."""
    ai, af, ao, ag, zi, zf, zo, zg = gate_views
    c_prev, c_new, h_new, tc_new = state_views
    for j in range(ai.shape[0]):
        i = sigmoid(ai[j] + zi[j] + p_i[j] * c_prev[j])
        f = sigmoid(af[j] + zf[j] + p_f[j] * c_prev[j])
        g = tanh(ag[j] + zg[j])
        cell = f * c_prev[j] + i * g
        o = sigmoid(ao[j] + zo[j] + p_o[j] * cell)
        tanh_c = tanh(cell)
        ai[j], af[j], ao[j], ag[j] = i, f, o, g
        c_new[j], tc_new[j], h_new[j] = cell, tanh_c, o * tanh_c


@kernel
def backward_grid(gates, c, tc, peep, Wh, Wb, dH, dA, dAx, dh, dc, scratch, rank, threads, groups, unit_groups,
                  sync):
    """Truncated BPTT through one layer over the window, t = T-1 down to 0, this thread's cells of
    the grid (as forward_grid).

    Wh (G, H);  Wb (Ub, G, W) out: Wh packed by columns (packed.pack_columns_any), float or bfloat16
    dH (T, B, H)  in: dloss/dh_t from above; out: the total dloss/dh_t
    dA (T, B, G)  out: dloss/d(gate pre-activations)
    dAx (T, B, G) out: dA as the product reads it (dA itself for float Wb, else rounded to bfloat16)
    dh, dc (B, H) in: the gradient arriving from after the window; out: dloss/dh_0, dloss/dc_0
    scratch (B, >= Ub * W)  dloss/dh_t through Wh per stream
    Step t's dloss/dh_t from step t+1 is dA[t+1] @ Wh, made for the cell's streams and units,
    and step t's gate gradients follow while it is in cache; step t-1 reads all of dA[t]."""
    T, B, G = gates.shape
    H = G // 4
    Ub, _, W = Wb.shape
    cells = groups * unit_groups
    wb = Wb.reshape(-1)
    for cell in range(rank, cells, threads):
        s, g = cell // unit_groups, cell % unit_groups
        b0, b1 = unit_blocks(g, unit_groups, Ub, PANELS)
        pack_columns_any(Wh, Wb, b0 + s * (b1 - b0) // groups, b0 + (s + 1) * (b1 - b0) // groups, dAx)
    first = 0
    if groups > 1:
        first = 1
        if not meet(sync[groups], 1, threads):
            return
    for t in range(T - 1, -1, -1):
        for cell in range(rank, cells, threads):
            s, g = cell // unit_groups, cell % unit_groups
            lo, hi = stream_range(s, groups, B)
            b0, b1 = unit_blocks(g, unit_groups, Ub, PANELS)
            units_lo, units_hi = min(b0 * W, H), min(b1 * W, H)
            if t < T - 1:
                _dh_products(dAx[t + 1], lo, hi, wb, b0, b1, W, G, scratch)
            else:  # from after the window: the dh given
                for st in range(lo, hi):
                    scratch[st, units_lo:units_hi] = dh[st, units_lo:units_hi]
            for st in range(lo, hi):
                cell_grad_units(gates[t, st], dA[t, st], peep, c[t, st], tc[t, st], dH[t, st], dc[st], scratch[st],
                                units_lo, units_hi)
                for q in range(4):
                    lo_q, hi_q = q * H + units_lo, q * H + units_hi
                    to_operand(dA[t, st, lo_q:hi_q], dAx[t, st, lo_q:hi_q], Wb)
        if not _meet(sync, T - t, first, rank, threads, groups, unit_groups):
            return
    for cell in range(rank, cells, threads):  # dloss/dh_0 = dA[0] @ Wh, for the caller
        s, g = cell // unit_groups, cell % unit_groups
        lo, hi = stream_range(s, groups, B)
        b0, b1 = unit_blocks(g, unit_groups, Ub, PANELS)
        units_lo, units_hi = min(b0 * W, H), min(b1 * W, H)
        _dh_products(dAx[0], lo, hi, wb, b0, b1, W, G, scratch)
        for st in range(lo, hi):
            dh[st, units_lo:units_hi] = scratch[st, units_lo:units_hi]


@inline_kernel
def _dh_products(dA_t, lo, hi, wb, b0, b1, W, G, scratch):
    """scratch[s, b0*W:b1*W] = dA_t[s] @ Wh's columns of unit blocks b0..b1-1, streams lo..hi-1:
    one row by the one-row kernel, more PANELS blocks a call."""
    flat, out, row = dA_t.reshape(-1), scratch.reshape(-1), scratch.shape[1]
    if hi - lo == 1:
        row_product(flat, lo * G, wb, b0 * G * W, G * W, G, out, lo * row + b0 * W, W, b1 - b0)
        return
    for u in range(b0, b1, PANELS):
        rows_times_pair(flat, lo, hi, G, G, wb, u * G * W, G * W, out, u * W, row, W)


@inline_kernel
def cell_grad_units(g, da, peep, c_prev, tc, dHt, dc, dh_next, lo, hi):
    """The gate gradients of units lo..hi-1 of one stream at one step (as cell_units, backward).

    g (G,) the gates i, f, o, g;  da (G,) out: dloss/d(pre-activations);  peep (3H,) or (0,)
    c_prev, tc (H,): c_{t-1}, tanh(c_t);  dHt (H,) in: dloss/dh_t from above, out: the total;
    dc (H,) in: dloss/dc_t, out: dloss/dc_{t-1};  dh_next: dloss/dh_t through Wh (units lo..hi-1)"""
    H = c_prev.shape[0]
    gate_views = (g[lo:hi], g[H + lo:H + hi], g[2 * H + lo:2 * H + hi], g[3 * H + lo:3 * H + hi],
                  da[lo:hi], da[H + lo:H + hi], da[2 * H + lo:2 * H + hi], da[3 * H + lo:3 * H + hi])
    state_views = (c_prev[lo:hi], tc[lo:hi], dHt[lo:hi], dc[lo:hi], dh_next[lo:hi])
    if peep.shape[0] > 0:
        _cell_grad_peep(gate_views, state_views, peep[lo:hi], peep[H + lo:H + hi], peep[2 * H + lo:2 * H + hi])
    else:
        _cell_grad(gate_views, state_views)


@inline_kernel
def _cell_grad(gate_views, state_views):
    """n units of one stream at one step. gate_views: the gates i, f, o, g (n,) and their gradients
    da_i, da_f, da_o, da_g (n,) out; state_views: c_{t-1}, tanh(c_t), dH_t (in: from above; out:
    the total), dc (in: dloss/dc_t from step t+1; out: dloss/dc_{t-1}), and dh_t through Wh."""
    gi, gf, go, gg, da_i, da_f, da_o, da_g = gate_views
    c_prev, tcs, dHs, dcs, dh_next = state_views
    for j in range(gi.shape[0]):
        dht = dHs[j] + dh_next[j]
        dHs[j] = dht
        # forward: h = o * tanh(c)   so: do = dh * tanh(c), dc += dh * o * (1 - tanh(c)^2)
        o, tct = go[j], tcs[j]
        da_o[j] = dht * tct * (o - o * o)
        dct = dcs[j] + dht * o - dht * o * tct * tct
        # forward: c = f * c_prev + i * g
        i, f, g = gi[j], gf[j], gg[j]
        da_i[j] = dct * g * (i - i * i)
        da_f[j] = dct * c_prev[j] * (f - f * f)
        da_g[j] = dct * i - dct * i * g * g
        dcs[j] = dct * f


@inline_kernel
def _cell_grad_peep(gate_views, state_views, p_i, p_f, p_o):
    """_cell_grad with peepholes p_i, p_f, p_o (n,)."""
    gi, gf, go, gg, da_i, da_f, da_o, da_g = gate_views
    c_prev, tcs, dHs, dcs, dh_next = state_views
    for j in range(gi.shape[0]):
        dht = dHs[j] + dh_next[j]
        dHs[j] = dht
        o, tct = go[j], tcs[j]
        dao = dht * tct * (o - o * o)
        da_o[j] = dao
        dct = dcs[j] + dht * o - dht * o * tct * tct + p_o[j] * dao  # a_o saw c_t through its peephole
        i, f, g = gi[j], gf[j], gg[j]
        dai = dct * g * (i - i * i)
        daf = dct * c_prev[j] * (f - f * f)
        da_i[j], da_f[j], da_g[j] = dai, daf, dct * i - dct * i * g * g
        dcs[j] = dct * f + p_i[j] * dai + p_f[j] * daf
