"""A plain-NumPy character LSTM written for clarity: per gate, per step, per layer, no batching tricks.

It shares nothing with the kernels but the parameter names, and is the truth they are checked
against. Parameters come as a dict of arrays named as in charlstm.model (l0.Wx, l0.Wh, l0.b,
l0.p, ..., out.W, out.b); x and y are (B, T) ids; h0, c0 are (L, B, H). Dropout masks, if given,
are (L, T, B, H): layer l's output at step t is multiplied by masks[l, t] before the layer above
(or the softmax) reads it.
"""
import numpy as np


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def split_gates(W, H):
    """Rows of a 4H block in gate order i, f, o, g."""
    return W[:H], W[H:2 * H], W[2 * H:3 * H], W[3 * H:]


def forward(p, x, y, h0, c0, layers, peepholes, masks=None):
    """Returns (mean loss in nats, cache for backward, final h, final c)."""
    B, T = x.shape
    V, H = p["out.W"].shape
    inputs = [np.eye(V)[x[:, t]] for t in range(T)]  # one-hot (B, V) per step
    cache = []
    h_last, c_last = [], []
    for l in range(layers):
        Wxi, Wxf, Wxo, Wxg = split_gates(p[f"l{l}.Wx"], H)
        Whi, Whf, Who, Whg = split_gates(p[f"l{l}.Wh"], H)
        bi, bf, bo, bg = split_gates(p[f"l{l}.b"], H)
        pi, pf, po = split_gates(p[f"l{l}.p"], H)[:3] if peepholes else (0.0, 0.0, 0.0)
        h, c = h0[l], c0[l]
        steps = []
        outputs = []
        for t in range(T):
            xt = inputs[t]
            i = sigmoid(xt @ Wxi.T + h @ Whi.T + pi * c + bi)
            f = sigmoid(xt @ Wxf.T + h @ Whf.T + pf * c + bf)
            g = np.tanh(xt @ Wxg.T + h @ Whg.T + bg)
            c_new = f * c + i * g
            o = sigmoid(xt @ Wxo.T + h @ Who.T + po * c_new + bo)
            h_new = o * np.tanh(c_new)
            steps.append(dict(x=xt, h_prev=h, c_prev=c, i=i, f=f, o=o, g=g, c=c_new))
            h, c = h_new, c_new
            outputs.append(h)
        cache.append(steps)
        h_last.append(h)
        c_last.append(c)
        inputs = outputs if masks is None else [outputs[t] * masks[l, t] for t in range(T)]
    loss, probs = 0.0, []
    for t in range(T):
        logits = inputs[t] @ p["out.W"].T + p["out.b"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        loss -= np.log(prob[np.arange(B), y[:, t]]).sum()
        probs.append(prob)
    return loss / (B * T), (cache, inputs, probs), np.array(h_last), np.array(c_last)


def backward(p, cache, y, layers, peepholes, masks=None):
    """Gradients {name: array} for every parameter, plus 'h0' and 'c0' (L, B, H)."""
    steps_per_layer, top, probs = cache
    B, T = y.shape
    V, H = p["out.W"].shape
    grads = {name: np.zeros_like(value) for name, value in p.items()}
    dh_above = []
    for t in range(T):
        dlogits = probs[t].copy()
        dlogits[np.arange(B), y[:, t]] -= 1
        dlogits /= B * T
        grads["out.W"] += dlogits.T @ top[t]
        grads["out.b"] += dlogits.sum(axis=0)
        dh_above.append(dlogits @ p["out.W"] * (1.0 if masks is None else masks[layers - 1, t]))
    dh0, dc0 = np.zeros((layers, B, H)), np.zeros((layers, B, H))
    for l in reversed(range(layers)):
        Wh, Wx = p[f"l{l}.Wh"], p[f"l{l}.Wx"]
        pi, pf, po = split_gates(p[f"l{l}.p"], H)[:3] if peepholes else (0.0, 0.0, 0.0)
        dh_next, dc_next = np.zeros((B, H)), np.zeros((B, H))
        dx = [None] * T
        for t in reversed(range(T)):
            s = steps_per_layer[l][t]
            dh = dh_above[t] + dh_next
            tanh_c = np.tanh(s["c"])
            do = dh * tanh_c
            da_o = do * s["o"] * (1 - s["o"])
            dc = dc_next + dh * s["o"] * (1 - tanh_c ** 2) + po * da_o
            da_i = dc * s["g"] * s["i"] * (1 - s["i"])
            da_f = dc * s["c_prev"] * s["f"] * (1 - s["f"])
            da_g = dc * s["i"] * (1 - s["g"] ** 2)
            da = np.concatenate([da_i, da_f, da_o, da_g], axis=1)  # (B, 4H) in gate order
            grads[f"l{l}.Wx"] += da.T @ s["x"]
            grads[f"l{l}.Wh"] += da.T @ s["h_prev"]
            grads[f"l{l}.b"] += da.sum(axis=0)
            if peepholes:
                grads[f"l{l}.p"] += np.concatenate([
                    (da_i * s["c_prev"]).sum(0), (da_f * s["c_prev"]).sum(0), (da_o * s["c"]).sum(0)])
            dx[t] = da @ Wx * (1.0 if masks is None or l == 0 else masks[l - 1, t])
            dh_next = da @ Wh
            dc_next = dc * s["f"] + pi * da_i + pf * da_f
        dh0[l], dc0[l] = dh_next, dc_next
        dh_above = dx
    grads["h0"], grads["c0"] = dh0, dc0
    return grads
