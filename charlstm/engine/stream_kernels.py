"""Sampling: streams advanced together a char at a time through every layer, each with its own
output layer and draw. One stream is `charlstm sample`; many are the server's batch (serve/), every
active stream one char per call step. (Training and eval run the recurrent grid, recurrent.py.)

A step is a product of the streams' input vectors with every recurrent weight: with one stream it
reads each weight once (1 MB a layer at H = 256 in float32) for 2 flops, so it is bound by how fast
the weights stream in, not by arithmetic; B streams read them once for all B. So each step is split
across the team (threads.Team.together) by hidden units, DeepCPU's layout: the units are cut into
`shares` contiguous ranges of unit blocks (packed.py's panels of W units), share i = blocks
[i*U/shares, (i+1)*U/shares), and thread r of n works shares r, r+n, ... for the whole call. A
thread's slice of the packed weights stays in its core's L2 from step to step. Per step a thread
makes its units' four gate pre-activations for every stream (one stream: the one-row micro-kernel,
packed.row_product; several: panel pairs times blocks of streams, packed.rows_times_pair), runs
their gates and cell update (recurrent.py's gate math), writes its units of h_t, and meets the
others (barrier.meet): the next layer reads all of h_t. Then the threads draw the next ids, stream
r, r+n, ... on thread r, and meet again: the next step reads them.

Every stream's arithmetic is the same whatever else runs: each product is one chain of fmas in k
order whichever block of streams holds it (packed.py), and its gates, output layer and draw read
only its own row. So a stream's text for a seed does not depend on the streams beside it, and
`shares` is always the team's full size (threads.Team.most), whatever number of threads runs, so
it does not depend on the thread count either.

run_streams takes (rank, threads, shares, sync) last and is called once per thread by
threads.Team.together (sync: one row of the team's meeting counters). Dimension letters as in
kernels.py; B here counts streams.
"""
import math

import numpy as np

from charlstm.engine.barrier import meet
from charlstm.engine.jit import inline_kernel, kernel
from charlstm.engine.packed import PANELS, row_product, rows_times_pair, to_operand
from charlstm.engine.recurrent import cell_units


@inline_kernel
def share_units(share, shares, U, W, H):
    """Share `share` of `shares`: (its first unit block, its unit blocks, its units lo..hi-1)."""
    u0, u1 = share * U // shares, (share + 1) * U // shares
    return u0, u1 - u0, min(u0 * W, H), min(u1 * W, H)


@inline_kernel
def input_term(bias, column, one_hot, a, at):
    """a (n,) = bias[at:at + n], plus column[at:at + n] with one_hot (layer 0's input, a column of Wx)."""
    b, x = bias[at:at + a.shape[0]], column[at:at + a.shape[0]]
    for j in range(a.shape[0]):  # from 0 through views: no negative-index check keeps LLVM from vectorizing
        a[j] = b[j] + x[j] if one_hot else b[j]


