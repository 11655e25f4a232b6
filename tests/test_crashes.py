"""Crashes and contention (SPEC §3, §5): kill -9 at random instants, two processes on one run
folder, a full disk during a save, and a Numba cache that cannot be used. Real processes where
the point is a real process; every case ends with loadable checkpoints or one clear line."""
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from numba.core import config as numba_config
from numba.core.caching import CacheImpl, IndexDataCacheFile

from charlstm import checkpoint, data
from charlstm.engine import jit
from charlstm.checkpoint import load_checkpoint
from charlstm.errors import UserError
from charlstm.runs import TEMP_FILE, RunFolder

from tests.conftest import INTERRUPT, INTERRUPTED, OWN_GROUP, TINY, seconds
from tests.test_bad_input import one_line_error
from tests.test_train import arrays

# Save at every step, never validate, run until stopped: a process that is nearly always saving.
SAVING = [*TINY, "--save-every", "1", "--eval-every", "0", "--steps", "100000"]
# Popen.kill's exit status: killed by SIGKILL; on Windows, TerminateProcess's exit code 1.
KILLED = -signal.SIGKILL if hasattr(signal, "SIGKILL") else 1
# What `kill` or a job scheduler sends to stop a run: SIGTERM. Windows delivers none (its SIGTERM
# never reaches a handler), so there the test stops the run as a user would (conftest.INTERRUPT).
TERMINATE, TERMINATED, TERMINATE_GROUP = ((INTERRUPT, INTERRUPTED, OWN_GROUP) if sys.platform == "win32" else
                                          (signal.SIGTERM, "SIGTERM", {}))


def start_training(log, *args, **popen):
    return subprocess.Popen([sys.executable, "-m", "charlstm", "train", *map(str, args)],
                            stdout=log, stderr=subprocess.STDOUT, **popen)


def wait_for(condition, proc, timeout=60):
    deadline = time.monotonic() + seconds(timeout)
    while not condition():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def newest_step(run_dir):
    return max((int(p.name[5:13]) for p in run_dir.glob("step-*.npz")), default=-1)


def temp_files(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if TEMP_FILE.match(p.name))


# ----------------------------------------------------------------------------------------- kill -9

