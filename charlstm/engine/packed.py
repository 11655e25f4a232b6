"""The packed per-step product: Wh laid out once per optimizer step for a register-blocked
micro-kernel, which the recurrent kernels (recurrent.py) call at every step.

Per step, a layer needs z = h_{t-1} @ Wh.T, (B, H)(H, G), forward and dh_{t-1} = dA_t @ Wh,
(B, G)(G, H), backward. BLAS re-packs Wh for every such call; here Wh is packed once per window
into panels of LANES columns (one vector register: 16 floats with AVX-512, 8 with AVX2, 4 with
NEON; half as many doubles), each panel K-major so the micro-kernel reads it as one contiguous stream:

    forward   Wf (U, 4, H, LANES)   Wf[u, q, k, j] = Wh[q*H + u*LANES + j, k]
              the 4 panels of unit block u are gates i, f, o, g of the same LANES units, so one
              micro-kernel call yields every gate of those units and the cell update can follow
              while they are in L1.
    backward  Wb (Ub, G, LANES)     Wb[u, k, j] = Wh[k, u*LANES + j]
              PANELS consecutive unit blocks per call (Ub a multiple of PANELS).
Units past H are zero rows (H need not be a multiple of LANES); their outputs are never read.

The micro-kernel, `block_product`, computes ROWS x PANELS vector accumulators over a K loop in
registers: out[m, p, :] (+)= sum_k x[m, k] * w[p, k, :], for m < rows <= ROWS rows of x (streams)
and PANELS panels. LLVM does not vectorize such loops written in Numba (3-4 GFLOP/s measured, all
scalar), so it is emitted as LLVM IR through numba.extending.intrinsic: vector loads of the
panels, a broadcast of each x entry, a multiply-add per panel and row: llvm.fma on <LANES x float>,
or in bfloat16 one of products.py's (the arrays' dtypes choose; bf16.py packs for them). Every
output is a sum over k in ascending order, whatever `rows` is, and a call may continue the sums
a call before it left (`accumulate`), which is the same chain: a stream's result does not depend
on which streams share its block (or thread), nor on how K is cut into calls (rows_times_pair's
chunks), so runs are the same bytes for any thread count.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from charlstm.engine import bf16, products
from charlstm.engine.jit import inline_kernel, kernel
from charlstm.engine.target import SHAPE

# The micro-kernel's shape for the target LLVM compiles for (target.py says which and why): a call
# multiplies ROWS rows of x by PANELS panels, keeping ROWS x PANELS accumulators in registers. Per k:
# PANELS vector loads and ROWS broadcasts feed ROWS x PANELS fmas, so the fmas, not the loads, set
# the pace.
VECTOR_BYTES, ROWS, PANELS = SHAPE.vector_bytes, SHAPE.rows, SHAPE.panels


def lanes(dtype):
    """Elements per vector register (and per panel row) for a dtype."""
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def packed_shapes(H, dtype):
    """The shapes of the forward and backward packings of an (4H, H) Wh, and the width of a stream's
    row of scratch: the forward's 4 x U*W pre-activations or the backward's Ub*W dh."""
    W = lanes(dtype)
    units = -(-H // W)
    backward_units = -(-units // PANELS) * PANELS
    return (units, 4, H, W), (backward_units, 4 * H, W), 4 * backward_units * W


@kernel
def pack_forward(Wh, Wf, lo, hi):
    """Unit blocks lo..hi-1 of Wf (U, 4, >= K, W) = Wh (4H, K) in forward panels (module docstring);
    pad units zero. Whole unit blocks, so threads can pack disjoint ranges. K is H for Wh; for
    sampling's fused [Wx | Wh] (4H, 2H) it is 2H (a panel's rows past K are left as they are).
    Row by row of Wh: its reads stream, and the panel's K lines it writes stay in L1 across a
    block's W rows (2-4x faster than gathering W rows at each k)."""
    _, _, _, W = Wf.shape
    H, K = Wh.shape[0] // 4, Wh.shape[1]
    for u in range(lo, hi):
        for q in range(4):
            panel = Wf[u, q]
            for j in range(W):
                unit = u * W + j
                if unit < H:
                    row = Wh[q * H + unit]
                    for k in range(K):
                        panel[k, j] = row[k]
                else:
                    for k in range(K):
                        panel[k, j] = 0
    return Wf


