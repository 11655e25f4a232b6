"""The model's parameters: their layout (engine/layout.py, re-exported here for the tool) and
their initialisation."""
import numpy as np

from charlstm.engine.layout import Slot, layout, param_count, views  # noqa: F401

INIT_RANGE = 0.08  # char-rnn's uniform(-0.08, 0.08)
FORGET_BIAS = 1.0  # Gers 1999: start by remembering


def init_params(config, rng, init="char-rnn"):
    """A fresh flat parameter buffer, drawn from rng in layout order.

    fan-in    PyTorch's nn.LSTM and nn.Linear: every weight and bias uniform in ±1/sqrt(H) (each
              LSTM layer's bias as the sum of two such draws, PyTorch's b_ih + b_hh)
    char-rnn  weights uniform in ±0.08, forget-gate bias 1, other biases 0 (SPEC's first choice)
    """
    flat = np.zeros(param_count(config), dtype=config.dtype)
    H = config.hidden
    bound = 1.0 / np.sqrt(H)
    for name, view in views(flat, config).items():
        weight = name.endswith(".Wx") or name.endswith(".Wh") or name == "out.W"
        if init == "char-rnn":
            if weight:
                view[...] = rng.uniform(-INIT_RANGE, INIT_RANGE, size=view.shape)
            elif name.endswith(".b") and name.startswith("l"):
                view[H:2 * H] = FORGET_BIAS
        elif weight or name == "out.b":
            view[...] = rng.uniform(-bound, bound, size=view.shape)
        elif name.endswith(".b"):
            view[...] = rng.uniform(-bound, bound, size=view.shape) + rng.uniform(-bound, bound, size=view.shape)
        # peepholes (PyTorch has none) start at 0 either way
    return flat
