"""Sampling against the plain-NumPy reference: the state a prime leaves, every draw (temperature,
top-k, argmax) replayed from the same uniforms, and the stream's behaviour (seeds, chunking,
stop strings, unknown characters, the command line)."""
import numpy as np
import pytest

from charlstm import sample
from charlstm.engine import stream_kernels
from charlstm.checkpoint import save_checkpoint
from charlstm.cli import cli
from charlstm.config import ModelConfig, TrainConfig
from charlstm.errors import UserError
from charlstm.model import param_count, views

from tests import reference
from tests.conftest import cli_runner

VOCAB = "\n\r !,.:?ACEMORabcdeghilmnorstuw"
H = 6


def make_model(layers=2, peepholes=True, dtype="float64", seed=0, scale=1.0, hidden=H):
    """Every parameter random (biases and peepholes too): a model with sharp, varied predictions."""
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype=dtype)
    rng = np.random.default_rng(seed)
    return rng.uniform(-scale, scale, param_count(config)).astype(dtype), config


def ref_logits(params, config, ids):
    """Reference logits (V,) after feeding ids from zero state, and the final h, c (L, H)."""
    p = {k: v.astype(np.float64) for k, v in views(params, config).items()}
    x = np.asarray(ids)[None, :]
    zero = np.zeros((config.layers, 1, config.hidden))
    _, (_, top, _), h, c = reference.forward(p, x, x, zero, zero, config.layers, config.peepholes)
    return top[-1][0] @ p["out.W"].T + p["out.b"], h[:, 0], c[:, 0]