@kernel
def pack_columns(M, P, lo, hi):
    """Panels lo..hi-1 of P (Cb, K, W) = the columns of M (K, C) in panels (module docstring's
    backward packing of Wh, (G, H)): P[u, k, j] = M[k, u*W + j], zero past C. Whole panels, so
    threads can pack disjoint ranges. A whole panel row is a plain copy, which LLVM vectorizes."""
    _, K, W = P.shape
    C = M.shape[1]
    for u in range(lo, hi):
        if (u + 1) * W <= C:
            for k in range(K):
                source, panel_row = M[k, u * W:(u + 1) * W], P[u, k]
                for j in range(W):
                    panel_row[j] = source[j]
        else:
            for k in range(K):
                row, panel_row = M[k], P[u, k]
                for j in range(W):
                    unit = u * W + j
                    panel_row[j] = row[unit] if unit < C else 0
    return P


# ---------------------------------------------------------------- the micro-kernel, in LLVM IR

def emit_block_product(context, builder, sig, args, rows, panels, product):
    """out[o + m*rs + p*os + j] (+)= sum_k x[xo + m*xs + k] * w[wo + p*ps + k*W + j] for m < rows,
    p < panels, j < W, k < K; x, w, out arrays, the rest int64 element counts, the last (accumulate)
    nonzero to continue each sum from out's value instead of from zero. `product` (products.py) says
    what an element is and how one k multiplies and adds."""
    x_ty, _, _, w_ty, _, _, _, out_ty, _, _, _, _ = sig.args
    x_arr, x_off, x_stride, w_arr, w_off, panel_stride, K, out_arr, out_off, out_row_stride, out_panel_stride, \
        accumulate = args
    vty, size, W = product.vty, product.size, product.W
    x_ptr = context.make_array(x_ty)(context, builder, x_arr).data
    w_ptr = context.make_array(w_ty)(context, builder, w_arr).data
    out_ptr = context.make_array(out_ty)(context, builder, out_arr).data
    i64 = ir.IntType(64)
    x_rows = [builder.gep(x_ptr, [builder.add(x_off, builder.mul(x_stride, ir.Constant(i64, m)))]) for m in range(rows)]
    w_panels = [builder.gep(w_ptr, [builder.add(w_off, builder.mul(panel_stride, ir.Constant(i64, p)))])
                for p in range(panels)]
    def out_at(m, p):  # out's vector of row m, panel p
        at = builder.add(builder.add(out_off, builder.mul(out_row_stride, ir.Constant(i64, m))),
                         builder.mul(out_panel_stride, ir.Constant(i64, p)))
        return builder.bitcast(builder.gep(out_ptr, [at]), vty.as_pointer())
    outs = [[out_at(m, p) for p in range(panels)] for m in range(rows)]
    zero = ir.Constant(vty, [ir.Constant(product.vty.element, 0.0)] * W)
    # A sum continued from out is the same chain of fmas as one call over both ranges of k: a
    # float32 stored and loaded is exact.
    adding = builder.icmp_signed("!=", accumulate, ir.Constant(i64, 0))
    start = [[builder.select(adding, builder.load(o, align=size), zero) for o in row] for row in outs]
    steps = product.steps(builder, K)

    entry = builder.basic_block
    loop = builder.append_basic_block("k_loop")
    done = builder.append_basic_block("k_done")
    builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(i64, 0)), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(i64)
    acc = [[builder.phi(vty) for _ in range(panels)] for _ in range(rows)]
    k.add_incoming(ir.Constant(i64, 0), entry)
    for m in range(rows):
        for p in range(panels):
            acc[m][p].add_incoming(start[m][p], entry)
    panel = [product.load_panel(builder, w_panels[p], k) for p in range(panels)]
    new = []
    for m in range(rows):
        x = product.load_x(builder, x_rows[m], k)
        new.append([product.madd(builder, x, panel[p], acc[m][p]) for p in range(panels)])
    k_next = builder.add(k, ir.Constant(i64, 1))
    body_end = builder.basic_block
    k.add_incoming(k_next, body_end)
    for m in range(rows):
        for p in range(panels):
            acc[m][p].add_incoming(new[m][p], body_end)
    builder.cbranch(builder.icmp_signed("<", k_next, steps), loop, done)

    builder.position_at_end(done)
    results = []
    for m in range(rows):  # phis first: LLVM wants them at the top of the block
        for p in range(panels):
            result = builder.phi(vty)
            result.add_incoming(start[m][p], entry)
            result.add_incoming(new[m][p], body_end)
            results.append(result)
    for i, result in enumerate(results):
        m, p = divmod(i, panels)
        builder.store(result, outs[m][p], align=size)
    return context.get_dummy_value()


