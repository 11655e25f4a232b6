"""bfloat16 operands: rounding float32 to bfloat16, and the weights packed as bfloat16 for the
micro-kernel's bfloat16 products (products.py: Widen and Dot).

A bfloat16 is the upper 16 bits of a float32 (sign, the 8-bit exponent, 7 bits of mantissa), held
here in uint16 arrays (NumPy has no bfloat16). Rounding is to nearest, ties to even, as
`vcvtne2ps2bf16` and PyTorch round; a NaN stays a (quiet) NaN and a value past bfloat16's largest
rounds to inf, as IEEE rounding does.

Only the operands of the matrix products are rounded (the weights once per window when packed,
h and the layers' inputs as they are made, the gate gradients as the backward makes them); the
accumulators, gates, cell state, gradients, master weights and optimizer state stay float32.

The two layouts of a packed operand, both shaped as packed.py's float32 packing with W float32
lanes (so every offset computed for one serves the other):
    singles (Widen)  panel[k, j] = element (k, j), as float32's packing
    pairs (Dot)      panel rows 2*k2 and 2*k2+1 hold pairs: flat[k2*2W + 2j + e] = element (2*k2+e, j),
                     K even (an odd K gets a zero row)
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from charlstm.engine.jit import FASTMATH, inline_kernel, kernel


@intrinsic
def float_bits(typingctx, x):
    """The 32 bits of a float32, as a uint32."""
    if x != types.float32:
        return None
    return types.uint32(x), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def bits_float(typingctx, b):
    """The float32 whose 32 bits are the low 32 bits of the unsigned integer b (Numba widens
    uint32 arithmetic to 64 bits)."""
    if not isinstance(b, types.Integer) or b.signed or b.bitwidth < 32:
        return None

    def emit(context, builder, sig, args):
        bits = args[0] if b.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(b), emit


@inline_kernel
def round_bits(x):
    """float32 x to bfloat16, to nearest with ties to even: its 16 bits as a uint32 (< 2**16)."""
    b = float_bits(x)
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it one, quiet
        return (b >> np.uint32(16)) | np.uint32(0x40)
    return (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@inline_kernel
def widen(bits):
    """A bfloat16's bits (uint16 or uint32 < 2**16) as the float32 it stands for."""
    return bits_float(np.uint64(bits) << np.uint64(16))


def round_into(src, dst):
    """dst (n,) = src (n,) float32 rounded to bfloat16: the bits into a uint16 dst (the Dot
    product's operands), the rounded value into a float32 one (the Widen product's x)."""


@overload(round_into, inline="always", jit_options={"fastmath": set(FASTMATH), "error_model": "numpy"})
def _round_into_impl(src, dst):
    if dst.dtype == types.uint16:
        def into_bits(src, dst):
            for j in range(src.shape[0]):
                dst[j] = np.uint16(round_bits(src[j]))
        return into_bits

    def into_values(src, dst):
        for j in range(src.shape[0]):
            dst[j] = widen(round_bits(src[j]))
    return into_values


@kernel
def round_rows(src, dst, lo, hi):
    """Rows lo..hi-1 of dst (R, >= C) = src (R, C) float32 rounded (round_into); any columns of dst
    past C (an odd K's pad) are zeroed."""
    C = src.shape[1]
    for r in range(lo, hi):
        round_into(src[r], dst[r, :C])
        dst[r, C:] = 0


TILE = 16  # transpose_tile's side


