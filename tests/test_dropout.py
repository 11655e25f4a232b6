"""Dropout masks: the SplitMix64 stream written again in plain NumPy, the drop rate, and the
property exact resume rests on (a function of seed and step only).
How masks enter the forward and backward is checked against the reference in test_kernels and by
finite differences in test_gradcheck."""
import numpy as np
import pytest

from charlstm.engine.dropout import WEIGHT_STREAM, fill_masks, fill_weight_masks, mix64, step_key


def numpy_masks(shape, p, seed, step, key=None):
    """SplitMix64 at indices 1..n of the stream keyed by (seed, step) (or by `key`), in NumPy's
    wrapping uint64."""
    n = int(np.prod(shape))
    z = np.uint64(step_key(seed, step) if key is None else key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    keep = (z >> np.uint64(40)) >= np.uint64(round(p * 2 ** 24))
    return (keep / (1 - p)).reshape(shape)


def splitmix64_first_output(seed):
    """The first output of the reference SplitMix64 generator (Vigna's splitmix64.c) from state seed."""
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_step_key_is_splitmix64():
    # Published test vector: splitmix64 seeded with 1234567 first returns 6457827717110365317.
    assert splitmix64_first_output(1234567) == 6457827717110365317
    assert step_key(1234567, 0) == splitmix64_first_output(splitmix64_first_output(1234567) - 0x9E3779B97F4A7C15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_match_numpy(dtype, p):
    masks = np.full((2, 30, 7), np.nan, dtype=dtype)
    fill_masks(masks, p, seed=3, step=11)
    assert np.array_equal(masks, numpy_masks(masks.shape, p, 3, 11).astype(dtype))


def test_drop_rate_and_values():
    p = 0.25
    masks = np.empty((2, 500, 256), dtype=np.float32)
    fill_masks(masks, p, seed=0, step=0)
    assert set(np.unique(masks)) == {np.float32(0), np.float32(1 / (1 - p))}
    n = masks.size
    dropped = np.count_nonzero(masks == 0)
    assert abs(dropped - p * n) < 5 * np.sqrt(n * p * (1 - p))  # 5 binomial standard deviations
    assert abs(masks.mean() - 1) < 0.01  # inverted dropout keeps the expected value


def test_masks_depend_on_seed_and_step_only():
    def masks(seed, step):
        out = np.empty((2, 40, 16), dtype=np.float32)
        fill_masks(out, 0.5, seed, step)
        return out

    assert np.array_equal(masks(0, 5), masks(0, 5))
    assert not np.array_equal(masks(0, 5), masks(0, 6))
    assert not np.array_equal(masks(0, 5), masks(1, 5))
    assert not np.array_equal(masks(0, 5)[0], masks(0, 5)[1])  # layers differ too


@pytest.mark.parametrize("first,count", [(0, 2), (2, 2), (4, 2), (1, 4), (0, 6)])
def test_a_share_of_the_streams_gets_the_whole_batchs_masks_there(first, count):
    """An MPI rank training streams first..first+count of B fills exactly those streams' masks."""
    L, T, B, H = 2, 5, 6, 7
    whole = np.empty((L, T * B, H), dtype=np.float32)
    fill_masks(whole, 0.5, seed=2, step=9)
    share = np.empty((L, T * count, H), dtype=np.float32)
    fill_masks(share, 0.5, seed=2, step=9, streams=(first, count, B))
    expected = whole.reshape(L, T, B, H)[:, :, first:first + count].reshape(L, T * count, H)
    assert np.array_equal(share, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_masks_match_numpy_and_are_not_the_dropout_masks(dtype):
    """Weight drop's masks (L, G, H): the stream keyed by the step's dropout key mixed with
    WEIGHT_STREAM; a function of (seed, step) like the dropout masks, and not equal to them."""
    masks = np.full((2, 24, 6), np.nan, dtype=dtype)
    fill_weight_masks(masks, 0.3, seed=3, step=11)
    key = int(mix64(np.uint64(step_key(3, 11)) ^ WEIGHT_STREAM))
    assert np.array_equal(masks, numpy_masks(masks.shape, 0.3, 3, 11, key).astype(dtype))
    dropout = np.empty_like(masks)
    fill_masks(dropout, 0.3, seed=3, step=11)
    assert not np.array_equal(masks, dropout)
    again = np.empty_like(masks)
    fill_weight_masks(again, 0.3, seed=3, step=12)
    assert not np.array_equal(masks, again)
    assert 0.15 < np.mean(masks == 0) < 0.45
