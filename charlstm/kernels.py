"""Every compiled kernel: LSTM forward and backward over a window, the output layer, sampling steps.

Dimension letters, used in every shape comment of the package:
    B  streams in a batch          T  steps in a window
    H  hidden units per layer      G  = 4H gate rows, in order i, f, o, g
    V  vocabulary size             N  = T*B positions of a window
    D  input width of a layer: V for layer 0 (one-hot), H above

Arrays of a window are time-major, (T, B, ...), so step t is one contiguous (B, ...) block and
(T, B, X) reshapes to (N, X) for free. Kernels take arrays and scalars only, never read module
state, and never allocate inside the time loop: workspaces are allocated once by the caller.

Products go to BLAS through np.dot (SciPy's BLAS, called from inside Numba). Only the recurrent
products run per step; every elementwise gate operation is fused into one pass around them.
In float32 the nonlinearities are rational approximations that vectorize (libm calls do not);
float64 keeps the exact functions, for the gradient checks.
"""
import math
import sys

import numpy as np
from numba import njit, types
from numba.core.caching import FunctionCache
from numba.extending import overload

# One place for the fastmath flags. No `nnan`/`ninf`: the trainer must see NaN and inf.
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})


def kernel(fn, **options):
    """njit with the package's flags (plus `options`, e.g. parallel=True), cached on disk.

    This is njit(cache=True) with a cache that fails soft: a cache Numba cannot place (no writable
    folder: NUMBA_CACHE_DIR, the package's __pycache__ and ~/.cache all refused), read (garbage or
    foreign files) or write (disk full) means compiling in memory with one warning on stderr,
    never an exception from the import or the first call.
    """
    # error_model="numpy": no zero-division check, which would stop the gate loops vectorizing.
    dispatcher = njit(fastmath=set(FASTMATH), error_model="numpy", nogil=True, **options)(fn)
    global _disk_cache
    if _disk_cache:
        try:
            dispatcher._cache = _SoftCache(dispatcher.py_func)  # what cache=True does, softened
        except Exception as e:  # RuntimeError "cannot cache function ...: no locator available"
            _disk_cache = False
            _cache_warning(f"found no writable folder: {_short(e)}; set NUMBA_CACHE_DIR to one")
    return dispatcher


_disk_cache = True  # False once Numba found no folder to cache in: then no kernel tries again
_warned = False


class _SoftCache(FunctionCache):
    """Numba's per-function disk cache; any error reading or writing it disables it (for this
    kernel) and the kernel is compiled in memory, as with cache=False."""

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # e.g. UnpicklingError from a garbage .nbi/.nbc file
            self.disable()
            _cache_warning(f"unreadable files in {self.cache_path}: {_short(e)}; delete them to rebuild the cache")
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as e:  # e.g. OSError: no space left on device
            self.disable()
            _cache_warning(f"cannot write to {self.cache_path}: {_short(e)}")


def _cache_warning(reason):
    """One line on stderr, once per process (above a progress bar, if one is showing)."""
    global _warned
    if not _warned:
        _warned = True
        from tqdm import tqdm
        tqdm.write(f"charlstm: cannot use the Numba cache ({reason}); compiling in memory", file=sys.stderr)


def _short(e):
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- nonlinearities, typed per dtype

def tanh(x):
    return math.tanh(x)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _is_float32(x):
    return isinstance(x, types.Float) and x.bitwidth == 32


@overload(tanh, inline="always", jit_options={"fastmath": set(FASTMATH), "error_model": "numpy"})
def _tanh_impl(x):
    if _is_float32(x):
        def tanh32(x):
            # Eigen's float32 rational approximation (13/6): |error| ~ 1e-7, no libm call.
            clamp = np.float32(7.90531110763549805)
            x = min(max(x, -clamp), clamp)
            x2 = x * x
            p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
            p = x2 * p + np.float32(-8.60467152213735e-11)
            p = x2 * p + np.float32(5.12229709037114e-08)
            p = x2 * p + np.float32(1.48572235717979e-05)
            p = x2 * p + np.float32(6.37261928875436e-04)
            p = x2 * p + np.float32(4.89352455891786e-03)
            q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
            q = x2 * q + np.float32(2.26843463243900e-03)
            q = x2 * q + np.float32(4.89352518554385e-03)
            return x * p / q
        return tanh32
    return lambda x: math.tanh(x)


@overload(sigmoid, inline="always", jit_options={"fastmath": set(FASTMATH), "error_model": "numpy"})
def _sigmoid_impl(x):
    if _is_float32(x):
        def sigmoid32(x):
            half = np.float32(0.5)
            return half + half * tanh(half * x)
        return sigmoid32
    return lambda x: 1.0 / (1.0 + math.exp(-x))


def like(x, value):
    """`value` as a scalar of x's type (a bare float literal would promote float32 math to float64)."""
    return type(x)(value)


