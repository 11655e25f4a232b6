"""The training kernels: LSTM forward and backward over a window of B streams, and the output layer.

Dimension letters, used in every shape comment of the package:
    B  streams in a batch          T  steps in a window
    H  hidden units per layer      G  = 4H gate rows, in order i, f, o, g
    V  vocabulary size             N  = T*B positions of a window
    D  input width of a layer: V for layer 0 (one-hot), H above

Arrays of a window are time-major, (T, B, ...), so step t is one contiguous (B, ...) block and
(T, B, X) reshapes to (N, X) for free. Kernels take arrays and scalars only, never read module
state, and never allocate inside the time loop: workspaces are allocated once by the caller.

These are the batched kernels, over all N positions of a window at once: products go to BLAS
through np.dot (SciPy's BLAS, called from inside Numba). The per-step recurrent loops are
recurrent.py's (the grid of grid.py, any B) and stream_kernels.py's (sampling), both on our
micro-kernel over Wh packed by packed.py, on the threads of threads.Team. How kernels are compiled, and
the dtype-typed tanh/sigmoid/like they use, is in jit.py.
"""
import math

import numpy as np

from charlstm.engine.jit import kernel, like


# ---------------------------------------------------------------- input terms (batched over time)

@kernel
def transpose_into(W, WT):
    """WT = W.T, both C-contiguous: (R, C) -> (C, R). Done once per window so every per-step read
    is a contiguous row. In bands of 8 rows: each band's reads stay in cache and each write is 8
    contiguous floats. Measured against 32x32 tiles: 3x faster for the (V, G) gradient of layer 0
    (the tiles' writes 4 KB apart alias in cache), 1.1-1.5x for the square-ish ones."""
    R, C = W.shape
    for r0 in range(0, R, 8):
        r1 = min(r0 + 8, R)
        for col in range(C):
            for r in range(r0, r1):
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


# ---------------------------------------------------------------- around the recurrent loops
# A layer's time loop itself is recurrent.py's.

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
def column_sums(dZ, db, lo, hi):
    """The bias gradient, columns lo..hi-1: db[lo:hi] out = sum over the N rows of dZ[:, lo:hi]
    (N, R). Each column sums its rows in order, whatever range holds it."""
    N = dZ.shape[0]
    part = db[lo:hi]
    part[:] = 0
    for n in range(N):
        row = dZ[n, lo:hi]
        for j in range(hi - lo):
            part[j] += row[j]


@kernel
def gather_input_grad(dA, x, dWxT, lo, hi):
    """Layer 0, columns lo..hi-1: scatter-add the gate gradients into the rows of the one-hot ids
    seen. dA (T, B, G), x (T, B) ids, dWxT (V, G) out (dWx transposed)."""
    T, B, G = dA.shape
    dWxT[:, lo:hi] = 0
    for t in range(T):
        for s in range(B):
            row, d = dWxT[x[t, s], lo:hi], dA[t, s, lo:hi]
            for j in range(hi - lo):
                row[j] += d[j]


# ---------------------------------------------------------------- output layer

@kernel
def softmax_xent(Htop, Wy, by, y, P, N):
    """Logits, softmax and cross-entropy for n positions (a share of a window's N); P becomes
    dloss/dlogits of the window's mean loss.

    Htop (n, H) top layer outputs, Wy (V, H), by (V,), y (n,) target ids,
    P (n, V) out: (softmax - onehot(y)) / N.  Returns the summed loss in nats (in float64).
    """
    np.dot(Htop, Wy.T, P)
    n_rows, V = P.shape
    inv_n = like(P[0, 0], 1.0 / N)
    total = 0.0
    for n in range(n_rows):
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
    return total
