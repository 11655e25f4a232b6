"""The kernels against the plain-NumPy reference (tests/reference.py), over the grid the issue asks:
L = 1 and 2, peepholes on and off, B = 1 and > 1, T = 1 and > 1, float64 and float32."""
import numba
import numpy as np
import pytest

from charlstm.engine import jit, kernels, network, packed, recurrent, stream_kernels
from charlstm.config import ModelConfig
from charlstm.model import init_params, param_count, views

from tests import reference

VOCAB = "abcdefg"
GRID = [(L, peep, B, T) for L in (1, 2) for peep in (False, True) for B in (1, 3) for T in (1, 5)]


def random_case(layers, peepholes, B, T, dtype, seed=0, hidden=6):
    """A model with every parameter random (peepholes and biases too) and random data."""
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = rng.uniform(-0.5, 0.5, param_count(config)).astype(dtype)
    x = rng.integers(0, len(VOCAB), (B, T))
    y = rng.integers(0, len(VOCAB), (B, T))
    h0 = rng.uniform(-0.5, 0.5, (layers, B, hidden)).astype(dtype)
    c0 = rng.uniform(-0.5, 0.5, (layers, B, hidden)).astype(dtype)
    return config, params, x, y, h0, c0


def run_network(config, params, x, y, h0, c0, masks=None, weight_masks=None):
    """Loss, gradients (flat), dh0, dc0 and final state from the kernels. x, y are (B, T); dropout
    masks, if any, (L, T, B, H) as the reference takes them; weight-drop masks (L, G, H)."""
    B, T = x.shape
    ws = network.Workspace(config, B, T, dropout=masks is not None, weight_drop=weight_masks is not None)
    if masks is not None:
        ws.masks[:] = masks.reshape(ws.masks.shape)
    if weight_masks is not None:
        ws.weight_masks[:] = weight_masks
    xt, yt = np.ascontiguousarray(x.T), np.ascontiguousarray(y.T)  # kernels are time-major
    network.forward(params, ws, xt, h0, c0)
    loss = network.loss(params, ws, yt)
    grads = np.full_like(params, np.nan)  # backward must write every entry
    dh0, dc0 = np.zeros_like(h0), np.zeros_like(c0)
    network.backward(params, grads, ws, xt, dh0, dc0)
    return loss, grads, dh0, dc0, ws.h[:, -1].copy(), ws.c[:, -1].copy()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,B,T", GRID)
def test_kernels_match_reference(layers, peepholes, B, T, dtype, tol):
    case = random_case(layers, peepholes, B, T, dtype)
    assert_matches_reference(case, run_network(*case), tol)


# The engine's edges: H not a multiple of the vector width (100, 37) or a multiple (32, 64), B not
# a multiple of the micro-kernel's rows and more than one block of them (7, 19), three layers.
ENGINE = [(1, False, 7, 100), (2, True, 7, 100), (3, True, 19, 37), (3, False, 19, 37), (2, False, 2, 16),
          (2, True, 19, 32), (3, False, 9, 64), (1, True, 3, 32)]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,B,H", ENGINE)
def test_engine_matches_reference(monkeypatch, layers, peepholes, B, H, dtype, tol):
    """The packed micro-kernel and fused gates (recurrent.py) and the batched products cut across
    the team, against the NumPy reference, with dropout, on one thread and on two, which give the
    very same bits."""
    from charlstm.engine.threads import team

    case = random_case(layers, peepholes, B, 5, dtype, hidden=H)
    masks = random_masks(case[0], B, 5, p=0.3, seed=2)
    monkeypatch.setattr(network, "SHARE_ROWS", 4)  # cut even these small batched products in two
    monkeypatch.setattr(team, "most", max(team.most, 2))
    monkeypatch.setattr(team, "size", 1)
    alone = run_network(*case, masks=masks)
    monkeypatch.setattr(team, "size", 2)
    shared = run_network(*case, masks=masks)
    assert_matches_reference(case, shared, tol, masks)
    for ours, theirs in zip(shared, alone):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,B,H", [(1, False, 1, 37), (2, True, 1, 37), (3, True, 7, 20)])