def test_kill_9_at_random_instants_leaves_loadable_checkpoints_and_exact_resume(tmp_path, corpus, run_cli):
    """Five SIGKILLs at seeded random instants (mid-training, or anywhere from startup on), each
    run resuming the last: after every kill each .npz loads; the next process clears the dead
    one's temp files; and the survivor resumed to step N equals a straight N-step run."""
    rng = random.Random(6)
    run_dir = tmp_path / "r"
    latest = run_dir / "latest.npz"
    log = open(tmp_path / "log.txt", "w")
    steps, pids = [], []
    for kill in range(5):
        before = newest_step(run_dir)
        args = [corpus, *SAVING, "--out", tmp_path, "--run", "r"] if kill == 0 else ["--resume", latest]
        proc = start_training(log, *args)
        try:
            if kill == 0:
                wait_for(latest.exists, proc)
                time.sleep(seconds(rng.uniform(0, 0.2)))
            elif kill % 2:  # some instant after it has saved at least once
                wait_for(lambda: newest_step(run_dir) > before, proc)
                time.sleep(seconds(rng.uniform(0, 0.2)))
            else:  # any instant from startup on: imports, loading, the lock, the log, training
                time.sleep(seconds(rng.uniform(0, 2.0)))
        finally:  # a wait that timed out must not leave the trainer running after the test
            proc.kill()
        assert proc.wait(timeout=seconds(30)) == KILLED
        for path in run_dir.glob("*.npz"):  # never a half-written checkpoint under a real name
            load_checkpoint(path)
        steps.append(load_checkpoint(latest).manifest["step"])
        pids.append(proc.pid)
        assert {int(TEMP_FILE.match(name)["pid"]) for name in temp_files(run_dir)} <= set(pids)
    assert steps == sorted(steps) and steps[-1] > steps[0], steps

    target = steps[-1] + 5
    resumed = run_cli("train", "--resume", latest, "--steps", target, "--save-every", 0, "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert temp_files(run_dir) == []  # RunFolder removed the dead processes' temp files
    straight = run_cli("train", corpus, *SAVING, "--save-every", 0, "--steps", target, "--out", tmp_path,
                       "--run", "straight", "--quiet")
    assert straight.exit_code == 0
    assert load_checkpoint(latest).manifest["step"] == target
    assert arrays(latest) == arrays(tmp_path / "straight" / "latest.npz")


HOLD_RUN_FOLDER = """
import sys
from charlstm.runs import RunFolder
folder = RunFolder(sys.argv[1])
(folder.path / sys.argv[2]).write_bytes(b"partial")  # as if killed mid-save
print("holding", flush=True)
sys.stdin.read()  # until the test kills it
"""


@contextmanager
def no_signals(monkeypatch):
    """Fails the test if the code inside sends a signal (os.kill, how POSIX probes a pid)."""
    with monkeypatch.context() as m:
        m.setattr(os, "kill", lambda *args: pytest.fail("a signal was sent to probe a pid"))
        yield


def test_a_dead_writers_temp_files_are_removed_once_its_lock_is_free(tmp_path, monkeypatch):
    """A writer's death is known by its lock, never by probing its pid (no signal is sent): while
    a live process holds the run folder, its temp file stays and RunFolder is refused, naming its
    pid; once it is killed, the next RunFolder removes every temp file of the folder's own files,
    whatever pid it names (a live one too: pids are reused), and leaves every other file alone."""
    folder = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_FOLDER, folder, ".latest.npz.tmp-1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        others = [f".best.npz.tmp-{os.getpid()}", f".step-00000007.npz.tmp-{holder.pid}", ".metrics.jsonl.tmp-99"]
        keep = [".notes.tmp-x", ".model.safetensors.tmp-5", "latest.npz", "notes.txt"]
        for name in others + keep:
            (folder / name).write_bytes(b"partial")
        with no_signals(monkeypatch), pytest.raises(UserError, match=rf"in use by .* \(pid {holder.pid}\)"):
            RunFolder(folder)
        assert (folder / ".latest.npz.tmp-1").exists()
        holder.kill()
        holder.wait(timeout=seconds(30))
        with no_signals(monkeypatch):
            RunFolder(folder).close()
    finally:
        holder.kill()
        holder.communicate()
    left = sorted(p.name for p in folder.iterdir() if p.name != ".lock")  # (Windows' filelock removes it)
    assert left == sorted(keep + [".holder"])


def test_metrics_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path):
    folder = RunFolder(tmp_path / "r")
    try:
        for step in (100, 200, 300):
            folder.log({"step": step, "train_loss": 1.0})
        with open(folder.path / "metrics.jsonl", "a") as f:
            f.write('{"step": 400, "train_lo')
        folder.truncate_log(250)
        assert (folder.path / "metrics.jsonl").read_text().splitlines() == [
            '{"step": 100, "train_loss": 1.0}', '{"step": 200, "train_loss": 1.0}']
    finally:
        folder.close()


# ----------------------------------------------------------------------------------- run folder lock

