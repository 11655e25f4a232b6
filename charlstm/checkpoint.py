"""Checkpoints: save, load and verify the documented .npz format (SPEC §3), written atomically.

A checkpoint is one uncompressed .npz (a zip of .npy files) with exactly these members:

    manifest  uint8 (n,)     UTF-8 JSON object: format, version, model, train, params (the layout
                             as [{name, shape, offset}]), optimizer ({name, state}), checksum, and
                             the trainer's run state
    params    float (P,)     every parameter, one flat buffer (model.layout gives the views)
    <state>   float (P,)     each of the optimizer's state arrays, same layout, named in the
                             manifest's optimizer.state: `adagrad` (Adagrad's mem), `rmsprop`
                             (RMSprop's mean square), `adam_m` and `adam_v` (Adam's moments)
    h, c      float (L,B,H)  the carried training state

`checksum` is the hex sha256 of the raw C-order bytes of params, each state array in the order of
optimizer.state, h, c. Version 1 (before there was a choice of optimizer) had no `optimizer`
section and always the one state array `adagrad`: its files load as Adagrad's, and an Adagrad
checkpoint of version 2 holds the same arrays under the same checksum order.

Loading trusts nothing in the file: members are read through zipfile (CRC-checked) and parsed
from their .npy headers by hand, so object arrays are refused before their bytes are touched (no
pickle is ever executed) and no allocation is larger than the file itself. Every problem becomes
a CheckpointError: one line naming the file, the problem and what to do.
"""
import hashlib
import io
import json
import math
import os
import struct
import typing
import zipfile
import zlib
from dataclasses import dataclass, fields

import numpy as np

from charlstm.config import BEFORE_OPTION, CLIP_MODES, DTYPES, OPTIMIZER_STATE, PRECISIONS, ModelConfig, TrainConfig
from charlstm.engine import files
from charlstm.errors import UserError
from charlstm.model import layout, param_count

FORMAT = "charlstm-checkpoint"
VERSION = 2  # 2: the optimizer is a choice, its state arrays named in the manifest
DAMAGED = "use another checkpoint (e.g. an earlier step-*.npz)"
# What zipfile, numpy's .npy header parser and json raise on bytes that are not what they expect.
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError,
                IndexError, TypeError, OverflowError, MemoryError, RuntimeError, SyntaxError,
                zlib.error, struct.error)


class CheckpointError(UserError):
    """A checkpoint that cannot be used, as one line: '<file>: <problem>; <what to do>'."""

    def __init__(self, message):
        # A file name or a value quoted from the file may hold a newline; the CLI promises one line.
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))


class _Invalid(Exception):
    """A problem in a checkpoint's contents; load and save word it for their own callers."""


@dataclass
class Checkpoint:
    manifest: dict
    params: np.ndarray   # (P,) model dtype
    optim_state: dict    # the optimizer's {name: (P,) array}, in the manifest's optimizer.state order
    h: np.ndarray        # (L, B, H)
    c: np.ndarray        # (L, B, H)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.manifest["train"])


# ---------------------------------------------------------------------------------------- writing