def test_weight_drop_matches_the_reference_on_masked_weights(monkeypatch, layers, peepholes, B, H, dtype, tol):
    """Weight drop is the reference run on Wh * mask, with dloss/dWh its gradient through the mask:
    B = 1 (units split across the team) and B > 1, on one thread and on two, the same bits."""
    from charlstm.engine.dropout import fill_weight_masks
    from charlstm.engine.threads import team

    config, params, x, y, h0, c0 = random_case(layers, peepholes, B, 5, dtype, hidden=H)
    weight_masks = np.zeros((layers, 4 * H, H), dtype)
    fill_weight_masks(weight_masks, 0.4, seed=1, step=2)
    monkeypatch.setattr(team, "most", max(team.most, 2))
    monkeypatch.setattr(team, "size", 1)
    alone = run_network(config, params, x, y, h0, c0, weight_masks=weight_masks)
    monkeypatch.setattr(team, "size", 2)
    loss, grads, dh0, dc0, h, c = run_network(config, params, x, y, h0, c0, weight_masks=weight_masks)
    for ours, theirs in zip((loss, grads, dh0, dc0, h, c), alone):
        assert np.array_equal(ours, theirs)
    dropped = params.astype(np.float64)
    for l in range(layers):
        views(dropped, config)[f"l{l}.Wh"][...] *= weight_masks[l]
    p = views(dropped, config)
    h64, c64 = h0.astype(np.float64), c0.astype(np.float64)
    ref_loss, cache, ref_h, ref_c = reference.forward(p, x, y, h64, c64, layers, peepholes)
    ref = reference.backward(p, cache, y, layers, peepholes)
    assert abs(loss - ref_loss) < tol
    g = views(grads, config)
    for name in p:
        want = ref[name] * (weight_masks[int(name[1])] if name.endswith(".Wh") else 1)
        assert np.max(np.abs(g[name] - want)) < tol, name
    assert not g["l0.Wh"][weight_masks[0] == 0].any()  # a dropped weight gets no gradient
    assert np.max(np.abs(h - ref_h)) < tol and np.max(np.abs(c - ref_c)) < tol
    assert np.max(np.abs(dh0 - ref["h0"])) < tol and np.max(np.abs(dc0 - ref["c0"])) < tol


@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_block_product_is_a_product(rows, dtype):
    """The micro-kernel for every row count, at offsets and strides, against NumPy in float64: each
    of PANELS panels of K x W is a slice of one matrix."""
    rng = np.random.default_rng(rows)
    W, K = packed.lanes(dtype), 13
    x = rng.standard_normal((rows + 2, K + 3)).astype(dtype)
    w = rng.standard_normal((packed.PANELS + 1, K, W)).astype(dtype)
    out = np.zeros((rows + 1, 3 * W * packed.PANELS), dtype)
    packed.block_product(x.reshape(-1), (K + 3) + 2, K + 3, rows, w.reshape(-1), K * W, K * W, K,
                         out.reshape(-1), out.shape[1] + W, out.shape[1], 2 * W)
    want = x[1:1 + rows, 2:2 + K].astype(np.float64) @ w[1:1 + packed.PANELS].astype(np.float64)  # (P, rows, W)
    for p in range(packed.PANELS):
        got = out[1:1 + rows, W + 2 * W * p:W + 2 * W * p + W]
        assert np.allclose(got, want[p], rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-5)
    untouched = np.ones(out.shape, bool)
    for p in range(packed.PANELS):
        untouched[1:1 + rows, W + 2 * W * p:W + 2 * W * p + W] = False
    assert not out[untouched].any()


