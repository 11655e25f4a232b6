"""A plain-NumPy emulation of the bfloat16 products (issue #32): the independent truth the engine's
bf16 paths (engine/bf16.py, products.py, packed.py, batched.py, Workspace(precision="bf16")) are
checked against. It shares nothing with the engine but the parameter names.

    round_bf16(a)  float32 -> float32 values rounded to bfloat16, to nearest with ties to even,
                   found by comparing the two neighbours' distances in float64 (not by the engine's
                   add-and-shift trick); NaN stays a quiet NaN, past the largest bfloat16 is inf
    bits(a)        the same as bfloat16 bits, uint16
    widen(x, w)    the Widen product: out = sum over k ascending of x[:, k] * w[k], one float32
                   chain (a product of two bfloat16 values is exact in float32, so the chain's
                   fmas are float32(acc + x*w))
    dot(x, w)      the Dot product (vdpbf16ps): k in pairs, product 2k+1 added before 2k, each add
                   rounded, denormals flushed (Intel's definition)
    forward, backward   the LSTM of tests/reference.py in float32 with the bf16 semantics: only the
                   operands of the LSTM layers' products rounded (Wh, Wx above layer 0, h_{t-1},
                   the layers' inputs after dropout, the gate gradients dA as operands of dh, the
                   passed-down gradient and dW), every product one chain in the path's order;
                   layer 0's one-hot input, the output layer, gates, state, loss and every
                   gradient sum that is not such a product stay float32.
"""
import numpy as np

F32 = np.float32
SMALLEST_NORMAL = np.float32(2.0 ** -126)


def round_bf16(a):
    """float32 array (any shape) -> float32 array of the values rounded to bfloat16 (module docstring)."""
    a = np.ascontiguousarray(a, F32)
    b = a.view(np.uint32)
    sign, mag = b & np.uint32(0x80000000), b & np.uint32(0x7FFFFFFF)
    down = mag & np.uint32(0xFFFF0000)  # toward zero: the bfloat16 at or below |a|
    up = down + np.uint32(0x10000)  # the next one away from zero (0x7F800000: inf)
    with np.errstate(invalid="ignore", over="ignore"):
        x = mag.view(F32).astype(np.float64)
        low = down.view(F32).astype(np.float64)
        # past the largest finite bfloat16 the next one up, with the exponent unbounded, is 2**128
        high = np.where(up == np.uint32(0x7F800000), 2.0 ** 128, up.view(F32).astype(np.float64))
        below, above = x - low, high - x
        odd = (down & np.uint32(0x10000)) != 0
        take_up = (above < below) | ((above == below) & odd)
    out = np.where(take_up, up, down) | sign
    nan = np.isnan(a)
    out = np.where(nan, ((b >> np.uint32(16)) | np.uint32(0x40)) << np.uint32(16), out).astype(np.uint32)
    return out.view(F32)


