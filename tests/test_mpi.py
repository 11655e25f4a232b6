"""Data-parallel training over MPI (charlstm.distributed), with real `mpiexec` jobs of 2 and 3 ranks:
the job equals one process, resumes across rank counts, and ends, never hangs, when a rank fails.

Tolerances, against one process training the same B streams: the ranks sum their gradients in
another order than one process's products over all B*T positions, so results differ by rounding.
In float64 that stays at ~1e-15 (measured 6e-16 on params after 40 steps): params within 1e-12.
In float32 the losses agree within 1e-6 (measured 2e-8), but a parameter may move by up to ~lr
more or less where its gradient is near zero, since Adagrad's early steps are lr * g / |g| and
rounding can flip a tiny g's sign (measured 6e-5): params within 1e-3.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charlstm.checkpoint import load_checkpoint

from tests.conftest import seconds
from tests.test_train import arrays, losses

MPIEXEC = shutil.which("mpiexec")
try:
    import mpi4py.MPI  # noqa: F401  (raises RuntimeError when it finds no MPI library)
    MISSING = None if MPIEXEC else "no mpiexec on PATH"
except (ImportError, RuntimeError) as e:
    MISSING = f"mpi4py unusable ({e}); pip install '.[mpi]'"
needs_mpi = pytest.mark.skipif(MISSING is not None, reason=f"MPI tests need the [mpi] extra: {MISSING}")

# B = 6 splits over 2 and 3 ranks (3 and 2 streams each), an epoch is 19 windows.
SMALL = ["--hidden", "12", "--layers", "2", "--batch-size", "6", "--seq-length", "8", "--eval-every", "5",
         "--save-every", "10", "--threads", "1"]
TIMEOUT = seconds(120)  # a job that takes longer hangs
FAULT = Path(__file__).parent / "mpi_fault.py"


def mpiexec(ranks, *args, program=("-m", "charlstm"), timeout=TIMEOUT):
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, *map(str, program), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def train(ranks, *args):
    result = mpiexec(ranks, "train", *args, "--quiet")
    assert result.returncode == 0, result.stderr
    return result


def one_process(run_cli, *args):
    result = run_cli("train", *args, "--quiet")
    assert result.exit_code == 0, result.output


def assert_close(a, b, dtype):
    """Two runs' checkpoints and metrics agree within the tolerances in the module docstring."""
    ca, cb = load_checkpoint(a / "latest.npz"), load_checkpoint(b / "latest.npz")
    assert ca.manifest["step"] == cb.manifest["step"]
    tolerance = 1e-12 if dtype == "float64" else 1e-3
    assert ca.optim_state.keys() == cb.optim_state.keys()
    for name in ("params", "h", "c"):
        np.testing.assert_allclose(getattr(ca, name), getattr(cb, name), rtol=0, atol=tolerance, err_msg=name)
    for name in ca.optim_state:
        np.testing.assert_allclose(ca.optim_state[name], cb.optim_state[name], rtol=0, atol=tolerance, err_msg=name)
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and len(la) >= 8
    np.testing.assert_allclose([la[k] for k in la], [lb[k] for k in la], rtol=0,
                               atol=1e-12 if dtype == "float64" else 1e-6)


@needs_mpi
@pytest.mark.parametrize("ranks,dtype", [(2, "float64"), (3, "float64"), (3, "float32")])
def test_job_equals_one_process(tmp_path, corpus, run_cli, ranks, dtype):
    """40 steps (across an epoch boundary, with dropout and validation) on N ranks against one
    process with the same B streams."""
    opts = [corpus, *SMALL, "--dtype", dtype, "--steps", 40, "--out", tmp_path]
    one_process(run_cli, *opts, "--run", "one")
    train(ranks, *opts, "--run", "job")
    assert_close(tmp_path / "one", tmp_path / "job", dtype)


