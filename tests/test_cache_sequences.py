"""Every command that compiles, run as real processes on fresh Numba caches, in two orders and again
on the warm caches (issue: `sample`, then `bench --batch-size 1` twice, died with SIGSEGV when a
cached kernel called a parallel one; see jit.py's threading rule). No process may die by a signal,
and every deterministic output must equal the one from a cold cache. Then two trainings started at
the same instant on an empty cache (float32 and float64: different signatures of the same kernels,
the case that races Numba's cache index), twice.

Slow (a few minutes: each fresh cache compiles every kernel), and run by CI.
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import SHAKESPEARE_HEAD, seconds

pytestmark = pytest.mark.slow

# H=192 in float32 and H=128 in float64 read >= 512 KB of Wh a step: the one-stream kernels split
# it across threads (the parallel variants); the small models run the serial ones.
TRAIN = {
    "batch32": ["--hidden", "16", "--layers", "2", "--batch-size", "4", "--seq-length", "8"],
    "one192": ["--hidden", "192", "--layers", "2", "--batch-size", "1", "--seq-length", "16"],
    "one128f64": ["--hidden", "128", "--batch-size", "1", "--seq-length", "8", "--dtype", "float64", "--peepholes"],
    "dropout": ["--hidden", "16", "--layers", "3", "--batch-size", "4", "--seq-length", "8", "--dtype", "float64",
                "--peepholes", "--dropout", "0.2"],
    "one24": ["--hidden", "24", "--layers", "2", "--batch-size", "1", "--seq-length", "8"],
}


def commands(ck):
    """(name, argv, deterministic) for every path that compiles; ck: the folder of the runs."""
    cmds = [(f"train {run}", ["train", "corpus.txt", *opts, "--steps", "3", "--eval-every", "2", "--out", ck,
                              "--run", run, "--quiet", "--threads", "2"], True)
            for run, opts in TRAIN.items()]
    ckpt = lambda run: f"{ck}/{run}/latest.npz"
    cmds += [
        ("sample parallel", ["sample", ckpt("one192"), "--length", "60", "--seed", "1"], True),
        ("sample prime top-k", ["sample", ckpt("one192"), "--prime", "First", "--top-k", "5", "--seed", "2"], True),
        ("sample argmax f64", ["sample", ckpt("one128f64"), "--argmax", "--length", "30", "--prime", "All"], True),
        ("sample serial", ["sample", ckpt("batch32"), "--length", "40", "--seed", "3"], True),
        ("eval parallel", ["eval", ckpt("one192"), "corpus.txt", "--json"], True),
        ("eval f64", ["eval", ckpt("one128f64"), "corpus.txt", "--json"], True),
        ("eval dropout", ["eval", ckpt("dropout"), "corpus.txt", "--json"], True),
        ("gradcheck", ["gradcheck", "--layers", "2", "--peepholes"], True),
        ("bench B=1", ["bench", "corpus.txt", "--hidden", "192", "--batch-size", "1", "--seq-length", "16",
                       "--seconds", "0.2", "--json"], False),
        ("bench B=4", ["bench", "corpus.txt", "--hidden", "16", "--batch-size", "4", "--seq-length", "8",
                       "--seconds", "0.2", "--json"], False),
    ]
    return cmds


def run(argv, cache, cwd):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-m", "charlstm", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=seconds(900))


def outcome(name, argv, proc, cwd):
    """What must not change between a cold and a warm cache: stdout, or a trained checkpoint's arrays."""
    assert proc.returncode >= 0, f"{name}: killed by signal {-proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    if argv[0] == "train":
        ck, run_name = argv[argv.index("--out") + 1], argv[argv.index("--run") + 1]
        with np.load(cwd / ck / run_name / "latest.npz") as f:
            return hashlib.sha256(b"".join(f[k].tobytes() for k in sorted(f.files) if k != "manifest")).hexdigest()
    return proc.stdout


def run_all(order, cache, cwd, ck):
    cmds = commands(ck)
    trains, rest = cmds[:len(TRAIN)], cmds[len(TRAIN):]
    sequence = trains + rest if order == "forward" else trains[::-1] + rest[::-1]
    return {name: (outcome(name, argv, run(argv, cache, cwd), cwd) if keep else run(argv, cache, cwd).returncode)
            for name, argv, keep in sequence}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "corpus.txt").write_text(SHAKESPEARE_HEAD * 8, encoding="utf-8")
    return tmp_path


def test_every_command_in_two_orders_on_fresh_caches_then_warm(workdir):
    results = {}
    for order in ("forward", "reverse"):
        cache = workdir / f"cache-{order}"
        cold = run_all(order, cache, workdir, f"ck-{order}-cold")
        warm = run_all(order, cache, workdir, f"ck-{order}-warm")
        for name, value in cold.items():
            if isinstance(value, int):
                assert value == 0 and warm[name] == 0, f"{name}: exit {value} cold, {warm[name]} warm"
            else:
                assert warm[name] == value, f"{name} ({order}): the warm cache changed the output"
        results[order] = cold
    # The same commands give the same results whichever order filled the cache.
    assert results["forward"] == results["reverse"]


def test_two_trainings_started_together_on_an_empty_cache_twice(workdir):
    cache = workdir / "cache"
    opts = TRAIN["one192"][:-2] + ["--seq-length", "8"]
    argv = lambda dtype, tag: ["train", "corpus.txt", *opts, "--dtype", dtype, "--steps", "3", "--eval-every", "0",
                               "--out", "ck", "--run", f"{dtype}-{tag}", "--quiet"]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    digests = {}
    for tag in ("first", "second"):
        procs = {dtype: subprocess.Popen([sys.executable, "-m", "charlstm", *argv(dtype, tag)], cwd=workdir, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for dtype in ("float32", "float64")}
        for dtype, proc in procs.items():
            _, err = proc.communicate(timeout=seconds(900))
            assert proc.returncode >= 0, f"{dtype} ({tag}): killed by signal {-proc.returncode}\n{err[-2000:]}"
            assert proc.returncode == 0, f"{dtype} ({tag}): exit {proc.returncode}\n{err[-2000:]}"
            with np.load(workdir / "ck" / f"{dtype}-{tag}" / "latest.npz") as f:
                digests[dtype, tag] = hashlib.sha256(f["params"].tobytes()).hexdigest()
    for dtype in ("float32", "float64"):
        assert digests[dtype, "first"] == digests[dtype, "second"]
