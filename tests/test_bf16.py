"""bfloat16 products (issue #32) against the plain-NumPy emulation (tests/bf16_reference.py): the
rounding, the packings, the micro-kernels and the window's batched products in both products
(Widen everywhere; Dot where target.BF16_PRODUCT is "dot", skipped with the reason elsewhere), the
whole network's loss and gradients over the shapes the engine packs, the same bytes on 1 thread
and on all, the per-machine choice of the product and its guard, and no compile on a second step.

Widen runs in this process on any machine: Workspace takes the product from network.BF16_PRODUCT
when it is made (pairs for dot, singles for widen; grid.BF16_PRODUCT prices the cut), and the
kernels pick theirs from the operands' dtypes, so a test sets those two (set_product;
test_the_env_widen_is_the_in_process_widen checks that this is byte for byte what
CHARLSTM_BF16_PRODUCT=widen runs in a child process).
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


@pytest.mark.parametrize("panels", [1, 3, 4, 8, 9, 13])
@pytest.mark.parametrize("product", PRODUCTS)
def test_row_product_matches_the_emulation(product, panels):
    """The one-row kernel (its widest calls first, then 4s, then 1s) at offsets and strides; K odd
    for Widen, and for Dot an odd K padded with a zero as the packers pad it."""
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


@pytest.mark.parametrize("product", PRODUCTS)
def test_denormals_as_each_product_defines_them(product):
    """Dot takes denormal inputs as zero and flushes a denormal result (vdpbf16ps's DAZ and FTZ,
    Intel's definition; the Zen 4 does the same); Widen's fma keeps both. Bit for bit: denormal x
    times 1, and normal operands whose product (2**-130) is a float32 denormal."""
    needs(product)
    K = 4
    xb = np.array([[0x0040, 0x8003, 0x0040, 0x0001],  # denormal bfloat16s
                   [0x1C80, 0x1C80, 0x0000, 0x0000]], np.uint16)  # 2**-70
    Eb = np.zeros((packed.PANELS, K, W), np.uint16)
    Eb[0] = 0x3F80  # 1.0
    Eb[1, :2] = 0x21C0  # 2**-59 * 1.5: 2**-70 times it is 1.5 * 2**-129, a float32 denormal
    x, E = emul.from_bits(xb), emul.from_bits(Eb)
    out = np.zeros((2, packed.PANELS * W), np.float32)
    packed.block_product(x_for(product, x).reshape(-1), 0, K, 2, as_layout(Eb, product == "dot").reshape(-1), 0,
                         K * W, K, out.reshape(-1), 0, out.shape[1], W, 0)
    for p in range(2):
        want = emul.PRODUCTS[product](x, E[p])
        assert np.array_equal(out[:, p * W:(p + 1) * W].view(np.uint32), want.view(np.uint32)), p
    assert (out[0, :W] == 0).all() == (product == "dot") and (out[1, W:2 * W] == 0).all() == (product == "dot")


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


# ---------------------------------------------------------------- the network

# Agreement with the emulation, relative to the largest entry of each result. Measured on the Zen 4
# (2026-12) over every case of CASES, in both products: loss, final h and c, dh0, dc0 and every
# gradient within 6.3e-7 of the emulation's, the engine's h, layer inputs and dA within 4.8e-7 (these
# are snapped: see emulated). Unsnapped the worst was 1.6e-3, a "flip": float32 values an ulp apart
# that round to bfloat16 values 2**-8 apart (about 1 operand in 10**4), as large as a real error in
# where the engine rounds would be, so the snapped comparison is the test and the unsnapped one a
# bound on the flips alone.
TOL = 5e-6
FLIPS = 1e-2

CASES = [(L, peep, B, H) for L in (1, 2, 3) for peep in (False, True) for B in (1, 7, 16, 50) for H in (16, 37)]


def extras(layers, peepholes, B, H):
    """Which cases run with dropout and with weight drop: each on about half, every B, H, L and
    peephole setting with and without each."""
    return (layers + B + H) % 2 == 1, (layers + B // 7 + peepholes) % 2 == 1


def network_case(layers, peepholes, B, H, T=5):
    """A random model and window (tests.test_kernels.random_case), with its masks: dropout
    (L, T, B, H) and weight drop (L, G, H), or None."""
    from charlstm.engine.dropout import fill_weight_masks

    case = random_case(layers, peepholes, B, T, "float32", seed=B + H + layers, hidden=H)
    dropout, weight_drop = extras(layers, peepholes, B, H)
    masks = random_masks(case[0], B, T, p=0.3, seed=2) if dropout else None
    weight_masks = None
    if weight_drop:
        weight_masks = np.zeros((layers, 4 * H, H), np.float32)
        fill_weight_masks(weight_masks, 0.4, seed=1, step=2)
    return case, masks, weight_masks


def run_bf16(config, params, x, y, h0, c0, masks=None, weight_masks=None):
    """tests.test_kernels.run_network in bf16: (loss, grads, dh0, dc0, final h, final c), and the
    engine's own values of the operands it computes before rounding them: `seen` (snap's keys,
    bf16_reference.forward)."""
    B, T = x.shape
    ws = network.Workspace(config, B, T, dropout=masks is not None, weight_drop=weight_masks is not None,
                           precision="bf16")
    if masks is not None:
        ws.masks[:] = masks.reshape(ws.masks.shape)
    if weight_masks is not None:
        ws.weight_masks[:] = weight_masks
    xt, yt = np.ascontiguousarray(x.T), np.ascontiguousarray(y.T)
    network.forward(params, ws, xt, h0, c0)
    loss = network.loss(params, ws, yt)
    seen = {("h", l, t): ws.h[l, t].copy() for l in range(config.layers) for t in range(T)}
    seen.update({("input", l): ws.output_up(l - 1).copy() for l in range(1, config.layers)})

    def ready(group):  # layer l's gradients are done: ws.dA holds its dA until the layer below starts
        if group != "out":
            l = int(group[1:])
            seen.update({("dA", l, t): ws.dA[t].copy() for t in range(T)})
    grads = np.full_like(params, np.nan)  # backward must write every entry
    dh0, dc0 = np.zeros_like(h0), np.zeros_like(c0)
    network.backward(params, grads, ws, xt, dh0, dc0, ready=ready)
    return (loss, grads, dh0, dc0, ws.h[:, -1].copy(), ws.c[:, -1].copy()), seen


def emulated(case, product, masks, weight_masks, seen=None, operands=None):
    """The emulation's results, in run_bf16's order (grads as a dict). With `seen`, each operand
    the emulation computes is rounded from the engine's value of it instead of its own, and the
    two values' discrepancy goes into `operands` {kind: worst} ("h", "input", "dA")."""
    config, params, x, y, h0, c0 = case

    def snap(key, value):
        theirs = seen[key].reshape(value.shape)
        operands[key[0]] = max(operands.get(key[0], 0.0), relative(value, theirs))
        return theirs
    p = views(params, config)
    args = (config.layers, config.peepholes, product, masks, weight_masks)
    kwargs = {} if seen is None else {"snap": snap}
    loss, cache, h, c = emul.forward(p, x, y, h0, c0, *args, **kwargs)
    grads = emul.backward(p, cache, x, y, *args, **kwargs)
    return loss, grads, grads["h0"], grads["c0"], h, c


