"""Dynamic evaluation (dynamic.py, gradient_scale.py): each segment's update against the rule
computed in NumPy from the reference's gradients (float64), the static score it must equal with
zero rates, the same bytes on any thread count and in any run, and the commands `eval --dynamic`
and `sample --adapt` (options, errors, a checkpoint only read)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from charlstm import dynamic, gradient_scale
from charlstm.checkpoint import load_checkpoint, save_checkpoint
from charlstm.cli import cli
from charlstm.config import DynamicConfig, ModelConfig, TrainConfig
from charlstm.model import param_count, views

from tests import reference
from tests.conftest import cli_runner
from tests.test_bad_input import one_line_error

TEXT = """MIRANDA:
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.

PROSPERO:
Be collected: no more amazement.
"""
VOCAB = "".join(sorted(set(TEXT)))


def make_model(layers=2, peepholes=True, dtype="float64", hidden=6, seed=0):
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype=dtype)
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, param_count(config)).astype(dtype), config


def random_rms(config, seed=1):
    """A gradient scale spread over two orders of magnitude, so lambda * RMS / mean(RMS) is clipped
    at 1 for some parameters and not for others."""
    rng = np.random.default_rng(seed)
    return np.exp(rng.normal(-4.0, 1.5, param_count(config)))


def ids_of(text):
    return np.array([VOCAB.index(ch) for ch in text], dtype=np.int32)


def reference_segment(p, x_ids, y_ids, h, c, config):
    """The reference's loss, flat gradient and final state for one segment from state h, c."""
    x, y = x_ids[None, :], y_ids[None, :]
    loss, cache, h1, c1 = reference.forward(p, x, y, h, c, config.layers, config.peepholes)
    grads = reference.backward(p, cache, y, config.layers, config.peepholes)
    flat = np.zeros(param_count(config))
    for name, view in views(flat, config).items():
        view[...] = grads[name]
    return loss, flat, h1, c1


@pytest.mark.parametrize("lam", [0.3, 0.0])
@pytest.mark.parametrize("peepholes", [False, True])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_each_segments_update_is_the_rule_on_the_references_gradients(layers, peepholes, lam):
    """Two segments of n = 7: after each, theta = theta - eta * g / (RMS + eps) + lambda * decrate *
    (theta_0 - theta) with decrate = min(RMS / mean(RMS), 1 / lambda), g the reference's gradient
    of the segment's mean loss at the weights it was scored with, from the state the segment
    before left (the second update is the first to pull back towards theta_0)."""
    params, config = make_model(layers, peepholes)
    rms, n = random_rms(config), 7
    settings = DynamicConfig(n, eta=0.05, lam=lam, eps=1e-3)
    decrate = np.minimum(rms / rms.mean(), 1 / lam) if lam else 0.0
    assert not lam or ((decrate == 1 / lam).any() and (decrate < 1 / lam).any())
    ids = ids_of(TEXT[:2 * n + 1])
    segments = dynamic.Segments(params.copy(), config, n, dynamic.Rule(settings, rms, params))

    theta0, theta = params.copy(), params.copy()
    h = c = np.zeros((layers, 1, config.hidden))
    losses = []
    for k, fed in enumerate((ids[:n + 1], ids[n + 1:])):
        segments.feed(fed)
        seg = ids[k * n:(k + 1) * n + 1]
        loss, g, h, c = reference_segment(views(theta, config), seg[:-1], seg[1:], h, c, config)
        theta = theta - settings.eta * g / (rms + settings.eps) + settings.lam * decrate * (theta0 - theta)
        losses.append(loss)
        assert np.max(np.abs(segments.params - theta)) < 1e-10, k
        assert abs(segments.score() - np.mean(losses)) < 1e-10
        assert np.max(np.abs(segments.h[:, 0] - h[:, 0])) < 1e-10
    assert np.max(np.abs(theta - theta0)) > 1e-3  # the updates did something


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_rates_give_the_static_score_exactly(dtype):
    """eta = lambda = 0: the dynamic pass (backward and update run) scores the same bytes as the
    static pass, and the weights do not move. The static score is the reference's (float64) and
    eval's without --dynamic."""
    from charlstm.evaluate import Scorer

    params, config = make_model(2, True, dtype, hidden=37)
    ids = ids_of(TEXT * 3)
    settings = DynamicConfig(segment=11, eta=0.0, lam=0.0)
    static, after_static = dynamic.run_ids(params, config, ids, settings)
    moving, after = dynamic.run_ids(params, config, ids, settings, random_rms(config))
    assert static.score.nats_per_char == moving.score.nats_per_char and static.score.chars == len(ids) - 1
    assert after.tobytes() == params.tobytes() == after_static.tobytes()
    scorer = Scorer(params, config)
    scorer.feed(ids)
    assert abs(static.score.nats_per_char - scorer.score()) < (1e-12 if dtype == "float64" else 1e-5)
    if dtype == "float64":
        p = views(params, config)
        zero = np.zeros((2, 1, 37))
        loss, *_ = reference.forward(p, ids[None, :-1], ids[None, 1:], zero, zero, 2, True)
        assert abs(static.score.nats_per_char - loss) < 1e-10


