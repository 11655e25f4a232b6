"""Corpus → vocab → ids; the train/val split; the B-stream truncated-BPTT batcher (SPEC §2).

A corpus may be a 2 GB file, so nothing here holds it whole in memory. `load_corpus` streams it
twice in CHUNK_BYTES chunks:

    pass 1  sha256 of the bytes, and the count of every code point (→ vocab, N, binary check)
    pass 2  code points → ids, written to a cached id file that is then opened as a read-only memmap

The cache file is named by the corpus hash and a hash of (encoding, vocab), so a second load of the
same file only needs pass 1. `Batcher` reads from those ids only the B slices a window needs.

Binary-data rule (a corpus is refused as "looks like binary data"):
  - its decoded text contains NUL (U+0000): no text format uses it; or
  - more than BINARY_CONTROL_FRAC (10%) of its characters are C0/C1 control characters other than
    tab, LF, VT, FF and CR (ANSI colour codes in a log stay far below that); or
  - it is not valid in the encoding and the chunk holding the first bad byte also holds a NUL byte
    (for byte-oriented encodings; not UTF-16/32, where NUL bytes are normal), so a gzip or PNG file
    is called binary rather than getting "try --encoding latin-1".
"""
import codecs
import hashlib
import math
import operator
import os
import stat
import tempfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from charlstm.engine import files
from charlstm.errors import UserError

CHUNK_BYTES = 8 << 20  # per read; peak memory is ~15x this (str, UTF-32 copy, intp index)
BINARY_CONTROL_FRAC = 0.10
MAX_CODE_POINT = 0x10FFFF
# Control characters that plain text does use: tab, LF, VT, FF, CR.
_TEXT_CONTROLS = (0x09, 0x0A, 0x0B, 0x0C, 0x0D)


@dataclass
class Corpus:
    path: str  # as given
    size: int  # bytes
    sha256: str  # hex of the file's bytes
    vocab: str  # code points in id order: sorted distinct code points, or the vocab given
    ids: np.ndarray  # (N,) read-only memmap of the cached id file, dtype from ids_dtype(len(vocab))


def ids_dtype(vocab_size):
    """The smallest unsigned dtype that holds ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------- reading

def _open(path):
    """Open the corpus for binary reading; every way that can fail is the user's to fix."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the corpus path") from None
    except OSError as e:
        raise UserError(f"{path}: cannot access ({e.strerror}); check the corpus path") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: is a directory; give the path of a plain-text file in it")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: is not a regular file; give the path of a plain-text file")
    try:
        return open(path, "rb")
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable or copy it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot open ({e.strerror})") from None


def _chunks(f, bar):
    """Yield (offset, bytes) of the file in CHUNK_BYTES pieces, advancing the progress bar."""
    offset = 0
    while chunk := f.read(CHUNK_BYTES):
        yield offset, chunk
        offset += len(chunk)
        bar.update(len(chunk))


def _decoder(path, encoding):
    try:
        return codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(f"{path}: unknown encoding {encoding!r}; pass a Python codec name to "
                        f"--encoding (e.g. utf-8, latin-1)") from None


def _code_points(decoder, chunk, offset, final, path, encoding):
    """Decode one chunk → (n,) uint32 code points. A decode error names its absolute byte offset.

    The incremental decoder holds back the bytes of a character cut at the chunk's end and decodes
    them with the next chunk, so the data it fails on is those pending bytes + this chunk: the bad
    byte sits at offset - len(pending) + e.start in the file.
    """
    pending = len(decoder.getstate()[0])
    try:
        text = decoder.decode(chunk, final=final)
    except UnicodeDecodeError as e:
        at = offset - pending + e.start
        if b"\x00" in chunk and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
            raise UserError(f"{path}: looks like binary data, not text (NUL bytes; undecodable "
                            f"as {encoding} at byte offset {at}); give a plain-text file") from None
        bad = e.object[e.start:e.end]
        what = f"byte{'s' if len(bad) > 1 else ''} {bad.hex(' ')}: {e.reason}"
        raise UserError(f"{path}: not valid {encoding} at byte offset {at} ({what}); "
                        f"if the file uses another encoding, pass it with --encoding "
                        f"(e.g. --encoding latin-1)") from None
    except UnicodeError as e:  # a codec's own check, e.g. UTF-16 without a byte-order mark
        raise UserError(f"{path}: not valid {encoding} ({e}); if the file uses another encoding, "
                        f"pass it with --encoding (e.g. --encoding latin-1)") from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _pass1(path, f, encoding, bar):
    """sha256 hex, byte size and per-code-point counts (MAX_CODE_POINT+1,) int64 of the file."""
    h, decoder = hashlib.sha256(), _decoder(path, encoding)
    counts = np.zeros(MAX_CODE_POINT + 1, dtype=np.int64)  # 9 MB, dense: cheaper than np.unique
    size = 0
    for offset, chunk in _chunks(f, bar):
        h.update(chunk)
        size = offset + len(chunk)
        _count(counts, _code_points(decoder, chunk, offset, False, path, encoding), path)
    # A multi-byte sequence cut off by the end of the file is an error too.
    _count(counts, _code_points(decoder, b"", size, True, path, encoding), path)
    return h.hexdigest(), size, counts