def discrepancies(config, ours, theirs):
    """{result: relative discrepancy} for the loss, every gradient, dh0, dc0 and the final state."""
    loss, grads, dh0, dc0, h, c = ours
    ref_loss, ref_grads, ref_dh0, ref_dc0, ref_h, ref_c = theirs
    out = {"loss": relative(loss, ref_loss), "dh0": relative(dh0, ref_dh0), "dc0": relative(dc0, ref_dc0),
           "h": relative(h, ref_h), "c": relative(c, ref_c)}
    out.update({name: relative(g, ref_grads[name]) for name, g in views(grads, config).items()})
    return out


def against_emulation(case, product, masks, weight_masks, ours, seen=None):
    """Every discrepancy between the engine's results and the emulation's: the results', and with
    `seen` the snapped operands' (as "operand h", "operand input", "operand dA")."""
    operands = {}
    worst = discrepancies(case[0], ours, emulated(case, product, masks, weight_masks, seen, operands))
    worst.update({f"operand {kind}": value for kind, value in operands.items()})
    return worst


def beyond(worst, tol):
    """The entries of `worst` at or past tol, for an assertion's message."""
    return {k: f"{v:.1e}" for k, v in worst.items() if not v < tol}


def set_product(monkeypatch, product):
    """Workspaces made from now on use `product` (module docstring): its layouts (network.py) and the
    grid its cost model chooses for it (grid.py)."""
    from charlstm.engine import grid

    monkeypatch.setattr(network, "BF16_PRODUCT", product)
    monkeypatch.setattr(grid, "BF16_PRODUCT", product, raising=False)


