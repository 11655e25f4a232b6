"""Scoring a file against an independent float64 forward pass (tests/reference.py): the mean over
positions 2..N of -log p(char | all earlier chars), from zero state, whatever the windows, the
pieces the ids arrive in, or the chunks the file is read in."""
import json
import math

import numpy as np
import pytest

from charlstm import evaluate
from charlstm.engine import stream_kernels
from charlstm.checkpoint import save_checkpoint
from charlstm.cli import cli
from charlstm.config import ModelConfig, TrainConfig
from charlstm.errors import UserError
from charlstm.model import param_count, views

from tests import reference
from tests.conftest import cli_runner

TEXT = """ROMEO:
Is the day so young?

BENVOLIO:
But new struck nine. Où est la lumière, é?
"""
VOCAB = "".join(sorted(set(TEXT)))
H = 6


def make_model(layers=2, peepholes=True, dtype="float32", seed=0, hidden=H):
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype=dtype)
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, param_count(config)).astype(dtype), config


def ref_nats(params, config, text):
    """The float64 reference: mean -log p over positions 2..N of text, from zero state."""
    p = {k: v.astype(np.float64) for k, v in views(params, config).items()}
    ids = np.array([VOCAB.index(ch) for ch in text])
    zero = np.zeros((config.layers, 1, config.hidden))
    loss, *_ = reference.forward(p, ids[None, :-1], ids[None, 1:], zero, zero, config.layers, config.peepholes)
    return loss


def write_checkpoint(path, params, config):
    train = TrainConfig()
    state = np.zeros((config.layers, train.batch_size, H), config.dtype)
    save_checkpoint(path, {"model": config.to_dict(), "train": train.to_dict()}, params, np.zeros_like(params),
                    state, state)
    return path


@pytest.mark.parametrize("team", [(1, 1), (3, 2)])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("layers,peepholes", [(1, False), (2, True), (3, False)])
def test_scorer_matches_the_reference_across_windows_and_pieces(layers, peepholes, dtype, tol, team, team_of):
    """team (3, 2): each step's units (H = 37) cut into 3 shares on 2 threads, as the team runs them."""
    team_of(*team)
    params, config = make_model(layers, peepholes, dtype, hidden=37)
    text = TEXT * 3
    ids = np.array([VOCAB.index(ch) for ch in text])
    expected = ref_nats(params, config, text)
    for window, pieces in [(1024, 1), (7, 1), (5, 9), (1, 3)]:
        scorer = evaluate.Scorer(params, config, window=window)
        for piece in np.array_split(ids, pieces):
            scorer.feed(piece)
        assert scorer.count == len(text) - 1
        assert abs(scorer.score() - expected) < tol, (window, pieces)


def test_file_score_matches_the_reference_whatever_the_read_chunks(tmp_path, monkeypatch):
    params, config = make_model()
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 5, encoding="utf-8")
    expected = ref_nats(params, config, TEXT * 5)
    score = evaluate.evaluate_file(params, config, path, progress=False)
    assert score.chars == len(TEXT) * 5 - 1 and abs(score.nats_per_char - expected) < 1e-4
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 7)  # cuts inside 'é' and 'ù' (two bytes in UTF-8)
    monkeypatch.setattr(evaluate, "FEED", 5)
    again = evaluate.evaluate_file(params, config, path, progress=False)
    assert again.chars == score.chars and abs(again.nats_per_char - score.nats_per_char) < 1e-6


def test_unknown_characters_are_listed_or_skipped(tmp_path):
    params, config = make_model()
    path = tmp_path / "text.txt"
    path.write_text("ZROMEO: \tjoy Zé", encoding="utf-8")
    with pytest.raises(UserError) as e:
        evaluate.evaluate_file(params, config, path, progress=False)
    assert "4 character(s)" in str(e.value) and "'\\t' 'Z' 'j'" in str(e.value) and "--unknown skip" in str(e.value)
    warnings = []
    score = evaluate.evaluate_file(params, config, path, unknown="skip", progress=False, warn=warnings.append)
    kept = "ROMEO: oy é"
    assert score.skipped == 4 and score.chars == len(kept) - 1 and len(warnings) == 1
    assert abs(score.nats_per_char - ref_nats(params, config, kept)) < 1e-4