def _block_product_intrinsic(rows, panels=PANELS):
    @intrinsic
    def block_product_rows(typingctx, x, x_off, x_stride, w, w_off, panel_stride, K, out, out_off, out_row_stride,
                           out_panel_stride, accumulate):
        if not all(isinstance(a, types.Array) for a in (x, w, out)) or str(out.dtype) not in ("float32", "float64"):
            return None
        product = products.product_class(x, w)
        if product is None:
            return None
        sig = types.void(x, types.int64, types.int64, w, types.int64, types.int64, types.int64, out, types.int64,
                         types.int64, types.int64, types.int64)
        return sig, lambda context, builder, sig, args: emit_block_product(
            context, builder, sig, args, rows, panels, product(context, x, VECTOR_BYTES))
    return block_product_rows


_p1, _p2, _p3, _p4, _p5, _p6, _p7, _p8 = [_block_product_intrinsic(rows) for rows in range(1, 9)]
_row8, _row4, _row1 = _block_product_intrinsic(1, 8), _block_product_intrinsic(1, 4), _block_product_intrinsic(1, 1)
# One row's widest call: 8 panels (8 accumulators, 8 panel vectors and the broadcast) where the
# target names 32 vector registers, else 4.
ROW_PANELS = 8 if SHAPE.registers >= 32 else 4


@kernel
def block_product(x, x_off, x_stride, rows, w, w_off, panel_stride, K, out, out_off, out_row_stride, out_panel_stride,
                  accumulate=0):
    """out[out_off + m*out_row_stride + p*out_panel_stride + j] = sum over k < K of
    x[x_off + m*x_stride + k] * w[w_off + p*panel_stride + k*W + j], for m < rows (1..ROWS),
    p < PANELS, j < W (module docstring), added to out's value if `accumulate`: a block of rows of
    x times PANELS panels. Offsets and strides count elements of the flat (1-D) arrays; nothing
    is bounds-checked. x and w are float arrays of one dtype, or bfloat16 bits (products.py)."""
    args = (x, x_off, x_stride, w, w_off, panel_stride, K, out, out_off, out_row_stride, out_panel_stride, accumulate)
    if rows == 8:
        _p8(*args)
    elif rows == 7:
        _p7(*args)
    elif rows == 6:
        _p6(*args)
    elif rows == 5:
        _p5(*args)
    elif rows == 4:
        _p4(*args)
    elif rows == 3:
        _p3(*args)
    elif rows == 2:
        _p2(*args)
    else:
        _p1(*args)


# Bytes of a panel pair's k chunk: the pair's chunk stays in L1 (32 KB on Zen 4, 48 KB on Ice Lake)
# while every block of rows reads it, and x's rows leave room beside it.
CHUNK_BYTES = 16384