def ref_sample(params, config, prime, length, seed, temperature=1.0, top_k=0, greedy=False, top_p=1.0):
    """The reference sampler: recompute the whole history each step, draw by inverse CDF with the
    same uniforms (one rng.random() per generated char, in order)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    ids = [VOCAB.index(ch) for ch in prime]
    for _ in range(length):
        logits, _, _ = ref_logits(params, config, ids)
        u = rng.random()
        if greedy:
            ids.append(int(np.argmax(logits)))
            continue
        order = np.arange(len(VOCAB))  # the CDF runs in id order, or over the top k, largest first
        if top_k or top_p < 1:
            order = np.argsort(-logits, kind="stable")[:top_k or None]  # ties: lower id first
        p = np.exp((logits[order] - logits[order].max()) / temperature)
        if top_p < 1:  # the nucleus: up to the first id whose running sum reaches top_p of the whole
            running = np.cumsum(p)
            p = p[:np.argmax(running >= top_p * running[-1]) + 1]
        ids.append(int(order[np.searchsorted(np.cumsum(p), u * p.sum(), side="right")]))
    return "".join(VOCAB[i] for i in ids)


def run(params, config, length, prime="", seed=0, **settings):
    stream = sample.Stream(params, config)
    return "".join(sample.generate(stream, np.random.default_rng(seed), length, prime, **settings))


# ---------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("team", [(1, 1), (3, 2)])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-4)])
@pytest.mark.parametrize("layers,peepholes", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("length", [40, 41])
def test_prime_leaves_the_reference_state(layers, peepholes, dtype, tol, team, length, team_of):
    """team (3, 2): each step's units (H = 37) cut into 3 shares on 2 threads, as the team runs
    them. An odd and an even number of steps (the kernel keeps two copies of the state).
    float32: one step is off by ~1e-7, and 40 steps through 3 random layers grow that to 2e-6
    (Numba 0.61 and later) or 2e-5 (Numba 0.60: LLVM 14 rounds otherwise, the one-step error alike)."""
    team_of(*team)
    params, config = make_model(layers, peepholes, dtype, hidden=37)
    ids = np.random.default_rng(1).integers(0, len(VOCAB), length)
    stream = sample.Stream(params, config)
    stream.feed(ids[:length // 2])
    stream.feed(ids[length // 2:])
    _, h, c = ref_logits(params, config, ids)
    # c grows with H (37 random inputs of up to 1 each: |c| ~ 15 here), so its float32 error is relative
    assert np.abs(stream.h - h).max() < tol and (np.abs(stream.c - c) / (1 + np.abs(c))).max() < tol


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.5}, {"temperature": 2.0}, {"top_k": 3},
                                      {"top_k": 1}, {"greedy": True}, {"top_k": 5, "temperature": 0.7}])
@pytest.mark.parametrize("team", [(1, 1), (2, 2), (3, 3)])
def test_draws_match_the_reference(settings, team, team_of):
    """float64, so every draw must be the reference's: temperature divides the logits, top-k keeps
    the k largest, argmax is greedy, the uniforms are consumed one per character in order; with the
    units (H = 37) on 1, 2 or 3 threads, which meet to hand on each drawn id."""
    team_of(*team)
    params, config = make_model(hidden=37)
    ours = run(params, config, 40, prime="ROMEO:", seed=7, **settings)
    assert ours == ref_sample(params, config, "ROMEO:", 40, 7, **settings)


def test_top_k_1_is_argmax():
    params, config = make_model(dtype="float32")
    greedy = run(params, config, 300, prime="a", greedy=True)
    assert run(params, config, 300, prime="a", seed=1, top_k=1) == greedy
    assert run(params, config, 300, prime="a", seed=3) != greedy


def test_top_k_draws_only_the_k_largest_with_ties_to_the_lower_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0, 2.0, -1.0])
    order, p = np.zeros(6, np.int64), np.zeros(6)
    assert stream_kernels.select_top(logits, 3, order, False) == 3 and list(order[:3]) == [1, 3, 4]
    assert stream_kernels.select_top(logits, 1, order, False) == 1 and order[0] == 1
    assert stream_kernels.select_top(logits, 6, order, False) == 6 and list(order) == list(range(6))
    drawn = {stream_kernels.draw(logits, 1.0, 2, 1.0, False, u, p, order) for u in np.linspace(0, 0.999, 50)}
    assert drawn == {1, 3}
    assert stream_kernels.draw(logits, 1.0, 0, 1.0, True, 0.5, p, order) == 1  # argmax: the first of the tie


@pytest.mark.parametrize("top_p, top_k", [(0.9, 0), (0.5, 0), (0.3, 5), (1e-9, 0)])
def test_top_p_against_the_reference(top_p, top_k):
    params, config = make_model(dtype="float64", scale=0.6)
    got = run(params, config, 80, prime="Ca", seed=4, top_p=top_p, top_k=top_k, temperature=0.9)
    assert got == ref_sample(params, config, "Ca", 80, 4, temperature=0.9, top_k=top_k, top_p=top_p)


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.1, 0.4, 0.05, 0.3, 0.15]))
    order, p = np.zeros(5, np.int64), np.zeros(5)
    us = np.linspace(0, 0.999, 200)
    assert {stream_kernels.draw(logits, 1.0, 0, 0.7, False, u, p, order) for u in us} == {1, 3}  # 0.4 + 0.3
    assert {stream_kernels.draw(logits, 1.0, 0, 0.71, False, u, p, order) for u in us} == {1, 3, 4}
    assert {stream_kernels.draw(logits, 1.0, 0, 0.01, False, u, p, order) for u in us} == {1}


def test_temperature_sharpens_and_flattens():
    """The frequency of the most likely character rises as the temperature falls."""
    logits = np.array([0.0, 1.0, 2.0])
    order, p = np.zeros(3, np.int64), np.zeros(3)
    us = np.random.default_rng(0).random(4000)
    share = {t: np.mean([stream_kernels.draw(logits, 1 / t, 0, 1.0, False, u, p, order) == 2 for u in us]) for t in (0.5, 1, 2)}
    assert share[0.5] > share[1] > share[2] > 1 / 3
    assert abs(share[1] - np.exp(2) / np.exp([0, 1, 2]).sum()) < 0.03
    assert {stream_kernels.draw(logits, 1e4, 0, 1.0, False, u, p, order) for u in us} == {2}  # near zero: argmax


# ---------------------------------------------------------------------------------- the stream

@pytest.mark.parametrize("dtype, precision, hidden", [("float32", "f32", 21), ("float64", "f32", 21),
                                                      ("float32", "bf16", 21), ("float32", "bf16", 22)])
def test_streams_stepped_together_give_each_the_text_it_gets_alone(dtype, precision, hidden):
    """Five streams of one batch (other primes, seeds and settings, joining at other calls) draw
    exactly the ids each draws alone: a stream's arithmetic does not depend on its neighbours.
    H not a multiple of the lanes; in bfloat16 an odd H runs Widen, an even one the machine's product."""
    params, config = make_model(dtype=dtype, hidden=hidden)
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(top_p=0.8), dict(greedy=True),
                dict(temperature=1.3, top_k=2, top_p=0.9)]
    primes = ["Ca", "RO", "a", "Come, ", "b"]
    n, B = 40, len(settings)
    alone = []
    for b in range(B):
        stream, rng = sample.Stream(params, config, precision), np.random.default_rng(b)
        stream.feed(stream.encode(primes[b][:-1]))
        alone.append(stream.run(stream.encode(primes[b])[-1], rng.random(n), **settings[b]))
    batch = sample.Streams(params, config, precision, capacity=8)
    ids, u = np.full((B, n + 6), -1, np.int64), np.full((B, n + 6), -1.0)
    for b in range(B):  # each prime fed in the batch, its draws start after its last char
        p = batch.encode(primes[b])
        ids[b, :len(p)] = p
        u[b, len(p) - 1:len(p) - 1 + n] = np.random.default_rng(b).random(n)
    how = [[1 / s.get("temperature", 1.0) for s in settings], [s.get("top_k", 0) for s in settings],
           [s.get("top_p", 1.0) for s in settings], [s.get("greedy", False) for s in settings]]
    first = batch.step(ids[:, :3], u[:, :3], *how)
    rest = ids[:, 3:].copy()
    rest[:, 0] = np.where(rest[:, 0] < 0, first[:, -1], rest[:, 0])  # a call starts from the id drawn last
    out = np.concatenate([first, batch.step(rest, u[:, 3:], *how)], axis=1)
    for b in range(B):
        drawn = out[b][out[b] >= 0]
        assert list(drawn[:n]) == list(alone[b]), b