def bits(a):
    """The bfloat16 bits (uint16) of float32 a rounded (round_bf16)."""
    return (round_bf16(a).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def from_bits(b):
    """The float32 values of bfloat16 bits (uint16)."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(F32)


def widen(x, w, acc=None):
    """(R, K) @ (K, C) in the Widen product's order: one float32 chain per output, k ascending,
    starting from acc (R, C) (the accumulate flag) or zero. x and w hold bfloat16 values."""
    x, w = np.asarray(x, F32), np.asarray(w, F32)
    out = np.zeros((x.shape[0], w.shape[1]), F32) if acc is None else np.array(acc, F32)
    for k in range(x.shape[1]):
        out += np.outer(x[:, k], w[k])  # the product exact in float32, the add rounded once
    return out


def _flush(a):
    """Denormals to zero (a signed zero), as vdpbf16ps takes its inputs and leaves its results."""
    return np.where(np.abs(a) < SMALLEST_NORMAL, a * F32(0), a).astype(F32)


def dot(x, w, acc=None):
    """(R, K) @ (K, C) in the Dot product's order: per pair of k, product 2k+1 added, then 2k, each
    add rounded to float32, denormal inputs and results flushed; an odd K gets a zero pad."""
    x, w = _flush(np.asarray(x, F32)), _flush(np.asarray(w, F32))
    out = np.zeros((x.shape[0], w.shape[1]), F32) if acc is None else _flush(np.array(acc, F32))
    K = x.shape[1]
    for k2 in range(0, K, 2):
        for k in (k2 + 1, k2):
            if k < K:
                out = _flush(out + np.outer(x[:, k], w[k]))
    return out


PRODUCTS = {"widen": widen, "dot": dot}


# ---------------------------------------------------------------- the LSTM, float32, bf16 operands

def sigmoid(a):
    return F32(1) / (F32(1) + np.exp(-a))


def split_gates(W, H):
    """Rows (or columns) of a 4H block in gate order i, f, o, g."""
    return W[:H], W[H:2 * H], W[2 * H:3 * H], W[3 * H:]


def _keep(key, value):
    return value


def forward(p, x, y, h0, c0, layers, peepholes, product, masks=None, weight_masks=None, snap=_keep):
    """Returns (mean loss, cache for backward, final h, final c). p: {name: float32 array}; x, y
    (B, T) ids; h0, c0 (L, B, H); product: "widen" or "dot"; masks (L, T, B, H) dropout on each
    layer's output; weight_masks (L, G, H) on each Wh. As tests/reference.forward, per step.

    snap(key, value) -> the float32 value to round for an operand that is computed, not given:
    ("h", l, t) layer l's h_{t-1} (B, H) at step t (t = 0: h0), ("input", l) layer l's input
    (T*B, H) after dropout; backward's ("dA", l, t) (B, G). By default the value itself; a test
    may hand back the engine's own value of it (after checking the two agree), so that a float32
    difference of an ulp cannot round to bfloat16 values 2**-8 apart (tests/test_bf16.py)."""
    mul = PRODUCTS[product]
    B, T = x.shape
    V, H = p["out.W"].shape
    cache, h_last, c_last = [], [], []
    inputs = None  # the layer below's outputs as this layer reads them, (T, B, H) after dropout
    for l in range(layers):
        Wx, b = p[f"l{l}.Wx"], p[f"l{l}.b"]
        Wh = p[f"l{l}.Wh"] if weight_masks is None else p[f"l{l}.Wh"] * weight_masks[l]
        if l == 0:  # a one-hot input is a row lookup: no product, nothing rounded
            terms = [Wx[:, x[:, t]].T + b for t in range(T)]
        else:  # all T steps as one product (N, H)(H, G) over the rounded operands, then the bias
            X = round_bf16(snap(("input", l), inputs.reshape(T * B, H)))
            terms = list((mul(X, round_bf16(Wx).T) + b).reshape(T, B, 4 * H))
        Wh_r = round_bf16(Wh).T  # (H, G)
        pi, pf, po = split_gates(p[f"l{l}.p"], H)[:3] if peepholes else (F32(0),) * 3
        h, c = h0[l].astype(F32), c0[l].astype(F32)
        steps, outputs = [], []
        for t in range(T):
            h_op = round_bf16(snap(("h", l, t), h))
            a = terms[t] + mul(h_op, Wh_r)  # input term + bias, then the recurrent product
            ai, af, ao, ag = np.split(a, 4, axis=1)
            i = sigmoid(ai + pi * c)
            f = sigmoid(af + pf * c)
            g = np.tanh(ag)
            c_new = f * c + i * g
            o = sigmoid(ao + po * c_new)
            h_new = o * np.tanh(c_new)
            steps.append(dict(h_op=h_op, c_prev=c, i=i, f=f, o=o, g=g, c=c_new))
            h, c = h_new, c_new
            outputs.append(h)
        cache.append(dict(steps=steps, X=None if l == 0 else X, Wh=Wh))
        h_last.append(h)
        c_last.append(c)
        inputs = np.array(outputs if masks is None else [outputs[t] * masks[l, t] for t in range(T)], F32)
    loss, probs = 0.0, []
    for t in range(T):  # the output layer in float32, unrounded
        logits = inputs[t] @ p["out.W"].T + p["out.b"]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
        loss -= np.log(prob[np.arange(B), y[:, t]].astype(np.float64)).sum()
        probs.append(prob)
    return loss / (B * T), (cache, inputs, probs), np.array(h_last), np.array(c_last)


def backward(p, cache, x, y, layers, peepholes, product, masks=None, weight_masks=None, snap=_keep):
    """Gradients {name: float32 array} for every parameter, plus 'h0' and 'c0' (L, B, H), as
    tests/reference.backward with the bf16 products: dh_{t-1} = round(dA_t) @ round(Wh), the
    gradient passed down round(dA) @ round(Wx), dWh = round(dA)^T @ round(h_prev) and dWx =
    round(dA)^T @ round(inputs) over the window's N = T*B positions in time-major order. snap as
    forward's, for ("dA", l, t)."""
    mul = PRODUCTS[product]
    layer_caches, top, probs = cache
    B, T = y.shape
    V, H = p["out.W"].shape
    G, N = 4 * H, T * B
    grads = {name: np.zeros_like(value, dtype=F32) for name, value in p.items()}
    dh_above = np.zeros((T, B, H), F32)
    for t in range(T):
        dlogits = probs[t].copy()
        dlogits[np.arange(B), y[:, t]] -= 1
        dlogits /= F32(B * T)
        grads["out.W"] += dlogits.T @ top[t]
        grads["out.b"] += dlogits.sum(axis=0)
        dh_above[t] = dlogits @ p["out.W"] * (F32(1) if masks is None else masks[layers - 1, t])
    dh0, dc0 = np.zeros((layers, B, H), F32), np.zeros((layers, B, H), F32)
    for l in reversed(range(layers)):
        steps, X, Wh = layer_caches[l]["steps"], layer_caches[l]["X"], layer_caches[l]["Wh"]
        Wh_r = round_bf16(Wh)  # (G, H): dh = dA @ Wh
        pi, pf, po = split_gates(p[f"l{l}.p"], H)[:3] if peepholes else (F32(0),) * 3
        dh_next, dc_next = np.zeros((B, H), F32), np.zeros((B, H), F32)
        dA, dA_op = np.zeros((T, B, G), F32), np.zeros((T, B, G), F32)
        for t in reversed(range(T)):
            s = steps[t]
            dh = dh_above[t] + dh_next
            tanh_c = np.tanh(s["c"])
            da_o = dh * tanh_c * s["o"] * (1 - s["o"])
            dc = dc_next + dh * s["o"] * (1 - tanh_c ** 2) + po * da_o
            da_i = dc * s["g"] * s["i"] * (1 - s["i"])
            da_f = dc * s["c_prev"] * s["f"] * (1 - s["f"])
            da_g = dc * s["i"] * (1 - s["g"] ** 2)
            dA[t] = np.concatenate([da_i, da_f, da_o, da_g], axis=1)
            dA_op[t] = round_bf16(snap(("dA", l, t), dA[t]))
            dh_next = mul(dA_op[t], Wh_r)
            dc_next = dc * s["f"] + pi * da_i + pf * da_f
        dh0[l], dc0[l] = dh_next, dc_next
        dA2, dA2_op = dA.reshape(N, G), dA_op.reshape(N, G)
        h_op = np.array([s["h_op"] for s in steps], F32).reshape(N, H)
        grads[f"l{l}.Wh"] = mul(dA2_op.T, h_op)
        if weight_masks is not None:
            grads[f"l{l}.Wh"] *= weight_masks[l]
        grads[f"l{l}.b"] = dA2.sum(axis=0)
        if peepholes:
            c_prev = np.array([s["c_prev"] for s in steps], F32).reshape(N, H)
            c_new = np.array([s["c"] for s in steps], F32).reshape(N, H)
            da_i, da_f, da_o, _ = split_gates(dA2.T, H)
            grads[f"l{l}.p"] = np.concatenate([(da_i.T * c_prev).sum(0), (da_f.T * c_prev).sum(0),
                                               (da_o.T * c_new).sum(0)])
        if l == 0:  # the one-hot input's gradient: dA's rows added into the columns of the ids seen
            dWxT = np.zeros((V, G), F32)
            np.add.at(dWxT, x.T.reshape(N), dA2)
            grads["l0.Wx"] = dWxT.T.copy()
        else:
            grads[f"l{l}.Wx"] = mul(dA2_op.T, X)
            down = mul(dA2_op, round_bf16(p[f"l{l}.Wx"])).reshape(T, B, H)
            dh_above = down if masks is None else down * masks[l - 1]
    grads["h0"], grads["c0"] = dh0, dc0
    return grads
