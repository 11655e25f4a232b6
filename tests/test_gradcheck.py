"""Finite differences in float64 against the kernels' gradients, for every parameter tensor and
h0, c0, over the same grid as the reference test."""
import pytest

from charlstm.gradcheck import TOLERANCE, gradcheck

from tests.test_kernels import GRID


@pytest.mark.parametrize("layers,peepholes,B,T", GRID)
def test_gradients_match_finite_differences(layers, peepholes, B, T):
    errors = gradcheck(hidden=5, layers=layers, peepholes=peepholes, batch_size=B, seq_length=T, seed=B + T)
    expected = {"l0.Wx", "l0.Wh", "l0.b", "out.W", "out.b", "h0", "c0"} | ({"l0.p"} if peepholes else set())
    assert expected <= set(errors)
    bad = {name: e for name, e in errors.items() if not e < TOLERANCE}
    assert not bad


@pytest.mark.parametrize("layers,B", [(2, 3), (3, 1)])
def test_gradients_with_dropout_match_finite_differences(layers, B):
    errors = gradcheck(hidden=5, layers=layers, peepholes=True, batch_size=B, seq_length=4, seed=7, dropout=0.3)
    assert {f"l{l}.Wx" for l in range(layers)} <= set(errors)
    bad = {name: e for name, e in errors.items() if not e < TOLERANCE}
    assert not bad


def test_gradcheck_catches_a_wrong_gradient(monkeypatch):
    """The check can fail: break the backward's output-bias gradient and it must be reported."""
    from charlstm.engine import kernels, network

    real = kernels.column_sums

    def doubled(dZ, db, lo, hi):
        real(dZ, db, lo, hi)
        db[lo:hi] *= 2

    monkeypatch.setattr(network.kernels, "column_sums", doubled)
    errors = gradcheck(hidden=4, layers=1, peepholes=False, batch_size=2, seq_length=3)
    assert errors["out.b"] > 0.1 and errors["l0.b"] > 0.1


@pytest.mark.parametrize("layers,B", [(1, 1), (2, 3), (3, 1)])
def test_gradients_with_weight_drop_match_finite_differences(layers, B):
    """Weight drop with its mask held fixed (and dropout besides): the gradient of Wh is the
    masked product's, through the mask again."""
    errors = gradcheck(hidden=5, layers=layers, peepholes=True, batch_size=B, seq_length=4, seed=3, dropout=0.2,
                       weight_drop=0.4)
    assert {f"l{l}.Wh" for l in range(layers)} <= set(errors)
    bad = {name: e for name, e in errors.items() if not e < TOLERANCE}
    assert not bad