def test_same_seed_same_text_other_seed_other_text():
    params, config = make_model(dtype="float32")
    assert run(params, config, 500, seed=5) == run(params, config, 500, seed=5)
    assert run(params, config, 500, seed=5) != run(params, config, 500, seed=6)


def test_output_does_not_depend_on_chunk_sizes(monkeypatch):
    params, config = make_model(dtype="float32")
    whole = run(params, config, 700, prime="Ca", seed=9, top_k=4)
    monkeypatch.setattr(sample, "CHUNK_MIN", 1)
    monkeypatch.setattr(sample, "CHUNK_MAX", 3)
    assert run(params, config, 700, prime="Ca", seed=9, top_k=4) == whole


def test_length_counts_generated_chars_and_the_prime_comes_first():
    params, config = make_model(dtype="float32")
    for prime, length in [("", 0), ("", 1), ("", 300), ("ROMEO:", 0), ("ROMEO:", 3000)]:
        text = run(params, config, length, prime=prime)
        assert text.startswith(prime) and len(text) == len(prime) + length


def test_generate_streams_in_bounded_pieces():
    """A near-endless sample yields its first pieces at once, none longer than CHUNK_MAX."""
    params, config = make_model(dtype="float32")
    pieces = sample.generate(sample.Stream(params, config), np.random.default_rng(0), 10**12, "Ca")
    first = [next(pieces) for _ in range(8)]
    assert first[0] == "Ca" and all(len(p) <= sample.CHUNK_MAX for p in first)


def test_stop_ends_right_after_the_first_occurrence_also_across_chunks(monkeypatch):
    monkeypatch.setattr(sample, "CHUNK_MIN", 2)
    monkeypatch.setattr(sample, "CHUNK_MAX", 5)
    params, config = make_model(dtype="float32", scale=0.3)
    full = run(params, config, 400, prime="ab", seed=4)
    generated = full[2:]
    for start, size in [(0, 1), (3, 2), (10, 3), (40, 4), (97, 6)]:
        stop = generated[start:start + size]
        end = generated.index(stop) + len(stop)
        assert run(params, config, 400, prime="ab", seed=4, stop=stop) == "ab" + generated[:end]
    assert run(params, config, 400, prime="ab", seed=4, stop="\x00never") == full
    primed = run(params, config, 400, prime="ROMEO:", seed=4)
    assert "ROMEO" not in primed[6:]
    assert run(params, config, 400, prime="ROMEO:", seed=4, stop="ROMEO") == primed  # the prime is not searched


def test_stop_matcher_across_pieces():
    m = sample.StopMatcher("abc")
    assert m.cut("xxa") == ("xxa", False)
    assert m.cut("b") == ("b", False)
    assert m.cut("cdef") == ("c", True)
    m = sample.StopMatcher("abcd")  # pieces shorter than the stop string
    assert [m.cut(p) for p in ("a", "b", "c", "dz")] == [("a", False), ("b", False), ("c", False), ("d", True)]
    m = sample.StopMatcher(["zz", "xb", "bc"])  # several: the one that ends first
    assert m.cut("axbcz") == ("axb", True)


def test_unknown_prime_characters():
    with pytest.raises(UserError) as e:
        sample.check_prime("Zebra ß!", VOCAB)
    assert "'Z'" in str(e.value) and "'ß'" in str(e.value) and "--unknown skip" in str(e.value)
    warnings = []
    assert sample.check_prime("Zebra ß!", VOCAB, "skip", warnings.append) == "ebra !"
    assert len(warnings) == 1 and "2 character(s)" in warnings[0]
    assert sample.check_prime("bread", VOCAB) == "bread"