def use(monkeypatch, product):
    """set_product, for a test of one product: a Dot test skips where the machine has none."""
    needs(product)
    set_product(monkeypatch, product)


@pytest.mark.parametrize("layers,peepholes,B,H", CASES)
@pytest.mark.parametrize("product", PRODUCTS)
def test_network_matches_the_emulation(monkeypatch, product, layers, peepholes, B, H):
    """Loss, every gradient, dh0, dc0 and the final state against the emulation, each operand the
    emulation computes snapped to the engine's (TOL's comment says why and what was measured)."""
    use(monkeypatch, product)
    case, masks, weight_masks = network_case(layers, peepholes, B, H)
    ours, seen = run_bf16(*case, masks, weight_masks)
    assert not beyond(against_emulation(case, product, masks, weight_masks, ours, seen), TOL)
    if weight_masks is not None:  # a dropped weight gets no gradient
        assert not views(ours[1], case[0])["l0.Wh"][weight_masks[0] == 0].any()


@pytest.mark.parametrize("product", PRODUCTS)
def test_snapping_hides_only_flips_and_rounding_shows(monkeypatch, product):
    """What the snapping hides and what TOL sees, on a case with flips (B = 50, L = 3; measured 6.2e-4
    apart unsnapped, a flip's size, which a change in the engine's float32 math may move): unsnapped
    the emulation is within FLIPS, snapped within TOL; and an emulation that rounds nothing (float32
    products) is far outside TOL, so TOL does see where the engine rounds."""
    use(monkeypatch, product)
    case, masks, weight_masks = network_case(3, False, 50, 37)
    ours, seen = run_bf16(*case, masks, weight_masks)
    free = max(against_emulation(case, product, masks, weight_masks, ours).values())
    snapped = max(against_emulation(case, product, masks, weight_masks, ours, seen).values())
    assert snapped < TOL and free < FLIPS
    monkeypatch.setattr(emul, "round_bf16", lambda a: np.asarray(a, np.float32))
    unrounded = max(against_emulation(case, product, masks, weight_masks, ours, seen).values())
    assert unrounded > 100 * TOL


@pytest.mark.parametrize("layers,peepholes,B,H", [(2, True, 1, 37), (2, False, 7, 37), (3, True, 50, 16),
                                                  (1, False, 16, 37)])
@pytest.mark.parametrize("product", PRODUCTS)
def test_the_thread_count_changes_no_bit(monkeypatch, team_of, product, layers, peepholes, B, H):
    """Every cut of the recurrent grid (tests/test_grid.py's CUTS, clipped to the shape), the
    batched products cut in shares of 4 rows: on 1 thread, one per cell and in between, the very
    same bytes, and the emulation's numbers."""
    from charlstm.engine import grid

    use(monkeypatch, product)
    case, masks, weight_masks = network_case(layers, peepholes, B, H)
    monkeypatch.setattr(network, "SHARE_ROWS", 4)
    monkeypatch.setattr(network, "SHARE_COLUMNS", 4)
    for text in CUTS:
        monkeypatch.setenv("CHARLSTM_GRID", text)
        cut = grid.choose(B, H, "bfloat16", 1)
        runs = {}
        for threads in threads_to_try(cut.cells):
            team_of(max(cut.cells, 2), threads)
            runs[threads] = run_bf16(*case, masks, weight_masks)
        first, seen = runs[1]
        assert not beyond(against_emulation(case, product, masks, weight_masks, first, seen), TOL), text
        for threads, (results, _) in runs.items():
            for ours, theirs in zip(results, first):
                assert np.array_equal(ours, theirs), (text, threads)


