"""One stream (B = 1), step by step: the kernels behind sampling, eval and training with B = 1.

A step of one stream reads every recurrent weight once (12.6 MB at H=512, L=2 in float32), so it
is bound by memory bandwidth, not arithmetic: the work is one sweep over the weight rows, split
across threads in blocks of hidden units. A block owns units [lo, hi): it dots their four gate
rows k, H+k, 2H+k, 3H+k with the input vector in one loop (each input element loaded once for four
rows), then runs their gates, cell and output. A thread gets the same block every step, so its
rows stay in its core's cache when they fit. A unit's sums run in one fixed order whatever the
block count, so within one compiled variant results do not depend on it (the parallel and the
serial variant can still differ in the last bit: see blocks_for).

The entry points (lstm_forward_one, lstm_backward_one, transpose_split, run_stream) are
threaded_kernels: each holds its time loop and its prange over unit blocks itself, and is called
from Python only (jit.py's threading rule). Everything they call is a plain kernel.

Dimension letters as in kernels.py.
"""
import math

import numba
import numpy as np
from numba import prange

from charlstm.jit import inline_kernel, kernel, like, sigmoid, tanh, threaded_kernel
from charlstm.kernels import transpose_rows


# The weights one layer's step must read before splitting it across threads pays for the parallel
# launch and barrier: measured on 2 cores, H=128 (256-512 KB a layer) ran faster on one thread,
# H=192 (576 KB-1.2 MB) faster on two.
PARALLEL_BYTES = 1 << 19


def blocks_for(nbytes):
    """How many unit blocks a layer step reading nbytes of weights is split into. Fixed by the
    process's thread pool (--threads), not by how many threads run right now: the parallel and the
    serial variant of a kernel can round differently (jit._run_from_cache), so a run whose thread
    count threads.Governor changes must keep running the same variant to stay exact."""
    return numba.config.NUMBA_NUM_THREADS if nbytes >= PARALLEL_BYTES else 1


# ---------------------------------------------------------------- one step of a block of units

@inline_kernel
def cell_units(W, v, a, peep, c_prev, c, z, tc, h_out, lo, hi):
    """One step of hidden units [lo, hi) of one layer of one stream.

    W     (G, K)  weights against the input vector v (K,): Wh with v = h_{t-1}, or [Wx | Wh]
                  (G, 2H) with v = [h_t of the layer below | h_{t-1}]
    a     (G,)    the rest of the pre-activation: the bias, plus layer 0's one-hot input column
    peep  (3H,)   peephole weights i, f, o; length 0 when off
    c_prev (H,)   c_{t-1};  c (H,) out: c_t (c may be c_prev: updated in place)
    z     (G,)    out: the gates i, f, o, g after their nonlinearity (z may be a)
    tc    (H,)    out: tanh(c_t) (tc may be h_out when it is not needed)
    h_out (H,)    out: h_t. Must not alias v: other blocks may still be reading h_{t-1}.
    """
    H = c.shape[0]
    K = v.shape[0]
    zero = like(c[0], 0.0)
    for k in range(lo, hi):
        wi, wf, wo, wg = W[k], W[H + k], W[2 * H + k], W[3 * H + k]
        si, sf, so, sg = zero, zero, zero, zero
        for j in range(K):  # the unit's four gate rows in one sweep: v[j] loaded once
            vj = v[j]
            si += wi[j] * vj
            sf += wf[j] * vj
            so += wo[j] * vj
            sg += wg[j] * vj
        z[k], z[H + k], z[2 * H + k], z[3 * H + k] = a[k] + si, a[H + k] + sf, a[2 * H + k] + so, a[3 * H + k] + sg
    # The gates in short passes over the units, each over views indexed from 0 (a loop index that
    # might be negative makes Numba wrap it, and the wrap stops LLVM vectorizing the loop).
    n = hi - lo
    zi, zf, zo, zg = z[lo:hi], z[H + lo:H + hi], z[2 * H + lo:2 * H + hi], z[3 * H + lo:3 * H + hi]
    cp, cu, tu, hu = c_prev[lo:hi], c[lo:hi], tc[lo:hi], h_out[lo:hi]
    if peep.shape[0] > 0:
        pi, pf = peep[lo:hi], peep[H + lo:H + hi]
        for k in range(n):
            zi[k] += pi[k] * cp[k]
            zf[k] += pf[k] * cp[k]
    for k in range(n):
        zi[k] = sigmoid(zi[k])
    for k in range(n):
        zf[k] = sigmoid(zf[k])
    for k in range(n):
        zg[k] = tanh(zg[k])
    for k in range(n):
        cu[k] = zf[k] * cp[k] + zi[k] * zg[k]  # c = f * c_prev + i * g
    if peep.shape[0] > 0:
        po = peep[2 * H + lo:2 * H + hi]
        for k in range(n):
            zo[k] += po[k] * cu[k]  # the output gate peeks at the new cell
    for k in range(n):
        zo[k] = sigmoid(zo[k])
    for k in range(n):
        tu[k] = tanh(cu[k])
    for k in range(n):
        hu[k] = zo[k] * tu[k]  # h = o * tanh(c)