@inline_kernel
def copy(src, dst):
    """dst[:] = src, in a plain loop: Numba's slice assignment first checks whether the two views
    overlap (copying through a temporary array when they do), per stream, layer and step."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@inline_kernel
def layer_products(Wf, xs, x_stride, K, z, share, shares, H):
    """The recurrent products of one share's units of one layer, for every stream.

    Wf (U, 4, Kmax, W) the layer's packed weights (packed.pack_forward or bf16.pack_rows), gate
    panels of length Kmax >= K;  xs: the streams' input vectors as the product reads them, stream
    b's K elements at b * x_stride (flat);  z (B, 4 * U * W) out: gate q of unit k at z[b, q*U*W + k]"""
    U, _, Kmax, W = Wf.shape
    B, width = z.shape[0], U * W
    u0, units, _, _ = share_units(share, shares, U, W, H)
    wf, out = Wf.reshape(-1), z.reshape(-1)
    if B == 1:  # one row: the one-row kernel keeps a unit block's 4 panels in flight
        for u in range(u0, u0 + units):
            row_product(xs, 0, wf, u * 4 * Kmax * W, Kmax * W, K, out, u * W, width, 4)
    else:  # panel pairs outside, blocks of streams inside (packed.rows_times_pair)
        for p in range(4 * u0, 4 * (u0 + units), PANELS):  # panel p: unit block p // 4, gate p % 4
            rows_times_pair(xs, 0, B, x_stride, K, wf, p * Kmax * W, Kmax * W, out, (p % 4) * width + (p // 4) * W,
                            z.shape[1], width)


# ---------------------------------------------------------------- sampling's entry point (Team.together)

@kernel
def run_streams(net, Wf, ids, u, how, state, statex, c, work, out, rank, threads, shares, sync):
    """Advance B streams together through every layer for n steps, a char each a step.

    ids (B, n) int64  stream b's input at step t: ids[b, t], or when that is negative the id it
           drew at step t - 1 (a call's first input is always given: a prime's char, or the last
           id drawn by the call before)
    u (B, n) float64  the uniform of stream b's draw after step t in [0, 1), or negative for no
           draw (a prime's chars but its last); out (B, n) int64 out: the ids drawn, -1 where none
    how   (inv_temp (B,), top_k (B,) int64, top_p (B,), greedy (B,) bool): each stream's settings
           for draw
    net   (WxT0 (V, G), bias (L, G), peep (L, 3H) or (L, 0), Wy (V, H), by (V,))
    Wf    (L, U, 4, Kmax, W)  Wf[0] is Wh of layer 0 packed (K = H), Wf[l] the fused [Wx | Wh] (G, 2H)
           of layer l; float, or bfloat16 bits. An argument of its own, not in `net`: Numba 0.60's
           dispatcher took a tuple differing only in this array's dtype for the other one
    state (B, 2, L, 2H)  layer l's input vector at a char, [h_t of layer l-1 | h_{t-1} of layer l],
           in two copies: step t reads copy t % 2 and writes copy 1 - t % 2, so a thread writing
           its units never overwrites what another still reads. Layer 0's vector is its second
           half. Between calls the state is copy 0's second halves. Stream-major, so the first B
           of more rows are a contiguous array too (a server's batch of its active streams).
    statex (B, 2, L, 2H)  the state as the products read it: state itself with float Wf, else its
           bfloat16 copy (uint16 bits for Dot's pairs, rounded float32 for Widen), made as h is;
           the output layer reads the float32 state, as training's does
    c     (B, 2, L, H)  the cell state, in two copies as `state` (between calls in copy 0): a
           cell update in place would keep LLVM from vectorizing the gate math (its runtime
           check that c_{t-1} and c_t do not overlap fails, and the scalar loop runs, 8x slower)
    work  (a (B, G), z (B, 4*U*W), tc (B, H), logits (B, V) float64,
           p (B, V) float64, order (B, V) int64)
    """
    WxT0, bias, peep, Wy, by = net[0], net[1], net[2], net[3], net[4]
    a, z, tc, logits, p, order = work[0], work[1], work[2], work[3], work[4], work[5]
    inv_temp, top_k, top_p, greedy = how[0], how[1], how[2], how[3]
    B, n = ids.shape
    L, H = c.shape[2], c.shape[3]
    U, W = Wf.shape[1], Wf.shape[4]
    stride = 2 * L * 2 * H  # one stream's state (both copies), flat
    flatx = statex.reshape(-1)
    meeting = 0
    for t in range(n):
        now, new = t % 2, 1 - t % 2  # the copies step t reads and writes
        for l in range(L):
            K = H if l == 0 else 2 * H
            xs = flatx[(now * L + l) * 2 * H + (H if l == 0 else 0):]  # stream b's vector at b * stride
            for share in range(rank, shares, threads):
                _, _, lo, hi = share_units(share, shares, U, W, H)
                layer_products(Wf[l], xs, stride, K, z, share, shares, H)
                for b in range(B):
                    x = ids[b, t] if ids[b, t] >= 0 else out[b, t - 1]
                    for q in range(4):  # the input term: the bias, and layer 0's one-hot input, a column of Wx
                        input_term(bias[l], WxT0[x], l == 0, a[b, q * H + lo:q * H + hi], q * H + lo)
                    h_new, hx_new = state[b, new, l, H:], statex[b, new, l, H:]
                    cell_units(a[b], z[b], U * W, peep[l], c[b, now, l], c[b, new, l], h_new, tc[b], lo, hi)
                    to_operand(h_new[lo:hi], hx_new[lo:hi], Wf)
                    if l + 1 < L:  # the layer above's input, this char
                        copy(h_new[lo:hi], state[b, now, l + 1, lo:hi])
                        copy(hx_new[lo:hi], statex[b, now, l + 1, lo:hi])
            meeting += 1
            if not meet(sync, meeting, threads):
                return
        for b in range(rank, B, threads):
            out[b, t] = -1
            if u[b, t] >= 0:
                output_logits(Wy, by, state[b, new, L - 1, H:], logits[b])
                out[b, t] = draw(logits[b], inv_temp[b], top_k[b], top_p[b], greedy[b], u[b, t], p[b], order[b])
        if t + 1 < n:  # the next step feeds the drawn ids
            meeting += 1
            if not meet(sync, meeting, threads):
                return
    if n % 2 == 1:  # the state is in copy 1: move this thread's units back to copy 0
        for share in range(rank, shares, threads):
            _, _, lo, hi = share_units(share, shares, U, W, H)
            for b in range(B):
                for l in range(L):
                    copy(state[b, 1, l, H + lo:H + hi], state[b, 0, l, H + lo:H + hi])
                    copy(statex[b, 1, l, H + lo:H + hi], statex[b, 0, l, H + lo:H + hi])
                    copy(c[b, 1, l, lo:hi], c[b, 0, l, lo:hi])


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
def select_top(logits, k, order, ranked):
    """order[:n] = the ids of the k largest logits, largest first, ties to the lower id; returns
    n = min(k, V). k <= 0 or k >= V keeps every id: in id order, or ranked as above if `ranked`.
    Insertion into a sorted list of k: cheap for the small k people use and a vocabulary of a
    few hundred, no allocation."""
    V = logits.shape[0]
    if k <= 0 or k >= V:
        if not ranked:
            for v in range(V):
                order[v] = v
            return V
        k = V
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
def draw(logits, inv_temp, top_k, top_p, greedy, u, p, order):
    """The next char id from logits (V,) float64.

    greedy: the argmax (ties to the lowest id). Otherwise inverse CDF at the uniform u in [0, 1) of
    softmax(logits * inv_temp) over the top_k largest logits (all when top_k <= 0), cut to its
    nucleus when top_p < 1: the most likely ids, largest first, up to the first whose running sum
    reaches top_p of the whole (nucleus sampling, Holtzman et al. 2019; the ids kept are renormalized).
    p, order (V,) workspaces, float64 and int64.
    """
    V = logits.shape[0]
    if greedy:
        best = 0
        for v in range(1, V):
            if logits[v] > logits[best]:
                best = v
        return best
    n = select_top(logits, top_k, order, top_p < 1.0)
    m = logits[order[0]]
    for i in range(1, n):
        m = max(m, logits[order[i]])
    total = 0.0
    for i in range(n):
        p[i] = math.exp((logits[order[i]] - m) * inv_temp)
        total += p[i]
    if top_p < 1.0:
        whole, total = total, 0.0
        for i in range(n):
            total += p[i]
            if total >= top_p * whole:
                n = i + 1
                break
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
