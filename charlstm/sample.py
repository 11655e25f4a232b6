"""Sampling: prime the state, step one character at a time, temperature / top-k / top-p / argmax, stream out.

`Streams` holds a model's weights laid out once for the step kernel (layer 0's Wx transposed so the
one-hot input is a row lookup; layer 0's Wh and the fused [Wx | Wh] (G, 2H) of each layer above
packed for the micro-kernel, so a step reads each weight once for all its streams), the state h, c
of up to `capacity` streams, and workspaces. `step` advances the first B of them together, a char
each a step (stream_kernels.run_streams), the step's units split across the team. `Stream` is one
of them, as `charlstm sample` steps it; the server (serve/) steps many, joining and leaving
between calls.

`generate` yields the text of one sample in pieces as it is made: the prime, then chunks of
generated characters. A chunk is one kernel call given pre-drawn uniforms, so the output for a
seed does not depend on the chunk sizes; chunks start small (the first characters show at once)
and grow to CHUNK_MAX. Memory stays constant however long the sample.

With precision "bf16" the packed weights are bfloat16 (engine/bf16.py), half the bytes a step
streams, in the machine's product (Dot's pairs where it has AVX512_BF16 and H is even, else
Widen's singles), and the products read a bfloat16 copy of the state that the step kernel makes as
it makes h; the output layer reads h in float32, as in training.
"""

import numpy as np

from charlstm.config import check_precision
from charlstm.engine import bf16, packed, stream_kernels
from charlstm.engine.jit import is_cached
from charlstm.engine.target import BF16_PRODUCT
from charlstm.errors import UserError
from charlstm.model import views
from charlstm.engine.threads import team

CHUNK_MIN, CHUNK_MAX = 64, 2048  # characters per kernel call