@inline_kernel
def rows_times_pair(x, lo, hi, x_stride, K, w, w_off, panel_stride, out, out_off, out_row_stride, out_panel_stride):
    """Rows lo..hi-1 of x (row r at r*x_stride, K elements) times the PANELS panels of K x W at
    w_off (panel p at w_off + p*panel_stride, K*W unless the panels are longer than K), into out at
    out_off + r*out_row_stride (+ panel * out_panel_stride):
    k in chunks of CHUNK_BYTES of the pair, blocks of up to ROWS rows inside, each block continuing
    its sums from the chunk before (one chain in k order: the same bytes as a single call)."""
    W = VECTOR_BYTES // max(w.itemsize, 4)  # float32 lanes for bfloat16 (uint16) panels
    chunk = CHUNK_BYTES // (PANELS * W * w.itemsize)
    blocks = -(-(hi - lo) // ROWS)
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        for b in range(blocks):
            first, rows = row_block(lo, hi, blocks, b)
            block_product(x, first * x_stride + k0, x_stride, rows, w, w_off + k0 * W, panel_stride, k1 - k0, out,
                          out_off + first * out_row_stride, out_row_stride, out_panel_stride, k0 > 0)


@inline_kernel
def row_block(lo, hi, blocks, b):
    """The first row and the row count of block b of `blocks` near-equal blocks of lo..hi-1.
    Even blocks, not full ones and a remainder: a call's fma chains are 2 x rows long, and 1 or 2
    rows cannot hide the fma latency (25 streams ran as 8+8+8+1 at 77 GFLOP/s, 32 as 4 x 8 at 93)."""
    n = hi - lo
    first = lo + b * n // blocks
    return first, lo + (b + 1) * n // blocks - first


@kernel
def row_product(x, x_off, w, w_off, panel_stride, K, out, out_off, out_panel_stride, panels):
    """out[out_off + p*out_panel_stride + j] = sum over k < K of x[x_off + k] * w[w_off + p*panel_stride + k*W + j]
    for p < panels, j < W: one row of x (one stream's step) times `panels` panels, ROW_PANELS (then
    4) a call while they last. One row has no rows to share a panel's load, so a call keeps its
    panels' fma chains in flight instead: with 4, the backward's long chains (k < G) waited on the
    latency of vdpbf16ps; with 8 a step is bound by how fast the panels stream in from L2. Each
    panel's sum is one chain in k order, whichever call holds it."""
    p = 0
    while ROW_PANELS == 8 and p + 8 <= panels:
        _row8(x, x_off, 0, w, w_off + p * panel_stride, panel_stride, K, out, out_off + p * out_panel_stride, 0,
              out_panel_stride, 0)
        p += 8
    while p + 4 <= panels:
        _row4(x, x_off, 0, w, w_off + p * panel_stride, panel_stride, K, out, out_off + p * out_panel_stride, 0,
              out_panel_stride, 0)
        p += 4
    while p < panels:
        _row1(x, x_off, 0, w, w_off + p * panel_stride, panel_stride, K, out, out_off + p * out_panel_stride, 0,
              out_panel_stride, 0)
        p += 1


# ---------------------------------------------------------------- one call for every precision

def pack_rows_any(M, P, lo, hi, x):
    """Unit blocks lo..hi-1 of P = M in forward panels (pack_forward) in P's dtype: float as is, or
    bfloat16 (uint16) rounded, in the layout the product with operand x reads (bf16.py: pairs
    for bfloat16 x, singles for float32 x)."""


def pack_columns_any(M, P, lo, hi, x):
    """Panels lo..hi-1 of P = the columns of M (pack_columns) in P's dtype, as pack_rows_any."""


def _overload_packer(stub, float_packer, bfloat_packer):
    """stub(M, P, lo, hi, x) calls float_packer(M, P, lo, hi) for float P, else
    bfloat_packer(M, P, lo, hi, pairs) with pairs for a bfloat16 operand x."""
    @overload(stub, inline="always")
    def choose(M, P, lo, hi, x):
        if P.dtype == types.uint16:
            pairs = x.dtype == types.uint16
            return lambda M, P, lo, hi, x: bfloat_packer(M, P, lo, hi, pairs)
        return lambda M, P, lo, hi, x: float_packer(M, P, lo, hi)


_overload_packer(pack_rows_any, pack_forward, bf16.pack_rows)
_overload_packer(pack_columns_any, pack_columns, bf16.pack_columns)


def to_operand(src, dst, w):
    """Make dst, the product operand copy of src (n,) float: nothing when the weights w are float
    (the float product reads src itself: dst is src), else src rounded to bfloat16 (bf16.round_into)."""


@overload(to_operand, inline="always")
def _to_operand(src, dst, w):
    if w.dtype == types.uint16:
        return lambda src, dst, w: bf16.round_into(src, dst)
    return lambda src, dst, w: None
