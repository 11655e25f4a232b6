"""Dropout between layers (Zaremba et al. 2014; char-rnn's and torch-rnn's -dropout), and weight
drop on the recurrent weights (DropConnect, Wan et al. 2013, as AWD-LSTM uses it on Wh).

In training, each layer's output is multiplied on its way up (to the next layer's input product,
or to the softmax) by a mask of 0 and 1/(1-p), so its expected value is unchanged and validation,
eval and sampling use the weights as they are. The recurrent h -> h path and the one-hot input are
never dropped. Masks are (L, N, H): one per layer output, time-major like every window array.

A mask is a hash of (seed, step, position), not a draw from a stateful RNG: a resumed run gets
the very masks of a straight one with nothing saved. The hash is SplitMix64 (Steele, Lea and Flood
2014): position i of step s reads the SplitMix64 stream keyed by (seed, s) at index i, and drops
the unit when its top 24 bits fall below p * 2^24.

Weight drop multiplies each layer's Wh (4H, H) by a mask of 0 and 1/(1-p), one mask (L, 4H, H) per
window: every step of the window sees the same dropped weights (network.py applies it to the copy
of Wh the packers read, so a step costs what it did). Its masks read another stream of the same
hash, keyed by (seed, s) mixed with WEIGHT_STREAM, so they are a function of the step too, and
every MPI rank draws the same.
"""
import numpy as np

from charlstm.engine.jit import kernel

UNIFORM_BITS = 24
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
WEIGHT_STREAM = np.uint64(0xD1B54A32D192ED03)  # mixed into a step's key for its weight-drop masks
_S30, _S27, _S31, _SHIFT = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(64 - UNIFORM_BITS)


@kernel
def mix64(z):
    """SplitMix64's finaliser on a uint64. Every operand is uint64: Numba would turn a mix of
    signed and unsigned into float64."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def step_key(seed, step):
    """The 64-bit key of one step's masks: SplitMix64 seeded with `seed`, its first output mixed
    again with `step`."""
    seeded = np.uint64((seed + int(_GOLDEN)) % (1 << 64))
    return int(mix64(np.uint64(mix64(seeded)) ^ np.uint64(step)))


def fill_masks(masks, p, seed, step, streams=None):
    """Fill masks (L, N, H) for optimizer step `step` of a run seeded `seed`, dropping with
    probability p: each entry 0 or 1/(1-p).

    streams=(first, count, total): the masks hold only `count` streams of a batch of `total`,
    from stream `first` on (one MPI rank's share; N = T * count), and get exactly the entries the
    whole batch's masks have at those streams, so a run split over ranks drops what one process
    would."""
    L, N, H = masks.shape
    if streams is None:  # rows of H entries, one per (layer, position)
        out, row_stride, offset = masks.reshape(L * N, H), H, 0
    else:  # rows of count * H entries, one per (layer, t), in a batch whose rows are total * H long
        first, count, total = streams
        out, row_stride, offset = masks.reshape(L * (N // count), count * H), total * H, first * H
    threshold = round(p * (1 << UNIFORM_BITS))
    scale = masks.dtype.type(1.0 / (1.0 - p))
    _fill(out, np.uint64(step_key(seed, step)), np.uint64(threshold), scale, np.uint64(row_stride), np.uint64(offset))


def fill_weight_masks(masks, p, seed, step):
    """Fill masks (L, G, H) for the weight drop of optimizer step `step` of a run seeded `seed`,
    dropping each recurrent weight with probability p: each entry 0 or 1/(1-p). Entry i (row-major)
    reads the stream keyed by mix64(step_key(seed, step) ^ WEIGHT_STREAM) at index i + 1."""
    L, G, H = masks.shape
    key = np.uint64(mix64(np.uint64(step_key(seed, step)) ^ WEIGHT_STREAM))
    threshold = round(p * (1 << UNIFORM_BITS))
    scale = masks.dtype.type(1.0 / (1.0 - p))
    _fill(masks.reshape(L * G, H), key, np.uint64(threshold), scale, np.uint64(H), np.uint64(0))


@kernel
def _fill(out, key, threshold, scale, row_stride, offset):
    """out (R, C): entry (r, j) is 0 if the top bits of SplitMix64(key + (i+1) * golden) are below
    threshold, else scale, with i = r * row_stride + offset + j its index in the whole batch's masks
    (row_stride = C and offset 0 when out is the whole batch).

    One thread: 0.2 ms a step at 2x256, B=T=50, too little to be worth a team call."""
    R, C = out.shape
    zero = scale - scale
    for r in range(R):
        base = np.uint64(r) * row_stride + offset
        for j in range(C):
            z = mix64(key + (base + np.uint64(j) + np.uint64(1)) * _GOLDEN)
            out[r, j] = zero if (z >> _SHIFT) < threshold else scale
