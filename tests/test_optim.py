"""Adagrad and both clip modes against values computed by hand."""
import math

import numpy as np
import pytest

from charlstm.optim import adagrad_update, clip_gradients, sum_of_squares


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
