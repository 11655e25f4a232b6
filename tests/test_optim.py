"""The optimizers against steps computed by hand and against PyTorch's formulas written out in
NumPy, and both clip modes against values computed by hand."""
import math

import numpy as np
import pytest

from charlstm.config import OPTIMIZER_STATE, TrainConfig
from charlstm.optim import adagrad_update, clip_gradients, new_state, rmsprop_update, sum_of_squares, update


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adagrad_matches_hand_computation(dtype):
    w = np.array([1.0, -2.0, 0.5], dtype)
    g = np.array([0.5, -1.0, 0.0], dtype)
    mem = np.array([0.0, 3.0, 1.0], dtype)
    adagrad_update(w, g, mem, 0.1, 1e-8)
    # mem = [0.25, 4.0, 1.0]; w = [1 - 0.1*0.5/0.5, -2 + 0.1*1/2, 0.5 - 0]
    assert np.allclose(mem, [0.25, 4.0, 1.0], rtol=1e-7)
    assert np.allclose(w, [0.9, -1.95, 0.5], rtol=1e-6)
    assert w.dtype == dtype and mem.dtype == dtype


def test_clip_value_is_elementwise():
    g = np.array([-7.0, -5.0, 0.3, 5.0, 12.0], np.float32)
    clip_gradients(g, 5.0, "value", sum_of_squares(g))
    assert g.tolist() == pytest.approx([-5.0, -5.0, 0.3, 5.0, 5.0])


def test_clip_norm_rescales_only_above_the_limit():
    g = np.array([3.0, 4.0], np.float64)  # norm 5
    clip_gradients(g, 1.0, "norm", sum_of_squares(g))
    assert g.tolist() == pytest.approx([0.6, 0.8])
    small = np.array([0.3, 0.4], np.float64)
    clip_gradients(small, 1.0, "norm", sum_of_squares(small))
    assert small.tolist() == pytest.approx([0.3, 0.4])


def test_clip_zero_is_off():
    g = np.array([100.0, -100.0], np.float32)
    for mode in ("value", "norm"):
        clip_gradients(g, 0.0, mode, sum_of_squares(g))
        assert g.tolist() == [100.0, -100.0]


def test_sum_of_squares_flags_non_finite():
    assert sum_of_squares(np.array([3.0, 4.0], np.float32)) == 25.0
    assert not math.isfinite(sum_of_squares(np.array([1.0, np.nan], np.float32)))
    assert not math.isfinite(sum_of_squares(np.array([np.inf, 1.0], np.float32)))


# ------------------------------------------------------------------ RMSprop and Adam, and update()

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rmsprop_matches_hand_computation(dtype):
    w = np.array([1.0, -2.0, 0.5], dtype)
    g = np.array([0.5, -1.0, 0.0], dtype)
    ms = np.array([0.0, 1.0, 4.0], dtype)
    rmsprop_update(w, g, ms, 0.1, 0.75, 1e-8)
    # ms = 0.75*ms + 0.25*g*g = [0.0625, 1.0, 3.0]; w -= 0.1 * g / sqrt(ms) = [-0.2, +0.1, 0]
    assert np.allclose(ms, [0.0625, 1.0, 3.0], rtol=1e-7)
    assert np.allclose(w, [0.8, -1.9, 0.5], rtol=1e-6)
    assert w.dtype == dtype and ms.dtype == dtype


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_moves_by_lr_against_a_constant_gradient(dtype):
    """By hand: with a constant g, the bias-corrected moments are m_hat = g and v_hat = g*g at
    every step t, so each step moves w by lr * sign(g) (less eps): t = 1 and t = 2 check that
    1 - b1^t and 1 - b2^t use the step count."""
    cfg = TrainConfig(optim="adam", adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
    w = np.array([1.0, -2.0, 0.5], dtype)
    g = np.array([0.5, -1.0, 0.0], dtype)
    state = new_state("adam", w)
    update(w, g, state, 1, 0.1, cfg)
    assert np.allclose(state["adam_m"], [0.05, -0.1, 0.0]) and np.allclose(state["adam_v"], [0.00025, 0.001, 0.0])
    assert np.allclose(w, [0.9, -1.9, 0.5], rtol=1e-6)
    update(w, g, state, 2, 0.1, cfg)
    # m = 0.9*0.05 + 0.1*0.5 = 0.095 = 0.5 * (1 - 0.9^2); v = 0.25 * (1 - 0.999^2)
    assert np.allclose(state["adam_m"], [0.095, -0.19, 0.0], rtol=1e-6)
    assert np.allclose(w, [0.8, -1.8, 0.5], rtol=1e-5)
    assert all(a.dtype == dtype for a in (w, *state.values()))


# PyTorch's update rules, written out from torch/optim/{adagrad,rmsprop,adam}.py (the single-tensor
# paths, defaults otherwise: no weight decay, momentum, centering, amsgrad or lr decay), in NumPy.

def torch_adagrad(w, g, state_sum, lr, eps=1e-10):
    state_sum += g * g
    w -= lr * g / (np.sqrt(state_sum) + eps)


def torch_rmsprop(w, g, square_avg, lr, alpha, eps):
    square_avg *= alpha
    square_avg += (1 - alpha) * g * g
    w -= lr * g / (np.sqrt(square_avg) + eps)


def torch_adam(w, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
    exp_avg += (g - exp_avg) * (1 - beta1)  # lerp
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(exp_avg_sq) / (1 - beta2 ** step) ** 0.5 + eps
    w -= step_size * exp_avg / denom


CONFIGS = {
    # PyTorch adds its eps (1e-10) outside the root, ours (1e-20) goes inside: only with both at 0
    # are the two the same formula to the last bit.
    "adagrad": TrainConfig(optim="adagrad", adagrad_eps=0.0),
    "rmsprop": TrainConfig(optim="rmsprop", rmsprop_alpha=0.9, rmsprop_eps=1e-8),
    "adam": TrainConfig(optim="adam", adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-8),
}


def torch_step(cfg, w, g, state, t, lr):
    if cfg.optim == "adagrad":
        torch_adagrad(w, g, state["adagrad"], lr, eps=0.0)  # eps 0 both sides: see CONFIGS
    elif cfg.optim == "rmsprop":
        torch_rmsprop(w, g, state["rmsprop"], lr, cfg.rmsprop_alpha, cfg.rmsprop_eps)
    else:
        torch_adam(w, g, state["adam_m"], state["adam_v"], t, lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 2e-5)])
