"""charlstm.data: corpus reading and caching, the split, the TBPTT batcher, and bad input."""
import hashlib
import os

import numpy as np
import pytest

from charlstm import data
from charlstm.data import Batcher, file_sha256, ids_dtype, load_corpus, split
from charlstm.errors import UserError

TEXT = "héllo wörld ✓ 𝄞 naïve\nsecond line ✓\n"


def write(tmp_path, content, name="corpus.txt"):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(p)


def decoded(corpus):
    return "".join(corpus.vocab[i] for i in corpus.ids)


# ---------------------------------------------------------------------------------------- corpus

def test_vocab_ids_and_metadata(tmp_path):
    path = write(tmp_path, TEXT)
    corpus = load_corpus(path, tmp_path / "cache")
    assert corpus.vocab == "".join(sorted(set(TEXT)))
    assert corpus.ids.dtype == np.uint8 and corpus.ids.shape == (len(TEXT),)
    assert isinstance(corpus.ids, np.memmap) and not corpus.ids.flags.writeable
    assert decoded(corpus) == TEXT
    raw = TEXT.encode("utf-8")
    assert corpus.path == path and corpus.size == len(raw)
    assert corpus.sha256 == hashlib.sha256(raw).hexdigest() == file_sha256(path)


def test_ids_dtype_is_smallest(tmp_path):
    assert [ids_dtype(v) for v in (2, 256, 257, 65536, 65537)] == [np.uint8] * 2 + [np.uint16] * 2 + [np.uint32]
    text = "".join(chr(0x100 + i) for i in range(300)) * 2
    corpus = load_corpus(write(tmp_path, text), tmp_path / "cache")
    assert len(corpus.vocab) == 300 and corpus.ids.dtype == np.uint16
    assert decoded(corpus) == text


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_chunk_boundaries_match_one_shot(tmp_path, monkeypatch, chunk):
    # 1-, 2-, 3- and 4-byte UTF-8 characters, so tiny chunks cut through every kind of sequence.
    text = TEXT * 3
    whole = load_corpus(write(tmp_path, text), tmp_path / "one")
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    pieces = load_corpus(write(tmp_path, text), tmp_path / "chunked")
    assert pieces.vocab == whole.vocab and pieces.sha256 == whole.sha256
    assert np.array_equal(pieces.ids, whole.ids) and decoded(pieces) == text


def test_cache_is_reused_and_keyed_by_vocab(tmp_path, monkeypatch):
    path, cache = write(tmp_path, TEXT), tmp_path / "cache"
    first = load_corpus(path, cache)
    [ids_file] = os.listdir(cache)
    assert ids_file.startswith(f"corpus-{first.sha256[:16]}-") and ids_file.endswith(".ids")
    mtime = os.stat(cache / ids_file).st_mtime_ns

    def no_rewrite(*args):
        raise AssertionError("pass 2 ran although the cache was valid")

    monkeypatch.setattr(data, "_write_ids", no_rewrite)
    again = load_corpus(path, cache)
    assert np.array_equal(again.ids, first.ids) and os.stat(cache / ids_file).st_mtime_ns == mtime
    monkeypatch.undo()

    other = load_corpus(path, cache, vocab=first.vocab + "XYZ")
    assert len(os.listdir(cache)) == 2 and other.ids.filename != first.ids.filename
    assert decoded(other) == TEXT


def test_cache_with_wrong_size_is_rebuilt(tmp_path):
    path, cache = write(tmp_path, TEXT), tmp_path / "cache"
    ids_file = load_corpus(path, cache).ids.filename
    with open(ids_file, "r+b") as f:
        f.truncate(3)
    assert decoded(load_corpus(path, cache)) == TEXT
    assert os.listdir(cache) == [os.path.basename(ids_file)]  # no temp file left behind


def test_given_vocab_sets_id_order(tmp_path):
    vocab = "".join(sorted(set(TEXT), reverse=True)) + "€"
    corpus = load_corpus(write(tmp_path, TEXT), tmp_path / "cache", vocab=vocab)
    assert corpus.vocab == vocab and decoded(corpus) == TEXT
    assert corpus.ids[0] == vocab.index(TEXT[0])


def test_other_encoding(tmp_path):
    corpus = load_corpus(write(tmp_path, b"caf\xe9 caf\xe9"), tmp_path / "cache", encoding="latin-1")
    assert decoded(corpus) == "café café"


def test_progress_bar_on_stderr(tmp_path, capsys):
    load_corpus(write(tmp_path, TEXT), tmp_path / "cache", progress=True)
    out = capsys.readouterr()
    assert out.out == "" and "encoding corpus" in out.err


# ---------------------------------------------------------------------------------------- bad input

def error(path, tmp_path, **kw):
    with pytest.raises(UserError) as e:
        load_corpus(path, tmp_path / "cache", **kw)
    message = e.value.format_message()
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("content, chunk, offset", [
    (b"hello \xff world", 1 << 20, 6),
    (b"abcdefgh\xc3\xa9ij\xffkl", 4, 12),  # beyond the first chunk
    (b"ab\xe2\x9cXYZ", 3, 2),  # a sequence carried over between chunks, then broken
    (b"abc \xe2\x9c", 1 << 20, 4),  # truncated at the end of the file
    (b"abc \xe2\x9c", 5, 4),
])
def test_invalid_utf8_names_offset(tmp_path, monkeypatch, content, chunk, offset):
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk)
    message = error(write(tmp_path, content), tmp_path)
    assert f"not valid utf-8 at byte offset {offset} " in message and "--encoding" in message


