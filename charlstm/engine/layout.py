"""Parameter layout: every parameter is a named view into one flat buffer (SPEC §3).

Gradients and Adagrad's memory use the same layout, so the optimizer, clipping and saving are each
one loop over one array. Names and shapes, row-major, rows of every 4H block in gate order i, f, o, g:

    l{l}.Wx  (4H, D)   D = V for layer 0 (one-hot input), H above
    l{l}.Wh  (4H, H)
    l{l}.b   (4H,)
    l{l}.p   (3H,)     peepholes i, f, o; only with peepholes on
    out.W    (V, H)
    out.b    (V,)
"""
import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple
    offset: int

    @property
    def size(self):
        return math.prod(self.shape)


@functools.lru_cache(maxsize=64)
def layout(config):
    """The Slots for a ModelConfig, in buffer order (a tuple: computed once per config, since
    views() runs several times a step and at B = 1 a step is ~2 ms)."""
    H, V = config.hidden, config.vocab_size
    shapes = []
    for l in range(config.layers):
        shapes += [(f"l{l}.Wx", (4 * H, V if l == 0 else H)), (f"l{l}.Wh", (4 * H, H)), (f"l{l}.b", (4 * H,))]
        if config.peepholes:
            shapes.append((f"l{l}.p", (3 * H,)))
    shapes += [("out.W", (V, H)), ("out.b", (V,))]
    slots, offset = [], 0
    for name, shape in shapes:
        slots.append(Slot(name, shape, offset))
        offset += slots[-1].size
    return tuple(slots)


def param_count(config):
    last = layout(config)[-1]
    return last.offset + last.size


def views(flat, config):
    """Named views {name: ndarray} into the flat buffer (no copies: writing a view writes `flat`)."""
    return {s.name: flat[s.offset:s.offset + s.size].reshape(s.shape) for s in layout(config)}
