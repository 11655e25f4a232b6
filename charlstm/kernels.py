"""The training kernels: LSTM forward and backward over a window of B streams, and the output layer.

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
How kernels are compiled, and the dtype-typed tanh/sigmoid/like they use, is in jit.py; the
one-stream step kernels for sampling and eval are in stream_kernels.py.
"""
import math

import numpy as np

from charlstm.jit import kernel, like, sigmoid, tanh


# ---------------------------------------------------------------- input terms (batched over time)

@kernel
def transpose_into(W, WT):
    """WT = W.T, both C-contiguous: (R, C) -> (C, R). Done once per window so every per-step read
    is a contiguous row."""
    transpose_rows(W, WT, 0, W.shape[0])


@kernel
def transpose_rows(W, WT, lo, hi):
    """WT[:, lo:hi] = W[lo:hi].T, in bands of 8 rows: each band's reads stay in cache and each
    write is 8 contiguous floats. Measured against 32x32 tiles: 3x faster for the (V, G) gradient
    of layer 0 (the tiles' writes 4 KB apart alias in cache), 1.1-1.5x for the square-ish ones."""
    C = W.shape[1]
    for r0 in range(lo, hi, 8):
        r1 = min(r0 + 8, hi)
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
