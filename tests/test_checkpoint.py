"""Checkpoints: round trip, byte-identical saves, atomic writes, and every bad file refused with a
one-line CheckpointError (named cases, then a seeded fuzz over bytes and manifests)."""
import copy
import hashlib
import json
import os
import random
import stat
import time
import zipfile

import numpy as np
import pytest

from charlstm import checkpoint
from charlstm.checkpoint import (FORMAT, VERSION, CheckpointError, atomic_write, load_checkpoint,
                                 save_checkpoint)
from charlstm.config import OPTIMIZER_STATE, ModelConfig, TrainConfig
from charlstm.model import layout, param_count
from charlstm.schedule import lr_at

B = 3  # batch_size of the tiny run


def make_state(dtype="float32", seed=0, optim="adagrad"):
    """(manifest, params, optim_state, h, c) of a tiny real run, as the trainer would hand them
    over; optim_state is the optimizer's {name: array}."""
    model = ModelConfig(vocab="abcdef", hidden=4, layers=2, peepholes=True, dtype=dtype)
    train = TrainConfig(batch_size=B, seq_length=5, optim=optim)
    rng = np.random.default_rng(seed)
    P = param_count(model)
    params = rng.standard_normal(P).astype(dtype)
    state = {name: rng.random(P).astype(dtype) for name in OPTIMIZER_STATE[optim]}
    h, c = (rng.standard_normal((model.layers, B, model.hidden)).astype(dtype) for _ in range(2))
    manifest = {"model": model.to_dict(), "train": train.to_dict(), "step": 7, "epoch": 0,
                "chars_seen": 105, "cursor": {"window": 7},
                "corpus": {"path": "corpus.txt", "size": 1234, "sha256": "ab" * 32},
                "rng": {"state": 12345}, "best_val_loss": 1.5, "metrics": [{"step": 7, "loss": 1.7}]}
    return manifest, params, state, h, c


def write_raw(path, manifest, **arrays):
    """An .npz built by hand (np.savez, no checks), for files save_checkpoint would refuse to write.
    `manifest` may be a dict (JSON-encoded) or already an array."""
    if isinstance(manifest, dict):
        manifest = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, manifest=manifest, **arrays)


def raw_checksum(*arrays):
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def full_state(dtype="float32"):
    """A complete, valid Adagrad manifest (with format, version, optimizer, layout, checksum) and
    its arrays, built by hand from SPEC §3."""
    manifest, params, state, h, c = make_state(dtype)
    config = ModelConfig.from_dict(manifest["model"])
    manifest.update(format=FORMAT, version=VERSION, checksum=raw_checksum(params, state["adagrad"], h, c),
                    optimizer={"name": "adagrad", "state": ["adagrad"]},
                    params=[{"name": s.name, "shape": list(s.shape), "offset": s.offset}
                            for s in layout(config)])
    return manifest, {"params": params, "adagrad": state["adagrad"], "h": h, "c": c}