def test_dynamic_evaluation_learns_a_repeated_text():
    """A text read twice: the second reading scores better than the static model once the model
    has learnt from the first (what dynamic evaluation is for)."""
    params, config = make_model(1, False, "float32", hidden=16)
    ids = ids_of(TEXT * 4)
    settings = DynamicConfig(segment=20, eta=0.01, lam=0.0)
    static, _ = dynamic.run_ids(params, config, ids, settings)
    moving, _ = dynamic.run_ids(params, config, ids, settings, np.full(param_count(config), 0.01))
    assert moving.score.nats_per_char < static.score.nats_per_char - 0.3


def test_same_bytes_on_one_thread_and_on_several(team_of, monkeypatch):
    """Units (H = 37: 3 blocks of 16 floats) and the update's parameters (SHARE = 1000) cut in
    3 shares, run on 1, 2 and 3 threads: the same weights and scores, byte for byte."""
    monkeypatch.setattr(dynamic, "SHARE", 1000)
    params, config = make_model(2, True, "float32", hidden=37)
    ids = ids_of(TEXT * 2)
    settings = DynamicConfig(segment=13, eta=0.01, lam=0.05)
    results = []
    for size in (1, 2, 3):
        team_of(3, size)
        result, theta = dynamic.run_ids(params, config, ids, settings, random_rms(config))
        results.append((result.score.nats_per_char, theta.tobytes()))
    assert results[0] == results[1] == results[2]
    assert results[0][1] != params.tobytes()


def test_the_gradient_scale_measured_on_text_is_the_rms_of_the_segments_gradients(tmp_path):
    """gradient_scale.from_text: sqrt(mean over segments of g * g), g from the reference, three
    segments of 9 (the last shorter), and no more characters than asked for."""
    params, config = make_model(2, False)
    path = tmp_path / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    ckpt = write_checkpoint(tmp_path / "model.npz", params, config)
    chars, n = 25, 9
    rms, words = gradient_scale.from_text(load_checkpoint(ckpt), path, n, chars=chars, progress=False)
    ids = ids_of(TEXT[:chars])
    h = c = np.zeros((2, 1, config.hidden))
    squares = []
    for start in range(0, chars - 1, n):
        seg = ids[start:start + n + 1]
        _, g, h, c = reference_segment(views(params, config), seg[:-1], seg[1:], h, c, config)
        squares.append(g * g)
    assert len(squares) == 3 and "24 characters" in words
    assert np.max(np.abs(rms - np.sqrt(np.mean(squares, axis=0)))) < 1e-12