@needs_mpi
def test_resume_across_rank_counts(tmp_path, corpus, run_cli):
    """A job checkpointed at step 20 on 2 ranks resumes on 2 (byte for byte the straight 2-rank
    run), on 3 and on 1 process; a one-process checkpoint resumes on 3 ranks."""
    opts = [*SMALL, "--dtype", "float64", "--out", tmp_path]
    train(2, corpus, *opts, "--steps", 40, "--run", "straight2")
    one_process(run_cli, corpus, *opts, "--steps", 40, "--run", "straight1")
    for run in ("on2", "on3", "on1"):
        train(2, corpus, *opts, "--steps", 20, "--run", run)
    one_process(run_cli, corpus, *opts, "--steps", 20, "--run", "from1")
    train(2, "--resume", tmp_path / "on2" / "latest.npz", "--steps", 40)
    train(3, "--resume", tmp_path / "on3" / "latest.npz", "--steps", 40)
    one_process(run_cli, "--resume", tmp_path / "on1" / "latest.npz", "--steps", 40)
    train(3, "--resume", tmp_path / "from1" / "latest.npz", "--steps", 40)
    assert arrays(tmp_path / "on2" / "latest.npz") == arrays(tmp_path / "straight2" / "latest.npz")
    assert losses(tmp_path / "on2") == losses(tmp_path / "straight2")
    for run in ("on3", "on1", "from1"):
        assert_close(tmp_path / "straight1", tmp_path / run, "float64")


@needs_mpi
@pytest.mark.parametrize("peepholes,B", [(False, 3), (True, 3), (True, 1)])
def test_backward_hands_each_group_to_the_reduction_once_final(peepholes, B):
    """network.backward calls ready(group) for "out", then the layers top down, each when its span
    of grads (group_spans, which tile the buffer) holds its final values: an Iallreduce in flight
    on that span would see no later write. B = 1 runs the one-stream kernels."""
    from charlstm.engine import network
    from charlstm.distributed import group_spans

    from tests.test_kernels import random_case

    config, params, x, y, h0, c0 = random_case(3, peepholes, B, 5, "float64")
    spans = group_spans(config)
    covered = np.zeros(params.size, int)
    for span in spans.values():
        covered[span] += 1
    assert (covered == 1).all()
    ws = network.Workspace(config, B, 5)
    xt = np.ascontiguousarray(x.T)
    network.forward(params, ws, xt, h0, c0)
    network.loss(params, ws, np.ascontiguousarray(y.T))
    grads, seen = np.full_like(params, np.nan), {}
    network.backward(params, grads, ws, xt, ready=lambda group: seen.setdefault(group, grads[spans[group]].copy()))
    assert list(seen) == ["out", "l2", "l1", "l0"]
    for group, values in seen.items():
        np.testing.assert_array_equal(values, grads[spans[group]], err_msg=group)
    assert not np.isnan(grads).any()


@needs_mpi
def test_batch_that_ranks_do_not_divide_is_one_line(tmp_path, corpus):
    result = mpiexec(4, "train", corpus, *SMALL, "--steps", 2, "--out", tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--batch-size 6 does not split evenly over 4 MPI ranks" in lines[0] and "1, 2, 3, 6" in lines[0]
    assert not list(tmp_path.rglob("*.npz"))


@needs_mpi
def test_a_setup_error_is_one_line_from_the_job(tmp_path):
    result = mpiexec(2, "train", tmp_path / "missing.txt", "--out", tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'missing.txt'}: no such file; check the corpus path"], result.stderr


def test_mpi_launch_without_mpi4py_is_one_line(tmp_path):
    """Launched as rank 0 of 2 (the launcher's variables) with mpi4py unimportable."""
    env = {**os.environ, "PMI_SIZE": "2", "PMI_RANK": "0"}
    code = "import sys; sys.modules['mpi4py'] = None; from charlstm.cli import cli; cli(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "train", "--out", tmp_path], env=env, capture_output=True,
                            text=True, timeout=seconds(60))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: this process was started by an MPI launcher (mpiexec, srun) but mpi4py is not installed; "
        "install it with: pip install 'charlstm[mpi]'"]
    env["PMI_RANK"] = "1"  # the other ranks exit quietly
    result = subprocess.run([sys.executable, "-c", code, "train", "--out", tmp_path], env=env, capture_output=True,
                            text=True, timeout=seconds(60))
    assert result.returncode == 1 and result.stderr == ""


# ---------------------------------------------------------------------------------------- faults

def ranks_of(pid):
    """{rank: pid} of the python processes under mpiexec `pid` (mpiexec -> hydra proxy -> ranks)."""
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += map(int, children)
        rank = next((v[9:] for v in environ if v.startswith(b"PMI_RANK=")), None)
        if rank is not None and p != pid:
            found[int(rank)] = p
    return found


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(signal, "SIGKILL"),
                    reason="finds the ranks in /proc (Linux) and kills one with SIGKILL")
