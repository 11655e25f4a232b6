#!/usr/bin/env python3
"""Where a training step's time goes, against the machine's limits, shape by shape.

    python benchmarks/step_profile.py [--threads 2] [--shapes 256x32x64x1 ...]

Once per run: one core's FMA peak (the micro-kernel on operands that stay in L1: no memory
traffic, only fmas) and big sgemm through SciPy's BLAS on one thread and on all.
For each shape H x B x T x L (dropout 0.3, as the defaults train), at the given thread count:
  - one full training step (forward, loss, backward, clip, update), as `charlstm bench` runs it,
    and its parts, timed by wrapping every kernel call the step makes:
      recurrent   the per-step loops (recurrent.py's grid, whose cells also pack their
                  slices of Wh), gates included
      batched     the window's products: input terms, logits, weight gradients, dH below, on the
                  packed micro-kernel (packed.py) or BLAS
      packing     packing weights and operands into panels, transposes
      waiting     the calling thread waiting for the team's other threads to finish their shares
      other       softmax, bias sums, layer 0's gathers, dropout, clipping, the update
  - the per-step product alone: one window's forward and backward recurrent products on one
    thread, in GFLOP/s and as a share of the FMA peak; at B = 1 (one row: memory-bound) also the
    rate the packed weights stream in, in GB/s.
Run it on a quiet machine; it prints numbers and asserts nothing.
"""
import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CATEGORY = {"forward_grid": "recurrent", "backward_grid": "recurrent",
            "gate_projection": "batched", "rows_times_panels": "batched", "project_input": "batched",
            "weight_grad": "batched", "matmul": "batched",
            "pack_forward": "packing", "pack_columns": "packing", "transpose_rows": "packing",
            "transpose_into": "packing"}


