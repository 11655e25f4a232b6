"""Scoring a file under a model (`charlstm eval`): the file is one stream from zero state, and the
score is the mean over positions 2..N of -log p(char | all earlier chars), in nats (SPEC §2).

The stream advances layer by layer over windows of WINDOW positions, carrying h and c from one
window to the next: layer 0's input is a row lookup, the input products of the layers above and
the output layer (logits, log-softmax, the targets' log-probabilities) are one matrix product per
window, and only the recurrent product runs step by step, its units split across the team
(recurrent.forward_grid, with one stream group).

With precision "bf16" the products' operands are rounded to bfloat16 (engine/bf16.py), as training
rounds them: each layer's Wh packed as bfloat16 for the Widen product (bfloat16 weights widened to
float32 in registers; it runs on every machine), h's operand copy `hx` rounded as it is made, and
the input products of the layers above read rounded copies of Wx and of the layer below's h (float32
BLAS on rounded values). Sums, gates, cell state and the output layer stay float32.

The file is read twice in chunks, never whole: pass 1 counts its characters and finds any outside
the vocabulary (so that an error comes before the work, and the progress bar knows its total);
pass 2 decodes, maps to ids and scores (open_text and feed_text: dynamic evaluation reads its
files with them too). Memory stays constant whatever the file's size.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from charlstm.config import check_precision
from charlstm.engine import bf16, grid, kernels, packed, recurrent, stream_kernels
from charlstm.engine.jit import is_cached
from charlstm.data import CHUNK_BYTES, MAX_CODE_POINT, _code_points, _decoder, _open
from charlstm.errors import UserError
from charlstm.engine.threads import team
from charlstm.model import views
from charlstm.sample import show_chars

WINDOW = 1024  # positions per window: enough to make the batched products efficient
FEED = 1 << 16  # positions between progress-bar updates


@dataclass
class Score:
    nats_per_char: float
    chars: int  # predictions scored: the characters kept, minus the first
    skipped: int = 0  # characters outside the vocabulary, dropped with --unknown skip

    @property
    def bits_per_char(self):
        return self.nats_per_char / math.log(2)

    @property
    def perplexity(self):
        return math.exp(self.nats_per_char)


class Scorer:
    """Scores one stream of ids fed in any number of pieces, from zero state, in constant memory."""

    def __init__(self, params, config, window=WINDOW, precision="f32"):
        L, H, V, G = config.layers, config.hidden, config.vocab_size, 4 * config.hidden
        dtype = np.dtype(config.dtype)
        check_precision(precision, dtype)
        self.bf16 = precision == "bf16"
        self.w = {k: np.array(v, dtype=dtype, order="C") for k, v in views(params, config).items()}
        if self.bf16:  # the input products read Wx rounded, rounded once here
            for l in range(1, L):
                self.w[f"l{l}.Wx"] = rounded(self.w[f"l{l}.Wx"])
        self.WxT0 = np.ascontiguousarray(self.w["l0.Wx"].T)  # (V, G): the one-hot input is a row lookup
        self.no_peep = np.zeros(0, dtype)
        self.config, self.window = config, window
        # h, c (L, window+1, H): row 0 the state carried in, row t+1 the state after step t
        self.h, self.c = np.zeros((L, window + 1, H), dtype), np.zeros((L, window + 1, H), dtype)
        self.A, self.tc = np.zeros((window, G), dtype), np.zeros((window, H), dtype)
        # hx (L, window+1, H): h as the products read it, h itself in float32, else rounded (row 0
        # carried in, rows 1.. made by forward_grid)
        self.hx = np.zeros_like(self.h) if self.bf16 else self.h
        forward_shape, _, row = packed.packed_shapes(H, dtype)
        # a layer's Wh packed (float32 lanes; uint16 bfloat16 singles for the Widen product); the products
        self.Wf = np.zeros(forward_shape, np.uint16 if self.bf16 else dtype)
        self.z = np.zeros((1, row), dtype)
        reads = "bfloat16" if self.bf16 else dtype  # what the grid's cost model counts per weight
        self.unit_groups = grid.choose(1, config.hidden, reads, team.most).unit_groups  # one stream group
        self.P = np.zeros((window, V), dtype)
        self.prev = None  # the last id fed: the input that predicts the next one
        self.total, self.count = 0.0, 0  # nats summed in float64, predictions made

    def feed(self, ids):
        """Score each id given everything fed before it (the very first id is not scored)."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.size == 0:
            return
        if self.prev is None:
            self.prev, ids = ids[:1], ids[1:]
        seq = np.concatenate([self.prev, ids])
        for start in range(0, len(ids), self.window):
            T = min(self.window, len(ids) - start)
            self._window(seq[start:start + T], seq[start + 1:start + T + 1])
        self.prev = seq[-1:]

    def finish(self):
        """Nothing is held back: every id fed is scored as it comes."""

    def _window(self, x, y):
        """x, y (T,): inputs and the targets they predict."""
        T, w, cfg = len(x), self.w, self.config
        A, h, hx, c = self.A[:T], self.h[:, :T + 1], self.hx[:, :T + 1], self.c[:, :T + 1]
        A3 = A.reshape(T, 1, -1)  # (T, B = 1, G), as the recurrent kernels take it
        kernels.gather_input(self.WxT0, w["l0.b"], x.reshape(T, 1), A3)
        for l in range(cfg.layers):
            if l > 0:
                kernels.project_input(hx[l - 1, 1:], w[f"l{l}.Wx"], w[f"l{l}.b"], A)
            peep = w.get(f"l{l}.p", self.no_peep)
            Wh, hl, hxl, cl, tc = w[f"l{l}.Wh"], h[l], hx[l], c[l], self.tc[:T]
            team.together(lambda rank, threads, sync: recurrent.forward_grid(
                A3, Wh, self.Wf, peep, hl.reshape(T + 1, 1, -1), hxl.reshape(T + 1, 1, -1), cl.reshape(T + 1, 1, -1),
                tc.reshape(T, 1, -1), self.z, rank, threads, 1, self.unit_groups, sync), self.unit_groups)
        self.total += stream_kernels.nll_sum(h[-1, 1:], w["out.W"], w["out.b"], y, self.P[:T])
        self.count += T
        h[:, 0], c[:, 0] = h[:, T], c[:, T]  # carried into the next window
        if self.bf16:
            hx[:, 0] = hx[:, T]  # h[:, T] rounded, as forward_grid made it

    def score(self):
        return self.total / self.count if self.count else math.nan