@pytest.mark.parametrize("optim,expected", [
    ("rmsprop", lambda s, step: np.sqrt(s["rmsprop"])),
    ("adam", lambda s, step: np.sqrt(s["adam_v"] / (1 - 0.999 ** step))),
    ("adagrad", lambda s, step: np.sqrt(s["adagrad"] / step)),
])
def test_the_gradient_scale_from_the_optimizers_state(tmp_path, optim, expected):
    params, config = make_model(1, False)
    rng = np.random.default_rng(3)
    state = {name: rng.uniform(0, 1e-4, params.size) for name in {"rmsprop": ["rmsprop"], "adam": ["adam_m", "adam_v"],
                                                                   "adagrad": ["adagrad"]}[optim]}
    ckpt = write_checkpoint(tmp_path / "model.npz", params, config, optim, state, step=40)
    rms, words = gradient_scale.from_checkpoint(load_checkpoint(ckpt), ckpt)
    assert np.max(np.abs(rms - expected(state, 40))) < 1e-15 and optim[:4] in words.lower()


# ---------------------------------------------------------------------------------- command line

def write_checkpoint(path, params, config, optim="rmsprop", state=None, step=100):
    """A checkpoint of the model; its optimizer state random (a usable gradient scale) unless given."""
    train = TrainConfig(optim=optim, batch_size=2)
    if state is None:
        names = {"rmsprop": ["rmsprop"], "adam": ["adam_m", "adam_v"], "adagrad": ["adagrad"]}[optim]
        state = {name: random_rms(config, seed=5).astype(config.dtype) ** 2 for name in names}
    zeros = np.zeros((config.layers, 2, config.hidden), config.dtype)
    save_checkpoint(path, {"model": config.to_dict(), "train": train.to_dict(), "step": step}, params,
                    {k: v.astype(config.dtype) for k, v in state.items()}, zeros, zeros)
    return path


@pytest.fixture
def model_files(tmp_path):
    params, config = make_model(2, False, "float32", hidden=12)
    ckpt = write_checkpoint(tmp_path / "model.npz", params, config)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    return ckpt, text


def invoke(*args):
    return cli_runner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_eval_dynamic_reports_both_scores_and_reads_the_checkpoint_only(model_files):
    ckpt, text = model_files
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    result = invoke("eval", ckpt, text, "--dynamic", "--json", "--segment", 16, "--eta", 0.01, "--lambda", 0.02)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["chars"] == 2 * len(TEXT) - 1 and (out["segment"], out["eta"], out["lambda"]) == (16, 0.01, 0.02)
    for name in ("static", "dynamic"):
        assert set(out[name]) == {"nats_per_char", "bits_per_char", "perplexity", "seconds"}
        assert out[name]["bits_per_char"] == pytest.approx(out[name]["nats_per_char"] / math.log(2))
    plain = json.loads(invoke("eval", ckpt, text, "--json").stdout)
    assert abs(out["static"]["nats_per_char"] - plain["nats_per_char"]) < 1e-5
    assert out["dynamic"]["nats_per_char"] != out["static"]["nats_per_char"]
    words = invoke("eval", ckpt, text, "--dynamic", "--segment", 16).stdout
    assert "static" in words and "dynamic" in words and "seconds" in words and "RMSprop" in words
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before


def test_cli_eval_dynamic_with_zero_rates_prints_the_static_score_twice(model_files):
    ckpt, text = model_files
    out = json.loads(invoke("eval", ckpt, text, "--dynamic", "--json", "--eta", 0, "--lambda", 0).stdout)
    assert out["static"]["nats_per_char"] == out["dynamic"]["nats_per_char"]