class Streams:
    """Up to `capacity` streams of one model, stepped together. Every stream's state starts at zero."""

    def __init__(self, params, config, precision="f32", capacity=1):
        L, H, V, G = config.layers, config.hidden, config.vocab_size, 4 * config.hidden
        w, dtype = views(params, config), np.dtype(config.dtype)
        check_precision(precision, dtype)
        fresh = lambda a: np.array(a, dtype=dtype, order="C")  # own, writable, C-contiguous copies
        (U, _, _, W), _, _ = packed.packed_shapes(H, dtype)  # float32 lanes for either precision
        bfloat = precision == "bf16"
        # Dot's pairs need an even K: layer 0's is H
        pairs = bfloat and BF16_PRODUCT == "dot" and H % 2 == 0
        Wf = np.zeros((L, U, 4, 2 * H if L > 1 else H, W), np.uint16 if bfloat else dtype)
        pack = (lambda M, P: bf16.pack_rows(M, P, 0, U, pairs)) if bfloat else (
            lambda M, P: packed.pack_forward(M, P, 0, U))
        pack(fresh(w["l0.Wh"]), Wf[0])
        for l in range(1, L):
            pack(fresh(np.concatenate([w[f"l{l}.Wx"], w[f"l{l}.Wh"]], axis=1)), Wf[l])
        bias = fresh([w[f"l{l}.b"] for l in range(L)])
        peep = fresh([w[f"l{l}.p"] for l in range(L)]) if config.peepholes else np.zeros((L, 0), dtype)
        self.net, self.Wf = (fresh(w["l0.Wx"].T), bias, peep, fresh(w["out.W"]), fresh(w["out.b"])), Wf
        # each layer's input vector [h below | its own h], twice (stream_kernels.run_streams)
        self.state = np.zeros((capacity, 2, L, 2 * H), dtype)
        # the state as the products read it: itself in float32, a bfloat16 copy otherwise
        self.statex = np.zeros_like(self.state, np.uint16 if pairs else dtype) if bfloat else self.state
        self.cells = np.zeros((capacity, 2, L, H), dtype)  # c, twice as the state
        self.work = (np.zeros((capacity, G), dtype), np.zeros((capacity, 4 * U * W), dtype),
                     np.zeros((capacity, H), dtype), np.zeros((capacity, V)), np.zeros((capacity, V)),
                     np.zeros((capacity, V), np.int64))
        self.config, self.capacity = config, capacity
        self.codes = np.frombuffer(config.vocab.encode("utf-32-le"), dtype=np.uint32)  # id -> code point
        self.index = {ch: i for i, ch in enumerate(config.vocab)}

    def h(self, row):
        """Stream `row`'s h (L, H), as the next step reads it."""
        return self.state[row, 0, :, self.config.hidden:]

    def c(self, row):
        """Stream `row`'s cell state c (L, H)."""
        return self.cells[row, 0]

    def reset(self, row):
        """Stream `row` back to zero state."""
        self.state[row] = 0
        self.statex[row] = 0
        self.cells[row] = 0

    def move(self, src, dst):
        """Stream `src`'s state into row `dst` (a server closing a gap in its rows)."""
        self.state[dst] = self.state[src]
        if self.statex is not self.state:
            self.statex[dst] = self.statex[src]
        self.cells[dst] = self.cells[src]

    def step(self, ids, uniforms, inv_temp, top_k, top_p, greedy):
        """Advance streams 0..B-1 n steps (stream_kernels.run_streams): ids (B, n) the inputs, -1 for
        the id drawn a step before; uniforms (B, n) the draws, negative for none; the settings (B,)
        each. Returns the drawn ids (B, n), -1 where none."""
        ids, uniforms = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(uniforms, float)
        B = ids.shape[0]
        if B > self.capacity or (ids.shape[1] and ids[:, 0].min() < 0) or ids.max(initial=0) >= self.config.vocab_size:
            raise ValueError("step: more streams than rows, a first input not given, or an id outside the vocabulary")
        out = np.empty(ids.shape, dtype=np.int64)
        how = (np.asarray(inv_temp, float), np.asarray(top_k, np.int64), np.asarray(top_p, float),
               np.asarray(greedy, np.bool_))
        work = tuple(w[:B] for w in self.work)
        team.together(lambda rank, threads, sync: stream_kernels.run_streams(
            self.net, self.Wf, ids, uniforms, how, self.state[:B], self.statex[:B], self.cells[:B], work, out,
            rank, threads, team.most, sync[0]))
        return out

    def decode(self, ids):
        return self.codes[ids].tobytes().decode("utf-32-le")

    def encode(self, text):
        return np.array([self.index[ch] for ch in text], dtype=np.int64)


