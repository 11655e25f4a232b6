"""The operating system's file calls that charlstm relies on, made to behave alike on Linux, macOS
and Windows. Here, below the tool, because the engine's kernel cache needs the lock; the tool's
run folders, checkpoints and corpus cache use all three.

    lock(path, wait)     an exclusive lock on a file that the OS drops when its holder dies, even
                         by kill -9 or TerminateProcess: flock on POSIX, LockFileEx on Windows,
                         through filelock's native classes. Never its SoftFileLock (a lock file
                         that exists while held, and outlives a crash): FileLock falls back to it
                         where flock is missing or refused (ENOSYS on some network filesystems),
                         so the class is chosen here and fallback_to_soft=False makes such a
                         filesystem an OSError instead.
    replace(src, dst)    os.replace. On Windows a file that another process has open (a reader
                         mid-read, an antivirus or indexer scan) cannot be replaced until it is
                         closed: PermissionError. Those holds are brief, so there it is retried
                         for about a second; POSIX replaces under readers, so one try.
    fsync_folder(path)   makes a rename inside the folder durable, by fsyncing the folder: POSIX
                         only. Windows cannot open a folder as a file (PermissionError); there a
                         rename's durability is the filesystem's (NTFS journals it).

Nothing here imports fcntl or msvcrt itself, and filelock is imported on first use.
"""
import os
import sys
import time

# Sleeps between Windows' retries of a replace: ~1.1 s in all, then one last try.
REPLACE_RETRY_SECONDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4)


def lock(path, wait):
    """Take an exclusive lock on `path` (created if missing) and return it; its release() drops it.
    wait=True blocks until the lock is free; wait=False returns None at once if another holder
    (another process, or another lock object in this one) has it. An OSError means no lock could
    be taken at all (no permission, or a filesystem without locks)."""
    import filelock

    native = filelock.WindowsFileLock if sys.platform == "win32" else filelock.UnixFileLock
    # thread_local=False: the holder is the process, whichever thread releases it.
    held = native(os.fspath(path), thread_local=False, fallback_to_soft=False)
    try:
        held.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        return None
    return held


def replace(src, dst):
    """os.replace(src, dst), retried on Windows while another process holds dst (or src) open."""
    if os.name == "nt":
        for delay in REPLACE_RETRY_SECONDS:
            try:
                return os.replace(src, dst)
            except PermissionError:  # ERROR_SHARING_VIOLATION or ERROR_ACCESS_DENIED: wait, try again
                time.sleep(delay)
    return os.replace(src, dst)


def fsync_folder(folder):
    """Make a rename inside `folder` durable: fsync the folder itself, where the OS can (POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