def rounded(M):
    """M (R, C) float32 rounded to bfloat16, as float32 values (a new array)."""
    out = np.empty_like(M)
    bf16.round_rows(M, out, 0, M.shape[0])
    return out


# ---------------------------------------------------------------------------------------- files

def _read_chunks(path, encoding):
    """Yield the file's code points, (n,) uint32, a chunk at a time (never the whole file)."""
    with _open(path) as f:
        decoder, offset = _decoder(path, encoding), 0
        while chunk := f.read(CHUNK_BYTES):
            yield _code_points(decoder, chunk, offset, False, path, encoding)
            offset += len(chunk)
        yield _code_points(decoder, b"", offset, True, path, encoding)


def _count(path, encoding):
    """Pass 1: how many times each code point occurs, (MAX_CODE_POINT + 1,) int64."""
    counts = np.zeros(MAX_CODE_POINT + 1, dtype=np.int64)
    for cps in _read_chunks(path, encoding):
        c = np.bincount(cps)
        counts[:c.size] += c
    return counts


@dataclass
class Text:
    """A text file checked against a model's vocabulary (pass 1), ready to be read as ids (pass 2)."""
    path: str
    encoding: str
    lut: np.ndarray  # (MAX_CODE_POINT + 1,) int32: code point -> id, -1 outside the vocabulary
    skipped: int  # characters outside the vocabulary, dropped with unknown='skip'
    kept: int  # characters that become ids

    def pieces(self):
        """The file's ids in pieces of at most FEED, in order, read a chunk at a time."""
        for cps in _read_chunks(self.path, self.encoding):
            ids = self.lut[cps]
            if self.skipped:
                ids = ids[ids >= 0]
            for start in range(0, len(ids), FEED):
                yield ids[start:start + FEED]