def timed(fn, reps):
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--shapes", nargs="*", default=["128x1x64x1", "256x1x64x1", "512x1x64x1", "128x32x64x1", "256x32x64x1", "512x32x64x1",
                                                     "256x32x64x2", "128x50x50x1", "256x50x50x2"])
    args = p.parse_args()
    from charlstm.cli import set_threads

    set_threads(args.threads)
    import numpy as np

    from charlstm.engine import kernels, network, packed, recurrent, stream_kernels
    from charlstm.bench import sgemm_peak
    from charlstm.config import ModelConfig, TrainConfig
    from charlstm.engine.dropout import fill_masks
    from charlstm.engine.jit import kernel
    from charlstm.model import init_params, views
    from charlstm.optim import new_state
    from charlstm.engine.threads import team, use
    from charlstm.train import train_step

    @kernel
    def products(x, w, out, rows_total, K, panels_total, W, reps):
        """Per-step products as recurrent.py makes them: panel pairs outside, blocks of rows inside."""
        xf, wf, of, row = x.reshape(-1), w.reshape(-1), out.reshape(-1), out.shape[1]
        blocks = -(-rows_total // packed.ROWS)
        for _ in range(reps):
            for p in range(0, panels_total, packed.PANELS):
                for b in range(blocks):
                    s0, rows = recurrent._block(0, rows_total, blocks, b)
                    packed.block_product(xf, s0 * K, K, rows, wf, p * K * W, K * W, K, of, s0 * row + p * W, row, W)

    @kernel
    def one_row(x, w, out, unit_panels, reps):
        """One stream's per-step products as stream_kernels.py makes them: one row times the panels,
        `unit_panels` panels a unit block (4 forward: its gates; 1 backward)."""
        wf = w.reshape(-1)
        panels, K, W = w.size // (w.shape[-2] * w.shape[-1]), w.shape[-2], w.shape[-1]
        for _ in range(reps):
            for p in range(0, panels, unit_panels):
                packed.row_product(x, 0, wf, p * K * W, K * W, K, out, p * W, W, unit_panels)

    use(args.threads)
    W = packed.lanes("float32")
    rng = np.random.default_rng(0)
    K = 192  # 192-deep products on 24 KB of panels (AVX-512): all in L1
    x = rng.standard_normal((packed.ROWS, K)).astype(np.float32)
    w = rng.standard_normal((packed.PANELS, K, W)).astype(np.float32)
    out = np.zeros((packed.ROWS, packed.PANELS * W), np.float32)
    reps = 50000
    peak = 2 * packed.ROWS * K * packed.PANELS * W * reps / timed(
        lambda: products(x, w, out, packed.ROWS, K, packed.PANELS, W, reps), 1) / 1e9
    sgemm1, sgemm_all = sgemm_peak(1), sgemm_peak(args.threads)
    print(f"vector width {W} floats, micro-kernel {packed.ROWS} rows x {packed.PANELS} panels; one core's fma peak "
          f"(micro-kernel in L1) {peak:.0f} GFLOP/s; big sgemm {sgemm1:.0f} GFLOP/s on 1 thread, "
          f"{sgemm_all:.0f} on {args.threads}\n")

    spent = collections.defaultdict(float)
    for module in (kernels, packed, recurrent, stream_kernels):
        for name, category in CATEGORY.items():
            if hasattr(module, name):
                setattr(module, name, _timing(getattr(module, name), category, spent))
    def timing_waits(team_call):
        def timed_team_call(*args):
            """The calling thread's kernels count in their categories; the time it then waits for
            the other threads to finish their shares counts as `waiting`."""
            before, start = sum(spent.values()), time.perf_counter()
            team_call(*args)
            spent["waiting"] += (time.perf_counter() - start) - (sum(spent.values()) - before)
        return timed_team_call
    team.run, team.together = timing_waits(team.run), timing_waits(team.together)

    print(f"{'HxBxTxL':>12} {'step':>8} {'recurrent':>10} {'batched':>8} {'packing':>8} {'waiting':>8} {'other':>7}   "
          f"{'per-step product, 1 thread':>26}")
    vocab = "".join(chr(33 + i) for i in range(65))
    for shape in args.shapes:
        H, B, T, L = map(int, shape.split("x"))
        model = ModelConfig(vocab, hidden=H, layers=L)
        cfg = TrainConfig(batch_size=B, seq_length=T)
        params = init_params(model, rng, cfg.init)
        grads, state = np.zeros_like(params), new_state(cfg.optim, params)
        ws = network.Workspace(model, B, T, dropout=True)
        fill_masks(ws.masks, cfg.dropout, 0, 1)
        xs = rng.integers(0, 65, (T, B))
        h, c = np.zeros((L, B, H), np.float32), np.zeros((L, B, H), np.float32)
        reps = 10
        one_step = lambda: train_step(params, grads, state, ws, xs, xs, h, c, cfg, 1, cfg.lr)
        one_step()
        spent.clear()
        step = timed(one_step, reps)
        part = {k: v / (reps + 1) for k, v in spent.items()}  # timed() runs reps + 1 steps
        other = step - sum(part.values())
        # One window's per-step products, forward (B x H)(H x G) and backward (B x G)(G x H), one thread.
        fwd_shape, bwd_shape, _ = packed.packed_shapes(H, "float32")
        Wh = views(params, model)["l0.Wh"]
        Wf = packed.pack_forward(Wh, np.zeros(fwd_shape, np.float32), 0, fwd_shape[0])
        Wb = packed.pack_columns(Wh, np.zeros(bwd_shape, np.float32), 0, bwd_shape[0])
        hx = rng.standard_normal((B, H)).astype(np.float32)
        dx = rng.standard_normal((B, 4 * H)).astype(np.float32)
        zf = np.zeros((B, 4 * fwd_shape[0] * W), np.float32)
        zb = np.zeros((B, bwd_shape[0] * W), np.float32)
        if B == 1:
            seconds = timed(lambda: (one_row(hx[0], Wf, zf[0], 4, T), one_row(dx[0], Wb, zb[0], 1, T)), 3)
        else:
            seconds = timed(lambda: (products(hx, Wf, zf, B, H, 4 * fwd_shape[0], W, T),
                                     products(dx, Wb, zb, B, 4 * H, bwd_shape[0], W, T)), 3)
        gflops = 2 * 2 * B * H * 4 * H * T / seconds / 1e9
        streamed = f" ({(Wf.nbytes + Wb.nbytes) * T / seconds / 1e9:.0f} GB/s)" if B == 1 else ""
        ms = lambda s: f"{s * 1e3:.1f}"
        print(f"{shape:>12} {ms(step):>6}ms {ms(part.get('recurrent', 0)):>8}ms {ms(part.get('batched', 0)):>6}ms "
              f"{ms(part.get('packing', 0)):>6}ms {ms(part.get('waiting', 0)):>6}ms {ms(other):>5}ms   {gflops:>8.0f} GFLOP/s = "
              f"{100 * gflops / peak:.0f}% of fma peak{streamed}", flush=True)


def _timing(fn, category, spent):
    """fn, adding its wall time to spent[category] when the main thread calls it (the team's other
    threads run their shares meanwhile; the main thread's wait for them counts as `waiting`)."""
    import threading

    main = threading.main_thread()

    def timed_call(*args):
        if threading.current_thread() is not main:
            return fn(*args)
        start = time.perf_counter()
        result = fn(*args)
        spent[category] += time.perf_counter() - start
        return result
    return timed_call


if __name__ == "__main__":
    main()