def assert_refused(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and os.path.basename(str(path)) in message
    for word in words:
        assert word in message, message
    return message


# ------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("optim", list(OPTIMIZER_STATE))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_keeps_everything(tmp_path, dtype, optim):
    manifest, params, state, h, c = make_state(dtype, optim=optim)
    path = tmp_path / "latest.npz"
    save_checkpoint(path, manifest, params, state, h, c)
    ck = load_checkpoint(path)
    assert list(ck.optim_state) == list(OPTIMIZER_STATE[optim])
    for got, want in zip((ck.params, *ck.optim_state.values(), ck.h, ck.c), (params, *state.values(), h, c)):
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable and got.flags.c_contiguous  # the trainer updates them in place
    for key, value in manifest.items():
        assert ck.manifest[key] == value
    assert ck.manifest["format"] == FORMAT and ck.manifest["version"] == VERSION
    assert ck.manifest["checksum"] == raw_checksum(params, *state.values(), h, c)
    assert ck.manifest["optimizer"] == {"name": optim, "state": list(OPTIMIZER_STATE[optim])}
    assert ck.model_config == ModelConfig.from_dict(manifest["model"])
    assert ck.train_config == TrainConfig.from_dict(manifest["train"])
    assert ck.manifest["params"][0] == {"name": "l0.Wx", "shape": [16, 6], "offset": 0}


def test_options_a_manifest_lacks_take_their_value_from_before_they_existed():
    """A checkpoint written before --dropout existed trained without it: resuming it must not
    switch on today's default."""
    legacy = {k: v for k, v in TrainConfig().to_dict().items() if k != "dropout"}
    assert TrainConfig().dropout > 0
    assert TrainConfig.from_dict(legacy).dropout == 0.0
    assert TrainConfig.from_dict(TrainConfig(dropout=0.3).to_dict()).dropout == 0.3
    older = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("init", "dropout_warmup")}
    assert (TrainConfig().init, TrainConfig().dropout_warmup) == ("fan-in", 20.0)
    assert (TrainConfig.from_dict(older).init, TrainConfig.from_dict(older).dropout_warmup) == ("char-rnn", 0.0)
    before_weight_drop = {k: v for k, v in TrainConfig(weight_drop=0.2).to_dict().items() if k != "weight_drop"}
    assert TrainConfig.from_dict(before_weight_drop).weight_drop == 0.0


def test_file_is_a_plain_npz(tmp_path):
    """The documented format: np.load reads it without pickles; manifest is UTF-8 JSON."""
    manifest, *arrays = make_state()
    save_checkpoint(tmp_path / "a.npz", manifest, *arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["adagrad", "c", "h", "manifest", "params"]
        assert json.loads(npz["manifest"].tobytes().decode("utf-8"))["format"] == FORMAT
        np.testing.assert_array_equal(npz["params"], arrays[0])


def test_save_does_not_change_the_callers_manifest_and_takes_numpy_scalars(tmp_path):
    manifest, *arrays = make_state()
    manifest["step"] = np.int64(7)
    before = copy.deepcopy(manifest)
    save_checkpoint(tmp_path / "a.npz", manifest, *arrays)
    assert manifest == before and "checksum" not in manifest
    assert load_checkpoint(tmp_path / "a.npz").manifest["step"] == 7


def test_save_refuses_arrays_that_do_not_fit_the_model(tmp_path):
    manifest, params, state, h, c = make_state()
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "a.npz", manifest, params[:-1], state, h, c)
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "a.npz", manifest, params.astype("float64"), state, h, c)
    with pytest.raises(ValueError):  # Adam's state under an Adagrad manifest
        save_checkpoint(tmp_path / "a.npz", manifest, params, {"adam_m": params, "adam_v": params}, h, c)
    assert not os.listdir(tmp_path)


def test_same_state_gives_identical_bytes(tmp_path, monkeypatch):
    manifest, *arrays = make_state()
    save_checkpoint(tmp_path / "a.npz", manifest, *arrays)
    later = time.time() + 86400 * 400  # a zip entry stamped with the clock would differ
    real_localtime = time.localtime
    monkeypatch.setattr(time, "time", lambda: later)
    monkeypatch.setattr(time, "localtime", lambda t=None: real_localtime(later if t is None else t))
    save_checkpoint(tmp_path / "b.npz", dict(reversed(list(manifest.items()))), *arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


# ---------------------------------------------------------------------------------- atomic writes

def saved_file(tmp_path):
    manifest, *arrays = make_state()
    path = tmp_path / "latest.npz"
    save_checkpoint(path, manifest, *arrays)
    return path, path.read_bytes()


def test_failing_write_callback_leaves_previous_file(tmp_path):
    path, before = saved_file(tmp_path)

    def half(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, half)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["latest.npz"]


def test_interrupt_during_save_leaves_previous_file(tmp_path, monkeypatch):
    path, before = saved_file(tmp_path)
    manifest, params, *rest = make_state(seed=1)
    calls = []

    def write_array(*args, **kwargs):  # Ctrl-C while the second member is being written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, manifest, params, *rest)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["latest.npz"]


def test_failing_rename_leaves_previous_file(tmp_path, monkeypatch):
    path, before = saved_file(tmp_path)

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, *make_state(seed=1))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["latest.npz"]


