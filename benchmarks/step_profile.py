#!/usr/bin/env python3
"""Where a training step's time goes, against the machine's limits, shape by shape.

    python benchmarks/step_profile.py [--threads 2] [--shapes 256x32x64x1 ...]

For each shape H x B x T x L it times, at the given thread count:
  - one full training step (forward, loss, backward, clip, update), as `charlstm bench` runs it;
  - the parts of the step: the recurrent loops of every layer (recurrent.py: products, gates and
    packing, on the team's threads), the dWh products (BLAS), and the rest (softmax, the other
    batched products, gathers, clipping, the update);
  - the per-step product alone: the micro-kernel calls of one window's forward and backward
    recurrent products, on one thread, in GFLOP/s;
and once per run one core's FMA peak: the micro-kernel on operands that stay in L1 (no memory
traffic, only fmas), and big-sgemm through the same BLAS on one thread and on all.
Run it on a quiet machine; it prints numbers and asserts nothing.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, reps):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--shapes", nargs="*", default=["128x32x64x1", "256x32x64x1", "512x32x64x1", "256x32x64x2",
                                                     "128x50x50x1", "256x50x50x2"])
    args = p.parse_args()
    from charlstm.cli import set_threads

    set_threads(args.threads)
    import numpy as np

    from charlstm import blas, kernels, network, packed
    from charlstm.config import ModelConfig, TrainConfig
    from charlstm.jit import kernel
    from charlstm.model import init_params, views
    from charlstm.optim import new_state
    from charlstm import recurrent as recurrent_kernels
    from charlstm.threads import team, use
    from charlstm.train import train_step

    @kernel
    def products(x, w, out, rows_total, K, panels_total, W, reps):
        """The window's per-step products as recurrent.py makes them: panel pairs outside, blocks of
        ROWS rows inside, out (rows_total, panels_total * W)."""
        xf, wf, of, row = x.reshape(-1), w.reshape(-1), out.reshape(-1), out.shape[1]
        for _ in range(reps):
            for p in range(0, panels_total, packed.PANELS):
                for s0 in range(0, rows_total, packed.ROWS):
                    packed.block_product(xf, s0 * K, K, min(packed.ROWS, rows_total - s0), wf, p * K * W, K * W, K,
                                         of, s0 * row + p * W, row, W)

    use(args.threads)
    W = packed.lanes("float32")
    rng = np.random.default_rng(0)
    # One core's fma peak: 192-deep products on 24 KB of panels (AVX-512), all in L1.
    K = 192
    x = rng.standard_normal((packed.ROWS, K)).astype(np.float32)
    w = rng.standard_normal((packed.PANELS, K, W)).astype(np.float32)
    out = np.zeros((packed.ROWS, packed.PANELS * W), np.float32)
    reps = 50000
    peak = 2 * packed.ROWS * K * packed.PANELS * W * reps / timed(lambda: products(x, w, out, packed.ROWS, K, packed.PANELS, W, reps), 1) / 1e9
    blas.set_threads(1)
    from charlstm.bench import sgemm_peak
    sgemm1 = sgemm_peak()
    blas.set_threads(args.threads)
    sgemm_all = sgemm_peak()
    print(f"vector width {W} floats, micro-kernel {packed.ROWS}x{packed.PANELS} panels; one core's fma peak "
          f"(micro-kernel in L1): {peak:.0f} GFLOP/s; big sgemm {sgemm1:.0f} GFLOP/s on 1 thread, "
          f"{sgemm_all:.0f} on {args.threads}\n")
    print(f"{'shape HxBxTxL':>14} {'step':>8} {'recurrent loops':>16} {'dWh (BLAS)':>11} {'the rest':>9} "
          f"{'per-step product, 1 thread':>27} {'% of fma peak':>13}")
    vocab = "".join(chr(33 + i) for i in range(65))
    for shape in args.shapes:
        H, B, T, L = map(int, shape.split("x"))
        model = ModelConfig(vocab, hidden=H, layers=L)
        cfg = TrainConfig(batch_size=B, seq_length=T, dropout=0.0)
        params = init_params(model, rng)
        grads, state = np.zeros_like(params), new_state(cfg.optim, params)
        ws = network.Workspace(model, B, T)
        xs = rng.integers(0, 65, (T, B))
        h, c = np.zeros((L, B, H), np.float32), np.zeros((L, B, H), np.float32)
        step = timed(lambda: train_step(params, grads, state, ws, xs, xs, h, c, cfg, 1, cfg.lr), 10)
        # The recurrent loops of every layer as the step runs them (products and gates, on the team).
        w_views, N, G = views(params, model), B * T, 4 * H
        peep = ws.no_peep

        def loops():
            for l in range(L):
                packed.pack_forward(w_views[f"l{l}.Wh"], ws.Wf)
                team.run(lambda lo, hi, slot: recurrent_kernels.forward_streams(
                    ws.gates[l], ws.Wf, peep, ws.h[l], ws.c[l], ws.tc[l], lo, hi, ws.scratch), team.shares(B, packed.ROWS))
                packed.pack_backward(w_views[f"l{l}.Wh"], ws.Wb)
                team.run(lambda lo, hi, slot: recurrent_kernels.backward_streams(
                    ws.gates[l], ws.c[l], ws.tc[l], peep, ws.Wb, ws.dH, ws.dA, ws.dh, ws.dc, lo, hi, ws.scratch),
                    team.shares(B, packed.ROWS))
        recurrent = timed(loops, 10)
        batched = timed(lambda: [kernels.weight_grad(ws.dA.reshape(N, G), ws.h[l, :-1].reshape(N, H),
                                                     views(grads, model)[f"l{l}.Wh"]) for l in range(L)], 10)
        # The per-step products of one window on one thread: forward (B x H)(H x G), backward (B x G)(G x H).
        fwd_shape, bwd_shape, _ = packed.packed_shapes(H, "float32")
        Wf = packed.pack_forward(w_views["l0.Wh"], np.zeros(fwd_shape, np.float32))
        Wb = packed.pack_backward(w_views["l0.Wh"], np.zeros(bwd_shape, np.float32))
        hx = rng.standard_normal((B, H)).astype(np.float32)
        dx = rng.standard_normal((B, G)).astype(np.float32)
        zf = np.zeros((B, 4 * fwd_shape[0] * W), np.float32)
        zb = np.zeros((B, bwd_shape[0] * W), np.float32)
        seconds = timed(lambda: (products(hx, Wf, zf, B, H, 4 * fwd_shape[0], W, T),
                                 products(dx, Wb, zb, B, G, bwd_shape[0], W, T)), 3)
        gflops = 2 * 2 * B * H * G * T / seconds / 1e9
        rest = step - recurrent - batched
        print(f"{shape:>14} {step * 1e3:>6.1f}ms {recurrent * 1e3:>14.1f}ms {batched * 1e3:>9.1f}ms {rest * 1e3:>7.1f}ms "
              f"{gflops:>20.0f} GFLOP/s {100 * gflops / peak:>12.0f}%", flush=True)


if __name__ == "__main__":
    main()