@overload(like, inline="always")
def _like_impl(x, value):
    scalar_type = x
    return lambda x, value: scalar_type(value)


# ---------------------------------------------------------------- input terms (batched over time)

@kernel
def transpose_into(W, WT):
    """WT = W.T, both C-contiguous: (R, C) -> (C, R), in 32x32 tiles so reads and writes both stay in
    cache. Done once per step so every per-step read is a contiguous row."""
    R, C = W.shape
    for r0 in range(0, R, 32):
        for c0 in range(0, C, 32):
            for col in range(c0, min(c0 + 32, C)):
                for r in range(r0, min(r0 + 32, R)):  # contiguous writes: strided ones alias in cache
                    WT[col, r] = W[r, col]


@kernel
def gather_input(WxT, b, x, A):
    """Layer 0: the one-hot input product is a row lookup. A[t, s] = WxT[x[t, s]] + b.
    WxT (V, G), b (G,), x (T, B) ids, A (T, B, G) out."""
    T, B = x.shape
    G = b.shape[0]
    for t in range(T):
        for s in range(B):
            row = WxT[x[t, s]]
            for j in range(G):
                A[t, s, j] = row[j] + b[j]


@kernel
def project_input(X, Wx, b, A):
    """Layers above 0: the input product for all T steps as one product. A = X @ Wx.T + b.
    X (N, H) the layer below's outputs, Wx (G, H), b (G,), A (N, G) out."""
    np.dot(X, Wx.T, A)
    N, G = A.shape
    for n in range(N):
        for j in range(G):
            A[n, j] += b[j]


# ---------------------------------------------------------------- one layer over one window

@kernel
def lstm_forward(A, Wh, peep, h, c, tc, z):
    """Run one layer over a window, keeping what the backward needs.

    A    (T, B, G)    in: input term + bias per step; out: the gates after their nonlinearity
    Wh   (G, H)       recurrent weights (BLAS reads Wh.T in place, no copy)
    peep (3H,)        peephole weights i, f, o; length 0 when peepholes are off
    h, c (T+1, B, H)  h[0], c[0] in: the carried state; h[t+1], c[t+1] out: the state after step t
    tc   (T, B, H)    out: tanh(c_t)
    z    (B, G)       workspace for the recurrent product
    """
    T, B, G = A.shape
    H = G // 4
    peepholes = peep.shape[0] > 0
    for t in range(T):
        np.dot(h[t], Wh.T, z)  # the only product that must run step by step
        for s in range(B):
            # Short passes over one stream's row, each simple enough for LLVM to vectorize.
            a, zs, c_prev, c_new, h_new, tc_new = A[t, s], z[s], c[t, s], c[t + 1, s], h[t + 1, s], tc[t, s]
            for j in range(G):
                a[j] += zs[j]
            if peepholes:
                for k in range(H):
                    a[k] += peep[k] * c_prev[k]
                    a[H + k] += peep[H + k] * c_prev[k]
            for j in range(2 * H):
                a[j] = sigmoid(a[j])  # i, f
            for j in range(3 * H, G):
                a[j] = tanh(a[j])  # g
            for k in range(H):
                c_new[k] = a[H + k] * c_prev[k] + a[k] * a[3 * H + k]  # c = f * c_prev + i * g
            if peepholes:
                for k in range(H):
                    a[2 * H + k] += peep[2 * H + k] * c_new[k]  # the output gate peeks at the new cell
            for k in range(H):
                o = sigmoid(a[2 * H + k])
                a[2 * H + k] = o
                tc_new[k] = tanh(c_new[k])
                h_new[k] = o * tc_new[k]


@kernel
def lstm_backward(gates, c, tc, peep, Wh, dH, dA, dh, dc):
    """Truncated BPTT through one layer over the window, from t = T-1 down to 0.

    gates (T, B, G)   i, f, o, g from the forward;  c (T+1, B, H);  tc (T, B, H) = tanh(c_t)
    peep  (3H,)       (length 0 when off);  Wh (G, H)
    dH    (T, B, H)   in: dloss/dh_t from above (output layer, or the next layer's input);
                      overwritten with the total dloss/dh_t
    dA    (T, B, G)   out: dloss/d(gate pre-activations), for the batched weight gradients
    dh, dc (B, H)     in: gradient arriving from after the window (zero under truncation);
                      out: dloss/dh_0, dloss/dc_0
    """
    T, B, G = gates.shape
    H = G // 4
    peepholes = peep.shape[0] > 0
    for t in range(T - 1, -1, -1):
        for s in range(B):
            # Short passes, each over few enough arrays for LLVM to vectorize.
            gs, das, c_prev, tcs, dHs, dhs, dcs = gates[t, s], dA[t, s], c[t, s], tc[t, s], dH[t, s], dh[s], dc[s]
            for k in range(H):
                dHs[k] += dhs[k]  # dloss/dh_t: from above, and from step t+1 through Wh
            for k in range(H):
                # forward: h = o * tanh(c)   so: do = dh * tanh(c), dc += dh * o * (1 - tanh(c)^2)
                o, tct, dht = gs[2 * H + k], tcs[k], dHs[k]
                das[2 * H + k] = dht * tct * (o - o * o)
                dcs[k] += dht * o - dht * o * tct * tct
            if peepholes:
                for k in range(H):
                    dcs[k] += peep[2 * H + k] * das[2 * H + k]  # a_o saw c_t through its peephole
            for k in range(H):
                # forward: c = f * c_prev + i * g
                i, f, g, dct = gs[k], gs[H + k], gs[3 * H + k], dcs[k]
                das[k] = dct * g * (i - i * i)
                das[H + k] = dct * c_prev[k] * (f - f * f)
                das[3 * H + k] = dct * i - dct * i * g * g
                dcs[k] = dct * f
            if peepholes:
                for k in range(H):
                    dcs[k] += peep[k] * das[k] + peep[H + k] * das[H + k]
        np.dot(dA[t], Wh, dh)  # forward: z = h_{t-1} @ Wh.T   so: dh_{t-1} = dz @ Wh


