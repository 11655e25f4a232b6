#!/usr/bin/env python3
"""Training throughput, ours against the PyTorch peer, shape by shape in one run.

    python benchmarks/vs_peer.py [--peer benchmarks/peer_torch.py] [--threads 2] [--shapes 256x1x64x1 ...]

For each shape of charlstm.bench.GRID it runs `charlstm bench --json` and the peer's `speed` mode
alternately (never at the same time), --repeats times each, and prints the median chars/s of each,
the ratio of the medians, and our GFLOP/s as a share of the big-sgemm peak measured at the start of
the same run. Both time full training steps (forward, backward, value clipping, RMSprop: charlstm's
defaults) without dropout. The peer needs torch: pip install -e '.[bench]'. Run it on an idle
machine: on 2 cores any background job halves the figures, and even idle this VM's speed drifts by
20-40% from run to run, hence the medians.
"""
import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from charlstm.bench import GRID  # noqa: E402


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default=str(ROOT / "benchmarks" / "peer_torch.py"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="*", help="HxBxTxL shapes to run (default: charlstm.bench.GRID)")
    args = p.parse_args()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("the PyTorch peer needs torch: pip install -e '.[bench]'")
    grid = [tuple(map(int, shape.split("x"))) for shape in args.shapes] if args.shapes else GRID
    peak = float(run([sys.executable, "-c", "from charlstm.bench import sgemm_peak; print(sgemm_peak())"]))
    print(f"big sgemm peak (2048^3 float32, same BLAS): {peak:.0f} GFLOP/s\n")
    print(f"{'H':>4} {'B':>3} {'T':>3} {'L':>2} {'ours chars/s':>13} {'torch chars/s':>14} {'ratio':>6} "
          f"{'ours GFLOP/s':>13} {'% of peak':>9}")
    for H, B, T, L in grid:
        ours, torch = [], []
        for _ in range(args.repeats):
            ours.append(json.loads(run([sys.executable, "-m", "charlstm", "bench", args.corpus, "--hidden", str(H),
                                        "--batch-size", str(B), "--seq-length", str(T), "--layers", str(L),
                                        "--threads", str(args.threads), "--json"])))
            peer_out = run([sys.executable, args.peer, "speed", args.corpus, "--hidden", str(H), "--batch", str(B),
                            "--seq", str(T), "--layers", str(L), "--threads", str(args.threads)])
            torch.append(float(re.search(r"chars_per_s=([\d.]+)", peer_out).group(1)))
        ours_cps = statistics.median(r["chars_per_s"] for r in ours)
        gflops = statistics.median(r["gflops"] for r in ours)
        torch_cps = statistics.median(torch)
        print(f"{H:>4} {B:>3} {T:>3} {L:>2} {ours_cps:>13,.0f} {torch_cps:>14,.0f} {ours_cps / torch_cps:>5.2f}x "
              f"{gflops:>13.1f} {100 * gflops / peak:>8.0f}%", flush=True)

if __name__ == "__main__":
    main()
