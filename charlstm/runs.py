"""A run folder: checkpoints/<run>/ with step-XXXXXXXX.npz, latest.npz, best.npz, metrics.jsonl.

One process at a time may write a run folder: RunFolder holds an exclusive flock on `.lock` for its
lifetime (the kernel drops it when the process dies, even by kill -9, so a stale lock never
blocks a resume). A process killed while saving leaves a temp file `.<name>.tmp-<pid>` (see
checkpoint.atomic_write); the next RunFolder on the folder removes those of dead processes.
"""
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path

from charlstm.checkpoint import atomic_write, save_checkpoint
from charlstm.errors import UserError

STEP_FILE = re.compile(r"^step-(\d{8})\.npz$")
TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")  # atomic_write's temp names


def check_out(out):
    """Refuse an --out that cannot become a writable folder, before any work (and creating nothing)."""
    existing = Path(out).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {existing} (permission denied); choose another --out")


def new_run_name(out, stem):
    """`stem`, or `stem-2`, `stem-3`, ... : the first name whose folder holds no checkpoint yet."""
    name, n = stem, 1
    while any((Path(out) / name).glob("*.npz")):
        n += 1
        name = f"{stem}-{n}"
    return name


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"cannot use {self.path} as a run folder: a file is in the way; choose another --out")
        except OSError as e:
            raise UserError(f"cannot write to {self.path}: {e.strerror}; choose another --out")
        self._lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            raise UserError(f"{self.path} is in use by a running charlstm (pid {holder}); "
                            "wait for it to finish or use another --run")
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self):
        """Temp files of processes that died mid-save (kill -9, power cut): never a checkpoint."""
        for path in self.path.iterdir():
            match = TEMP_FILE.match(path.name)
            if match and not _alive(int(match.group(1))):
                path.unlink(missing_ok=True)

    def close(self):
        self._lock.close()

    @property
    def latest(self):
        return self.path / "latest.npz"

    def step_files(self):
        return sorted(p for p in self.path.iterdir() if STEP_FILE.match(p.name))

    def save(self, step, manifest, arrays, keep, best=False):
        """Write step-<step>.npz, then latest.npz (and best.npz) as copies of it, each atomically;
        then drop all but the `keep` newest step files. Returns the step file's path."""
        step_path = self.path / f"step-{step:08d}.npz"
        save_checkpoint(step_path, manifest, *arrays)
        for name in ("latest.npz",) + (("best.npz",) if best else ()):
            _atomic_copy(step_path, self.path / name)
        for old in self.step_files()[:-keep] if keep > 0 else []:
            old.unlink()
        return step_path

    def log(self, record):
        """Append one JSON line to metrics.jsonl."""
        try:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as e:  # disk full, folder removed: one line, like a failed checkpoint write
            raise UserError(f"{self.path / 'metrics.jsonl'}: cannot write: {e.strerror or e}; check the "
                            "folder exists, is writable and has space") from None

    def truncate_log(self, step):
        """Drop metrics lines past `step`: a resumed run rewrites what came after its checkpoint.
        A line cut short by a crash is dropped too. Rewritten atomically, so a kill keeps the log.
        Returns the wall-clock seconds ("time") of the last line kept, 0.0 if none, for the resumed
        run's clock to continue from (it loses the time of the steps after that line)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return 0.0
        kept = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        times = [json.loads(line).get("time") for line in kept]
        return next((t for t in reversed(times) if isinstance(t, (int, float)) and not isinstance(t, bool)), 0.0)


def _step_of(line):
    """A metrics line's step; inf for a line that a crash cut short (so that it is dropped)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def _atomic_copy(src, dst):
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