@inline_kernel
def back_units(WhT, dz, dh, lo, hi):
    """dh[lo:hi] = (dz @ Wh)[lo:hi] from WhT (H, G) = Wh.T, where a unit's column of Wh is a
    contiguous row: one dot product with dz (G,) per unit, the same sum whatever the block."""
    zero = like(dz[0], 0.0)
    for k in range(lo, hi):
        w, s = WhT[k], zero
        for r in range(dz.shape[0]):
            s += w[r] * dz[r]
        dh[k] = s


@inline_kernel
def cell_grad_units(WhT, dz_next, gates, c_prev, tc, peep, dHt, dh, dc, dz, lo, hi):
    """One backward step of units [lo, hi) of one layer of one stream.

    WhT     (H, G) Wh transposed
    dz_next (G,)   dloss/d(pre-activations) of step t+1, or length 0 at the window's last step
    gates   (G,)   i, f, o, g of step t;  c_prev (H,) c_{t-1};  tc (H,) tanh(c_t);  peep as in cell_units
    dHt     (H,)   in: dloss/dh_t from above; out: the total dloss/dh_t
    dh      (H,)   in at the last step: the gradient from after the window; out: dz_next @ Wh
    dc      (H,)   in: dloss/dc_t; out: dloss/dc_{t-1}
    dz      (G,)   out: dloss/d(pre-activations) of step t
    """
    H = dh.shape[0]
    if dz_next.shape[0] > 0:
        back_units(WhT, dz_next, dh, lo, hi)
    n = hi - lo
    gi, gf, go, gg = gates[lo:hi], gates[H + lo:H + hi], gates[2 * H + lo:2 * H + hi], gates[3 * H + lo:3 * H + hi]
    di, df, do, dg = dz[lo:hi], dz[H + lo:H + hi], dz[2 * H + lo:2 * H + hi], dz[3 * H + lo:3 * H + hi]
    cp, tu, dHu, dhu, dcu = c_prev[lo:hi], tc[lo:hi], dHt[lo:hi], dh[lo:hi], dc[lo:hi]
    for k in range(n):
        dHu[k] += dhu[k]  # dloss/dh_t: from above, and from step t+1 through Wh
    for k in range(n):
        # forward: h = o * tanh(c)   so: do = dh * tanh(c), dc += dh * o * (1 - tanh(c)^2)
        o, t, d = go[k], tu[k], dHu[k]
        do[k] = d * t * (o - o * o)
        dcu[k] += d * o - d * o * t * t
    if peep.shape[0] > 0:
        po = peep[2 * H + lo:2 * H + hi]
        for k in range(n):
            dcu[k] += po[k] * do[k]  # a_o saw c_t through its peephole
    for k in range(n):
        # forward: c = f * c_prev + i * g
        i, f, g, d = gi[k], gf[k], gg[k], dcu[k]
        di[k] = d * g * (i - i * i)
        df[k] = d * cp[k] * (f - f * f)
        dg[k] = d * i - d * i * g * g
        dcu[k] = d * f
    if peep.shape[0] > 0:
        pi, pf = peep[lo:hi], peep[H + lo:H + hi]
        for k in range(n):
            dcu[k] += pi[k] * di[k] + pf[k] * df[k]