@pytest.mark.parametrize("panels", [1, 3, 4, 9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_product_is_a_product(panels, dtype):
    """The one-row micro-kernel (4 panels a call, then 1s) at offsets and strides, against NumPy."""
    rng = np.random.default_rng(panels)
    W, K = packed.lanes(dtype), 11
    x = rng.standard_normal(K + 2).astype(dtype)
    w = rng.standard_normal((panels + 1, K, W)).astype(dtype)
    out = np.zeros((panels + 1) * 2 * W, dtype)
    packed.row_product(x, 2, w.reshape(-1), K * W, K * W, K, out, W, 2 * W, panels)
    want = x[2:].astype(np.float64) @ w[1:].astype(np.float64)  # (panels, W)
    got = out[W:W + 2 * W * panels].reshape(panels, 2, W)
    assert np.allclose(got[:, 0], want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-5)
    assert not got[:, 1].any() and not out[:W].any() and not out[W + 2 * W * panels:].any()


def test_packings_hold_wh():
    """Every entry of the forward and backward packings is Wh's, and the padding units are zero."""
    H, dtype = 37, "float32"
    Wh = np.random.default_rng(0).standard_normal((4 * H, H)).astype(dtype)
    fwd_shape, bwd_shape, _ = packed.packed_shapes(H, dtype)
    Wf = packed.pack_forward(Wh, np.full(fwd_shape, np.nan, dtype), 0, fwd_shape[0])
    Wb = packed.pack_columns(Wh, np.full(bwd_shape, np.nan, dtype), 0, bwd_shape[0])
    W = packed.lanes(dtype)
    unit = np.arange(fwd_shape[0] * W)
    for q in range(4):  # Wf[u, q, k, j] = Wh[q*H + u*W + j, k]
        rows = Wf[:, q].transpose(0, 2, 1).reshape(-1, H)  # (units, H)
        assert np.array_equal(rows[unit < H], Wh[q * H:(q + 1) * H]) and not rows[unit >= H].any()
    cols = Wb.transpose(1, 0, 2).reshape(4 * H, -1)  # Wb[u, k, j] = Wh[k, u*W + j]
    assert np.array_equal(cols[:, :H], Wh) and not cols[:, H:].any()


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,H", [(1, False, 100), (2, True, 37), (3, False, 64), (2, True, 3)])
def test_one_stream_split_across_threads_matches_reference(team_of, layers, peepholes, H, dtype, tol):
    """B = 1 splits each step's units into unit groups (the grid with one stream group, grid.py)
    whose threads meet once a step. Cut for 2 or 3 cores (fewer groups when H is small), with
    dropout: the reference's numbers, and for each cut the very same bits on any number of threads.
    Two cuts need not agree in the last bit: a gate loop over other units can round differently
    (seen on apple-m1's NEON at H = 37, where 2 and 3 unit groups differed)."""
    case = random_case(layers, peepholes, 1, 5, dtype, hidden=H)
    masks = random_masks(case[0], 1, 5, p=0.3, seed=2)
    for most in (2, 3):
        team_of(most, 1)
        alone = run_network(*case, masks=masks)
        assert_matches_reference(case, alone, tol, masks)
        for size in range(2, most + 1):
            team_of(most, size)
            split = run_network(*case, masks=masks)
            for ours, theirs in zip(split, alone):
                assert np.array_equal(ours, theirs), (most, size)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,B", [(1, False, 3), (2, True, 3), (2, False, 1), (3, True, 2)])
def test_dropout_matches_reference(layers, peepholes, B, dtype, tol):
    """With dropout masks (zeros and 1/(1-p), as charlstm.engine.dropout makes them) between layers and
    before the softmax, on both the batch and the one-stream paths."""
    case = random_case(layers, peepholes, B, 5, dtype)
    masks = random_masks(case[0], B, 5, p=0.4, seed=1)
    assert_matches_reference(case, run_network(*case, masks=masks), tol, masks)


def random_masks(config, B, T, p, seed):
    keep = np.random.default_rng(seed).random((config.layers, T, B, config.hidden)) >= p
    assert 0 < keep.mean() < 1
    return (keep / (1 - p)).astype(config.dtype)


def assert_matches_reference(case, results, tol, masks=None):
    config, params, x, y, h0, c0 = case
    layers, peepholes = config.layers, config.peepholes
    loss, grads, dh0, dc0, hT, cT = results

    p64 = {k: v.astype(np.float64) for k, v in views(params, config).items()}
    m64 = None if masks is None else masks.astype(np.float64)
    ref_loss, cache, ref_h, ref_c = reference.forward(p64, x, y, h0.astype(np.float64), c0.astype(np.float64),
                                                     layers, peepholes, m64)
    ref = reference.backward(p64, cache, y, layers, peepholes, m64)

    def close(ours, theirs):
        scale = max(1.0, np.abs(theirs).max())
        return np.abs(np.asarray(ours, np.float64) - theirs).max() / scale < tol

    assert close(loss, ref_loss)
    assert close(hT, ref_h) and close(cT, ref_c)
    for name, g in views(grads, config).items():
        assert close(g, ref[name]), name
    assert close(dh0, ref["h0"]) and close(dc0, ref["c0"])


def test_float32_nonlinearities_are_accurate():
    x = np.linspace(-12, 12, 200001).astype(np.float32)
    out = np.empty_like(x)
    _apply_activations(x, out)
    assert np.abs(out - np.tanh(x.astype(np.float64))).max() < 1e-6


@jit.kernel
def _apply_activations(x, out):
    for j in range(x.shape[0]):
        out[j] = jit.tanh(x[j])


def test_second_call_compiles_nothing_new():
    """Running a window again, in either dtype, adds no signature to any kernel: no float64 drift
    in float32 runs, no retyping between calls."""
    for dtype in ("float32", "float64"):
        for B in (1, 3):
            run_network(*random_case(2, True, B, 4, dtype))
    counts = _signature_counts()
    for dtype in ("float32", "float64"):
        for B in (1, 3):
            run_network(*random_case(2, True, B, 4, dtype, seed=1))
    assert counts == _signature_counts()
    # one float32 and one float64 specialization, nothing else (bfloat16's, with uint16 arrays,
    # come from tests/test_bf16.py in the same process)
    for name in (recurrent.forward_grid, recurrent.backward_grid):
        assert sum(not any(getattr(t, "dtype", None) == numba.uint16 for t in sig) for sig in name.signatures) == 2


def _signature_counts():
    return {f"{module.__name__.split('.')[-1]}.{name}": len(getattr(module, name).signatures)
            for module in (kernels, recurrent, packed, stream_kernels) for name in dir(module)
            if hasattr(getattr(module, name), "signatures")}


@pytest.mark.parametrize("shape", [(1, 1), (7, 24), (24, 7), (65, 1024), (1030, 33)])
def test_transposes_match_numpy(shape):
    W = np.random.default_rng(0).random(shape, dtype=np.float32)
    WT = np.full(shape[::-1], np.nan, dtype=np.float32)
    kernels.transpose_into(W, WT)
    assert np.array_equal(WT, W.T)