def _count(counts, cps, path):
    c = np.bincount(cps)  # (max(cps)+1,)
    if c.size and c[0]:
        raise UserError(f"{path}: looks like binary data, not text (contains NUL characters); give "
                        f"a plain-text file (for UTF-16/32 text pass --encoding utf-16 or utf-32)")
    counts[:c.size] += c


def _check_text(path, counts):
    """Refuse empty, one-character and binary-looking corpora (rule in the module docstring)."""
    n = int(counts.sum())
    if n == 0:
        raise UserError(f"{path}: is empty; give a plain-text file to train on")
    if n == 1:
        raise UserError(f"{path}: holds a single character, too short to train on: a corpus needs "
                        f"at least 2 characters (and B*T+1 for one batch); give a longer file")
    controls = int(counts[:32].sum() - counts[list(_TEXT_CONTROLS)].sum() + counts[127:160].sum())
    if controls > BINARY_CONTROL_FRAC * n:
        raise UserError(f"{path}: looks like binary data, not text ({controls} of {n} characters "
                        f"are control characters); give a plain-text file")
    return n


def _check_vocab(path, present, vocab):
    """Every code point present in the corpus must be in the given vocab, else list what is not."""
    missing = sorted(set(present) - set(vocab))
    if missing:
        shown = " ".join(repr(ch) for ch in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise UserError(f"{path}: the checkpoint's vocabulary does not cover this corpus: "
                        f"{len(missing)} characters missing: {shown}{more}; train a new model "
                        f"on it instead")


# ---------------------------------------------------------------------------------------- ids

def _lookup(vocab):
    """Dense table code point → id, (max code point + 1,): at most 1.1M entries (4.4 MB)."""
    cps = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    if np.unique(cps).size != cps.size:
        raise ValueError("vocab has repeated characters")
    lut = np.zeros(int(cps.max()) + 1, dtype=ids_dtype(len(vocab)))
    lut[cps] = np.arange(len(vocab))
    return lut


def _cache_path(cache_dir, sha256, vocab, encoding):
    # The encoding is hashed with the vocab: the same bytes under another codec give other chars.
    key = codecs.lookup(encoding).name + "\0" + vocab
    vocab_hash = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return os.path.join(cache_dir, f"corpus-{sha256[:16]}-{vocab_hash}.ids")


def _write_ids(path, f, encoding, vocab, sha256, target, bar):
    """Pass 2: encode the file into `target` atomically (temp file, fsync, rename, fsync dir)."""
    lut, h, decoder = _lookup(vocab), hashlib.sha256(), _decoder(path, encoding)
    folder = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".corpus-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            size = 0
            for offset, chunk in _chunks(f, bar):
                h.update(chunk)
                size = offset + len(chunk)
                out.write(_encode(lut, _code_points(decoder, chunk, offset, False, path, encoding), path))
            out.write(_encode(lut, _code_points(decoder, b"", size, True, path, encoding), path))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise UserError(f"{path}: changed while being read; try again once it is complete")
        files.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    files.fsync_folder(folder)


def _encode(lut, cps, path):
    """(n,) code points → (n,) ids. Pass 1 checked coverage, so a miss means the file changed."""
    if cps.size and int(cps.max()) >= lut.size:
        raise UserError(f"{path}: changed while being read; try again once it is complete")
    return lut[cps]


def load_corpus(path, cache_dir, vocab=None, encoding="utf-8", progress=False):
    """Read a text corpus into a Corpus whose ids are a read-only memmap of a cached id file.

    vocab=None: the vocab is the sorted distinct code points of the corpus. vocab given (resume,
    fine-tune): the corpus must use only its characters, and ids follow its order.
    Bad input (missing, unreadable, empty, one char, undecodable, binary) raises UserError.
    """
    with _open(path) as f:
        with tqdm(total=os.fstat(f.fileno()).st_size, unit="B", unit_scale=True,
                  desc="reading corpus", disable=not progress) as bar:
            sha256, size, counts = _pass1(path, f, encoding, bar)
        n = _check_text(path, counts)
        present = "".join(map(chr, np.flatnonzero(counts)))  # sorted by code point
        if vocab is None:
            vocab = present
        else:
            _check_vocab(path, present, vocab)
        dtype = ids_dtype(len(vocab))
        target = _cache_path(cache_dir, sha256, vocab, encoding)
        if not (os.path.isfile(target) and os.path.getsize(target) == n * dtype.itemsize):
            f.seek(0)
            _make_dir(cache_dir)
            with tqdm(total=size, unit="B", unit_scale=True, desc="encoding corpus",
                      disable=not progress) as bar:
                try:
                    _write_ids(path, f, encoding, vocab, sha256, target, bar)
                except OSError as e:  # disk full, say: the temp file is gone, nothing half-written
                    raise UserError(f"{cache_dir}: cannot write the corpus cache ({e.strerror or e}); "
                                    f"check the folder is writable and has space") from None
    ids = np.memmap(target, dtype=dtype, mode="r", shape=(n,))
    return Corpus(path=path, size=size, sha256=sha256, vocab=vocab, ids=ids)


def _make_dir(cache_dir):
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cache_dir}: cannot create the corpus cache folder ({e.strerror}); "
                        f"choose a writable folder") from None


