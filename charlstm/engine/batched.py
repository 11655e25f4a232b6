"""The window's batched products in bfloat16, on the packed micro-kernel (float32 runs them on BLAS,
kernels.py; BLAS has no bfloat16 product). Per layer above 0 and per layer (N = T*B positions):

    input terms   A (N, G) = X (N, H) @ Wx.T + b        x: X's operand copy,  panels: Wx by rows
    dH below      dH (N, H) = dA (N, G) @ Wx             x: dA's operand copy, panels: Wx by columns
    weight grads  dW (G, H) = dA^T (G, N) @ X (N, H)    x: dA^T's copy,       panels: X by columns

`product_rows` multiplies rows of x by every panel into a float32 `wide` array whose columns are
the panels' W lanes in panel order; the shapes' tails (units past H) land in its pad columns, and
one pass (`scatter_gates`, `copy_columns`) moves the real columns into place, adding the bias for
the input terms. The k loop runs in chunks of KC, so a chunk of a panel pair stays in L1 while
every block of rows reads it (the block's rows continue their sums from out: the same chain of
fmas as one call, bf16.py). Every output is one chain in k order, whichever thread and rows cut
holds it, so the bytes do not depend on the thread count.
"""
from charlstm.engine.jit import kernel
from charlstm.engine.packed import PANELS, ROWS, block_product

KC = 256  # k per chunk: a panel pair's chunk is 16 KB of bfloat16 (32 KB of L1 on Zen 4)


@kernel
def product_rows(x, P, wide, lo, hi):
    """wide[r, u*W + j] = sum over k of x[r, k] * P[u, k, j] for rows lo..hi-1 of x (R, K) and
    every panel u of P (Pn, K, W) (Pn a multiple of PANELS); wide (R, >= Pn*W) float32."""
    R, K = x.shape
    Pn, _, W = P.shape
    xf, pf, out, stride = x.reshape(-1), P.reshape(-1), wide.reshape(-1), wide.shape[1]
    blocks = -(-(hi - lo) // ROWS)
    for k0 in range(0, K, KC):
        k1 = min(K, k0 + KC)
        for u in range(0, Pn, PANELS):
            for b in range(blocks):
                first = lo + b * (hi - lo) // blocks
                rows = lo + (b + 1) * (hi - lo) // blocks - first
                block_product(xf, first * K + k0, K, rows, pf, u * K * W + k0 * W, K * W, k1 - k0, out,
                              first * stride + u * W, stride, W, k0 > 0)


@kernel
def scatter_gates(wide, b, A, lo, hi, W):
    """Rows lo..hi-1 of A (N, G) = the input terms in gate order + b (G,): wide (N, >= 4*U*W) holds
    panel (u, q) (packed.pack_forward's unit block u, gate q) at columns (4u + q) * W."""
    G = A.shape[1]
    H = G // 4
    for n in range(lo, hi):
        row, out = wide[n], A[n]
        for q in range(4):
            for k in range(H):
                out[q * H + k] = row[(4 * (k // W) + q) * W + k % W] + b[q * H + k]


@kernel
def copy_columns(wide, out, lo, hi):
    """Rows lo..hi-1 of out (R, C) = wide[:, :C]."""
    C = out.shape[1]
    for r in range(lo, hi):
        out[r] = wide[r, :C]


@kernel
def transpose_part(src, dst, lo, hi):
    """Rows lo..hi-1 of dst (C, >= R) = columns lo..hi-1 of src (R, C); dst's columns past R zeroed.
    In bands of 8 rows of src, as kernels.transpose_into."""
    R = src.shape[0]
    for r0 in range(0, R, 8):
        r1 = min(r0 + 8, R)
        for col in range(lo, hi):
            for r in range(r0, r1):
                dst[col, r] = src[r, col]
    for col in range(lo, hi):
        dst[col, R:] = 0
