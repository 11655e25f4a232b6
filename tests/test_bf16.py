"""bfloat16 products (issue #32) against the plain-NumPy emulation (tests/bf16_reference.py): the
rounding, the packings, the micro-kernels and the window's batched products in both products
(Widen everywhere; Dot where target.BF16_PRODUCT is "dot", skipped with the reason elsewhere), the
whole network's loss and gradients over the shapes the engine packs, the same bytes on 1 thread
and on all, the per-machine choice of the product and its guard, and no compile on a second step.

Widen runs in this process on any machine: Workspace takes the product from network.BF16_PRODUCT
when it is made (pairs for dot, singles for widen), and the kernels pick theirs from the operands'
dtypes, so a test sets network.BF16_PRODUCT (test_the_env_widen_is_the_in_process_widen checks
that this is byte for byte what CHARLSTM_BF16_PRODUCT=widen runs in a child process).
"""
import os
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest

from charlstm.engine import batched, bf16, kernels, network, packed, recurrent, stream_kernels, target
from charlstm.engine.jit import kernel
from charlstm.model import views

from tests import bf16_reference as emul
from tests.conftest import seconds
from tests.test_grid import CUTS, threads_to_try
from tests.test_kernels import random_case, random_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = packed.lanes(np.float32)  # a panel's lanes: bfloat16 panels are shaped as float32's
HAS_DOT = target.BF16_PRODUCT == "dot"
K_CHUNK = packed.CHUNK_BYTES // (packed.PANELS * W * 2)  # k per chunk of a bfloat16 panel pair (rows_times_pair)
PRODUCTS = ["widen", "dot"]


def needs(product):
    """Skip a Dot test, saying why, where the machine's product is not Dot."""
    if product == "dot" and not HAS_DOT:
        pytest.skip(f"the Dot product (vdpbf16ps) needs avx512bf16: this machine's bfloat16 product is "
                    f"{target.BF16_PRODUCT!r} ({target.architecture()})")


def relative(ours, theirs):
    """max |ours - theirs| over max |theirs|, in float64."""
    theirs = np.asarray(theirs, np.float64)
    return np.abs(np.asarray(ours, np.float64) - theirs).max() / max(np.abs(theirs).max(), 1e-30)


# ---------------------------------------------------------------- rounding

@kernel
def _round_each(src, out):
    for j in range(src.shape[0]):
        out[j] = bf16.round_bits(src[j])


@kernel
def _round_into(src, dst):
    bf16.round_into(src, dst)


def special_values():
    """float32 bit patterns at every edge of rounding (expected bfloat16 bits beside, as comments)."""
    patterns = [
        0x3F808000,  # tie, even below (0x3F80): stays 0x3F80
        0x3F818000,  # tie, odd below (0x3F81): up to 0x3F82
        0x3F807FFF, 0x3F808001,  # just below and above a tie
        0xBF818000, 0xBF808000,  # negative ties
        0x7F7F7FFF,  # below the tie under the largest bfloat16: 0x7F7F
        0x7F7F8000,  # tie between 0x7F7F (odd) and 2**128: inf
        0x7F7FFFFF,  # float32's largest: inf
        0xFF7FFFFF,  # -inf
        0x7F800000, 0xFF800000,  # inf, -inf stay
        0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF, 0xFF800001,  # NaNs: quiet and signalling
        0x00000000, 0x80000000,  # zeros keep their sign
        0x00000001, 0x00008000,  # denormals rounding to zero (the second a tie to even 0)
        0x00018000,  # denormal tie, odd below: 0x0002
        0x007FFFFF,  # the largest denormal: up to the smallest normal 0x0080
        0x00400000, 0x80012345,  # denormals kept / rounded
        0x00800000, 0x00807FFF, 0x00808000, 0x00818000,  # the smallest normals and ties there
    ]
    return np.array(patterns, np.uint32).view(np.float32)