def file_sha256(path):
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with _open(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- batching

def split(n, val_frac):
    """(n_train, n_val): the first n - n_val ids train, the contiguous tail validates."""
    if not 0 <= val_frac < 1:
        raise UserError(f"--val-frac must be at least 0 and below 1, got {val_frac}")
    n_val = math.floor(n * val_frac)
    return n - n_val, n_val


class Batcher:
    """The training ids cut into B contiguous streams, read T steps at a time (truncated BPTT).

    With n = (N_train - 1) // B, stream b covers ids[b*n : (b+1)*n + 1]. Window k feeds, for every
    stream b and t < T, x[t, b] = ids[b*n + k*T + t] and its next char y[t, b] = ids[b*n + k*T + t + 1].
    An epoch has n // T windows; the tail of each stream that does not fill a window is not used.

    streams, a range of stream numbers (default: all B), makes window() read only those: one MPI
    rank's share of the batch, with n and the windows still those of all B streams.
    """

    def __init__(self, ids_train, batch_size, seq_length, streams=None):
        B, T = batch_size, seq_length
        if B < 1 or T < 1:
            raise UserError(f"--batch-size and --seq-length must be at least 1, got {B} and {T}")
        self.ids, self.batch_size, self.seq_length = ids_train, B, T
        self.stream_length = (len(ids_train) - 1) // B  # n
        self.windows_per_epoch = self.stream_length // T
        if self.windows_per_epoch == 0:
            raise UserError(f"the training split has {len(ids_train)} characters, too few for one "
                            f"batch of --batch-size {B} x --seq-length {T}: it needs at least "
                            f"{B * T + 1}; use a smaller --batch-size or --seq-length "
                            f"(or a longer corpus, or a smaller --val-frac)")
        # (T+1, B'): offsets of window 0's inputs plus one target row, B' the streams read; window k adds k*T.
        streams = np.arange(B) if streams is None else np.asarray(streams)
        self._base = np.arange(T + 1)[:, None] + self.stream_length * streams[None, :]

    def window(self, k):
        """x, y: (T, B') int32, C-contiguous, time-major, for window k of the epoch (B' streams read)."""
        k = operator.index(k)
        if not 0 <= k < self.windows_per_epoch:
            raise IndexError(f"window {k} outside 0..{self.windows_per_epoch - 1}")
        # Fancy indexing gathers only these (T+1)*B ids, so a memmap pages in only B short slices.
        rows = np.asarray(self.ids[self._base + k * self.seq_length])  # (T+1, B)
        return rows[:-1].astype(np.int32), rows[1:].astype(np.int32)