def test_the_env_widen_is_the_in_process_widen(monkeypatch):
    """CHARLSTM_BF16_PRODUCT=widen in a child process (the product chosen at import) trains the
    very bytes this process's network.BF16_PRODUCT = "widen" does, so the in-process Widen tests
    test what a forced Widen runs."""
    case, masks, weight_masks = network_case(2, True, 16, 37)
    assert all(m is not None for m in (masks, weight_masks))
    set_product(monkeypatch, "widen")
    ours, _ = run_bf16(*case, masks, weight_masks)
    code = ("import sys, numpy as np\n"
            "from charlstm.engine import network, target\n"
            "assert target.BF16_PRODUCT == network.BF16_PRODUCT == 'widen'\n"
            "from tests.test_bf16 import network_case, run_bf16\n"
            "case, masks, weight_masks = network_case(2, True, 16, 37)\n"
            "results, _ = run_bf16(*case, masks, weight_masks)\n"
            "sys.stdout.buffer.write(b''.join(np.asarray(r, np.float32).tobytes() for r in results))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=seconds(600),
                          env={**os.environ, "CHARLSTM_BF16_PRODUCT": "widen"})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout == b"".join(np.asarray(r, np.float32).tobytes() for r in ours)


@pytest.mark.parametrize("product", PRODUCTS)
def test_the_workspace_holds_the_operands_of_its_product(monkeypatch, product):
    """Dot: bfloat16 bits, h's copies padded to an even K (H = 37: 38); Widen: rounded float32."""
    use(monkeypatch, product)
    config = random_case(2, False, 3, 4, "float32", hidden=37)[0]
    ws = network.Workspace(config, 3, 4, dropout=True, precision="bf16")
    operand, Kx = (np.uint16, 38) if product == "dot" else (np.float32, 37)
    assert ws.pairs == (product == "dot") and ws.Wf.dtype == ws.Wb.dtype == ws.columns.dtype == np.uint16
    assert ws.hx.shape == (2, 5, 3, Kx) and ws.Wf.shape[2] == Kx and ws.inputs.shape == (12, Kx)
    assert ws.hx.dtype == ws.dAx.dtype == ws.dAT.dtype == ws.inputs.dtype == operand


def test_precision_must_be_known_and_bf16_needs_float32():
    config = random_case(1, False, 2, 3, "float32", hidden=16)[0]
    with pytest.raises(ValueError, match="precision 'bf8'"):
        network.Workspace(config, 2, 3, precision="bf8")
    with pytest.raises(ValueError, match="float32 model"):
        network.Workspace(random_case(1, False, 2, 3, "float64", hidden=16)[0], 2, 3, precision="bf16")


def test_a_second_bf16_step_compiles_nothing_new(monkeypatch):
    """A window again, in each product this machine has, B = 1 and B > 1, with dropout and weight
    drop: no kernel gains a signature (no float64 drift, no retyping), and no bfloat16 kernel has
    a float64 argument."""
    products = [p for p in PRODUCTS if p == "widen" or HAS_DOT]

    def windows(seed):
        for product in products:
            set_product(monkeypatch, product)
            for layers, peepholes, B, H in [(2, True, 1, 37), (2, False, 7, 16), (3, True, 16, 37)]:
                case, masks, weight_masks = network_case(layers, peepholes, B, H)
                config, params, x, y, h0, c0 = case
                rng = np.random.default_rng(seed)
                params = (params + rng.uniform(-0.1, 0.1, params.shape)).astype(np.float32)
                run_bf16(config, params, x, y, h0, c0, masks, weight_masks)
    windows(0)
    counts = _signature_counts()
    windows(1)
    assert _signature_counts() == counts
    for module in (batched, bf16):
        for name in dir(module):
            for signature in getattr(getattr(module, name), "signatures", []):
                assert "float64" not in str(signature), (module.__name__, name, signature)