def test_run_folder_in_use_is_refused(tmp_path, corpus, run_cli):
    holder = RunFolder(tmp_path / "out" / "r")
    try:
        result = run_cli("train", corpus, *TINY, "--steps", 2, "--out", tmp_path / "out", "--run", "r")
        one_line_error(result, "is in use by a running charlstm", f"pid {os.getpid()}", "--run", code=1)
    finally:
        holder.close()
    result = run_cli("train", corpus, *TINY, "--steps", 2, "--out", tmp_path / "out", "--run", "r", "--quiet")
    assert result.exit_code == 0  # the lock went with its holder


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX's")
def test_a_run_folder_where_files_cannot_be_locked_is_one_line(tmp_path, corpus, run_cli, monkeypatch):
    """A filesystem without flock (ENOSYS: some network filesystems): one line, not an unlocked run."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    result = run_cli("train", corpus, *TINY, "--steps", 2, "--out", tmp_path, "--run", "r")
    one_line_error(result, f"cannot lock {tmp_path / 'r' / '.lock'}", "Function not implemented", "--out", code=1)


def test_resume_is_refused_while_the_run_trains_and_sigterm_saves(tmp_path, corpus, run_cli):
    run_dir = tmp_path / "r"
    with open(tmp_path / "log.txt", "w") as log:
        proc = start_training(log, corpus, *SAVING, "--out", tmp_path, "--run", "r", **TERMINATE_GROUP)
        try:
            wait_for(lambda: newest_step(run_dir) >= 3, proc)
            result = run_cli("train", "--resume", run_dir / "latest.npz", "--steps", 200000, "--quiet")
            one_line_error(result, "is in use by a running charlstm", f"pid {proc.pid}", code=1)
            assert proc.poll() is None
            proc.send_signal(TERMINATE)
            assert proc.wait(timeout=seconds(60)) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "log.txt").read_text()
    assert f"stopped by {TERMINATED}" in output and "Traceback" not in output
    step = load_checkpoint(run_dir / "latest.npz").manifest["step"]
    assert f"at step {step:,}" in output and step == newest_step(run_dir)


# ------------------------------------------------------------------------------------ disk full

@pytest.mark.parametrize("failing", ["step file", "latest copy"])
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path, corpus, run_cli, monkeypatch, failing):
    """The second save runs out of space, writing the step file or copying it to latest.npz: the
    run stops with one line, latest.npz keeps the first save's bytes, no temp file stays behind,
    and the folder's lock is released."""
    run_dir = tmp_path / "r"
    module, name = (checkpoint, "_write_npz") if failing == "step file" else (shutil, "copyfileobj")
    real = getattr(module, name)
    calls, first = [], {}

    def fill_disk(*args):
        calls.append(1)
        if len(calls) == 2:
            first["latest"] = (run_dir / "latest.npz").read_bytes()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(module, name, fill_disk)
    result = run_cli("train", corpus, *TINY, "--eval-every", 0, "--save-every", 10, "--steps", 25,
                     "--out", tmp_path, "--run", "r", "--quiet")
    wrote = "step-00000020.npz" if failing == "step file" else "latest.npz"
    one_line_error(result, wrote, "No space left on device", "has space", code=1)
    assert (run_dir / "latest.npz").read_bytes() == first["latest"]
    assert load_checkpoint(run_dir / "latest.npz").manifest["step"] == 10
    assert (run_dir / "step-00000020.npz").exists() == (failing == "latest copy")
    assert temp_files(run_dir) == []
    RunFolder(run_dir).close()  # not still locked


def test_disk_full_writing_the_corpus_cache_is_one_line(tmp_path, corpus, run_cli, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "fsync", full)  # the id file's fsync, before its rename
    result = run_cli("train", corpus, *TINY, "--steps", 2, "--out", tmp_path, "--run", "r")
    one_line_error(result, ".corpus-cache", "No space left on device", "has space", code=1)
    assert list((tmp_path / ".corpus-cache").iterdir()) == []  # no half-written id file
    assert not list(tmp_path.rglob("*.npz"))


# -------------------------------------------------------------------------------- Numba's cache

def add_one(x):
    return x + 1


def set_numba_config(monkeypatch, name, value):
    """Set a Numba setting for this test: in numba.config, and in the environment, from which
    Numba's compiler reloads its config on every compile."""
    monkeypatch.setenv(f"NUMBA_{name}", value)
    monkeypatch.setattr(numba_config, name, value)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """Numba's cache in tmp_path for kernels made in this test, and kernels' warning unsent."""
    set_numba_config(monkeypatch, "CACHE_DIR", str(tmp_path / "numba"))
    # An in-process `train --threads 1` (CliRunner) set NUMBA_NUM_THREADS=1 after Numba's thread
    # pool may have started with more; the config reload of our compiles would then raise.
    monkeypatch.setenv("NUMBA_NUM_THREADS", str(numba_config.NUMBA_NUM_THREADS))
    monkeypatch.setattr(jit, "_warned", False)
    monkeypatch.setattr(jit, "_disk_cache", True)
    return tmp_path / "numba"