@kernel
def peephole_grad(dA, c, dpeep):
    """dpeep (3H,) out: sum over the window of da_i * c_{t-1}, da_f * c_{t-1}, da_o * c_t.
    dA (T, B, G), c (T+1, B, H)."""
    T, B, G = dA.shape
    H = G // 4
    dpeep[:] = 0
    for t in range(T):
        for s in range(B):
            for k in range(H):
                dpeep[k] += dA[t, s, k] * c[t, s, k]
                dpeep[H + k] += dA[t, s, H + k] * c[t, s, k]
                dpeep[2 * H + k] += dA[t, s, 2 * H + k] * c[t + 1, s, k]


@kernel
def matmul(a, b, out):
    """out = a @ b, all C-contiguous 2-D."""
    np.dot(a, b, out)


@kernel
def weight_grad(dZ, X, dW):
    """The batched gradient of a product Z = X @ W.T over all positions: dW = dZ^T @ X.
    dZ (N, R), X (N, D), dW (R, D) out."""
    np.dot(dZ.T, X, dW)


@kernel
def column_sums(dZ, db):
    """The bias gradient: db (R,) out = sum over the N rows of dZ (N, R)."""
    N, R = dZ.shape
    db[:] = 0
    for n in range(N):
        for j in range(R):
            db[j] += dZ[n, j]


@kernel
def gather_input_grad(dA, x, dWxT):
    """Layer 0: scatter-add the gate gradients into the rows of the one-hot ids seen.
    dA (T, B, G), x (T, B) ids, dWxT (V, G) out (dWx transposed)."""
    T, B, G = dA.shape
    dWxT[:] = 0
    for t in range(T):
        for s in range(B):
            row = dWxT[x[t, s]]
            for j in range(G):
                row[j] += dA[t, s, j]


# ---------------------------------------------------------------- output layer

@kernel
def softmax_xent(Htop, Wy, by, y, P):
    """Logits, softmax and cross-entropy for all N positions at once; P becomes dloss/dlogits.

    Htop (N, H) top layer outputs, Wy (V, H), by (V,), y (N,) target ids,
    P (N, V) out: (softmax - onehot(y)) / N.  Returns the mean loss in nats (summed in float64).
    """
    np.dot(Htop, Wy.T, P)
    N, V = P.shape
    inv_n = like(P[0, 0], 1.0 / N)
    total = 0.0
    for n in range(N):
        row = P[n]
        m = row[0] + by[0]
        for v in range(V):
            row[v] += by[v]
            m = max(m, row[v])
        z = like(m, 0.0)
        for v in range(V):
            row[v] = math.exp(row[v] - m)
            z += row[v]
        total += math.log(z) - math.log(row[y[n]])
        scale = inv_n / z
        for v in range(V):
            row[v] *= scale
        row[y[n]] -= inv_n
    return total / N




# ---- one stream, step by step (sampling and eval)
#
# One stream (B = 1) advanced one character at a time: sampling, priming, scoring a file. A step
# reads every recurrent weight once (12.6 MB at H=512, L=2 in float32), so it is bound by memory
# bandwidth, not arithmetic: the work is one sweep over the weight rows, split across threads in
# blocks of hidden units. A block owns units [lo, hi): it dots their four gate rows k, H+k, 2H+k,
# 3H+k with the input vector in one loop (each input element loaded once for four rows), then runs
# their gates, cell and output. A thread gets the same block every step, so its rows stay in its
# core's cache when they fit.

from numba import prange  # noqa: E402  (only this section uses it)


def parallel_kernel(fn):
    """`kernel` with parallel=True: its prange loops run on Numba's threads (NUMBA_NUM_THREADS)."""
    return kernel(fn, parallel=True)


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