@intrinsic
def transpose_tile(typingctx, src, src_off, src_stride, dst, dst_off, dst_stride):
    """dst[dst_off + j*dst_stride + i] = src[src_off + i*src_stride + j] for i, j < TILE: a 16 x 16
    tile of a flat array of 16-, 32- or 64-bit elements, as 16 vector loads, four stages of 16 shuffles
    (stage k swaps the off-diagonal k x k blocks of every 2k x 2k block) and 16 vector stores, where
    a loop of scalar copies is bound by its instructions (~2 ns an element measured)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
            and src.dtype.bitwidth in (16, 32, 64)):
        return None

    def emit(context, builder, sig, args):
        src_arr, s_off, s_stride, dst_arr, d_off, d_stride = args
        ety = context.get_value_type(sig.args[0].dtype)
        vty, i64, i32 = ir.VectorType(ety, TILE), ir.IntType(64), ir.IntType(32)
        size = sig.args[0].dtype.bitwidth // 8
        s_ptr = context.make_array(sig.args[0])(context, builder, src_arr).data
        d_ptr = context.make_array(sig.args[3])(context, builder, dst_arr).data
        at = lambda ptr, off, stride, i: builder.bitcast(
            builder.gep(ptr, [builder.add(off, builder.mul(stride, ir.Constant(i64, i)))]), vty.as_pointer())
        rows = [builder.load(at(s_ptr, s_off, s_stride, i), align=size) for i in range(TILE)]
        k = TILE // 2
        while k:
            for i in range(TILE):
                if i & k:
                    continue
                a, b = rows[i], rows[i + k]
                low = [j if not j & k else TILE + j - k for j in range(TILE)]
                high = [j + k if not j & k else TILE + j for j in range(TILE)]
                rows[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, TILE), low))
                rows[i + k] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, TILE), high))
            k //= 2
        for j in range(TILE):
            builder.store(rows[j], at(d_ptr, d_off, d_stride, j), align=size)
        return context.get_dummy_value()
    return types.void(src, types.int64, types.int64, dst, types.int64, types.int64), emit


@inline_kernel
def transpose_block(src, s_off, s_stride, R, c_lo, c_hi, dst, d_off, d_stride):
    """dst[d_off + c*d_stride + r] = src[s_off + r*s_stride + c] for r < R, c_lo <= c < c_hi (flat
    arrays of one dtype): whole TILE x TILE tiles by transpose_tile, the
    edges element by element."""
    whole = R // TILE * TILE
    c = c_lo
    while whole > 0 and c + TILE <= c_hi:
        for r0 in range(0, whole, TILE):
            transpose_tile(src, s_off + r0 * s_stride + c, s_stride, dst, d_off + c * d_stride + r0, d_stride)
        c += TILE
    for col in range(c_lo, c_hi):
        for r in range(whole if col < c else 0, R):  # past the whole tiles' columns: every row
            dst[d_off + col * d_stride + r] = src[s_off + r * s_stride + col]


@kernel
def pack_rows(M, P, lo, hi, pairs):
    """Unit blocks lo..hi-1 of P (U, 4, Kx, W) uint16 = M (4H, K) float32 rounded, in forward panels
    (packed.pack_forward's order: panel (u, q) holds rows q*H + u*W .. + W of M, gate q of unit block
    u), in pairs or singles (module docstring). Units past H and columns past K are zero. A panel
    is its W rows of M rounded, then transposed: element by element for singles, pair by pair (as
    32-bit elements) for pairs."""
    _, _, Kx, W = P.shape
    H, K = M.shape[0] // 4, M.shape[1]
    rounded = np.zeros((W, Kx), np.uint16)  # a panel's rows of M, rounded; the pad stays zero
    for u in range(lo, hi):
        n = min(W, H - u * W)  # the block's real units
        rounded[n:] = 0
        for q in range(4):
            for j in range(n):
                round_into(M[q * H + u * W + j], rounded[j, :K])
            panel = P[u, q].reshape(-1)
            if pairs:
                transpose_block(rounded.reshape(-1).view(np.uint32), 0, Kx // 2, W, 0, Kx // 2,
                                panel.view(np.uint32), 0, W)
            else:
                transpose_block(rounded.reshape(-1), 0, Kx, W, 0, Kx, panel, 0, W)
    return P


@kernel
def pack_columns(M, P, lo, hi, pairs):
    """Panels lo..hi-1 of P (Cb, Kx, W) uint16 = the columns of M (K, C) float32 rounded
    (packed.pack_columns's order: P[u, k, j] = M[k, u*W + j]), in pairs or singles; zero past C
    and K. A panel row is W contiguous elements of M's row (two rows, interleaved, for pairs)."""
    _, Kx, W = P.shape
    K, C = M.shape
    for u in range(lo, hi):
        flat = P[u].reshape(-1)
        flat[:] = 0
        n = min(W, C - u * W)  # the panel's real columns
        if pairs:
            for k2 in range(K // 2):
                even, odd = M[2 * k2, u * W:u * W + n], M[2 * k2 + 1, u * W:u * W + n]
                out = flat[k2 * 2 * W:k2 * 2 * W + 2 * n]
                for j in range(n):
                    out[2 * j] = np.uint16(round_bits(even[j]))
                    out[2 * j + 1] = np.uint16(round_bits(odd[j]))
            if K % 2:  # the last row pairs with the zero pad
                last, out = M[K - 1, u * W:u * W + n], flat[(K // 2) * 2 * W:]
                for j in range(n):
                    out[2 * j] = np.uint16(round_bits(last[j]))
        else:
            for k in range(K):
                row, out = M[k, u * W:u * W + n], flat[k * W:k * W + n]
                for j in range(n):
                    out[j] = np.uint16(round_bits(row[j]))
    return P