@pytest.mark.parametrize("content,words", [("", ["0 character(s)", "at least 2"]), ("a", ["1 character(s)"])])
def test_too_short_to_score(tmp_path, content, words):
    path = tmp_path / "short.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        evaluate.evaluate_file(*make_model(), path, progress=False)
    assert all(w in str(e.value) for w in words)


def test_score_units():
    score = evaluate.Score(1.5, 10)
    assert score.bits_per_char == pytest.approx(1.5 / math.log(2)) and score.perplexity == pytest.approx(math.exp(1.5))


# ---------------------------------------------------------------------------------- command line

def invoke(*args):
    return cli_runner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def test_cli_eval_json_agrees_with_the_reference(tmp_path):
    params, config = make_model(layers=2, peepholes=False)
    ckpt = write_checkpoint(tmp_path / "model.npz", params, config)
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    result = invoke(ckpt, tmp_path / "text.txt", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"nats_per_char", "bits_per_char", "perplexity", "chars"}
    assert out["chars"] == len(TEXT) - 1
    assert abs(out["nats_per_char"] - ref_nats(params, config, TEXT)) < 1e-4
    assert out["bits_per_char"] == pytest.approx(out["nats_per_char"] / math.log(2))
    text = invoke(ckpt, tmp_path / "text.txt").stdout
    assert f"{len(TEXT) - 1:,} characters scored" in text and f"{out['nats_per_char']:.5f}" in text


def test_cli_eval_unknown(tmp_path):
    ckpt = write_checkpoint(tmp_path / "model.npz", *make_model())
    (tmp_path / "text.txt").write_text("ROMEO: Zounds?", encoding="utf-8")
    result = invoke(ckpt, tmp_path / "text.txt")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "'Z'" in lines[0] and "--unknown skip" in lines[0]
    result = invoke(ckpt, tmp_path / "text.txt", "--unknown", "skip", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped"] == 1 and "warning" in result.stderr


@pytest.mark.parametrize("name,content,words", [
    ("missing.txt", None, ["no such file"]),
    ("latin1.txt", "café".encode("latin-1"), ["not valid utf-8", "--encoding"]),
])
def test_cli_eval_bad_file_is_one_line(tmp_path, name, content, words):
    ckpt = write_checkpoint(tmp_path / "model.npz", *make_model())
    if content is not None:
        (tmp_path / name).write_bytes(content)
    result = invoke(ckpt, tmp_path / name)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and all(w in lines[0] for w in words), result.stderr


def test_the_score_does_not_depend_on_the_thread_count(team_of):
    """Windows long enough that the batched products are cut in 3 by positions, on 1 and 3 threads."""
    params, config = make_model(2, True, "float32", hidden=37)
    ids = np.random.default_rng(3).integers(0, len(VOCAB), 700)
    scores = []
    for size in (1, 3):
        team_of(3, size)
        scorer = evaluate.Scorer(params, config, window=300)
        scorer.feed(ids)
        scores.append(scorer.score())
    assert scores[0] == scores[1]
    assert abs(scores[0] - ref_nats(params, config, "".join(VOCAB[i] for i in ids))) < 1e-4


def test_a_second_run_compiles_nothing_new():
    from charlstm.engine import kernels, recurrent, stream_kernels

    def score(layers, peepholes, dtype, seed):
        scorer = evaluate.Scorer(*make_model(layers, peepholes, dtype, seed), window=8)
        scorer.feed(np.arange(20) % len(VOCAB))

    for dtype in ("float32", "float64"):
        score(2, True, dtype, 0)
    used = [recurrent.forward_grid, stream_kernels.nll_sum, kernels.gather_input, kernels.project_input]
    counts = [len(k.signatures) for k in used]
    for dtype in ("float32", "float64"):
        score(1, False, dtype, 1)
        score(3, True, dtype, 2)
    assert counts == [len(k.signatures) for k in used]
    # forward_grid: one float32 and one float64 specialization (bfloat16's, uint16 weights, come from other tests)
    assert sum("uint16" not in str(sig) for sig in recurrent.forward_grid.signatures) == 2
