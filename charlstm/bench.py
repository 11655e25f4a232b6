"""Training throughput: full steps (forward, backward, clipping, the optimizer) timed after a warm-up.
Without dropout, as the PyTorch peer runs (with it, filling the masks adds 0.2 ms a step at 2x256,
B=T=50: under 1%).

GFLOP/s counts the useful matrix FLOPs only (2 per multiply-add; layer 0's one-hot input gather
is a lookup and counts nothing):

    per layer:       h_{t-1} @ Wh.T forward, dz @ Wh backward, dWh = dz^T @ h     3 * 2*N*G*H
    layers above 0:  the same three for the input product Wx                       3 * 2*N*G*H
    output:          logits, dHtop, dWy                                            3 * 2*N*V*H
"""
import time

import numpy as np

from charlstm.engine import network
from charlstm.config import ModelConfig, TrainConfig
from charlstm.data import Batcher
from charlstm.model import init_params

# The grid of issues 5 and 13: (H, B, T, L), the last the training defaults.
GRID = [(128, 1, 64, 1), (256, 1, 64, 1), (512, 1, 64, 1),
        (128, 32, 64, 1), (256, 32, 64, 1), (512, 32, 64, 1),
        (256, 32, 64, 2), (128, 50, 50, 1), (256, 50, 50, 2)]


def flops_per_step(hidden, batch_size, seq_length, layers, vocab_size):
    N, H, G, V = batch_size * seq_length, hidden, 4 * hidden, vocab_size
    recurrent = 3 * 2 * N * G * H
    return layers * recurrent + (layers - 1) * recurrent + 3 * 2 * N * V * H


def measure(ids, vocab, hidden, batch_size, seq_length, layers, seconds=3.0, warmup=3, dtype="float32",
            precision="f32"):
    """chars/s and GFLOP/s of full training steps on successive windows of `ids`, timed for at
    least `seconds` after `warmup` untimed steps."""
    from charlstm.optim import new_state
    from charlstm.engine.threads import Governor
    from charlstm.train import train_step

    model = ModelConfig(vocab, hidden=hidden, layers=layers, dtype=dtype)
    cfg = TrainConfig(batch_size=batch_size, seq_length=seq_length)
    params = init_params(model, np.random.default_rng(0), cfg.init)
    grads, optim_state = np.zeros_like(params), new_state(cfg.optim, params)
    ws = network.Workspace(model, batch_size, seq_length, precision=precision)
    h = np.zeros((layers, batch_size, hidden), dtype=dtype)
    c = np.zeros_like(h)
    batcher = Batcher(ids, batch_size, seq_length)
    step, start, elapsed, governor = 0, None, 0.0, Governor()
    while start is None or elapsed < seconds:
        if step == warmup:
            start = time.perf_counter()
        x, y = batcher.window(step % batcher.windows_per_epoch)
        governor.run(lambda: train_step(params, grads, optim_state, ws, x, y, h, c, cfg, step + 1, cfg.lr))
        step += 1
        if start is not None:
            elapsed = time.perf_counter() - start
    timed = step - warmup
    flops = flops_per_step(hidden, batch_size, seq_length, layers, len(vocab)) * timed
    return {"chars_per_s": timed * batch_size * seq_length / elapsed, "gflops": flops / elapsed / 1e9}


def sgemm_peak(threads=None, n=2048, reps=8):
    """GFLOP/s of a big square float32 product through the same BLAS the kernels call, on `threads`
    threads (default: all cores; charlstm itself keeps BLAS on one, blas.py)."""
    import os

    from charlstm.engine import blas
    from charlstm.engine.kernels import matmul

    blas.set_threads(threads or os.cpu_count())
    try:
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)
        out = np.empty_like(a)
        matmul(a, a, out)
        start = time.perf_counter()
        for _ in range(reps):
            matmul(a, a, out)
        return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9
    finally:
        blas.set_threads(1)