class Stream(Streams):
    """One stream of a model, stepped one character at a time. State starts at zero."""

    def __init__(self, params, config, precision="f32"):
        super().__init__(params, config, precision, capacity=1)

    @property
    def h(self):
        return super().h(0)

    @property
    def c(self):
        return super().c(0)

    def reset(self):
        super().reset(0)

    def feed(self, ids):
        """Advance the state through the ids (a prime)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self.step(ids[None], np.full((1, len(ids)), -1.0), [1.0], [0], [1.0], [False])

    def run(self, x, uniforms, temperature=1.0, top_k=0, greedy=False, top_p=1.0):
        """Feed id x, then draw and feed one id per uniform; returns the drawn ids (n,) int64."""
        n = len(uniforms)
        ids = np.full((1, n), -1, np.int64)
        ids[0, 0] = x
        return self.step(ids, np.asarray(uniforms, float)[None], [1.0 / temperature], [top_k or 0], [top_p],
                         [bool(greedy)])[0]


def show_chars(chars, limit=20):
    """'a' '\\t' 'é' and 3 more: characters quoted for a one-line message."""
    chars = sorted(chars)
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return " ".join(repr(ch) for ch in chars[:limit]) + more


def check_prime(prime, vocab, unknown="error", warn=print):
    """The prime with characters outside the vocabulary refused (unknown='error') or dropped with
    a warning (unknown='skip')."""
    missing = set(prime) - set(vocab)
    if not missing:
        return prime
    count = sum(ch in missing for ch in prime)
    if unknown != "skip":
        raise UserError(f"the prime has {count} character(s) not in the model's vocabulary: "
                        f"{show_chars(missing)}; remove them, or pass --unknown skip to drop them")
    warn(f"warning: dropped {count} character(s) of the prime not in the model's vocabulary: "
         f"{show_chars(missing)}")
    return "".join(ch for ch in prime if ch not in missing)


class StopMatcher:
    """Cuts generated text right after the first occurrence of any of the `stops` (a string or a
    list of them), also when it spans pieces: it keeps the last longest - 1 characters to search
    together with the next piece."""

    def __init__(self, stops):
        self.stops = [stops] if isinstance(stops, str) else [s for s in stops or () if s]
        self.keep, self.tail = max(map(len, self.stops), default=1) - 1, ""

    def cut(self, piece):
        """(the part of piece to emit, whether a stop string ended it)."""
        if not self.stops:
            return piece, False
        window = self.tail + piece
        ends = [at + len(stop) for stop in self.stops if (at := window.find(stop)) >= 0]
        if ends:
            return piece[:min(ends) - len(self.tail)], True
        self.tail = window[max(0, len(window) - self.keep):] if self.keep else ""
        return piece, False


def generate(stream, rng, length, prime="", temperature=1.0, top_k=0, greedy=False, stop=None, top_p=1.0):
    """Yield one sample as text pieces: the prime (whose characters must be in the vocabulary),
    then up to `length` generated characters, ending early right after `stop` if it appears.

    The prime warms the state from zero. Without one, the first character is drawn uniformly from
    the vocabulary (as char-rnn and torch-rnn do) and counts towards `length`.
    rng: a numpy Generator; all randomness comes from it, so a seed fixes the output.
    """
    stream.reset()
    stopper, remaining = StopMatcher(stop), length
    if prime:
        ids = stream.encode(prime)
        stream.feed(ids[:-1])
        x = int(ids[-1])
        yield prime
    elif remaining > 0:
        x = int(rng.integers(stream.config.vocab_size))
        remaining -= 1
        piece, done = stopper.cut(stream.decode([x]))
        yield piece
        if done:
            return
    size = CHUNK_MIN
    while remaining > 0:
        n = min(size, remaining)
        ids = stream.run(x, rng.random(n), temperature, top_k, greedy, top_p)
        x, remaining, size = int(ids[-1]), remaining - n, min(2 * size, CHUNK_MAX)
        piece, done = stopper.cut(stream.decode(ids))
        yield piece
        if done:
            return


# ---------------------------------------------------------------------------------------- command

def read_prime(prime, prime_file):
    """The prime text from --prime or --prime-file (UTF-8, read exactly: no newline translation)."""
    if prime is not None and prime_file is not None:
        raise UserError("give --prime or --prime-file, not both")
    if prime_file is None:
        return prime or ""
    try:
        with open(prime_file, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{prime_file}: no such file; check the --prime-file path") from None
    except IsADirectoryError:
        raise UserError(f"{prime_file}: is a directory; give --prime-file a text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{prime_file}: not valid UTF-8 at byte offset {e.start}; give --prime-file "
                        f"a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"{prime_file}: cannot read ({e.strerror}); check the --prime-file path") from None


def write_samples(out, params, config, seed, samples, length, prime="", precision="f32", **settings):
    """Write `samples` samples to the text stream `out` as they are generated, flushing each piece.
    Each sample ends with a newline; a blank line separates samples. `settings`: temperature,
    top_k, top_p, greedy, stop as in generate. seed None draws fresh entropy (every run differs)."""
    stream = Stream(params, config, precision)
    rng = np.random.Generator(np.random.PCG64(seed))
    for i in range(samples):
        if i:
            out.write("\n")
        for piece in generate(stream, rng, length, prime, **settings):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()


def kernels_cached(config, precision="f32"):
    """Whether the sampling kernels for this model are in Numba's disk cache (so no compile is coming)."""
    extra = (bf16.pack_rows,) if precision == "bf16" else ()
    return is_cached(stream_kernels.run_streams, *extra)
