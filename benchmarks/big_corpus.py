#!/usr/bin/env python3
"""Peak memory of training on a corpus bigger than memory should allow: a generated text file of
--gigabytes GB (the bundled corpus repeated with line-level variation), trained for a few steps.

    python benchmarks/big_corpus.py [--gigabytes 2] [--dir /tmp/charlstm-big] [--keep]

Prints the encode time (first run: hash, vocabulary and id file, with a progress bar) and the peak
resident memory of the whole `charlstm train` process, read from the kernel (ru_maxrss of the child).
Needs about 2x the file size free on disk (the text and its id file).
"""
import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(path, gigabytes):
    """Write ~gigabytes GB: the bundled corpus over and over, every copy numbered so no two are equal."""
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    target, written, copy = int(gigabytes * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            chunk = f"\n=== Copy {copy} ===\n" + text
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            copy += 1
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=2.0)
    p.add_argument("--dir", default="/tmp/charlstm-big")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "big.txt"
    if not corpus.exists():
        start = time.perf_counter()
        size = generate(corpus, args.gigabytes)
        print(f"generated {corpus}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    cmd = ["charlstm", "train", str(corpus), "--hidden", "256", "--layers", "2", "--steps", str(args.steps),
           "--eval-every", "0", "--out", str(work / "checkpoints"), "--run", "big"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux reports KiB
    print(f"\ncharlstm train on {corpus.stat().st_size / 1e9:.2f} GB, {args.steps} steps: "
          f"{elapsed:.0f} s in all (encoding included), peak resident memory {peak_mb:.0f} MB")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
