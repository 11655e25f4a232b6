"""One stream (B = 1), step by step: the kernels behind sampling, eval and training with B = 1.

One stream (B = 1) advanced one character at a time: sampling, priming, scoring a file. A step
reads every recurrent weight once (12.6 MB at H=512, L=2 in float32), so it is bound by memory
bandwidth, not arithmetic: the work is one sweep over the weight rows, split across threads in
blocks of hidden units. A block owns units [lo, hi): it dots their four gate rows k, H+k, 2H+k,
3H+k with the input vector in one loop (each input element loaded once for four rows), then runs
their gates, cell and output. A thread gets the same block every step, so its rows stay in its
core's cache when they fit.

Dimension letters as in kernels.py.
"""
import math

import numba
import numpy as np
from numba import prange

from charlstm.jit import kernel, like, parallel_kernel, sigmoid, tanh
from charlstm.kernels import transpose_rows


# The weights one layer's step must read before splitting it across threads pays for the parallel
# launch and barrier: measured on 2 cores, H=128 (256-512 KB a layer) ran faster on one thread,
# H=192 (576 KB-1.2 MB) faster on two.
PARALLEL_BYTES = 1 << 19


def blocks_for(nbytes):
    """How many unit blocks (threads) a layer step reading nbytes of weights should use."""
    return numba.get_num_threads() if nbytes >= PARALLEL_BYTES else 1


@kernel
def cell_units(W, v, a, peep, c_prev, c, z, tc, h_out, lo, hi):
    """One step of hidden units [lo, hi) of one layer of one stream (arguments as in cell_step)."""
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