def _signature_counts():
    return {f"{module.__name__}.{name}": len(getattr(module, name).signatures)
            for module in (kernels, recurrent, packed, stream_kernels, batched, bf16) for name in dir(module)
            if hasattr(getattr(module, name), "signatures")}


# ---------------------------------------------------------------- which product, per machine

@pytest.mark.parametrize("arch,features,expected", [
    ("x86_64", {"sse2", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512bf16"}, "dot"),  # Zen 4/5
    ("x86_64", {"sse2", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, "widen"),  # Ice Lake
    ("x86_64", {"sse2", "avx2", "fma"}, "widen"),  # Zen 3, Haswell
    ("x86_64", {"sse2", "avx512bf16"}, "widen"),  # bf16 reported without avx512f (a VM's mask): no zmm
    ("x86_64", {"sse2", "avx2", "fma", "avx512f", "avx512bf16", "amx-tile", "amx-bf16"}, "widen"),  # AMX Xeon
    ("x86_64", set(), "widen"),
    ("aarch64", {"neon"}, "widen"),
    ("aarch64", {"neon", "bf16", "i8mm", "sve"}, "widen"),  # BFDOT/BFMMLA not built yet (target.py)
    ("powerpc64le", {"altivec", "vsx"}, "widen"),
])
def test_each_machine_gets_its_product(arch, features, expected):
    assert target.choose_bf16_product(arch, features) == expected


def test_this_machine_runs_the_product_its_features_choose():
    if os.environ.get("CHARLSTM_BF16_PRODUCT"):
        pytest.skip("CHARLSTM_BF16_PRODUCT forces the product in this process")
    assert target.BF16_PRODUCT == target.choose_bf16_product(target.architecture(), target.features())


def without_avx512bf16():
    """The features LLVM compiles for here, as NUMBA_CPU_FEATURES spells them, with avx512bf16 off."""
    from numba.core import config

    text = config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()
    kept = [f for f in text.split(",") if f and f[1:] != "avx512bf16"]
    return ",".join(kept + ["-avx512bf16"])


def child_product(env):
    """target.BF16_PRODUCT in a fresh process with `env` added (only target.py is imported)."""
    code = "from charlstm.engine import target; print(target.BF16_PRODUCT)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=seconds(120), env={**os.environ, **env})


@pytest.mark.parametrize("forced", [None, "widen", "dot"])
def test_without_avx512bf16_widen_is_chosen_and_dot_refused(forced):
    """A CPU without the feature, simulated by its input (NUMBA_CPU_FEATURES: this machine's
    features less avx512bf16): Widen, also when forced; forced Dot is refused before any kernel
    compiles, in one line naming the feature."""
    env = {"NUMBA_CPU_FEATURES": without_avx512bf16()}
    if forced:
        env["CHARLSTM_BF16_PRODUCT"] = forced
    done = child_product(env)
    if forced == "dot":
        assert done.returncode != 0
        assert "ValueError: CHARLSTM_BF16_PRODUCT=dot: this CPU has no avx512bf16" in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["widen"]


@pytest.mark.parametrize("forced", ["widen", "dot", "amx"])
def test_a_forced_product_on_this_machine(forced):
    """Widen is forced on any machine; Dot where the machine has it; an unknown name is refused."""
    done = child_product({"CHARLSTM_BF16_PRODUCT": forced})
    if forced == "amx":
        assert done.returncode != 0 and "CHARLSTM_BF16_PRODUCT=amx: expected one of dot, widen" in done.stderr
    elif forced == "dot" and not HAS_DOT:
        assert done.returncode != 0 and "this CPU has no avx512bf16" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout.split() == [forced], done.stderr[-2000:]