def test_a_second_run_compiles_nothing_new():
    for dtype in ("float32", "float64"):
        run(*make_model(dtype=dtype), 10, prime="ab", top_k=2)
    used = [stream_kernels.run_streams, stream_kernels.output_logits, stream_kernels.draw, stream_kernels.select_top]
    counts = [len(k.signatures) for k in used]
    for dtype in ("float32", "float64"):
        run(*make_model(dtype=dtype, seed=1), 10, prime="abc", greedy=True)
        run(*make_model(dtype=dtype, layers=1, peepholes=False), 10)
    assert counts == [len(k.signatures) for k in used]
    # run_streams: one float32 and one float64 specialization (bfloat16's, uint16 weights, come from other tests)
    assert sum("uint16" not in str(sig) for sig in stream_kernels.run_streams.signatures) == 2


# ---------------------------------------------------------------------------------- command line

@pytest.fixture
def checkpoint(tmp_path):
    params, config = make_model(dtype="float32", scale=0.5)
    path = tmp_path / "model.npz"
    train = TrainConfig()
    state = np.zeros((config.layers, train.batch_size, H), np.float32)
    save_checkpoint(path, {"model": config.to_dict(), "train": train.to_dict()}, params, np.zeros_like(params),
                    state, state)
    return path, params, config


def invoke(*args):
    """Run `charlstm sample`; result.out is stdout exactly (click's .stdout turns \r\n into \n)."""
    result = cli_runner().invoke(cli, ["sample", *map(str, args)], catch_exceptions=False)
    result.out = result.stdout_bytes.decode()
    return result


def test_cli_sample(checkpoint, tmp_path):
    path, params, config = checkpoint
    result = invoke(path, "--length", 200, "--seed", 3, "--prime", "ROMEO:", "--top-k", 5, "-t", 0.8)
    assert result.exit_code == 0, result.output
    assert result.out == run(params, config, 200, "ROMEO:", seed=3, top_k=5, temperature=0.8) + "\n"
    assert invoke(path, "--length", 200, "--seed", 3, "--prime", "ROMEO:", "--top-k", 5, "-t", 0.8).out == result.out
    assert invoke(path, "--length", 200).out != invoke(path, "--length", 200).out  # no seed: fresh
    prime_file = tmp_path / "prime.txt"
    prime_file.write_bytes("ROMEO:\r\n".encode())
    result = invoke(path, "--prime-file", prime_file, "--length", 5, "--seed", 1)
    assert result.out.startswith("ROMEO:\r\n") and len(result.out) == 8 + 5 + 1  # read exactly as written


def test_cli_samples_are_separated_by_a_blank_line(checkpoint):
    path, params, config = checkpoint
    result = invoke(path, "--samples", 3, "--length", 30, "--seed", 2, "--prime", "a")
    stream, rng = sample.Stream(params, config), np.random.default_rng(2)
    expected = ["".join(sample.generate(stream, rng, 30, "a")) for _ in range(3)]
    assert result.out == "\n\n".join(expected) + "\n"
    assert len(set(expected)) == 3


def test_cli_stop(checkpoint):
    path, params, config = checkpoint
    generated = run(params, config, 300, "a", seed=1)[1:]
    stop = generated[50:52]
    result = invoke(path, "--prime", "a", "--seed", 1, "--length", 300, "--stop", stop)
    assert result.out == "a" + generated[:generated.index(stop) + 2] + "\n"


@pytest.mark.parametrize("args,words", [
    (["--prime", "Zebra"], ["'Z'", "vocabulary", "--unknown skip"]),
    (["--prime", "a", "--prime-file", "x"], ["--prime-file", "not both"]),
    (["--prime-file", "/nonexistent/prime.txt"], ["no such file"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--stop", ""], ["--stop"]),
])
def test_cli_sample_errors_are_one_line(checkpoint, args, words):
    result = invoke(checkpoint[0], *args)
    assert result.exit_code != 0 and result.out == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and all(w in lines[0] for w in words), result.stderr


def test_cli_unknown_skip_warns_and_samples(checkpoint):
    result = invoke(checkpoint[0], "--prime", "Zebra", "--unknown", "skip", "--length", 10, "--seed", 0)
    assert result.exit_code == 0 and result.out.startswith("ebra") and len(result.out) == 4 + 10 + 1
    assert "warning" in result.stderr and "'Z'" in result.stderr
