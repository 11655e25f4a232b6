"""A run folder: checkpoints/<run>/ with step-XXXXXXXX.npz, latest.npz, best.npz, metrics.jsonl.

One process at a time may write a run folder: RunFolder holds an exclusive lock on `.lock` for its
lifetime (files.lock: the OS drops it when the process dies, even by kill -9, so a stale lock never
blocks a resume) and writes its pid to `.holder`, for the line a second trainer gets. The lock is
also how a writer's death is known, without probing its pid (a pid may be reused; Windows has no
signal 0): a process killed while saving leaves a temp file `.<name>.tmp-<pid>` (see
checkpoint.atomic_write), only the lock's holder writes the folder's own files, so once a RunFolder
holds the lock every temp file of those files is a dead writer's, and it removes them.
"""
import json
import math
import os
import re
import shutil
from contextlib import suppress
from pathlib import Path

from charlstm.checkpoint import atomic_write, save_checkpoint
from charlstm.engine import files
from charlstm.errors import UserError

STEP_FILE = re.compile(r"^step-(\d{8})\.npz$")
OWN_FILES = r"step-\d{8}\.npz|latest\.npz|best\.npz|metrics\.jsonl"  # what RunFolder writes
TEMP_FILE = re.compile(rf"^\.(?:{OWN_FILES})\.tmp-(?P<pid>\d+)$")  # atomic_write's temp names for them


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
        try:
            self._lock = files.lock(self.path / ".lock", wait=False)
        except OSError as e:  # e.g. ENOSYS: a network filesystem without file locks
            raise UserError(f"cannot lock {self.path / '.lock'} ({e.strerror or e}); a run folder needs a "
                            "filesystem with file locks: choose another --out") from None
        if self._lock is None:
            raise UserError(f"{self.path} is in use by a running charlstm{self._holder()}; "
                            "wait for it to finish or use another --run")
        with suppress(OSError):  # the pid only words that line
            (self.path / ".holder").write_text(str(os.getpid()))
        self._remove_stale_temp_files()

    def _holder(self):
        """' (pid N)' as the lock's holder wrote it, or '' if there is none to read."""
        try:
            pid = (self.path / ".holder").read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def _remove_stale_temp_files(self):
        """Temp files of the folder's own files: each was left by a writer that died mid-save (kill
        -9, a power cut), since only the lock's holder writes them and the lock is now ours."""
        for path in self.path.iterdir():
            if TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)

    def close(self):
        self._lock.release()

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
            with suppress(PermissionError):  # Windows: a reader has it open; the next save prunes it
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


def _atomic_copy(src, dst):
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f))
