"""One stream (B = 1), step by step: the kernels behind sampling and eval.

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

import numpy as np
from numba import prange

from charlstm.jit import kernel, like, parallel_kernel, sigmoid, tanh


@kernel
def cell_units(W, v, a, peep, c, z, h_out, lo, hi):
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
    cu, hu = c[lo:hi], h_out[lo:hi]
    if peep.shape[0] > 0:
        pi, pf = peep[lo:hi], peep[H + lo:H + hi]
        for k in range(n):
            zi[k] += pi[k] * cu[k]
            zf[k] += pf[k] * cu[k]
    for k in range(n):
        zi[k] = sigmoid(zi[k])
    for k in range(n):
        zf[k] = sigmoid(zf[k])
    for k in range(n):
        zg[k] = tanh(zg[k])
    for k in range(n):
        cu[k] = zf[k] * cu[k] + zi[k] * zg[k]  # c = f * c_prev + i * g
    if peep.shape[0] > 0:
        po = peep[2 * H + lo:2 * H + hi]
        for k in range(n):
            zo[k] += po[k] * cu[k]  # the output gate peeks at the new cell
    for k in range(n):
        zo[k] = sigmoid(zo[k])
    for k in range(n):
        hu[k] = tanh(cu[k])
    for k in range(n):
        hu[k] *= zo[k]  # h = o * tanh(c)


@parallel_kernel
def cell_step(W, v, a, peep, c, z, h_out, blocks):
    """One step of one layer of one stream.

    W     (G, K)  weights against the input vector v (K,): Wh with v = h_{t-1}, or [Wx | Wh]
                  (G, 2H) with v = [h_t of the layer below | h_{t-1}]
    a     (G,)    the rest of the pre-activation: the bias, plus layer 0's one-hot input column
    peep  (3H,)   peephole weights i, f, o; length 0 when off
    c     (H,)    in: c_{t-1}; out: c_t
    z     (G,)    workspace: the pre-activations
    h_out (H,)    out: h_t. Must not alias v: other blocks may still be reading h_{t-1}.
    blocks        how many unit blocks (threads) to split the work into. 1 runs in the calling
                  thread with no parallel launch (worth it for small layers). The caller chooses
                  (numba.get_num_threads() called in here would stop Numba caching the kernel).
    """
    H = c.shape[0]
    if blocks <= 1:
        cell_units(W, v, a, peep, c, z, h_out, 0, H)
        return
    blocks = min(blocks, H)
    for b in prange(blocks):
        cell_units(W, v, a, peep, c, z, h_out, b * H // blocks, (b + 1) * H // blocks)


@kernel
def lstm_forward_stream(A, Wh, peep, h, c, z, Hout, blocks):
    """One layer of one stream over T steps (scoring a file layer by layer, so that the input and
    output products batch over time and only Wh is read per step).

    A (T, G) input term + bias per step; Wh (G, H); peep (3H,) or (0,); z (G,) workspace;
    h, c (H,) in: the carried state, out: the state after the last step; Hout (T, H) out: h_t;
    blocks as in cell_step.
    """
    T = A.shape[0]
    cell_step(Wh, h, A[0], peep, c, z, Hout[0], blocks)
    for t in range(1, T):
        cell_step(Wh, Hout[t - 1], A[t], peep, c, z, Hout[t], blocks)
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
    cell_step(Wh0, h[0], a, peep[0], c[0], z, hn, blocks)
    h[0, :] = hn
    flat = h.reshape(L * H)
    for l in range(1, L):
        cell_step(Wcat[l - 1], flat[(l - 1) * H:(l + 1) * H], bias[l], peep[l], c[l], z, hn, blocks)
        h[l, :] = hn


@kernel
def feed_stream(net, ids, h, c, work, blocks):
    """Feed the ids (n,) one by one (a prime warming the state)."""
    for n in range(ids.shape[0]):
        stream_step(net, ids[n], h, c, work, blocks)


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
