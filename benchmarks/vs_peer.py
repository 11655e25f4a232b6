#!/usr/bin/env python3
"""Training throughput, ours against the PyTorch peer, shape by shape in one run.

    python benchmarks/vs_peer.py [--peer benchmarks/peer_torch.py] [--threads 2] [--shapes 256x1x64x1 ...]
                                 [--precision bf16]

For each shape of charlstm.bench.GRID it runs `charlstm bench --json` and the peer's `speed` mode
alternately (never at the same time), --repeats times each, and prints the median chars/s of each,
the ratio of the medians, and our GFLOP/s as a share of the big-sgemm peak measured at the start of
the same run. Both time full training steps (forward, backward, value clipping, RMSprop: charlstm's
defaults) without dropout. With --precision bf16 each round also runs charlstm in bfloat16
(`charlstm bench --precision bf16`), and the table adds its chars/s, its ratio to the peer and to
charlstm's own float32, and which bfloat16 product ran (target.BF16_PRODUCT). The peer needs torch:
pip install -e '.[bench]'. Run it on an idle machine: on 2 cores any background job halves the
figures, and even idle this VM's speed drifts by 20-40% from run to run, hence the medians.
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


def cpu_name():
    """The CPU's model name, with its family and model on Linux (a VM often names only the vendor)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in info.items()}
        family, model = fields.get("cpu family", "?"), fields.get("model", "?")
        return f"{fields.get('model name', '?')} (family {family} model {model})"
    except OSError:
        import platform
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default=str(ROOT / "benchmarks" / "peer_torch.py"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="*", help="HxBxTxL shapes to run (default: charlstm.bench.GRID)")
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                   help="bf16: also time charlstm in bfloat16 (the peer stays float32)")
    args = p.parse_args()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("the PyTorch peer needs torch: pip install -e '.[bench]'")
    grid = [tuple(map(int, shape.split("x"))) for shape in args.shapes] if args.shapes else GRID
    peak = float(run([sys.executable, "-c", "from charlstm.bench import sgemm_peak; print(sgemm_peak())"]))
    print(f"CPU: {cpu_name()}, {args.threads} threads")
    print(f"big sgemm peak (2048^3 float32, same BLAS): {peak:.0f} GFLOP/s\n")
    bf16 = args.precision == "bf16"
    if bf16:
        product = run([sys.executable, "-c", "from charlstm.engine.target import BF16_PRODUCT; print(BF16_PRODUCT)"])
        print(f"charlstm's bfloat16 product on this machine: {product.strip()} (docs/engine.md)\n")
    print(f"{'H':>4} {'B':>3} {'T':>3} {'L':>2} {'ours chars/s':>13} {'torch chars/s':>14} {'ratio':>6} "
          f"{'ours GFLOP/s':>13} {'% of peak':>9}" + (f" {'bf16 chars/s':>13} {'vs torch':>8} {'vs f32':>7} "
                                                      f"{'bf16 GFLOP/s':>13}" if bf16 else ""))
    for H, B, T, L in grid:
        shape = ["--hidden", str(H), "--batch-size", str(B), "--seq-length", str(T), "--layers", str(L),
                 "--threads", str(args.threads), "--json"]
        ours, torch, halves = [], [], []
        for _ in range(args.repeats):
            ours.append(json.loads(run([sys.executable, "-m", "charlstm", "bench", args.corpus, *shape])))
            if bf16:
                halves.append(json.loads(run([sys.executable, "-m", "charlstm", "bench", args.corpus, *shape,
                                              "--precision", "bf16"])))
            peer_out = run([sys.executable, args.peer, "speed", args.corpus, "--hidden", str(H), "--batch", str(B),
                            "--seq", str(T), "--layers", str(L), "--threads", str(args.threads)])
            torch.append(float(re.search(r"chars_per_s=([\d.]+)", peer_out).group(1)))
        ours_cps = statistics.median(r["chars_per_s"] for r in ours)
        gflops = statistics.median(r["gflops"] for r in ours)
        torch_cps = statistics.median(torch)
        line = (f"{H:>4} {B:>3} {T:>3} {L:>2} {ours_cps:>13,.0f} {torch_cps:>14,.0f} {ours_cps / torch_cps:>5.2f}x "
                f"{gflops:>13.1f} {100 * gflops / peak:>8.0f}%")
        if bf16:
            half_cps = statistics.median(r["chars_per_s"] for r in halves)
            half_gflops = statistics.median(r["gflops"] for r in halves)
            line += (f" {half_cps:>13,.0f} {half_cps / torch_cps:>7.2f}x {half_cps / ours_cps:>6.2f}x "
                     f"{half_gflops:>13.1f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
