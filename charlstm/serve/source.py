"""What a server serves: a checkpoint file, or a run folder whose newest best.npz it follows.

A run folder's trainer replaces best.npz by an atomic rename (checkpoint.atomic_write), so a file
read here is the old one or the new one, never half of either: `Source.poll` notices a new file by
its identity (inode, size, modification time), loads and verifies it, and only then hands it on.
A file that fails to load (damaged, or replaced again while read) keeps the model in service and
is retried when the file changes again.
"""
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from charlstm.checkpoint import CheckpointError, load_checkpoint
from charlstm.errors import UserError
from charlstm.model import param_count

LN2 = math.log(2)


@dataclass
class Model:
    """One loaded checkpoint and the facts the page and /api/model show."""
    name: str
    path: Path
    params: object  # (P,) the weights
    config: object  # ModelConfig
    manifest: dict
    loaded_at: float

    def facts(self):
        m, cfg = self.manifest, self.config
        val = m.get("metrics", {}).get("val_loss")
        best = m.get("best_val_loss")
        return {"id": self.name, "source": str(self.path), "layers": cfg.layers, "hidden": cfg.hidden,
                "peepholes": cfg.peepholes, "parameters": param_count(cfg), "vocab": cfg.vocab,
                "vocab_size": cfg.vocab_size, "step": m.get("step", 0), "val_loss": val,
                "val_bpc": None if val is None else val / LN2, "best_val_loss": best,
                "loaded_at": self.loaded_at}


def _identity(path):
    """What changes when a file is replaced: (inode, size, mtime in ns); None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Source:
    """A checkpoint (`folder` None) or a run folder; `model` is what is in service now."""

    def __init__(self, path):
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such checkpoint or run folder; pass a .npz file or checkpoints/<run>")
        self.folder = path if path.is_dir() else None
        if self.folder is not None and self._newest() is None:
            raise UserError(f"{path}: no best.npz or latest.npz in this folder; pass a run folder of charlstm "
                            "train (checkpoints/<run>) or a checkpoint file")
        # the model's name in the API: the run's name, or <run>/<file stem> for a file in a run folder
        self.name = path.resolve().name if self.folder else f"{path.resolve().parent.name}/{path.stem}"
        file = self._newest() if self.folder is not None else path
        self.seen = _identity(file)
        self.model = self._load(file)  # a CheckpointError (a UserError) here stops the server's start
        self.reloads = 0

    def _newest(self):
        """The run folder's checkpoint to serve: best.npz, else latest.npz (before the first validation)."""
        for name in ("best.npz", "latest.npz"):
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    def _load(self, file):
        ckpt = load_checkpoint(file)
        return Model(self.name, file, ckpt.params, ckpt.model_config, ckpt.manifest, time.time())

    def poll(self):
        """A newly written checkpoint of the run folder, loaded, or None (nothing new, or not loadable yet)."""
        if self.folder is None:
            return None
        file = self._newest()
        identity = _identity(file) if file is not None else None
        if identity is None or (identity == self.seen and file == self.model.path):
            return None
        self.seen = identity
        try:
            model = self._load(file)
        except (CheckpointError, OSError):
            return None  # retried when the file changes again
        if model.config.to_dict() != self.model.config.to_dict():
            return None  # another architecture in the same folder: keep serving the one we have
        self.model, self.reloads = model, self.reloads + 1
        return model

    def metrics(self):
        """Every complete line of the run folder's metrics.jsonl as a dict (a line being written is skipped)."""
        try:
            text = (self.folder / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        records = []
        for line in text.split("\n")[:-1]:  # the last item is "" or a line not finished yet
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
