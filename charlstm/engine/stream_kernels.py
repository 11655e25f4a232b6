"""Sampling: one stream, a char at a time through every layer, and the output layer and the draw.
(Training with B = 1 and eval run the recurrent grid, recurrent.py, with one stream group.)

A step of one stream is a matrix-vector product: it reads every recurrent weight once (1 MB a
layer at H = 256 in float32) for 2 flops each, so it is bound by how fast the weights stream in,
not by arithmetic. So each step is split across the team (threads.Team.together) by hidden units,
DeepCPU's layout: the units are cut into `shares` contiguous ranges of unit blocks (packed.py's
panels of W units), share i = blocks [i*U/shares, (i+1)*U/shares), and thread r of n works shares
r, r+n, ... for the whole call. A thread's slice of the packed weights stays in its core's L2
from step to step. Per step a thread makes its units' four gate pre-activations with the one-row
micro-kernel (packed.row_product), runs their gates and cell update (recurrent.py's gate math),
writes its units of h_t, and meets the others (barrier.meet): the next char reads all of h_t.

`shares` is always the team's full size (threads.Team.most), whatever number of threads runs: a
unit's arithmetic, and the views its gate loops run over, are then the same on 1 thread or on
all, so results do not depend on the thread count.

run_stream takes (rank, threads, shares, sync) last and is called once per thread by
threads.Team.together (sync: one row of the team's meeting counters). Dimension letters as in
kernels.py.
"""
import math

import numpy as np

from charlstm.engine.barrier import meet
from charlstm.engine.jit import inline_kernel, kernel
from charlstm.engine.packed import row_product, to_operand
from charlstm.engine.recurrent import cell_units


@inline_kernel
def share_units(share, shares, U, W, H):
    """Share `share` of `shares`: (its first unit block, its unit blocks, its units lo..hi-1)."""
    u0, u1 = share * U // shares, (share + 1) * U // shares
    return u0, u1 - u0, min(u0 * W, H), min(u1 * W, H)


@inline_kernel
def step_share(Wf, v, a, peep, c_prev, c_new, tc, h_new, hx_new, z, share, shares):
    """One step of one share of one layer's units.

    Wf    (U, 4, Kmax, W)  the layer's weights against the input vector, packed: float
          (packed.pack_forward), or bfloat16 (bf16.pack_rows: pairs for Dot, singles for Widen)
    v     (K,)   the input vector as the product reads it: h_{t-1}, or for sampling's fused layers
          [h_t below | h_{t-1}]; float with float Wf, else its bfloat16 operand copy
    a     (G,)   in: the rest of the pre-activation (bias, input term); out: the gates (this share's units)
    peep  (3H,) or (0,);  c_prev (H,) c_{t-1};  c_new (H,) out: c_t (may be c_prev)
    tc    (H,) out: tanh(c_t);  h_new (H,) out: h_t (must not alias v: other shares still read it)
    hx_new (H,) out: h_t as the next products read it (h_new itself with float Wf; packed.to_operand)
    z     (4 * U * W,)  the products, gate-major (z[q*U*W + k]); shares write disjoint parts
    """
    U, _, Kmax, W = Wf.shape
    H, K, width = c_new.shape[0], v.shape[0], U * W
    u0, units, lo, hi = share_units(share, shares, U, W, H)
    wf = Wf.reshape(-1)
    for u in range(u0, u0 + units):  # the unit block's 4 gate panels in one call
        row_product(v, 0, wf, u * 4 * Kmax * W, Kmax * W, K, z, u * W, width, 4)
    cell_units(a, z, width, peep, c_prev, c_new, h_new, tc, lo, hi)
    to_operand(h_new[lo:hi], hx_new[lo:hi], Wf)


# ---------------------------------------------------------------- sampling's entry point (Team.together)