def atomic_write(path, write):
    """Fill a temp file in path's folder with write(fileobj), then rename it over path.

    The rename (files.replace) is atomic within one filesystem, so readers see the old file or the
    new one, never a mix. The fsyncs make that hold across a power cut: the data reaches disk
    before the rename, and the folder's fsync (where the OS has one) makes the rename itself
    durable. The temp name `.<name>.tmp-<pid>` marks a leftover from a hard crash; on any
    exception (Ctrl-C included) it is removed.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        files.replace(tmp, path)
        files.fsync_folder(folder)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError):  # disk full, no permission, no such folder: the user can fix it
            raise CheckpointError(f"{path}: cannot write: {e.strerror or e}; check the folder "
                                  "exists, is writable and has space") from e
        raise


def _remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def save_checkpoint(path, manifest, params, optim_state, h, c):
    """Write one checkpoint atomically; the same state always gives the same bytes. `optim_state`
    is the {name: array} of the optimizer manifest["train"]["optim"] (optim.new_state's); one bare
    array, as callers written before version 2 pass it, is the state of an optimizer that keeps one
    (Adagrad, the optimizer of those files, or RMSprop)."""
    if isinstance(optim_state, np.ndarray):
        (name,) = OPTIMIZER_STATE[(manifest.get("train") or {}).get("optim", "adagrad")]
        optim_state = {name: optim_state}
    arrays = {key: np.ascontiguousarray(a) for key, a in {"params": params, **optim_state, "h": h, "c": c}.items()}
    train = manifest.get("train")
    name = train.get("optim", BEFORE_OPTION["optim"]) if isinstance(train, dict) else None
    full = dict(manifest, format=FORMAT, version=VERSION, optimizer={"name": name, "state": list(optim_state)})
    try:
        full["checksum"] = _checksum(arrays, _array_keys(list(optim_state)))
        full["params"] = _layout_json(_check_model(full.get("model")))
        _verify(full, arrays)  # never write a file that load_checkpoint would refuse
    except _Invalid as e:
        raise ValueError(f"refusing to save {os.fspath(path)}: {e}") from None  # a caller's bug
    members = {"manifest": _manifest_bytes(full), **arrays}
    atomic_write(path, lambda f: _write_npz(f, members))


def _manifest_bytes(manifest):
    # sort_keys: same state, same bytes. The trainer may hand us numpy scalars (np.int64 step).
    text = json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False, default=_plain)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"manifest value {value!r} is not JSON")


def _write_npz(f, members):
    # np.savez stores members uncompressed and dated with zipfile's fixed default (1980-01-01),
    # not the clock, so equal members give equal bytes (test_same_state_gives_identical_bytes).
    # No allow_pickle=False: save's _verify has checked every member is a plain numeric array, and
    # NumPy before 2.1 takes that keyword for one more array to store (which load then refuses).
    np.savez(f, **members)


def _array_keys(state_names):
    """The array members in checksum order: params, the optimizer's state arrays, h, c."""
    return ("params", *state_names, "h", "c")


def _checksum(arrays, keys):
    digest = hashlib.sha256()
    for key in keys:
        digest.update(np.ascontiguousarray(arrays[key]).data)
    return digest.hexdigest()


def _layout_json(config):
    return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in layout(config)]


# ---------------------------------------------------------------------------------------- reading

def load_checkpoint(path):
    """Read and verify a checkpoint; any problem with the file raises CheckpointError."""
    shown = os.fspath(path)
    _check_is_file(shown)
    try:
        members = _read_members(shown)
        manifest = _parse_manifest(members.pop("manifest"))
        state_names = _verify(manifest, members)
    except _Invalid as e:
        raise CheckpointError(f"{shown}: {e}") from None
    return Checkpoint(manifest, members["params"], {key: members[key] for key in state_names},
                      members["h"], members["c"])


def _check_is_file(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint; pass a .npz file inside it "
                              "(e.g. latest.npz)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy?); {DAMAGED}")


def _read_members(path):
    """{key: ndarray} for every member, raising _Invalid for anything that is not a sound zip of
    plain (non-object) .npy arrays with a manifest. Which arrays must be there is the manifest's
    to say (_check_members)."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            infos = _check_names(zf)
            limit = os.fstat(f.fileno()).st_size
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > limit:
                    # We only write stored members; refusing others also rules out zip bombs.
                    raise _Invalid(f"member {info.filename!r} is compressed or oversized, which "
                                   f"charlstm never writes; {DAMAGED}")
            keys = [info.filename.removesuffix(".npy") for info in infos]
            return {key: _parse_npy(key, zf.read(key + ".npy")) for key in keys}  # read checks CRC
    except PermissionError as e:
        raise _Invalid(f"cannot read: {e.strerror}; check the file's permissions") from None
    except _READ_ERRORS as e:
        raise _Invalid(f"not a readable checkpoint, truncated or damaged ({_short(e)}); "
                       f"{DAMAGED}") from None


def _check_names(zf):
    infos = zf.infolist()
    names = sorted(i.filename for i in infos)
    held = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
    if "manifest.npy" not in names:  # some other program's .npz
        raise _Invalid(f"not a charlstm checkpoint (it holds {_short(held)}); pass a checkpoint "
                       "written by charlstm train")
    if len(set(names)) != len(names) or not all(n.endswith(".npy") for n in names):
        raise _Invalid(f"holds members {_short(held)}, which charlstm never writes (each one "
                       f"array, once); {DAMAGED}")
    return infos


def _parse_npy(key, data):
    """One .npy member's bytes -> a fresh writable C-order array. The header is read first, so an
    object dtype (a pickle) is refused before its payload is touched."""
    fp = io.BytesIO(data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise _Invalid(f"array {key!r} uses .npy version {version}, which charlstm never writes; "
                       f"{DAMAGED}")
    if dtype.hasobject:
        raise _Invalid(f"array {key!r} holds Python objects (a pickle), which charlstm never "
                       "writes and will not load; use a checkpoint written by charlstm train")
    payload = data[fp.tell():]
    count = math.prod(shape)
    if dtype.itemsize == 0 or len(payload) != count * dtype.itemsize:
        raise _Invalid(f"array {key!r} has {len(payload)} bytes of data for shape {shape} "
                       f"{dtype}; {DAMAGED}")
    flat = np.frombuffer(payload, dtype=dtype, count=count)
    return np.array(flat.reshape(shape, order="F" if fortran else "C"), order="C")


def _parse_manifest(array):
    if array.dtype != np.uint8 or array.ndim != 1:
        raise _Invalid(f"manifest is a {array.dtype} array of shape {array.shape}, not UTF-8 "
                       f"bytes; {DAMAGED}")
    try:
        manifest = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Invalid(f"manifest is not valid UTF-8 JSON ({_short(e)}); {DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise _Invalid(f"manifest is not a JSON object; {DAMAGED}")
    return manifest


# ---------------------------------------------------------------------------------- verification
# Each check reads parsed JSON of any shape: it tests types before using values, so a hostile
# manifest yields _Invalid, never TypeError. Shared by save (as a self-check) and load.

def _verify(manifest, arrays):
    """Check a manifest and its arrays ({key: array}, manifest excluded) against each other;
    return the optimizer's state array names."""
    _check_format(manifest)
    config = _check_model(manifest.get("model"))
    batch_size = _check_train(manifest.get("train"))
    _check_precision(manifest["train"], config)
    state_names = _check_optimizer(manifest)
    _check_layout(manifest.get("params"), config)
    _check_members(arrays, _array_keys(state_names))
    _check_arrays(arrays, config, batch_size, state_names)
    if manifest.get("checksum") != _checksum(arrays, _array_keys(state_names)):
        raise _Invalid(f"corrupt: checksum mismatch (the arrays differ from what was saved); "
                       f"{DAMAGED}")
    return state_names