def warnings_in(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("damage", ["garbage index", "truncated data"])
def test_unreadable_cache_files_mean_compiling_in_memory(fresh_cache, capsys, damage):
    assert jit.kernel(add_one)(1) == 2  # compiles and caches
    assert warnings_in(capsys) == []
    suffix = ".nbi" if damage == "garbage index" else ".nbc"
    (cached,) = fresh_cache.rglob(f"*{suffix}")
    cached.write_bytes(b"not a pickle" if damage == "garbage index" else cached.read_bytes()[:40])
    again = jit.kernel(add_one)
    assert again(1) == 2 and again(2.5) == 3.5  # compiled in memory, for each signature
    (line,) = warnings_in(capsys)
    assert line.startswith("charlstm: cannot use the Numba cache (unreadable files in ")
    assert line.endswith("; delete them to rebuild the cache); compiling in memory")


# As for a read-only install and an unwritable home: Numba may cache in NUMBA_CACHE_DIR and no other
# folder. Its list of places to try starts with that one; Numba 0.62 added NUMBA_CACHE_LOCATOR_CLASSES
# to choose from the list, 0.60 has only the list.
ONLY_CACHE_DIR = "from numba.core.caching import CacheImpl; CacheImpl._locator_classes = CacheImpl._locator_classes[:1]"


def test_no_folder_for_the_cache_means_compiling_in_memory(fresh_cache, monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    set_numba_config(monkeypatch, "CACHE_DIR", str(tmp_path / "file" / "sub"))
    assert CacheImpl._locator_classes[0].__name__.endswith("UserProvidedCacheLocator")
    monkeypatch.setattr(CacheImpl, "_locator_classes", CacheImpl._locator_classes[:1])
    first, second = jit.kernel(add_one), jit.kernel(add_one)
    assert first(1) == 2 and second(1) == 2
    (line,) = warnings_in(capsys)
    assert "found no writable folder" in line and "set NUMBA_CACHE_DIR" in line


def test_cache_write_error_means_compiling_in_memory(fresh_cache, monkeypatch, capsys):
    def disk_full(self, key, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexDataCacheFile, "save", disk_full)
    assert jit.kernel(add_one)(1) == 2
    (line,) = warnings_in(capsys)
    assert "cannot write to" in line and "No space left on device" in line


GRADCHECK = [sys.executable, "-m", "charlstm", "gradcheck", "--hidden", "3", "--layers", "1", "--batch-size", "1",
             "--seq-length", "2"]


def gradcheck(cache_dir, setup=None, **env):
    """The smallest real command, in a fresh process with NUMBA_CACHE_DIR=cache_dir and `env` (and
    the Python statements `setup` run first)."""
    command = GRADCHECK if setup is None else [
        sys.executable, "-c", f"{setup}; import sys; from charlstm.cli import cli; cli(sys.argv[1:])", *GRADCHECK[3:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds(300),
                            env=dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **env))
    assert result.returncode == 0 and "gradcheck passed" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_cli_survives_a_garbage_filled_cache(tmp_path):
    assert gradcheck(tmp_path / "good") == []  # a cold compile fills it
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    for n, path in enumerate(sorted((tmp_path / "bad").rglob("*.nbi"))):
        if n % 2:
            path.write_bytes(b"\x00garbage" * 10)  # the index
        else:
            data = path.with_name(path.name.replace(".nbi", ".1.nbc"))
            data.write_bytes(data.read_bytes()[:100])  # the compiled code, cut short
    (line,) = gradcheck(tmp_path / "bad")
    assert line.startswith("charlstm: cannot use the Numba cache (unreadable files in ")
    assert line.endswith("compiling in memory")


def test_cli_survives_a_cache_dir_it_cannot_create(tmp_path):
    (tmp_path / "file").write_text("")
    # No other folder allowed (as for a read-only install and an unwritable home): compile in memory.
    (line,) = gradcheck(tmp_path / "file" / "sub", setup=ONLY_CACHE_DIR)
    assert "found no writable folder" in line and line.endswith("compiling in memory")
    # By default Numba quietly caches in the package's __pycache__ instead: no warning needed.
    assert gradcheck(tmp_path / "file") == []