@kernel
def run_stream(net, feed, state, statex, c, u, inv_temp, top_k, greedy, work, out, rank, threads, shares, sync):
    """Advance one stream through every layer, a char at a time: feed the ids feed (n,), then
    draw out.shape[0] ids, each from the state after the previous id (the last fed id for the
    first), with the uniform u[k], feeding each drawn id but the last. A call with no ids to draw
    just warms the state (a prime); a call that continues a sample feeds the last id drawn.

    net   (WxT0 (V, G), Wf (L, U, 4, Kmax, W), bias (L, G), peep (L, 3H) or (L, 0), Wy (V, H),
           by (V,)): Wf[0] is Wh of layer 0 packed (K = H), Wf[l] the fused [Wx | Wh] (G, 2H) of layer l
    state (2, L, 2H)  layer l's input vector at a char, [h_t of layer l-1 | h_{t-1} of layer l],
           in two copies: char n reads copy n % 2 and writes copy 1 - n % 2, so a thread writing
           its units never overwrites what another still reads. Layer 0's vector is its second
           half. Between calls the state is copy 0's second halves.
    statex (2, L, 2H)  the state as the products read it: state itself with float Wf, else its
           bfloat16 copy (uint16 bits for Dot's pairs, rounded float32 for Widen), made as h is;
           the output layer reads the float32 state, as training's does
    c     (L, H) in/out;  work (a (G,), z (4*U*W,), tc (H,), logits (V,) float64, p (V,) float64,
           order (V,) int64);  inv_temp, top_k, greedy as in draw
    Thread 0 draws, and the others meet it once more to read the drawn id.
    """
    WxT0, Wf, bias, peep, Wy, by = net[0], net[1], net[2], net[3], net[4], net[5]
    a, z, tc, logits, p, order = work[0], work[1], work[2], work[3], work[4], work[5]
    L, H = c.shape
    U, W = Wf.shape[1], Wf.shape[4]
    n_feed, n_out = feed.shape[0], out.shape[0]
    steps = n_feed + max(n_out - 1, 0)
    meeting = 0
    for n in range(steps):
        x = feed[n] if n < n_feed else out[n - n_feed]
        now, after = state[n % 2], state[1 - n % 2]
        nowx, afterx = statex[n % 2], statex[1 - n % 2]
        for l in range(L):
            for share in range(rank, shares, threads):
                _, _, lo, hi = share_units(share, shares, U, W, H)
                b, column = bias[l], WxT0[x]  # layer 0's one-hot input: a column of Wx
                for q in range(4):
                    for j in range(q * H + lo, q * H + hi):
                        a[j] = column[j] + b[j] if l == 0 else b[j]
                v = nowx[0, H:] if l == 0 else nowx[l]
                h_new, hx_new = after[l, H:], afterx[l, H:]
                step_share(Wf[l], v, a, peep[l], c[l], c[l], tc, h_new, hx_new, z, share, shares)
                if l + 1 < L:  # the layer above's input, this char
                    now[l + 1, lo:hi] = h_new[lo:hi]
                    nowx[l + 1, lo:hi] = hx_new[lo:hi]
            meeting += 1
            if not meet(sync, meeting, threads):
                return
        k = n - n_feed + 1  # the draw this step's state makes, if any
        if 0 <= k < n_out:
            if rank == 0:
                output_logits(Wy, by, after[L - 1, H:], logits)
                out[k] = draw(logits, inv_temp, top_k, greedy, u[k], p, order)
            if k + 1 < n_out:  # the next char feeds it
                meeting += 1
                if not meet(sync, meeting, threads):
                    return
    if steps % 2 == 1:  # the state is in copy 1: move this thread's units back to copy 0
        for share in range(rank, shares, threads):
            _, _, lo, hi = share_units(share, shares, U, W, H)
            for l in range(L):
                state[0, l, H + lo:H + hi] = state[1, l, H + lo:H + hi]
                statex[0, l, H + lo:H + hi] = statex[1, l, H + lo:H + hi]


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