@pytest.mark.parametrize("os_name", [os.name, "nt"])
def test_atomic_write_fsyncs_file_and_folder_and_names_its_temp(tmp_path, monkeypatch, os_name):
    """The file, then its folder where the OS can fsync one (POSIX; Windows, simulated, cannot)."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    names = []
    with monkeypatch.context() as m:  # (only the write runs as on another OS, not pytest)
        m.setattr(os, "name", os_name)
        atomic_write(tmp_path / "x.bin", lambda f: (names.append(f.name), f.write(b"data")))
    assert synced == ([False, True] if os_name == "posix" else [False])  # file, folder
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    # same folder (so the rename is atomic), and a leftover from a crash is recognisable
    assert names == [str(tmp_path / f".x.bin.tmp-{os.getpid()}")]


def test_write_into_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot write"):
        save_checkpoint(tmp_path / "nope" / "a.npz", *make_state())


# ------------------------------------------------------------------------------------- bad files

def test_missing_folder_empty_and_foreign_bytes(tmp_path):
    assert_refused(tmp_path / "missing.npz", "no such")
    (tmp_path / "run").mkdir()
    assert_refused(tmp_path / "run", "folder")
    (tmp_path / "empty.npz").write_bytes(b"")
    assert_refused(tmp_path / "empty.npz", "empty")
    (tmp_path / "noise.npz").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(999)))
    assert_refused(tmp_path / "noise.npz", "not a readable checkpoint")
    path, good = saved_file(tmp_path)
    (tmp_path / "cut.npz").write_bytes(good[:len(good) // 2])
    assert_refused(tmp_path / "cut.npz", "truncated")


def test_foreign_npz_and_wrong_members(tmp_path):
    manifest, arrays = full_state()
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    assert_refused(tmp_path / "other.npz", "not a charlstm checkpoint")
    write_raw(tmp_path / "extra.npz", manifest, extra=np.zeros(1), **arrays)
    assert_refused(tmp_path / "extra.npz", "extra")
    write_raw(tmp_path / "short.npz", manifest, **{k: arrays[k] for k in ("params", "h", "c")})
    assert_refused(tmp_path / "short.npz", "expected exactly")
    np.savez_compressed(tmp_path / "zipped.npz", manifest=np.frombuffer(
        json.dumps(manifest).encode(), dtype=np.uint8), **arrays)
    assert_refused(tmp_path / "zipped.npz", "compressed")


class Bomb:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("key", ["manifest", "params", "h"])
def test_object_array_is_refused_and_never_unpickled(tmp_path, key):
    manifest, arrays = full_state()
    marker = tmp_path / "pwned"
    members = {"manifest": np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8), **arrays}
    members[key] = np.array([Bomb(str(marker))], dtype=object)
    with open(tmp_path / "evil.npz", "wb") as f:
        np.savez(f, **members)  # allow_pickle defaults to True when writing: a real pickle
    assert_refused(tmp_path / "evil.npz", "pickle")
    assert not marker.exists()


def test_a_valid_hand_written_file_loads(tmp_path):
    """The baseline for the edit cases below: write_raw + full_state is a good checkpoint."""
    manifest, arrays = full_state("float64")
    write_raw(tmp_path / "ok.npz", manifest, **arrays)
    assert load_checkpoint(tmp_path / "ok.npz").manifest == manifest


def edited(manifest, path, value):
    """A deep copy of manifest with manifest[path[0]][path[1]]... set to value (DELETE removes)."""
    out = copy.deepcopy(manifest)
    target = out
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


DELETE = object()
MANIFEST_EDITS = [  # (path into the manifest, new value, words the message must hold)
    (("format",), "something-else", "not a charlstm checkpoint"),
    (("format",), DELETE, "not a charlstm checkpoint"),
    (("version",), VERSION + 1, "newer charlstm"),
    (("version",), "1", "version"), (("version",), 0, "version"), (("version",), True, "version"),
    (("model",), DELETE, "model"), (("model",), [1, 2], "model"),
    (("model", "hidden"), DELETE, "lacks hidden"),
    (("model", "hidden"), 0, "hidden"), (("model", "hidden"), "4", "hidden"),
    (("model", "hidden"), 4.0, "hidden"), (("model", "hidden"), True, "hidden"),
    (("model", "layers"), -1, "layers"), (("model", "layers"), 10 ** 9, "layout"),
    (("model", "peepholes"), "yes", "peepholes"), (("model", "peepholes"), False, "layout"),
    (("model", "dtype"), "float16", "dtype"), (("model", "dtype"), ["float32"], "dtype"),
    (("model", "dtype"), "float64", "array 'params'"),
    (("model", "vocab"), "", "vocab"), (("model", "vocab"), "abcdea", "vocab"),
    (("model", "vocab"), 6, "vocab"), (("model", "vocab"), "abcdefg", "layout"),
    (("train",), DELETE, "train"), (("train", "batch_size"), DELETE, "batch_size"),
    (("train", "batch_size"), 0, "batch_size"), (("train", "batch_size"), "3", "batch_size"),
    (("train", "batch_size"), 4, "array 'h'"), (("train", "lr"), "fast", "lr"),
    (("train", "clip_mode"), "sideways", "clip_mode"),
    (("params",), DELETE, "layout"), (("params",), "l0.Wx", "layout"),
    (("params", 0, "shape"), [6, 16], "l0.Wx"), (("params", 1, "offset"), 95, "l0.Wh"),
    (("params", 1, "offset"), 96.0, "l0.Wh"), (("params", 2, "name"), "l0.bias", "l0.b"),
    (("params", 0), "l0.Wx", "l0.Wx"),
    (("checksum",), "0" * 64, "checksum mismatch"), (("checksum",), DELETE, "checksum"),
    (("checksum",), 5, "checksum"),
    (("optimizer",), DELETE, "optimizer section None"), (("optimizer", "name"), "adam", "optimizer section"),
    (("optimizer", "state"), ["adam_m", "adam_v"], "optimizer section"),
    (("train", "optim"), "adam", "does not match train optim 'adam'"), (("train", "optim"), "sgd", "optim 'sgd'"),
    (("train", "optim"), 1, "optim"), (("train", "adam_beta1"), 1.0, "adam_beta1"),
    (("train", "rmsprop_alpha"), -0.5, "rmsprop_alpha"), (("train", "lr_decay"), 2.0, "lr_decay"),
    (("train", "lr_decay"), 0, "lr_decay"), (("train", "lr_decay_every"), 0, "lr_decay_every"),
    (("train", "lr_decay_after"), 1.5, "lr_decay_after"),
    (("train", "precision"), "fp8", "precision 'fp8'"), (("train", "precision"), 16, "precision"),
]


@pytest.mark.parametrize("path,value,words", MANIFEST_EDITS, ids=lambda x: str(x)[:20])
def test_manifest_edit_is_refused(tmp_path, path, value, words):
    manifest, arrays = full_state()
    write_raw(tmp_path / "bad.npz", edited(manifest, path, value), **arrays)
    assert_refused(tmp_path / "bad.npz", words)


def version_1(manifest, arrays):
    """What format version 1 wrote for this Adagrad state: no optimizer section, no option that
    came with version 2; the checksum over params, adagrad, h, c is the same."""
    old = copy.deepcopy(manifest)
    del old["optimizer"]
    for key in ("optim", "rmsprop_alpha", "rmsprop_eps", "adam_beta1", "adam_beta2", "adam_eps",
                "lr_decay", "lr_decay_after", "lr_decay_every"):
        del old["train"][key]
    old["version"] = 1
    return old


def test_a_version_1_file_loads_as_adagrad(tmp_path):
    manifest, arrays = full_state()
    write_raw(tmp_path / "v1.npz", version_1(manifest, arrays), **arrays)
    ck = load_checkpoint(tmp_path / "v1.npz")
    assert ck.train_config.optim == "adagrad" and ck.train_config.lr_decay == 1.0
    assert lr_at(ck.train_config, 100) == ck.train_config.lr  # trained without decay, resumes without it
    assert list(ck.optim_state) == ["adagrad"]
    np.testing.assert_array_equal(ck.optim_state["adagrad"], arrays["adagrad"])
    # version 1 knew no other optimizer, nor any array but these
    write_raw(tmp_path / "adam.npz", edited(version_1(manifest, arrays), ("train", "optim"), "adam"), **arrays)
    assert_refused(tmp_path / "adam.npz", "version 1 predates")
    write_raw(tmp_path / "extra.npz", version_1(manifest, arrays), adam_m=arrays["params"], **arrays)
    assert_refused(tmp_path / "extra.npz", "expected exactly manifest, params, adagrad, h, c")


def test_adam_checkpoint_must_hold_both_moments(tmp_path):
    manifest, params, state, h, c = make_state(optim="adam")
    save_checkpoint(tmp_path / "good.npz", manifest, params, state, h, c)
    full = load_checkpoint(tmp_path / "good.npz").manifest
    write_raw(tmp_path / "bad.npz", full, params=params, adam_m=state["adam_m"], h=h, c=c)
    assert_refused(tmp_path / "bad.npz", "expected exactly manifest, params, adam_m, adam_v, h, c")
    swapped = dict(full, checksum=raw_checksum(params, state["adam_v"], state["adam_m"], h, c))
    write_raw(tmp_path / "order.npz", swapped, params=params, **state, h=h, c=c)
    assert_refused(tmp_path / "order.npz", "checksum mismatch")  # the manifest's order is the checksum's


def bad_arrays():
    """Wrong payloads under a correct-looking manifest (the checksum recomputed to match)."""
    manifest, a = full_state()
    P = a["params"].size
    yield "params", a["params"][:-1], "array 'params'"
    yield "params", a["params"].reshape(2, P // 2), "array 'params'"
    yield "params", a["params"].astype("float64"), "array 'params'"
    yield "params", a["params"].astype(">f4"), "array 'params'"
    yield "adagrad", a["adagrad"].view(np.int32), "array 'adagrad'"
    yield "h", a["h"][:, :-1], "array 'h'"
    yield "h", a["h"].reshape(-1), "array 'h'"
    yield "c", a["c"].astype("float64"), "array 'c'"
    yield "manifest", np.frombuffer(json.dumps(manifest).encode(), np.uint8).astype(
        np.float32), "manifest"
    yield "manifest", np.frombuffer(b"\xff\xfe{}", np.uint8), "UTF-8 JSON"
    yield "manifest", np.frombuffer(b"[1, 2]", np.uint8), "JSON object"
    yield "manifest", np.frombuffer(b"{\"format\": ", np.uint8), "UTF-8 JSON"
    yield "manifest", np.frombuffer(b"[" * 100000, np.uint8), "UTF-8 JSON"


@pytest.mark.parametrize("key,value,words", list(bad_arrays()), ids=lambda x: str(x)[:20])
def test_wrong_array_is_refused(tmp_path, key, value, words):
    manifest, arrays = full_state()
    members = {"manifest": manifest, **arrays, key: value}
    if key != "manifest":
        manifest["checksum"] = raw_checksum(*(members[k] for k in ("params", "adagrad", "h", "c")))
    write_raw(tmp_path / "bad.npz", members.pop("manifest"), **members)
    assert_refused(tmp_path / "bad.npz", words)


def test_changed_params_are_caught_by_the_checksum(tmp_path):
    """A valid zip whose params differ from the manifest's checksum (the zip CRC is fresh)."""
    manifest, arrays = full_state()
    arrays["params"] = arrays["params"].copy()
    arrays["params"][5] += 1
    write_raw(tmp_path / "bad.npz", manifest, **arrays)
    assert_refused(tmp_path / "bad.npz", "corrupt: checksum mismatch")