def _check_format(manifest):
    if manifest.get("format") != FORMAT:
        raise _Invalid(f"not a charlstm checkpoint (format {_show(manifest.get('format'))}); "
                       "pass a checkpoint written by charlstm train")
    version = manifest.get("version")
    if not _is_int(version) or version < 1:
        raise _Invalid(f"invalid format version {_show(version)}; {DAMAGED}")
    if version > VERSION:
        raise _Invalid(f"written by a newer charlstm (format version {version}, this one reads "
                       f"up to {VERSION}); upgrade charlstm (pip install -U charlstm)")


def _check_model(model):
    if not isinstance(model, dict):
        raise _Invalid(f"manifest has no 'model' section; {DAMAGED}")
    missing = [f.name for f in fields(ModelConfig) if f.name not in model]
    if missing:
        raise _Invalid(f"model config lacks {', '.join(missing)}; {DAMAGED}")
    vocab = model["vocab"]
    if not isinstance(vocab, str) or not vocab or len(set(vocab)) != len(vocab):
        raise _Invalid(f"model vocab {_show(vocab)} is not a non-empty string of distinct "
                       f"characters; {DAMAGED}")
    for key in ("hidden", "layers"):
        if not _is_int(model[key]) or model[key] < 1:
            raise _Invalid(f"model {key} {_show(model[key])} is not a positive integer; {DAMAGED}")
    if not isinstance(model["peepholes"], bool):
        raise _Invalid(f"model peepholes {_show(model['peepholes'])} is not true/false; {DAMAGED}")
    if not isinstance(model["dtype"], str) or model["dtype"] not in DTYPES:
        raise _Invalid(f"model dtype {_show(model['dtype'])} is not one of {', '.join(DTYPES)}; "
                       f"{DAMAGED}")
    return ModelConfig.from_dict(model)


def _check_train(train):
    """Type-check every TrainConfig field present against its annotation; return batch_size (B)."""
    if not isinstance(train, dict):
        raise _Invalid(f"manifest has no 'train' section; {DAMAGED}")
    for f in fields(TrainConfig):
        if f.name in train and not _fits(train[f.name], f.type):
            raise _Invalid(f"train {f.name} {_show(train[f.name])} has the wrong type; {DAMAGED}")
    for key in ("batch_size", "seq_length"):
        if not _is_int(train.get(key)) or train[key] < 1:
            raise _Invalid(f"train {key} {_show(train.get(key))} is not a positive integer; "
                           f"{DAMAGED}")
    if "clip_mode" in train and train["clip_mode"] not in CLIP_MODES:
        raise _Invalid(f"train clip_mode {_show(train['clip_mode'])} is not one of "
                       f"{', '.join(CLIP_MODES)}; {DAMAGED}")
    if "optim" in train and train["optim"] not in OPTIMIZER_STATE:
        raise _Invalid(f"train optim {_show(train['optim'])} is not one of "
                       f"{', '.join(OPTIMIZER_STATE)}; {DAMAGED}")
    _check_recipe(train)
    return train["batch_size"]