def open_text(config, path, encoding="utf-8", unknown="error", warn=print, what="file to score"):
    """Pass 1 over the text file at `path`: characters outside the vocabulary raise a UserError
    listing them, or with unknown='skip' are dropped (with a warning) and counted. A text needs
    at least 2 characters (the first is only context)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; check the path of the {what}")
    counts = _count(path, encoding)
    lut = np.full(MAX_CODE_POINT + 1, -1, dtype=np.int32)  # code point -> id, -1 outside the vocab
    lut[np.frombuffer(config.vocab.encode("utf-32-le"), dtype=np.uint32)] = np.arange(config.vocab_size)
    present = np.flatnonzero(counts)
    missing = present[lut[present] < 0]
    skipped = int(counts[missing].sum())
    if skipped:
        listed = show_chars(map(chr, missing))
        if unknown != "skip":
            raise UserError(f"{path}: {skipped} character(s) not in the model's vocabulary: {listed}; "
                            "pass --unknown skip to leave them out")
        warn(f"warning: skipping {skipped} character(s) of {path} not in the model's vocabulary: {listed}")
    kept = int(counts.sum()) - skipped
    if kept < 2:
        raise UserError(f"{path}: {kept} character(s){' after skipping' if skipped else ''}, nothing to "
                        f"score: a file needs at least 2 (the first is only context)")
    return Text(str(path), encoding, lut, skipped, kept)


def feed_text(text, scorer, progress=True, desc="scoring"):
    """Pass 2: feed every id of `text` to `scorer` (a Scorer, or anything with its feed, finish
    and count), with a progress bar on stderr."""
    with tqdm(total=text.kept - 1, unit="char", unit_scale=True, desc=desc, file=sys.stderr,
              delay=1.0, disable=not progress, dynamic_ncols=True) as bar:
        for ids in text.pieces():
            before = scorer.count
            scorer.feed(ids)
            bar.update(scorer.count - before)
        before = scorer.count
        scorer.finish()
        bar.update(scorer.count - before)


def evaluate_file(params, config, path, encoding="utf-8", unknown="error", progress=True, warn=print, precision="f32"):
    """Score the text file at `path` under the model (open_text says what it refuses), with the
    products in `precision`."""
    text = open_text(config, path, encoding, unknown, warn)
    scorer = Scorer(params, config, precision=precision)
    feed_text(text, scorer, progress)
    return Score(scorer.score(), scorer.count, text.skipped)


def report(score, path, as_json=False, skipping=False):
    """The score as text for people, or (as_json) one JSON object for programs; `skipped` is in
    the JSON when --unknown skip was given."""
    if as_json:
        out = {"nats_per_char": score.nats_per_char, "bits_per_char": score.bits_per_char,
               "perplexity": score.perplexity, "chars": score.chars}
        if skipping:
            out["skipped"] = score.skipped
        return json.dumps(out)
    skipped = f" ({score.skipped:,} skipped: not in the vocabulary)" if score.skipped else ""
    return "\n".join([
        f"{path}: {score.chars:,} characters scored{skipped}",
        f"nats/char   {score.nats_per_char:.5f}",
        f"bits/char   {score.bits_per_char:.5f}",
        f"perplexity  {score.perplexity:.4f}",
    ])


def kernels_cached(config, precision="f32"):
    """Whether the scoring kernels are in Numba's disk cache (so no compile is coming)."""
    extra = (bf16.round_rows,) if precision == "bf16" else ()
    return is_cached(recurrent.forward_grid, stream_kernels.nll_sum, *extra)