def test_flipped_byte_in_params_payload_is_refused(tmp_path):
    path, good = saved_file(tmp_path)
    start = good.find(load_checkpoint(path).params.tobytes())
    assert start > 0
    for offset in (0, 17, 400):
        bad = bytearray(good)
        bad[start + offset] ^= 0x10
        (tmp_path / "flip.npz").write_bytes(bytes(bad))
        assert_refused(tmp_path / "flip.npz")


def test_one_line_even_for_a_file_name_with_a_newline(tmp_path):
    (tmp_path / "a\nb.npz").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "a\nb.npz")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- fuzz

def mutate_bytes(rng, good):
    kind = rng.randrange(3)
    if kind == 0:
        return good[:rng.randrange(len(good))]
    data = bytearray(good)
    for _ in range(rng.choice((1, 1, 1, 2, 5))):
        at = rng.randrange(len(data))
        if kind == 1:
            data[at] ^= rng.randrange(1, 256)
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
    return bytes(data)


def mutate_manifest(rng, manifest, arrays):
    """A random edit or two, of the kinds a bad manifest could hold; sometimes the arrays too."""
    manifest, arrays = copy.deepcopy(manifest), dict(arrays)
    values = [None, True, 0, -1, 1, 3, 4, 2.5, "", "x", "float64", [], {}, [4, 6], 10 ** 30]
    for _ in range(rng.randrange(1, 3)):
        section = rng.choice(["model", "train", "params", None])
        if section == "params":
            slots = manifest.get("params")  # an earlier edit may have deleted or replaced it
            target = rng.choice(slots) if isinstance(slots, list) and slots else manifest
        else:
            target = manifest[section] if section in manifest and isinstance(
                manifest.get(section), dict) else manifest
        if isinstance(target, dict) and target:
            key = rng.choice(sorted(target))
            if rng.random() < 0.2:
                del target[key]
            else:
                target[key] = rng.choice(values)
    if rng.random() < 0.3:
        key = rng.choice(["params", "adagrad", "h", "c"])
        arrays[key] = rng.choice([arrays[key][:-1], arrays[key].astype("float64"),
                                  arrays[key].reshape(-1)[:1], np.zeros(0, np.float32)])
        if rng.random() < 0.5:
            manifest["checksum"] = raw_checksum(*(arrays[k] for k in ("params", "adagrad", "h", "c")))
    return manifest, arrays