def test_cli_eval_dynamic_is_the_same_in_every_run_and_on_any_thread_count(model_files):
    """Two processes, on 1 thread and on 2: the same scores, to the last bit."""
    ckpt, text = model_files
    scores = []
    for threads in (1, 2):
        result = subprocess.run([sys.executable, "-m", "charlstm", "eval", str(ckpt), str(text), "--dynamic", "--json",
                                 "--segment", "10", "--eta", "0.02", "--threads", str(threads)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        scores.append((out["static"]["nats_per_char"], out["dynamic"]["nats_per_char"]))
    assert scores[0] == scores[1]


def test_cli_sample_adapt(model_files):
    """--adapt: the same sample as without it when the rates are zero; another with a step; the
    checkpoint is only read; what it did is said on stderr."""
    ckpt, text = model_files
    before = (ckpt.read_bytes(), ckpt.stat().st_mtime_ns)
    args = ("sample", ckpt, "--seed", 3, "--length", 200, "--prime", "MIRANDA:")
    plain = invoke(*args)
    still = invoke(*args, "--adapt", text, "--eta", 0, "--lambda", 0)
    moved = invoke(*args, "--adapt", text, "--eta", 0.05, "--segment", 20)
    again = invoke(*args, "--adapt", text, "--eta", 0.05, "--segment", 20)
    assert plain.exit_code == still.exit_code == moved.exit_code == 0, moved.output
    assert still.stdout == plain.stdout and moved.stdout != plain.stdout and moved.stdout == again.stdout
    assert moved.stdout.startswith("MIRANDA:") and "adapted to" in moved.stderr
    assert (ckpt.read_bytes(), ckpt.stat().st_mtime_ns) == before


@pytest.mark.parametrize("args,words", [
    (["--eta", "-0.1"], ["'--eta'", "x>=0"]),
    (["--segment", "0"], ["'--segment'", "x>=1"]),
    (["--lambda", "1"], ["'--lambda'", "0<=x<1"]),
    (["--lambda", "-0.5"], ["'--lambda'"]),
])
@pytest.mark.parametrize("command", ["eval", "sample"])
def test_bad_dynamic_options_are_one_usage_line(model_files, command, args, words):
    ckpt, text = model_files
    full = ["eval", ckpt, text, "--dynamic"] if command == "eval" else ["sample", ckpt, "--adapt", text]
    one_line_error(invoke(*full, *args), *words, code=2)


@pytest.mark.parametrize("full,words", [
    (["eval", "{ckpt}", "{text}", "--eta", "0.1"], ["--eta is an option of --dynamic"]),
    (["sample", "{ckpt}", "--lambda", "0.1"], ["--lambda is an option of --adapt"]),
    (["sample", "{ckpt}", "--rms-text", "{text}"], ["--rms-text is an option of --adapt"]),
])
def test_dynamic_options_without_dynamic_are_one_usage_line(model_files, full, words):
    ckpt, text = model_files
    one_line_error(invoke(*[a.format(ckpt=ckpt, text=text) for a in full]), *words, code=2)


def test_a_checkpoint_without_a_gradient_scale_says_how_to_get_one(tmp_path, model_files):
    """An optimizer state of zeros (a run saved before its first step): one line naming --rms-text;
    with --rms-text it runs."""
    _, text = model_files
    params, config = make_model(2, False, "float32", hidden=12)
    ckpt = write_checkpoint(tmp_path / "fresh.npz", params, config, state={"rmsprop": np.zeros_like(params)}, step=0)
    for args in (["eval", ckpt, text, "--dynamic"], ["sample", ckpt, "--adapt", text]):
        one_line_error(invoke(*args), "no gradient scale", "--rms-text", code=1)
    result = invoke("eval", ckpt, text, "--dynamic", "--rms-text", text, "--json")
    assert result.exit_code == 0, result.output
    assert "characters of" in json.loads(result.stdout)["rms"]


def test_diverging_steps_are_one_line(model_files):
    ckpt, text = model_files
    one_line_error(invoke("eval", ckpt, text, "--dynamic", "--eta", 1e6, "--segment", 5), "smaller --eta", code=1)


def test_a_second_model_compiles_nothing_new():
    """Dynamic passes over models of other shapes (layers, peepholes) in a dtype already seen
    reuse the compiled kernels: one specialization per dtype."""
    def run(layers, peepholes, dtype, lam):
        params, config = make_model(layers, peepholes, dtype, hidden=7, seed=layers)
        dynamic.run_ids(params, config, ids_of(TEXT[:40]), DynamicConfig(9, 0.01, lam), random_rms(config))

    for dtype in ("float32", "float64"):
        run(2, True, dtype, 0.1)
        run(2, True, dtype, 0.0)
    used = [dynamic.descend, dynamic.descend_and_pull]
    counts = [len(k.signatures) for k in used]
    for dtype in ("float32", "float64"):
        run(1, False, dtype, 0.1)
        run(3, True, dtype, 0.0)
    assert counts == [len(k.signatures) for k in used] == [2, 2]