def rounding_cases():
    rng = np.random.default_rng(0)
    every_bit = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)  # NaNs too
    ties = ((rng.integers(0, 2 ** 16, 2000).astype(np.uint32) << np.uint32(16)) | np.uint32(0x8000)).view(np.float32)
    normal = rng.standard_normal(5000).astype(np.float32)
    return np.concatenate([special_values(), every_bit, ties, normal])


def test_the_emulation_rounds_the_edges_as_ieee_says():
    """The emulation itself on hand-worked cases (its ties, overflow and NaN are the truth below)."""
    got = emul.bits(special_values())
    want = [0x3F80, 0x3F82, 0x3F80, 0x3F81, 0xBF82, 0xBF80, 0x7F7F, 0x7F80, 0x7F80, 0xFF80, 0x7F80, 0xFF80,
            0x7FC0, 0xFFC0, 0x7FC0, 0x7FFF, 0xFFC0, 0x0000, 0x8000, 0x0000, 0x0000, 0x0002, 0x0080, 0x0040, 0x8001,
            0x0080, 0x0080, 0x0080, 0x0082]
    assert [hex(b) for b in got] == [hex(b) for b in want]
    assert np.array_equal(emul.round_bf16(np.float32([1.0, -2.5, 3.4e38, np.inf])),
                          np.float32([1.0, -2.5, np.inf, np.inf]))


def test_round_bits_matches_the_emulation():
    values = rounding_cases()
    out = np.zeros(values.shape, np.uint32)
    _round_each(values, out)
    assert out.max() < 2 ** 16
    want = emul.bits(values)
    bad = np.flatnonzero(out.astype(np.uint16) != want)
    assert not bad.size, [(hex(values[i:i + 1].view(np.uint32)[0]), hex(out[i]), hex(want[i])) for i in bad[:5]]
    nan = np.isnan(values)
    assert nan.any() and np.isnan(emul.from_bits(out[nan].astype(np.uint16))).all()
    assert (out[nan] & 0x40).all()  # quiet


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_round_into_matches_the_emulation(dtype):
    """Bits into a uint16 destination (the Dot product's operands), rounded values into a float32 one
    (the Widen product's x), NaN payloads included."""
    values = rounding_cases()
    dst = np.zeros(values.shape, dtype)
    _round_into(values, dst)
    if dtype == "uint16":
        assert np.array_equal(dst, emul.bits(values))
    else:
        assert np.array_equal(dst.view(np.uint32), emul.round_bf16(values).view(np.uint32))


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_round_rows_rounds_its_rows_and_zeroes_the_pad(dtype):
    src = rounding_cases()[:7 * 37].reshape(7, 37)
    sentinel = np.uint16(0xABCD) if dtype == "uint16" else np.float32(-7.0)
    dst = np.full((7, 38), sentinel, dtype)
    bf16.round_rows(src, dst, 2, 5)
    want = emul.bits(src[2:5]) if dtype == "uint16" else emul.round_bf16(src[2:5])
    assert np.array_equal(dst[2:5, :37].view(np.uint16 if dtype == "uint16" else np.uint32),
                          want.view(np.uint16 if dtype == "uint16" else np.uint32))
    assert not dst[2:5, 37].any()
    assert (dst[:2] == sentinel).all() and (dst[5:] == sentinel).all()


# ---------------------------------------------------------------- packing