def loads_or_refuses(path, original):
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and os.path.basename(path) in str(e)
        return False
    # Only a harmless change (zip header padding, JSON whitespace) may still load: same payload.
    assert ck.manifest == original.manifest
    for got, want in zip((ck.params, *ck.optim_state.values(), ck.h, ck.c),
                         (original.params, *original.optim_state.values(), original.h, original.c)):
        np.testing.assert_array_equal(got, want)
    return True


def test_fuzz_byte_mutations(tmp_path):
    path, good = saved_file(tmp_path)
    original = load_checkpoint(path)
    rng, bad_path, loaded = random.Random(1234), str(tmp_path / "fuzz.npz"), 0
    for _ in range(2500):
        with open(bad_path, "wb") as f:
            f.write(mutate_bytes(rng, good))
        loaded += loads_or_refuses(bad_path, original)
    assert loaded < 500  # almost every mutation must be noticed


def test_fuzz_manifest_mutations(tmp_path):
    """Edited manifests may legitimately load (a changed step, say); then they must be usable."""
    manifest, arrays = full_state()
    rng, bad_path, refused = random.Random(99), str(tmp_path / "fuzz.npz"), 0
    for _ in range(600):
        bad_manifest, bad_arrays = mutate_manifest(rng, manifest, arrays)
        write_raw(bad_path, bad_manifest, **bad_arrays)
        try:
            ck = load_checkpoint(bad_path)
        except CheckpointError as e:
            assert "\n" not in str(e) and "fuzz.npz" in str(e)
            refused += 1
            continue
        model = ck.model_config
        assert ck.params.shape == (param_count(model),) and ck.params.dtype == np.dtype(model.dtype)
        assert ck.h.shape == (model.layers, ck.train_config.batch_size, model.hidden)
    assert refused > 300
