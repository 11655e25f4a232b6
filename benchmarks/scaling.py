"""Weak scaling of `mpiexec -n N charlstm train`: chars/s for 1 and 2 ranks with the same streams
per rank and one thread each, on loopback (shared memory) and across two emulated hosts (two
network namespaces joined by a veth pair shaped to --gbit Gbit/s with tc; needs root), with the
time a step waits for its reduction, and the ring-allreduce model for N ranks:

    t_allreduce(N) = 2 (N-1)/N * bytes / bandwidth + latency,    efficiency(N) = t_step / (t_step + t_allreduce(N))

for bytes = all the gradients (no overlap, as --no-overlap runs: one Allreduce of the whole
buffer after backward) and for bytes = layer 0's (perfect overlap: by default the trainer starts
each parameter group's sum as soon as backward has finished it, the output layer's first, so at
best only the last group, layer 0, is waited for). Run both modes to see what the overlap buys.
Both "hosts" here share this machine's cores, so 2 ranks also slow each other's compute: the
loopback row shows that part alone.

    python benchmarks/scaling.py                       # 2x256, 25 streams per rank, T=50, 30 s each
    python benchmarks/scaling.py --no-overlap          # one Allreduce after backward
    python benchmarks/scaling.py --hidden 16 --layers 1 --streams 2 --seq-length 8 --seconds 3 --netns

The emulated hosts: namespaces charlstm-a and charlstm-b (10.199.0.1 and .2 on a veth pair, each
with a tbf qdisc at the given rate), each with its own hostname (unshare --uts) so MPICH treats
them as two machines; MPICH's UCX is told to use TCP (UCX_TLS=tcp,self) and MPIR_CVAR_NOLOCAL=1,
so every byte of the reduction crosses the shaped link, and nothing else is reachable from them.
The namespaces are removed at the end. Run it on a quiet machine: it prints numbers, it asserts none.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS, ADDR, DEV = ("charlstm-a", "charlstm-b"), ("10.199.0.1", "10.199.0.2"), ("charlstm-va", "charlstm-vb")
MODEL_RANKS = (2, 4, 8, 16, 64)


# ---------------------------------------------------------------------------------------- one rank

def worker(a):
    """Under mpiexec: train a.streams streams per rank for a.seconds; rank 0 prints one JSON line."""
    from charlstm.cli import set_threads

    set_threads(a.threads)  # before NumPy loads BLAS
    import numpy as np
    from mpi4py import MPI

    from charlstm.config import ModelConfig, TrainConfig
    from charlstm.data import load_corpus
    from charlstm.distributed import FollowerFolder, Job, RankTrainer, group_spans
    from charlstm.model import init_params
    from charlstm.optim import new_state
    from charlstm.train import State

    comm = MPI.COMM_WORLD
    job = Job(comm)
    with tempfile.TemporaryDirectory() as cache:  # one cache per rank: nothing shared, nothing raced
        corpus = load_corpus(a.corpus, cache)
        model = ModelConfig(corpus.vocab, a.hidden, a.layers)
        cfg = TrainConfig(batch_size=a.streams * job.size, seq_length=a.seq_length, dropout=a.dropout)
        params = init_params(model, np.random.default_rng(0), cfg.init)
        shape = (a.layers, cfg.batch_size, a.hidden)
        state = State(params, new_state(cfg.optim, params), np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        trainer = RankTrainer(job, model, cfg, corpus, FollowerFolder(cache), state, lambda msg: None)
        trainer.reduce.overlap = a.overlap
        for _ in range(3):  # compile (or load) the kernels, warm the caches
            trainer.step()
        small = np.zeros(1)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(20):
            comm.Allreduce(MPI.IN_PLACE, small)
        latency = (time.perf_counter() - start) / 20
        steps, job.wait_seconds = 0, 0.0
        comm.Barrier()
        start = time.perf_counter()
        while True:
            trainer.step()
            steps += 1
            # every rank must take the same number of steps: rank 0's clock decides
            if comm.bcast(time.perf_counter() - start >= a.seconds if job.leader else None, root=0):
                break
        elapsed = time.perf_counter() - start
    waits = comm.gather(job.wait_seconds / steps, root=0)
    if job.leader:
        print(json.dumps({"ranks": job.size, "steps": steps, "chars_per_s": steps * cfg.batch_size * a.seq_length / elapsed,
                          "step_ms": 1e3 * elapsed / steps, "wait_ms": 1e3 * max(waits),
                          "grad_bytes": params.nbytes, "latency_ms": 1e3 * latency,
                          # the group backward finishes last (layer 0): its sum cannot overlap anything
                          "last_group_bytes": params[group_spans(model)["l0"]].nbytes}), flush=True)


# ---------------------------------------------------------------------------------------- the driver

def launch(a, ranks, prefix=(), mpi_options=()):
    cmd = [*prefix, "mpiexec", *mpi_options, "-n", str(ranks), sys.executable, __file__, "--worker",
           *worker_args(a)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.seconds * 4 + 600)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_args(a):
    return [str(v) for v in ["--corpus", a.corpus, "--hidden", a.hidden, "--layers", a.layers, "--streams", a.streams,
            "--seq-length", a.seq_length, "--dropout", a.dropout, "--seconds", a.seconds, "--threads", a.threads,
            "--overlap" if a.overlap else "--no-overlap"]]


def sh(*cmd):
    subprocess.run(list(map(str, cmd)), check=True)


def netns_up(gbit):
    """Two namespaces, a veth pair between them shaped to `gbit` Gbit/s each way."""
    netns_down()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", DEV[0], "type", "veth", "peer", "name", DEV[1])
    for ns, dev, addr in zip(NS, DEV, ADDR):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{gbit}gbit", "burst", "256kb",
           "latency", "20ms")


def netns_down():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)  # takes its end of the veth along


def across_namespaces(a, folder):
    """2 ranks, one per namespace: mpiexec in charlstm-a starts charlstm-b's proxy through a
    launcher script in place of ssh (hydra calls it as: [-x] HOST COMMAND)."""
    script = Path(folder) / "netns-launch"
    script.write_text(f'#!/bin/sh\n[ "$1" = "-x" ] && shift\nshift\n'
                      f'exec ip netns exec {NS[1]} unshare --uts sh -c "hostname {NS[1]} && $*"\n')
    script.chmod(0o755)
    options = ["-genv", "MPIR_CVAR_NOLOCAL", "1", "-genv", "UCX_TLS", "tcp,self", "-hosts", ",".join(ADDR),
               "-ppn", "1", "-launcher", "ssh", "-launcher-exec", str(script), "-localhost", ADDR[0]]
    # the launching side gets its own hostname too (the inner mpiexec comes from launch())
    prefix = ["ip", "netns", "exec", NS[0], "unshare", "--uts", "sh", "-c", f'hostname {NS[0]} && exec "$@"', "sh"]
    return launch(a, 2, prefix, options)


def ring_ms(ranks, grad_bytes, bytes_per_s, latency_ms):
    return 1e3 * 2 * (ranks - 1) / ranks * grad_bytes / bytes_per_s + latency_ms


def report(a, rows):
    one = rows[0][1]
    print(f"model {a.layers}x{a.hidden}, {a.streams} streams x {a.seq_length} steps per rank, {a.threads} thread(s) "
          f"per rank, dropout {a.dropout}; gradients {one['grad_bytes'] / 1e6:.2f} MB per step, summed "
          f"{'by parameter group during backward' if a.overlap else 'in one Allreduce after backward'}")
    print(f"{'setting':<28} {'ranks':>5} {'chars/s':>10} {'step ms':>8} {'wait ms':>8} {'efficiency':>10}")
    for name, r in rows:
        eff = r["chars_per_s"] / (r["ranks"] * one["chars_per_s"])
        print(f"{name:<28} {r['ranks']:>5} {r['chars_per_s']:>10,.0f} {r['step_ms']:>8.1f} {r['wait_ms']:>8.1f} "
              f"{eff:>9.1%}")
    compute_ms = one["step_ms"]
    link = next((r for name, r in rows if name.startswith("2 namespaces")), None)
    bps = a.gbit * 1e9 / 8
    latency = link["latency_ms"] if link else 0.0
    print(f"\nring allreduce model at {a.gbit:g} Gbit/s (latency {latency:.2f} ms, the measured 8-byte allreduce over "
          f"the link), no overlap, step compute {compute_ms:.1f} ms:")
    print(f"{'ranks':>5} {'allreduce ms':>12} {'efficiency':>10}")
    for n in MODEL_RANKS:
        t = ring_ms(n, one["grad_bytes"], bps, latency)
        print(f"{n:>5} {t:>12.1f} {compute_ms / (compute_ms + t):>9.1%}")
    exposed = one["last_group_bytes"]
    print(f"with overlap at best, only layer 0's sum ({exposed / 1e6:.2f} MB, the group backward finishes last) "
          f"is waited for:")
    print(f"{'ranks':>5} {'wait ms':>12} {'efficiency':>10}")
    for n in MODEL_RANKS:
        t = ring_ms(n, exposed, bps, latency)
        print(f"{n:>5} {t:>12.1f} {compute_ms / (compute_ms + t):>9.1%}")
    if link:
        print(f"measured at 2 ranks: wait {link['wait_ms']:.1f} ms a step against the model's "
              f"{ring_ms(2, one['grad_bytes'], bps, latency):.1f} ms without overlap and "
              f"{ring_ms(2, exposed, bps, latency):.1f} ms with perfect overlap")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--streams", type=int, default=25, help="streams per rank (the job's B is this times N)")
    p.add_argument("--seq-length", type=int, default=50)
    p.add_argument("--dropout", type=float, default=0.3, help="as train's default (ramped up over 20 epochs)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per setting")
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--gbit", type=float, default=1.0, help="rate of the emulated link")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="sum each parameter group's gradients as backward finishes it (--no-overlap: one "
                        "Allreduce after backward)")
    p.add_argument("--netns", action=argparse.BooleanOptionalAction, default=None,
                   help="also run across two network namespaces (default: when root and `ip` are there)")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if shutil.which("mpiexec") is None:
        sys.exit("no mpiexec on PATH: pip install 'charlstm[mpi]'")
    rows = [("loopback (one process)", launch(a, 1)), ("loopback (shared memory)", launch(a, 2))]
    if a.netns is None:
        a.netns = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
    if a.netns:
        with tempfile.TemporaryDirectory() as folder:
            try:
                netns_up(a.gbit)
                rows.append((f"2 namespaces, {a.gbit:g} Gbit/s", across_namespaces(a, folder)))
            finally:
                netns_down()
    report(a, rows)


if __name__ == "__main__":
    main()