def as_layout(E, pairs):
    """Panels E (..., Kx, W) of element bits, element (k, j) at E[..., k, j], in the product's
    layout (bf16.py): singles as they are; pairs with flat[k2*2W + 2j + e] = element (2*k2 + e, j)."""
    if not pairs:
        return E
    *lead, Kx, Wn = E.shape
    return np.swapaxes(E.reshape(*lead, Kx // 2, 2, Wn), -1, -2).reshape(E.shape)


def rows_panels(M, U, Kx):
    """packed.pack_forward's panels of M (4H, K) as bits: E[u, q, k, j] = M[q*H + u*W + j, k]."""
    H, K = M.shape[0] // 4, M.shape[1]
    E = np.zeros((U, 4, Kx, W), np.uint16)
    Mb = emul.bits(M)
    for u in range(U):
        for q in range(4):
            units = np.arange(u * W, min((u + 1) * W, H))
            E[u, q, :K, :len(units)] = Mb[q * H + units].T
    return E


def columns_panels(M, Cb, Kx):
    """packed.pack_columns's panels of M (K, C) as bits: E[u, k, j] = M[k, u*W + j]."""
    K, C = M.shape
    E = np.zeros((Cb, Kx, W), np.uint16)
    padded = np.zeros((K, Cb * W), np.uint16)
    padded[:, :C] = emul.bits(M)
    E[:, :K] = padded.reshape(K, Cb, W).transpose(1, 0, 2)
    return E


@pytest.mark.parametrize("pairs", [False, True], ids=["singles", "pairs"])
@pytest.mark.parametrize("H,K", [(37, 37), (16, 16), (37, 16), (5, 38)])
def test_pack_rows_lays_out_the_rounded_weights(pairs, H, K):
    """H not a multiple of the 16 lanes (37: three blocks, the last with 5 units), odd K (pairs pad
    a zero row), every pad zero; packed in two parts as the threads do, the same bytes."""
    M = np.random.default_rng(H + K).standard_normal((4 * H, K)).astype(np.float32)
    U = -(-H // W)
    Kx = K + K % 2 if pairs else K
    P = np.full((U, 4, Kx, W), 0xABCD, np.uint16)
    bf16.pack_rows(M, P, 0, U // 2, pairs)
    bf16.pack_rows(M, P, U // 2, U, pairs)
    assert np.array_equal(P, as_layout(rows_panels(M, U, Kx), pairs))


@pytest.mark.parametrize("pairs", [False, True], ids=["singles", "pairs"])
@pytest.mark.parametrize("K,C", [(37, 148), (148, 37), (51, 16), (50, 1)])
def test_pack_columns_lays_out_the_rounded_columns(pairs, K, C):
    """Wh's or Wx's columns (K = 4H, C = H) and an (N, H) operand (K = N positions, odd or even)."""
    M = np.random.default_rng(K + C).standard_normal((K, C)).astype(np.float32)
    Cb = -(-(-(-C // W)) // packed.PANELS) * packed.PANELS
    Kx = K + K % 2 if pairs else K
    P = np.full((Cb, Kx, W), 0xABCD, np.uint16)
    bf16.pack_columns(M, P, 0, 1, pairs)
    bf16.pack_columns(M, P, 1, Cb, pairs)
    assert np.array_equal(P, as_layout(columns_panels(M, Cb, Kx), pairs))


# ---------------------------------------------------------------- the micro-kernels

def operands(rng, shape):
    """float32 values already bfloat16 (operands are rounded before a product reads them)."""
    return emul.round_bf16(rng.standard_normal(shape).astype(np.float32))


def x_for(product, x):
    """x as the product reads it: rounded float32 for Widen, bits for Dot."""
    return x if product == "widen" else emul.bits(x)


def w_for(product, E):
    """Panels (..., K, W) of bfloat16 values as the product reads them: singles or pairs of bits."""
    return as_layout(emul.bits(E), product == "dot")


def assert_product(product, got, want):
    """Widen is the emulation's chain bit for bit (each fma adds an exact product); Dot within
    1e-5 of the largest output (Intel's order is emulated; AMD may round otherwise: measured on the
    2026-12 Zen 4, equal bits in every case here)."""
    if product == "widen":
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), relative(got, want)
    else:
        assert relative(got, want) < 1e-5


@pytest.mark.parametrize("accumulate", [0, 1])
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("product", PRODUCTS)
def test_block_product_matches_the_emulation(product, rows, accumulate):
    """Every row count, at offsets and strides, PANELS panels, K even (Dot's pairs) and long enough
    for the pair order to matter; accumulate continues each sum from out's values."""
    needs(product)
    rng = np.random.default_rng(rows + 10 * accumulate)
    K = 38
    x = operands(rng, (rows + 2, K + 3))
    E = operands(rng, (packed.PANELS + 1, K, W))
    start = rng.standard_normal((rows + 1, 3 * W * packed.PANELS)).astype(np.float32)
    out = start.copy() if accumulate else np.zeros_like(start)
    packed.block_product(x_for(product, x).reshape(-1), (K + 3) + 2, K + 3, rows, w_for(product, E).reshape(-1),
                         K * W, K * W, K, out.reshape(-1), out.shape[1] + W, out.shape[1], 2 * W, accumulate)
    written = np.zeros(out.shape, bool)
    for p in range(packed.PANELS):
        cols = slice(W + 2 * W * p, W + 2 * W * p + W)
        acc = start[1:1 + rows, cols] if accumulate else None
        want = emul.PRODUCTS[product](x[1:1 + rows, 2:2 + K], E[1 + p], acc)
        assert_product(product, out[1:1 + rows, cols], want)
        written[1:1 + rows, cols] = True
    assert np.array_equal(out[~written], start[~written] if accumulate else 0 * start[~written])


@pytest.mark.parametrize("panels", [1, 3, 4, 9])
@pytest.mark.parametrize("product", PRODUCTS)
def test_row_product_matches_the_emulation(product, panels):
    """The one-row kernel (4 panels a call, then 1s) at offsets and strides; K odd for Widen, and
    for Dot an odd K padded with a zero as the packers pad it."""
    needs(product)
    rng = np.random.default_rng(panels)
    K = 37 + (product == "dot")
    x = operands(rng, K + 2)
    E = operands(rng, (panels + 1, K, W))
    if product == "dot":
        x[-1], E[:, -1] = 0, 0  # the pad
    out = np.zeros((panels + 1) * 2 * W, np.float32)
    packed.row_product(x_for(product, x), 2, w_for(product, E).reshape(-1), K * W, K * W, K, out, W, 2 * W, panels)
    got = out[W:W + 2 * W * panels].reshape(panels, 2, W)
    for p in range(panels):
        assert_product(product, got[p, 0], emul.PRODUCTS[product](x[None, 2:], E[1 + p])[0])
    assert not got[:, 1].any() and not out[:W].any() and not out[W + 2 * W * panels:].any()


@pytest.mark.parametrize("R,K,Pn", [(13, 2 * K_CHUNK + 38, packed.PANELS), (7, K_CHUNK + 1, 2 * packed.PANELS),
                                    (1, 3 * K_CHUNK, packed.PANELS), (50, 37, packed.PANELS)])
@pytest.mark.parametrize("product", PRODUCTS)
def test_product_rows_matches_the_emulation(product, R, K, Pn):
    """The window's batched product: K past one chunk of KC (each chunk continues the chain), odd
    row counts cut in two parts as the team's shares, odd K (Dot: padded with a zero)."""
    needs(product)
    rng = np.random.default_rng(R + K)
    Kx = K + K % 2 if product == "dot" else K
    x = np.zeros((R, Kx), np.float32)
    x[:, :K] = operands(rng, (R, K))
    E = np.zeros((Pn, Kx, W), np.float32)
    E[:, :K] = operands(rng, (Pn, K, W))
    wide = np.full((R, Pn * W + 3), np.nan, np.float32)
    for lo, hi in ((0, R // 2), (R // 2, R)):
        batched.product_rows(x_for(product, x), w_for(product, E), wide, lo, hi)
    want = emul.PRODUCTS[product](x, E.transpose(1, 0, 2).reshape(Kx, Pn * W))  # column u*W + j: E[u, :, j]
    assert_product(product, wide[:, :Pn * W], want)
    assert np.isnan(wide[:, Pn * W:]).all()
