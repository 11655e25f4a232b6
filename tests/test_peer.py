"""The PyTorch peer (benchmarks/peer_torch.py) does charlstm's job, so comparisons are fair: the same
vocabulary and split as charlstm.data, the same window at every step as charlstm.data.Batcher, the
same dropout ramp as charlstm.schedule, and a validation loss equal to charlstm's own on the same
weights; its three modes run and print what benchmarks/vs_peer.py and the docs read. Needs torch
(the `bench` extra); without it the module is skipped."""
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from charlstm.config import ModelConfig, TrainConfig  # noqa: E402
from charlstm.data import Batcher, load_corpus, split  # noqa: E402
from charlstm.model import init_params  # noqa: E402
from charlstm.schedule import dropout_at, lr_at  # noqa: E402
from charlstm.validate import VAL_MAX_CHARS, validation_loss  # noqa: E402

from tests.conftest import SHAKESPEARE_HEAD, TINY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "benchmarks" / "peer_torch.py"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peer = load_script("peer_torch")


@pytest.fixture
def odd_corpus(tmp_path):
    """Text with CRLF line ends and characters beyond ASCII, whose ids a newline-translating or
    byte-based reader would get wrong."""
    path = tmp_path / "odd.txt"
    path.write_bytes((SHAKESPEARE_HEAD.replace("\n", "\r\n") + "café — naïve ☃\n").encode("utf-8") * 4)
    return path


def test_vocab_and_split_are_charlstms(odd_corpus, tmp_path):
    corpus = load_corpus(str(odd_corpus), str(tmp_path / "cache"))
    for val_frac in (0.05, 0.1, 0.0):
        train_ids, val_ids, vocab = peer.load(odd_corpus, val_frac)
        n_train, n_val = split(len(corpus.ids), val_frac)
        assert vocab == corpus.vocab
        np.testing.assert_array_equal(train_ids, corpus.ids[:n_train])
        np.testing.assert_array_equal(val_ids, corpus.ids[n_train:])


@pytest.mark.parametrize("B, T", [(4, 8), (3, 7), (1, 16)])
def test_every_step_reads_batchers_window(odd_corpus, tmp_path, B, T):
    ids = load_corpus(str(odd_corpus), str(tmp_path / "cache")).ids
    batcher = Batcher(ids, B, T)
    x, y = peer.streams(np.asarray(ids, dtype=np.int64), B)
    for step in range(2 * batcher.windows_per_epoch + 3):  # across two epoch ends
        inputs, targets, k = peer.window(x, y, step, T)
        want_x, want_y = batcher.window(step % batcher.windows_per_epoch)
        assert k == step % batcher.windows_per_epoch
        np.testing.assert_array_equal(inputs.numpy(), want_x)
        np.testing.assert_array_equal(targets.numpy(), want_y)


def test_dropout_ramp_is_charlstms():
    cfg = TrainConfig(dropout=0.3, dropout_warmup=2.5)
    args = SimpleNamespace(dropout=0.3, dropout_warmup=2.5)
    for step in (0, 1, 17, 99, 100, 101, 1000):
        assert peer.dropout_at(args, step, 40) == pytest.approx(dropout_at(cfg, step, 40), abs=1e-15)


def test_lr_schedule_is_charlstms():
    """The peer's defaults are charlstm train's schedule; torch-rnn's steps too."""
    defaults = peer.parser().parse_args(["train", "corpus.txt"])
    every = peer.parser().parse_args(["train", "corpus.txt", "--lr-decay", "0.5", "--lr-decay-every", "3"])
    for epoch in range(20):
        assert peer.lr_at(defaults, epoch) == pytest.approx(lr_at(TrainConfig(), epoch), rel=1e-15)
        want = lr_at(TrainConfig(lr_decay=0.5, lr_decay_after=None, lr_decay_every=3), epoch)
        assert peer.lr_at(every, epoch) == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("n_val", [1003, 50])
def test_one_stream_validation_is_charlstms_on_the_same_weights(n_val):
    """Random fan-in weights, loaded through score_like_peer (export's mapping): the peer's
    evaluate() with one stream must score what charlstm's validation scores, the last partial
    window included."""
    config = ModelConfig("".join(chr(c) for c in range(97, 97 + 19)), hidden=16, layers=2)
    params = init_params(config, np.random.default_rng(3), "fan-in")
    val_ids = np.random.default_rng(4).integers(config.vocab_size, size=n_val)
    model = load_script("score_like_peer").peer_model(peer, params, config)
    want, chars = validation_loss(params, config, val_ids)
    assert chars == n_val - 1
    assert peer.evaluate(model, val_ids, 1, 50) == pytest.approx(want, abs=2e-6)
    assert peer.VAL_MAX_CHARS == VAL_MAX_CHARS


def run_peer(*args):
    result = subprocess.run([sys.executable, str(PEER), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_validates_samples_and_stops(corpus):
    out = run_peer("train", corpus, "--hidden", 12, "--layers", 2, "--batch-size", 4, "--seq-length", 8,
                   "--max-steps", 6, "--eval-every", 3, "--threads", 1, "--warmup", 1)
    steps = [int(s) for s in re.findall(r"^step=(\d+) val_loss_nats=", out, re.M)]
    assert steps == [3, 6, 6]  # two validations, then the final report
    losses = [float(v) for v in re.findall(r"val_loss_nats=([\d.]+)", out)]
    assert all(0 < v < 2 * math.log(40) for v in losses)
    assert losses[1] == losses[2]  # the final report scores the same weights
    samples = re.findall(r"--- sample at step \d+ \(temperature 0.8\) ---\n(.*?)\n---\n", out, re.S)
    vocab = set(corpus.read_text(encoding="utf-8"))
    assert len(samples) == 2 and all(len(s) == 200 and set(s) <= vocab for s in samples)
    assert re.search(r"chars_seen=160 chars_per_s=[\d.]+$", out.strip())  # 5 timed steps of 4 x 8


def test_speed_and_sample_print_what_vs_peer_reads(corpus):
    assert re.fullmatch(r"chars_per_s=[\d.]+\n", run_peer("speed", corpus, "--hidden", 12, "--batch", 4, "--seq", 8,
                                                          "--layers", 1, "--steps", 3, "--threads", 1))
    assert re.fullmatch(r"sample_chars_per_s=[\d.]+\n", run_peer("sample", corpus, "--hidden", 12, "--length", 60,
                                                                 "--threads", 1))


def test_score_like_peer_reproduces_charlstms_validation(run_cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE_HEAD * 6, encoding="utf-8")
    result = run_cli("train", corpus, *TINY, "--steps", 10, "--out", tmp_path, "--run", "r", "--quiet")
    assert result.exit_code == 0, result.output
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_like_peer.py"), tmp_path / "r" / "latest.npz",
                          "--corpus", corpus, "--streams", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ours, theirs = re.search(r"\(1 streams x 50\): ([\d.]+) nats .* own validation: ([\d.]+)", out.stdout).groups()
    assert abs(float(ours) - float(theirs)) <= 2e-4  # both printed to 4 decimals