def test_codec_error_without_offset(tmp_path):
    assert "not valid utf-16" in error(write(tmp_path, b"abc"), tmp_path, encoding="utf-16")


@pytest.mark.parametrize("content", [
    b"text\x00more text",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "ab\x01\x02\x03\x04cdefgh".encode("utf-8"),
])
def test_binary_is_refused(tmp_path, content):
    assert "looks like binary data" in error(write(tmp_path, content), tmp_path)


def test_control_characters_below_threshold_are_text(tmp_path):
    text = "\x1b[31mred\x1b[0m and plain text\twith\ttabs\r\n" * 3
    assert decoded(load_corpus(write(tmp_path, text), tmp_path / "cache")) == text


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"a", "at least 2 characters"),
    ("✓".encode("utf-8"), "at least 2 characters"),
])
def test_too_little_text(tmp_path, content, words):
    assert words in error(write(tmp_path, content), tmp_path)


def test_missing_directory_unreadable_unknown_encoding(tmp_path, monkeypatch):
    assert "no such file" in error(str(tmp_path / "nope.txt"), tmp_path)
    assert "is a directory" in error(str(tmp_path), tmp_path)
    path = write(tmp_path, TEXT)
    assert "unknown encoding" in error(path, tmp_path, encoding="no-such-codec")

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data, "open", denied, raising=False)  # root ignores chmod, so fake it
    assert "permission denied" in error(path, tmp_path)


def test_vocab_not_covering_lists_missing(tmp_path):
    message = error(write(tmp_path, TEXT), tmp_path, vocab="abcdefghijklmnopqrstuvwxyz")
    assert "does not cover" in message
    for ch in "é✓𝄞\n":
        assert repr(ch) in message
    assert not os.path.exists(tmp_path / "cache")  # refused before writing anything


# ---------------------------------------------------------------------------------------- batching

@pytest.mark.parametrize("n, val_frac, expected", [
    (100, 0.0, (100, 0)), (100, 0.05, (95, 5)), (99, 0.05, (95, 4)), (10, 0.5, (5, 5)),
    (7, 0.1, (7, 0)), (1_000_003, 0.05, (950_003, 50_000)),
])
def test_split(n, val_frac, expected):
    assert split(n, val_frac) == expected


@pytest.mark.parametrize("val_frac", [-0.1, 1.0])
def test_split_rejects_bad_fraction(val_frac):
    with pytest.raises(UserError):
        split(100, val_frac)


def reference_windows(ids, B, T):
    """SPEC §2 in plain loops: [(x, y)] per window, x[t][b] = ids[b*n + k*T + t], y one later."""
    n = (len(ids) - 1) // B
    out = []
    for k in range(n // T):
        x = [[int(ids[b * n + k * T + t]) for b in range(B)] for t in range(T)]
        y = [[int(ids[b * n + k * T + t + 1]) for b in range(B)] for t in range(T)]
        out.append((x, y))
    return out


@pytest.mark.parametrize("N, B, T", [
    (2, 1, 1), (10, 1, 1), (10, 1, 9), (10, 3, 1), (10, 3, 3), (101, 4, 5), (50, 7, 2), (1000, 16, 8),
])
def test_batcher_matches_spec(N, B, T):
    ids = np.arange(N, dtype=np.uint16)[::-1].copy()  # distinct values: any misplacement shows
    batcher = Batcher(ids, B, T)
    expected = reference_windows(ids, B, T)
    assert batcher.windows_per_epoch == len(expected) == ((N - 1) // B) // T
    for k, (x_ref, y_ref) in enumerate(expected):
        x, y = batcher.window(k)
        for a in (x, y):
            assert a.shape == (T, B) and a.dtype == np.int32 and a.flags.c_contiguous
        assert x.tolist() == x_ref and y.tolist() == y_ref
    for k in (-1, batcher.windows_per_epoch):
        with pytest.raises(IndexError):
            batcher.window(k)


@pytest.mark.parametrize("streams", [range(0, 2), range(2, 4), range(4, 6), range(3, 4)])
def test_batcher_share_reads_those_streams_of_the_whole_batch(streams):
    """An MPI rank's Batcher: the whole batch's windows, at its streams only."""
    ids = np.arange(200, dtype=np.uint16)[::-1].copy()
    whole, share = Batcher(ids, 6, 5), Batcher(ids, 6, 5, streams)
    assert share.windows_per_epoch == whole.windows_per_epoch
    for k in range(whole.windows_per_epoch):
        for a, b in zip(share.window(k), whole.window(k)):
            assert a.flags.c_contiguous and np.array_equal(a, b[:, streams.start:streams.stop])


def test_batcher_on_memmap_slice(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    corpus = load_corpus(write(tmp_path, text), tmp_path / "cache")
    n_train, _ = split(len(corpus.ids), 0.1)
    batcher = Batcher(corpus.ids[:n_train], 4, 10)
    x, y = batcher.window(batcher.windows_per_epoch - 1)
    for (x_ref, y_ref) in reference_windows(corpus.ids[:n_train], 4, 10)[-1:]:
        assert x.tolist() == x_ref and y.tolist() == y_ref


@pytest.mark.parametrize("B, T", [(1, 1), (1, 50), (4, 7), (50, 50)])
def test_batcher_too_short_names_minimum(B, T):
    with pytest.raises(UserError) as e:
        Batcher(np.zeros(B * T, dtype=np.uint8), B, T)
    message = e.value.format_message()
    assert f"at least {B * T + 1}" in message and "--batch-size" in message and "\n" not in message
    assert Batcher(np.zeros(B * T + 1, dtype=np.uint8), B, T).windows_per_epoch == 1