@parallel_kernel
def cell_step(W, v, a, peep, c_prev, c, z, tc, h_out, blocks):
    """One step of one layer of one stream.

    W     (G, K)  weights against the input vector v (K,): Wh with v = h_{t-1}, or [Wx | Wh]
                  (G, 2H) with v = [h_t of the layer below | h_{t-1}]
    a     (G,)    the rest of the pre-activation: the bias, plus layer 0's one-hot input column
    peep  (3H,)   peephole weights i, f, o; length 0 when off
    c_prev (H,)   c_{t-1};  c (H,) out: c_t (c may be c_prev: updated in place)
    z     (G,)    out: the gates i, f, o, g after their nonlinearity (z may be a)
    tc    (H,)    out: tanh(c_t) (tc may be h_out when it is not needed)
    h_out (H,)    out: h_t. Must not alias v: other blocks may still be reading h_{t-1}.
    blocks        how many unit blocks (threads) to split the work into. 1 runs in the calling
                  thread with no parallel launch (worth it for small layers). The caller chooses
                  (numba.get_num_threads() called in here would stop Numba caching the kernel).
    """
    H = c.shape[0]
    if blocks <= 1:
        cell_units(W, v, a, peep, c_prev, c, z, tc, h_out, 0, H)
        return
    blocks = min(blocks, H)
    for b in prange(blocks):
        cell_units(W, v, a, peep, c_prev, c, z, tc, h_out, b * H // blocks, (b + 1) * H // blocks)


@kernel
def lstm_forward_stream(A, Wh, peep, h, c, z, Hout, blocks):
    """One layer of one stream over T steps (scoring a file layer by layer, so that the input and
    output products batch over time and only Wh is read per step).

    A (T, G) input term + bias per step; Wh (G, H); peep (3H,) or (0,); z (G,) workspace;
    h, c (H,) in: the carried state, out: the state after the last step; Hout (T, H) out: h_t;
    blocks as in cell_step.
    """
    T = A.shape[0]
    cell_step(Wh, h, A[0], peep, c, c, z, Hout[0], Hout[0], blocks)
    for t in range(1, T):
        cell_step(Wh, Hout[t - 1], A[t], peep, c, c, z, Hout[t], Hout[t], blocks)
    h[:] = Hout[T - 1]


@kernel
def stream_step(net, x, h, c, work, blocks):
    """Feed the char id x to every layer of one stream: h, c (L, H) in/out.

    net  (WxT0 (V, G), Wh0 (G, H), Wcat (L-1, G, 2H), bias (L, G), peep (L, 3H) or (L, 0), ...)
         where Wcat[l-1] = [Wx | Wh] of layer l: its input vector [h_t below | h_{t-1}] is the
         contiguous slice h[l-1:l+1] once layer l-1 has been updated in place.
    work (a (G,), z (G,), hn (H,), ...);  blocks as in cell_step
    """
    WxT0, Wh0, Wcat, bias, peep = net[0], net[1], net[2], net[3], net[4]
    a, z, hn = work[0], work[1], work[2]
    L, H = h.shape
    row, b0 = WxT0[x], bias[0]
    for j in range(a.shape[0]):
        a[j] = row[j] + b0[j]  # one-hot input: a column of Wx
    cell_step(Wh0, h[0], a, peep[0], c[0], c[0], z, hn, hn, blocks)
    h[0, :] = hn
    flat = h.reshape(L * H)
    for l in range(1, L):
        cell_step(Wcat[l - 1], flat[(l - 1) * H:(l + 1) * H], bias[l], peep[l], c[l], c[l], z, hn, hn, blocks)
        h[l, :] = hn


@kernel
def feed_stream(net, ids, h, c, work, blocks):
    """Feed the ids (n,) one by one (a prime warming the state)."""
    for n in range(ids.shape[0]):
        stream_step(net, ids[n], h, c, work, blocks)


# ---------------------------------------------------------------- training one stream (B = 1)
# kernels.lstm_forward/lstm_backward with B = 1, where each step's product is a matrix-vector
# product: through BLAS, every call streams all of Wh from the shared L3. Here each step is one
# sweep over Wh split into unit blocks, a block per thread, so each core keeps its share of Wh in
# its own cache all window long (the backward reads Wh.T, so a unit's weights are one row).
# A unit's sums run in one fixed order whatever the block count, so results do not depend on it.

@kernel
def lstm_forward_one(A, Wh, peep, h, c, tc, blocks):
    """kernels.lstm_forward for one stream, same arguments: A (T, 1, G), h, c (T+1, 1, H),
    tc (T, 1, H); blocks as in cell_step."""
    for t in range(A.shape[0]):
        a = A[t, 0]  # the input term becomes the gates in place
        cell_step(Wh, h[t, 0], a, peep, c[t, 0], c[t + 1, 0], a, tc[t, 0], h[t + 1, 0], blocks)


@kernel
def back_units(WhT, dz, dh, lo, hi):
    """dh[lo:hi] = (dz @ Wh)[lo:hi] from WhT (H, G) = Wh.T, where a unit's column of Wh is a
    contiguous row: one dot product with dz (G,) per unit, the same sum whatever the block."""
    zero = like(dz[0], 0.0)
    for k in range(lo, hi):
        w, s = WhT[k], zero
        for r in range(dz.shape[0]):
            s += w[r] * dz[r]
        dh[k] = s


@kernel
def cell_grad_units(WhT, dz_next, gates, c_prev, tc, peep, dHt, dh, dc, dz, lo, hi):
    """Units [lo, hi) of one backward step (arguments as in cell_grad_step)."""
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


@parallel_kernel
def cell_grad_step(WhT, dz_next, gates, c_prev, tc, peep, dHt, dh, dc, dz, blocks):
    """One backward step of one layer of one stream.

    WhT     (H, G) Wh transposed
    dz_next (G,)   dloss/d(pre-activations) of step t+1, or length 0 at the window's last step
    gates   (G,)   i, f, o, g of step t;  c_prev (H,) c_{t-1};  tc (H,) tanh(c_t);  peep as in cell_step
    dHt     (H,)   in: dloss/dh_t from above; out: the total dloss/dh_t
    dh      (H,)   in at the last step: the gradient from after the window; out: dz_next @ Wh
    dc      (H,)   in: dloss/dc_t; out: dloss/dc_{t-1}
    dz      (G,)   out: dloss/d(pre-activations) of step t
    """
    H = dh.shape[0]
    if blocks <= 1:
        cell_grad_units(WhT, dz_next, gates, c_prev, tc, peep, dHt, dh, dc, dz, 0, H)
        return
    blocks = min(blocks, H)
    for b in prange(blocks):
        cell_grad_units(WhT, dz_next, gates, c_prev, tc, peep, dHt, dh, dc, dz, b * H // blocks, (b + 1) * H // blocks)


@parallel_kernel
def back_step(WhT, dz, dh, blocks):
    """dh (H,) = dz (G,) @ Wh, from WhT (H, G), split in unit blocks."""
    H = dh.shape[0]
    if blocks <= 1:
        back_units(WhT, dz, dh, 0, H)
        return
    blocks = min(blocks, H)
    for b in prange(blocks):
        back_units(WhT, dz, dh, b * H // blocks, (b + 1) * H // blocks)


@parallel_kernel
def transpose_split(W, WT, blocks):
    """kernels.transpose_into split across threads in bands of rows (WT = W.T, (R, C) -> (C, R))."""
    R = W.shape[0]
    if blocks <= 1:
        transpose_rows(W, WT, 0, R)
        return
    bands = (R + 7) // 8
    for b in prange(blocks):
        transpose_rows(W, WT, 8 * (b * bands // blocks), min(R, 8 * ((b + 1) * bands // blocks)))


@kernel
def lstm_backward_one(gates, c, tc, peep, WhT, dH, dA, dh, dc, blocks):
    """kernels.lstm_backward for one stream (B = 1), same arguments but WhT (H, G) = Wh.T, which
    the caller transposes once per window (transpose_split); blocks as in cell_step."""
    T = gates.shape[0]
    for t in range(T - 1, -1, -1):
        dz_next = dA[t + 1, 0] if t < T - 1 else dA[0, 0, :0]
        cell_grad_step(WhT, dz_next, gates[t, 0], c[t, 0], tc[t, 0], peep, dH[t, 0], dh[0], dc[0], dA[t, 0], blocks)
    back_step(WhT, dA[0, 0], dh[0], blocks)


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
def sample_stream(net, x, h, c, u, inv_temp, top_k, greedy, work, out, blocks):
    """Generate out.shape[0] char ids (n,) from one stream: feed x, draw the next id with the
    uniform u[n], feed it, and so on. A following call continues with x = out[-1].

    net (..., Wy (V, H), by (V,)); work (a, z, hn, logits (V,) float64, p (V,) float64,
    order (V,) int64). Other arguments as in stream_step and draw.
    """
    Wy, by = net[5], net[6]
    logits, p, order = work[3], work[4], work[5]
    V, H = Wy.shape
    top = h[h.shape[0] - 1]
    for n in range(out.shape[0]):
        stream_step(net, x, h, c, work, blocks)
        for v in range(V):
            row = Wy[v]
            s = by[v]
            for k in range(H):
                s += row[k] * top[k]
            logits[v] = s
        x = draw(logits, inv_temp, top_k, greedy, u[n], p, order)
        out[n] = x


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