# ---------------------------------------------------------------- entry points (called from Python)

@threaded_kernel
def lstm_forward_one(A, Wh, peep, h, c, tc, blocks):
    """One layer of one stream over T steps: recurrent.forward_streams with B = 1 (training), and a
    window of a scored file (eval).

    A    (T, G)    in: input term + bias per step; out: the gates after their nonlinearity
    Wh   (G, H);   peep (3H,) or (0,)
    h, c (T+1, H)  h[0], c[0] in: the carried state; h[t+1], c[t+1] out: the state after step t
    tc   (T, H)    out: tanh(c_t)
    blocks         unit blocks (threads) to split each step into: blocks_for(Wh.nbytes)
    """
    T, H = A.shape[0], h.shape[1]
    blocks = min(blocks, H)
    for t in range(T):
        a = A[t]  # the input term becomes the gates in place
        for b in prange(blocks):
            cell_units(Wh, h[t], a, peep, c[t], c[t + 1], a, tc[t], h[t + 1], b * H // blocks, (b + 1) * H // blocks)


@threaded_kernel
def lstm_backward_one(gates, c, tc, peep, WhT, dH, dA, dh, dc, blocks):
    """recurrent.backward_streams for one stream (B = 1): gates, dA (T, G), c (T+1, H), tc, dH (T, H),
    dh, dc (H,), and WhT (H, G) = Wh.T, which the caller transposes once per window
    (transpose_split); blocks as in lstm_forward_one."""
    T, H = gates.shape[0], dh.shape[0]
    blocks = min(blocks, H)
    for t in range(T - 1, -1, -1):
        dz_next = dA[t + 1] if t < T - 1 else dA[0, :0]
        for b in prange(blocks):
            cell_grad_units(WhT, dz_next, gates[t], c[t], tc[t], peep, dH[t], dh, dc, dA[t],
                            b * H // blocks, (b + 1) * H // blocks)
    for b in prange(blocks):
        back_units(WhT, dA[0], dh, b * H // blocks, (b + 1) * H // blocks)  # dloss/dh_0


@threaded_kernel
def transpose_split(W, WT, blocks):
    """kernels.transpose_into split across threads in bands of rows (WT = W.T, (R, C) -> (C, R))."""
    bands = (W.shape[0] + 7) // 8
    for b in prange(blocks):
        transpose_rows(W, WT, 8 * (b * bands // blocks), min(W.shape[0], 8 * ((b + 1) * bands // blocks)))


@threaded_kernel
def run_stream(net, feed, h, c, u, inv_temp, top_k, greedy, work, out, blocks):
    """Advance one stream through every layer, a char at a time: feed the ids feed (n,), then
    draw out.shape[0] ids, each from the state after the previous id (the last fed id for the
    first), with the uniform u[k], feeding each drawn id but the last. A call with no ids to draw
    just warms the state (a prime); a call that continues a sample feeds the last id drawn.

    net  (WxT0 (V, G), Wh0 (G, H), Wcat (L-1, G, 2H), bias (L, G), peep (L, 3H) or (L, 0),
          Wy (V, H), by (V,)), where Wcat[l-1] = [Wx | Wh] of layer l: its input vector
          [h_t below | h_{t-1}] is the contiguous slice h[l-1:l+1] once layer l-1 is updated
    h, c (L, H) in/out;  work (a (G,), z (G,), hn (H,), logits (V,) float64, p (V,) float64,
          order (V,) int64);  inv_temp, top_k, greedy as in draw;  blocks as in lstm_forward_one
    """
    WxT0, Wh0, Wcat, bias, peep, Wy, by = net[0], net[1], net[2], net[3], net[4], net[5], net[6]
    a, z, hn, logits, p, order = work[0], work[1], work[2], work[3], work[4], work[5]
    L, H = h.shape
    blocks = min(blocks, H)
    flat = h.reshape(L * H)
    n_feed, n_out = feed.shape[0], out.shape[0]
    for n in range(n_feed + max(n_out - 1, 0)):
        x = feed[n] if n < n_feed else out[n - n_feed]
        row, b0 = WxT0[x], bias[0]
        for j in range(a.shape[0]):
            a[j] = row[j] + b0[j]  # one-hot input: a column of Wx
        for b in prange(blocks):
            cell_units(Wh0, h[0], a, peep[0], c[0], c[0], z, hn, hn, b * H // blocks, (b + 1) * H // blocks)
        h[0, :] = hn
        for l in range(1, L):
            v = flat[(l - 1) * H:(l + 1) * H]
            for b in prange(blocks):
                cell_units(Wcat[l - 1], v, bias[l], peep[l], c[l], c[l], z, hn, hn, b * H // blocks, (b + 1) * H // blocks)
            h[l, :] = hn
        k = n - n_feed + 1  # the draw this step's state makes, if any
        if 0 <= k < n_out:
            output_logits(Wy, by, h[L - 1], logits)
            out[k] = draw(logits, inv_temp, top_k, greedy, u[k], p, order)


# ---------------------------------------------------------------- the output layer of one stream

@kernel
def output_logits(Wy, by, top, logits):
    """logits (V,) float64 = Wy (V, H) @ top (H,) + by, summed in the weights' dtype."""
    V, H = Wy.shape
    for v in range(V):
        row = Wy[v]
        s = by[v]
        for k in range(H):
            s += row[k] * top[k]
        logits[v] = s


@kernel
def select_top(logits, k, order):
    """order[:n] = the ids of the k largest logits, largest first, ties to the lower id; returns
    n = min(k, V). k <= 0 or k >= V keeps every id in id order. Insertion into a sorted list of
    k: cheap for the small k people use, no allocation."""
    V = logits.shape[0]
    if k <= 0 or k >= V:
        for v in range(V):
            order[v] = v
        return V
    n = 0
    for v in range(V):
        value = logits[v]
        if n == k and not value > logits[order[k - 1]]:
            continue  # not above the smallest kept (a tie keeps the earlier, lower id)
        i = n if n < k else k - 1
        while i > 0 and logits[order[i - 1]] < value:
            order[i] = order[i - 1]
            i -= 1
        order[i] = v
        n = min(n + 1, k)
    return n


@kernel
def draw(logits, inv_temp, top_k, greedy, u, p, order):
    """The next char id from logits (V,) float64.

    greedy: the argmax (ties to the lowest id). Otherwise inverse CDF at the uniform u in [0, 1) of
    softmax(logits * inv_temp) over the top_k largest logits (all when top_k <= 0).
    p, order (V,) workspaces, float64 and int64.
    """
    V = logits.shape[0]
    if greedy:
        best = 0
        for v in range(1, V):
            if logits[v] > logits[best]:
                best = v
        return best
    n = select_top(logits, top_k, order)
    m = logits[order[0]]
    for i in range(1, n):
        m = max(m, logits[order[i]])
    total = 0.0
    for i in range(n):
        p[i] = math.exp((logits[order[i]] - m) * inv_temp)
        total += p[i]
    target = u * total
    acc, last = 0.0, 0
    for i in range(n):
        if p[i] > 0.0:
            acc += p[i]
            last = i
            if acc > target:
                return order[i]
    return order[last]  # u * total rounded up to the full sum


@kernel
def nll_sum(Htop, Wy, by, y, P):
    """Sum over N positions of -log softmax(Htop @ Wy.T + by)[y], accumulated in float64.
    Htop (N, H), Wy (V, H), by (V,), y (N,) target ids, P (N, V) workspace."""
    np.dot(Htop, Wy.T, P)
    N, V = P.shape
    total = 0.0
    for n in range(N):
        row = P[n]
        m = row[0] + by[0]
        for v in range(V):
            row[v] += by[v]
            m = max(m, row[v])
        s = 0.0
        for v in range(V):
            s += math.exp(np.float64(row[v] - m))
        total += math.log(s) - np.float64(row[y[n]] - m)
    return total