def _check_precision(train, config):
    """train precision (absent before --precision existed: f32) is one of PRECISIONS, and bf16 only
    for a float32 model (the engine's bfloat16 products accumulate in float32)."""
    precision = train.get("precision", BEFORE_OPTION["precision"])
    if precision not in PRECISIONS:
        raise _Invalid(f"train precision {_show(precision)} is not one of {', '.join(PRECISIONS)}; {DAMAGED}")
    if precision == "bf16" and config.dtype != "float32":
        raise _Invalid(f"train precision bf16 with a {config.dtype} model (bf16 needs float32); {DAMAGED}")


# Values outside these would break the optimizer's or the schedule's arithmetic (a division by
# zero, a power that overflows); the CLI's ranges are the same.
_RANGES = {"rmsprop_alpha": (0.0, 1.0), "adam_beta1": (0.0, 1.0), "adam_beta2": (0.0, 1.0),
           "weight_drop": (0.0, 1.0)}  # [lo, hi)


def _check_recipe(train):
    for key, (lo, hi) in _RANGES.items():
        if key in train and not lo <= train[key] < hi:
            raise _Invalid(f"train {key} {_show(train[key])} is not in [{lo:g}, {hi:g}); {DAMAGED}")
    if "lr_decay" in train and not 0 < train["lr_decay"] <= 1:
        raise _Invalid(f"train lr_decay {_show(train['lr_decay'])} is not in (0, 1]; {DAMAGED}")
    if train.get("lr_decay_every") is not None and train["lr_decay_every"] < 1:
        raise _Invalid(f"train lr_decay_every {_show(train['lr_decay_every'])} is not a positive "
                       f"integer; {DAMAGED}")


def _check_optimizer(manifest):
    """The optimizer's state array names: from the manifest's optimizer section, which must be
    what train.optim implies; a version-1 file (no section) is Adagrad's."""
    name = manifest["train"].get("optim", BEFORE_OPTION["optim"])  # a name _check_train accepted
    expected = {"name": name, "state": list(OPTIMIZER_STATE[name])}
    if manifest["version"] == 1:
        if name != "adagrad":
            raise _Invalid(f"format version 1 predates optimizers other than Adagrad, yet train "
                           f"optim is {_show(name)}; {DAMAGED}")
    elif manifest.get("optimizer") != expected:
        raise _Invalid(f"optimizer section {_show(manifest.get('optimizer'))} does not match "
                       f"train optim {_show(name)} (expected {expected}); {DAMAGED}")
    return OPTIMIZER_STATE[name]


def _check_members(arrays, keys):
    if sorted(arrays) != sorted(keys):
        held = ", ".join(["manifest", *sorted(arrays)])
        raise _Invalid(f"holds arrays {_short(held)}, expected exactly "
                       f"{', '.join(('manifest',) + keys)}; {DAMAGED}")


def _check_layout(slots, config):
    """The manifest's {name, shape, offset} list must be exactly model.layout(config)."""
    per_layer = 4 if config.peepholes else 3
    # Compare lengths before calling layout: a damaged `layers` of 10**9 must not loop for hours.
    if not isinstance(slots, list) or len(slots) != config.layers * per_layer + 2:
        raise _Invalid(f"parameter layout in the manifest does not match the model config; "
                       f"{DAMAGED}")
    for got, want in zip(slots, _layout_json(config)):
        # Canonical JSON, so that 1.0 or true does not pass for the integer 1.
        if json.dumps(got, sort_keys=True) != json.dumps(want, sort_keys=True):
            raise _Invalid(f"parameter layout in the manifest does not match the model config "
                           f"(at {want['name']}: expected shape {want['shape']} offset "
                           f"{want['offset']}); {DAMAGED}")


def _check_arrays(arrays, config, batch_size, state_names):
    dtype = np.dtype(config.dtype)  # native byte order: a byte-swapped array is refused too
    P = param_count(config)
    shapes = {"params": (P,), **{key: (P,) for key in state_names},
              "h": (config.layers, batch_size, config.hidden),
              "c": (config.layers, batch_size, config.hidden)}
    for key, shape in shapes.items():
        array = arrays[key]
        if array.shape != shape or array.dtype != dtype:
            raise _Invalid(f"array {key!r} is {array.dtype} {array.shape}, the manifest implies "
                           f"{dtype} {shape}; {DAMAGED}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _fits(value, annotation):
    """Does a JSON value fit a dataclass annotation such as int, float, str or `int | None`?"""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None or isinstance(value, (bool, str)):
        return type(value) in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed  # JSON writes 5.0 as 5.0, but a user may not
    return isinstance(value, float) and float in allowed


def _show(value):
    """A value quoted from the file, escaped and kept short for a one-line message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(e):
    text = str(e) if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."