@pytest.mark.parametrize("victim", [0, 1])
def test_kill_9_of_a_rank_ends_the_job_and_keeps_the_checkpoint(tmp_path, corpus, run_cli, victim):
    """kill -9 of one rank while the job trains and saves every step: mpiexec ends the job within
    seconds; latest.npz loads, and resuming it on one process runs."""
    run_dir = tmp_path / "r"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "charlstm", "train", str(corpus), *SMALL, "--save-every", "1",
           "--eval-every", "0", "--steps", "100000", "--out", str(tmp_path), "--run", "r"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(int(p.name[5:13]) >= 3 for p in run_dir.glob("step-*.npz")):  # (older ones get pruned)
            assert proc.poll() is None and time.monotonic() < deadline, "the job ended, or took too long, before step 3"
            time.sleep(0.05)
        ranks = ranks_of(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[victim], signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=seconds(30))
        assert time.monotonic() - killed < seconds(10)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "resume with: mpiexec -n 2 charlstm train --resume" in out  # said at the start, by rank 0
    step = load_checkpoint(run_dir / "latest.npz").manifest["step"]
    one_process(run_cli, "--resume", run_dir / "latest.npz", "--steps", step + 2)


@needs_mpi
def test_an_exception_in_one_rank_aborts_the_job(tmp_path, corpus):
    result = mpiexec(2, 1, 7, "exception", "train", corpus, *SMALL, "--steps", 40, "--out", tmp_path, "--run", "r",
                     program=(FAULT,))
    assert result.returncode != 0
    assert "RuntimeError: planted fault at step 7" in result.stderr
    assert "rank 1: ending the job (MPI_Abort)" in result.stderr
    assert load_checkpoint(tmp_path / "r" / "latest.npz").manifest["step"] == 5  # validated and best at 5


@needs_mpi
def test_nan_in_one_rank_stops_every_rank_as_one_process_does(tmp_path, corpus):
    """The NaN reaches every rank through the reduction: all stop at that step, exit 3, nothing saved."""
    result = mpiexec(2, 1, 13, "nan", "train", corpus, *SMALL, "--steps", 40, "--out", tmp_path, "--run", "r",
                     "--quiet", program=(FAULT,))
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Error: the loss or gradients became NaN at step 13" in lines[0]
    assert load_checkpoint(tmp_path / "r" / "latest.npz").manifest["step"] == 10


@needs_mpi
def test_ranks_that_drift_apart_are_caught(tmp_path, corpus):
    result = mpiexec(2, 1, 4, "diverge", "train", corpus, *SMALL, "--steps", 40, "--out", tmp_path, "--run", "r",
                     program=(FAULT,))
    assert result.returncode != 0
    assert "Error: rank 0: the ranks' parameters differ at step 5" in result.stderr


@needs_mpi
@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C forwarded by mpiexec as SIGINT is POSIX (a Windows "
                                                    "console cannot aim Ctrl-C at one process group)")
def test_ctrl_c_on_mpiexec_saves_once_and_resumes_exactly(tmp_path, corpus, run_cli):
    """SIGINT to mpiexec reaches every rank; they agree to stop at the same step, rank 0 saves once
    and prints the resume command; resuming on 2 ranks to step N gives the straight run's bytes."""
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "charlstm", "train", str(corpus), *SMALL, "--save-every", "0",
           "--eval-every", "0", "--steps", "100000", "--out", str(tmp_path), "--run", "stopped"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        # its own session: whatever mpiexec signals, pytest is not in its process group
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while "/100000" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(seconds(0.5))
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=seconds(30))
    assert proc.returncode == 0, err_path.read_text()
    assert out.count("stopped by SIGINT") == 1
    assert "resume with: mpiexec -n 2 charlstm train --resume" in out
    run_dir = tmp_path / "stopped"
    assert len(list(run_dir.glob("step-*.npz"))) == 1
    step = load_checkpoint(run_dir / "latest.npz").manifest["step"]
    train(2, "--resume", run_dir / "latest.npz", "--steps", step + 5)
    train(2, corpus, *SMALL, "--save-every", 0, "--eval-every", 0, "--steps", step + 5, "--out", tmp_path,
          "--run", "straight")
    assert arrays(run_dir / "latest.npz") == arrays(tmp_path / "straight" / "latest.npz")