@pytest.mark.parametrize("optim", list(CONFIGS))
def test_update_matches_pytorchs_formulas(optim, dtype, rtol):
    """Eight steps of update() against PyTorch's rules in float64, gradients at the scale of our
    mean loss's (1e-5 to 1e-1), a changing lr as a schedule gives."""
    cfg, rng = CONFIGS[optim], np.random.default_rng(7)
    w0 = rng.standard_normal(257)
    w, ref = w0.astype(dtype), w0.copy()
    state, ref_state = new_state(optim, w), new_state(optim, ref)
    assert list(state) == list(OPTIMIZER_STATE[optim]) and all(a.dtype == dtype for a in state.values())
    for t in range(1, 9):
        g = rng.standard_normal(257) * 10.0 ** rng.uniform(-5, -1, 257)
        lr = 0.01 * 0.5 ** (t // 3)
        update(w, g.astype(dtype), state, t, lr, cfg)
        torch_step(cfg, ref, g, ref_state, t, lr)
    np.testing.assert_allclose(w, ref, rtol=rtol, atol=0)
    for key in state:
        np.testing.assert_allclose(state[key], ref_state[key], rtol=rtol * 10, atol=0)
    assert not np.allclose(w, w0, rtol=1e-3)  # it moved


# ------------------------------------------------------------------ the loops cut into chunks on the team

@pytest.mark.parametrize("optim", ["adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("mode", ["value", "norm"])
def test_chunks_on_the_team_give_the_bytes_of_one_loop(monkeypatch, team_of, optim, mode):
    """clip_and_update cut into many chunks, on 1 thread and on 3, writes the very bytes the
    whole-buffer kernels write in one call each; the chunked sum of squares is NumPy's float64 sum."""
    from charlstm import optim as optim_module

    rng = np.random.default_rng(3)
    n = 1000
    params, grads = rng.standard_normal(n).astype(np.float32), (rng.standard_normal(n) * 4).astype(np.float32)
    cfg = TrainConfig(optim=optim, clip=5.0 if mode == "value" else 20.0, clip_mode=mode)
    want_params, want_grads, want_state = params.copy(), grads.copy(), new_state(optim, params)
    monkeypatch.setattr(optim_module, "CHUNK", 64)  # 16 chunks
    sumsq = sum_of_squares(grads)
    assert sumsq == pytest.approx(float(np.sum(grads.astype(np.float64) ** 2)), rel=1e-12)
    g = want_grads  # the whole buffer at once, by the kernels themselves
    if mode == "value":
        optim_module.clip_values(g, cfg.clip)
    else:
        assert math.sqrt(sumsq) > cfg.clip
        optim_module.scale(g, cfg.clip / math.sqrt(sumsq))
    kernel = {"adagrad": lambda: adagrad_update(want_params, g, want_state["adagrad"], 0.01, cfg.adagrad_eps),
              "rmsprop": lambda: rmsprop_update(want_params, g, want_state["rmsprop"], 0.01, cfg.rmsprop_alpha,
                                                cfg.rmsprop_eps),
              "adam": lambda: optim_module.adam_update(want_params, g, want_state["adam_m"], want_state["adam_v"],
                                                       0.01 / (1 - cfg.adam_beta1), cfg.adam_beta1, cfg.adam_beta2,
                                                       math.sqrt(1 - cfg.adam_beta2), cfg.adam_eps)}
    kernel[optim]()
    for threads in (1, 3):
        team_of(3, threads)
        p, gr, state = params.copy(), grads.copy(), new_state(optim, params)
        assert sum_of_squares(gr) == sumsq  # the chunks' sums added in one order on any count
        optim_module.clip_and_update(p, gr, state, 1, 0.01, cfg, sumsq)
        assert np.array_equal(p, want_params) and np.array_equal(gr, want_grads)
        for key in state:
            assert np.array_equal(state[key], want_state[key])
