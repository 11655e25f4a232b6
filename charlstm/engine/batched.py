"""The window's batched products in bfloat16, on the packed micro-kernel (float32 runs them on BLAS,
kernels.py; BLAS has no bfloat16 product). Per layer above 0 and per layer (N = T*B positions):

    input terms   A (N, G) = X (N, H) @ Wx.T + b        x: X's operand copy,  panels: Wx by rows
    dH below      dH (N, H) = dA (N, G) @ Wx             x: dA's operand copy, panels: Wx by columns
    weight grads  dW (G, H) = dA^T (G, N) @ X (N, H)    x: dA^T's copy,       panels: X by columns

`product_rows` multiplies rows of x by every panel into a float32 array whose columns are the
panels' W lanes in panel order: the result itself when its width is the panels' (H a multiple of
2W: network._into), else a padded `wide` array whose pad columns take the units past H, and one
pass (`scatter_gates`, `copy_columns`) moves the real columns into place, adding the bias for the
input terms (whose panels are in unit-block order, not gate order). The k loop runs in chunks,
so a chunk of a panel pair stays in L1 while every block of rows reads it (packed.rows_times_pair:
each block continues its sums from out, the same chain of fmas as one call). Every output is one
chain in k order, whichever thread and rows cut holds it, so the bytes do not depend on the thread
count.
"""
from charlstm.engine.bf16 import transpose_block
from charlstm.engine.jit import kernel
from charlstm.engine.packed import PANELS, rows_times_pair


@kernel
def product_rows(x, P, wide, lo, hi):
    """wide[r, u*W + j] = sum over k of x[r, k] * P[u, k, j] for rows lo..hi-1 of x (R, K) and
    every panel u of P (Pn, K, W) (Pn a multiple of PANELS); wide (R, >= Pn*W) float32. Panel
    pairs outside, k chunks and blocks of rows inside (packed.rows_times_pair)."""
    K = x.shape[1]
    Pn, _, W = P.shape
    xf, pf, out, stride = x.reshape(-1), P.reshape(-1), wide.reshape(-1), wide.shape[1]
    for u in range(0, Pn, PANELS):
        rows_times_pair(xf, lo, hi, K, K, pf, u * K * W, K * W, out, u * W, stride, W)


@kernel
def scatter_gates(wide, b, A, lo, hi, W):
    """Rows lo..hi-1 of A (N, G) = the input terms in gate order + b (G,): wide (N, >= 4*U*W) holds
    panel (u, q) (packed.pack_forward's unit block u, gate q) at columns (4u + q) * W."""
    G = A.shape[1]
    H = G // 4
    U = -(-H // W)
    for n in range(lo, hi):
        row, out = wide[n], A[n]
        for u in range(U):
            m = min(W, H - u * W)  # the block's real units
            for q in range(4):
                source, bias, dest = row[(4 * u + q) * W:(4 * u + q) * W + m], b[q * H + u * W:q * H + u * W + m], \
                    out[q * H + u * W:q * H + u * W + m]
                for j in range(m):
                    dest[j] = source[j] + bias[j]


@kernel
def copy_columns(wide, out, lo, hi):
    """Rows lo..hi-1 of out (R, C) = wide[:, :C]."""
    C = out.shape[1]
    for r in range(lo, hi):
        out[r] = wide[r, :C]


@kernel
def transpose_part(src, dst, lo, hi):
    """Rows lo..hi-1 of dst (C, >= R) = columns lo..hi-1 of src (R, C); dst's columns past R zeroed."""
    R, C = src.shape
    transpose_block(src.reshape(-1), 0, C, R, lo, hi, dst.reshape(-1), 0, dst.shape[1])
    for col in range(lo, hi):
        dst[col, R:] = 0
