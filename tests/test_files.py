"""engine/files.py: the lock, the replace and the folder fsync, for real on this OS, and on the
others simulated (os.name or sys.platform patched, the error Windows gives injected)."""
import errno
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from charlstm.engine import files

from tests.conftest import seconds

HOLD = """
import sys
from charlstm.engine.files import lock
held = lock(sys.argv[1], wait=False)
print("held" if held else "busy", flush=True)
sys.stdin.read()  # until the test closes stdin or kills it
"""


def lock_in_another_process(path):
    """(the process, "held" or "busy"): what lock(path, wait=False) gave a fresh process, which
    keeps what it got until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    return proc, proc.stdout.readline().strip()


def end(proc):
    proc.kill()
    proc.communicate(timeout=seconds(30))


# ------------------------------------------------------------------------------------------ lock

def test_lock_is_exclusive_between_processes_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    holder, said = lock_in_another_process(path)
    try:
        assert said == "held"
        other, said = lock_in_another_process(path)
        end(other)
        assert said == "busy"  # a third process is refused at once
        assert files.lock(path, wait=False) is None  # and so is this one
        got = []
        waiter = threading.Thread(target=lambda: got.append(files.lock(path, wait=True)))
        waiter.start()
        waiter.join(timeout=seconds(0.5))
        assert waiter.is_alive()  # wait=True waits for the holder...
        holder.kill()  # ...which dies without releasing anything itself: the OS releases it
        waiter.join(timeout=seconds(30))
        assert not waiter.is_alive() and got[0] is not None
    finally:
        end(holder)
    got[0].release()
    files.lock(path, wait=False).release()


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    """As a second RunFolder on one folder in one process (the CLI tests' case) must be refused."""
    first = files.lock(tmp_path / "x.lock", wait=False)
    assert first is not None and files.lock(tmp_path / "x.lock", wait=False) is None
    first.release()
    files.lock(tmp_path / "x.lock", wait=False).release()


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX's")
def test_a_filesystem_without_flock_is_an_error_not_a_soft_lock(tmp_path, monkeypatch):
    """filelock's FileLock would fall back to SoftFileLock (a lock file that outlives a crash)."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(OSError) as error:
        files.lock(tmp_path / "x.lock", wait=False)
    assert error.value.errno == errno.ENOSYS


@pytest.mark.parametrize("platform, native", [("linux", "UnixFileLock"), ("darwin", "UnixFileLock"),
                                              ("win32", "WindowsFileLock")])
def test_lock_is_the_native_lock_of_each_os(tmp_path, monkeypatch, platform, native):
    """flock or LockFileEx, which the OS drops when the holder dies; never FileLock's SoftFileLock."""
    import filelock

    made = []

    class Recorder:
        def __init__(self, path, **options):
            made.append((type(self).__name__, options))

        def acquire(self, timeout):
            pass

    for name in ("UnixFileLock", "WindowsFileLock", "FileLock", "SoftFileLock"):
        monkeypatch.setattr(filelock, name, type(name, (Recorder,), {}))
    with monkeypatch.context() as m:  # (pytest itself must not run as on another OS)
        m.setattr(sys, "platform", platform)
        files.lock(tmp_path / "x.lock", wait=True)
    assert made == [(native, {"thread_local": False, "fallback_to_soft": False})]


# --------------------------------------------------------------------------------------- replace

@contextmanager
def as_windows(monkeypatch):
    """os.name is "nt" inside (and only inside: pytest itself must not run as on Windows)."""
    with monkeypatch.context() as m:
        m.setattr(os, "name", "nt")
        yield m


def sharing_violations(count, monkeypatch):
    """os.replace that fails as Windows does while another process holds the file open, `count`
    times, then replaces; and a list that records each call and each sleep."""
    real, log = os.replace, []

    def replace(src, dst):
        log.append("replace")
        if log.count("replace") <= count:
            raise PermissionError(errno.EACCES, "The process cannot access the file because it is being used "
                                                "by another process")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(time, "sleep", lambda s: log.append(s))
    return log


@pytest.fixture
def two_files(tmp_path):
    (tmp_path / "new").write_bytes(b"new")
    (tmp_path / "old").write_bytes(b"old")
    return tmp_path / "new", tmp_path / "old"


def test_replace_on_windows_waits_out_a_reader(two_files, monkeypatch):
    src, dst = two_files
    log = sharing_violations(3, monkeypatch)
    with as_windows(monkeypatch):
        files.replace(src, dst)
    assert log == ["replace", 0.01, "replace", 0.02, "replace", 0.05, "replace"]
    assert dst.read_bytes() == b"new" and not src.exists()


def test_replace_on_windows_gives_up_after_about_a_second(two_files, monkeypatch):
    src, dst = two_files
    log = sharing_violations(1000, monkeypatch)
    with pytest.raises(PermissionError), as_windows(monkeypatch):
        files.replace(src, dst)
    sleeps = [entry for entry in log if entry != "replace"]
    assert log.count("replace") == len(sleeps) + 1 and 0.5 < sum(sleeps) < 2
    assert dst.read_bytes() == b"old" and src.read_bytes() == b"new"  # nothing lost: the caller reports it


@pytest.mark.parametrize("os_name, error", [("posix", PermissionError(errno.EACCES, "Permission denied")),
                                            ("nt", OSError(errno.ENOSPC, "No space left on device"))])
def test_replace_retries_nothing_but_windows_sharing_violations(two_files, monkeypatch, os_name, error):
    """On POSIX readers never block a replace, so a PermissionError is a real one: raised at once,
    as is any other error on Windows."""
    log = []

    def replace(src, dst):
        log.append("replace")
        raise error

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(time, "sleep", lambda s: log.append(s))
    with pytest.raises(type(error)), monkeypatch.context() as m:
        m.setattr(os, "name", os_name)
        files.replace(*two_files)
    assert log == ["replace"]


def test_replace_while_another_process_reads_the_file(two_files):
    """The real thing on this OS: a reader in another process holds the old file open for a moment
    (on Windows the first tries fail, on POSIX none do); the replace succeeds either way."""
    src, dst = two_files
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'rb'); "
                               "print(f.read().decode(), flush=True); time.sleep(float(sys.argv[2]))",
                               str(dst), str(seconds(0.3))], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "old\n"  # it has the file open
        files.replace(src, dst)
        assert dst.read_bytes() == b"new"
    finally:
        end(reader)


# ---------------------------------------------------------------------------------- fsync_folder

@pytest.mark.skipif(os.name != "posix", reason="folders can be opened and fsynced on POSIX only")
def test_fsync_folder_fsyncs_the_folder_on_posix(tmp_path, monkeypatch):
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    files.fsync_folder(tmp_path)
    assert synced == [os.stat(tmp_path).st_ino]


def test_fsync_folder_is_skipped_on_windows(tmp_path, monkeypatch):
    """Windows cannot open a folder as a file (os.open gives PermissionError): nothing to do there."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with as_windows(monkeypatch) as m:
        m.setattr(os, "open", refuse)
        m.setattr(os, "fsync", refuse)
        files.fsync_folder(tmp_path)
