"""Training runs end to end through the CLI: exact resume, determinism, interrupts, checkpoint
rotation, fine-tuning and NaN handling."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from charlstm.engine import network
from charlstm.checkpoint import load_checkpoint
from charlstm.data import split
from charlstm.train import EXIT_NONFINITE
from charlstm.validate import validation_loss

from tests.conftest import INTERRUPT, INTERRUPTED, OWN_GROUP, TINY, seconds


def arrays(path):
    ckpt = load_checkpoint(path)
    return {name: a.tobytes() for name, a in {"params": ckpt.params, **ckpt.optim_state, "h": ckpt.h,
                                                "c": ckpt.c}.items()}


def losses(run_dir):
    """Every loss in metrics.jsonl, by (step, key)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("train_loss", "val_loss"):
            if key in record:
                out[(record["step"], key)] = record[key]
    return out


@pytest.mark.parametrize("options", [["--dropout", "0"], ["--dropout", "0.3"], ["--dropout", "0.3", "--dropout-warmup", "0"],
                                     ["--dropout", "0.4", "--dropout-warmup", "0.3", "--init", "char-rnn"],
                                     ["--weight-drop", "0.3"], ["--weight-drop", "0.5", "--batch-size", "1"]])
def test_resume_is_exact_byte_for_byte(tmp_path, corpus, run_cli, options):
    straight = run_cli("train", corpus, *TINY, *options, "--steps", 40, "--out", tmp_path, "--run", "straight",
                       "--quiet")
    assert straight.exit_code == 0, straight.output
    first = run_cli("train", corpus, *TINY, *options, "--steps", 20, "--out", tmp_path, "--run", "split", "--quiet")
    assert first.exit_code == 0
    second = run_cli("train", "--resume", tmp_path / "split" / "latest.npz", "--steps", 40, "--quiet")
    assert second.exit_code == 0, second.output
    assert arrays(tmp_path / "straight" / "latest.npz") == arrays(tmp_path / "split" / "latest.npz")
    assert load_checkpoint(tmp_path / "split" / "latest.npz").manifest["step"] == 40
    straight_losses = losses(tmp_path / "straight")
    assert len(straight_losses) >= 16 and straight_losses == losses(tmp_path / "split")


@pytest.mark.parametrize("hidden", [4, 100])
def test_initialisations(hidden):
    """fan-in (the default): PyTorch's bounds, ±1/sqrt(H) for weights and the output bias, the sum
    of two such draws for a layer's bias, peepholes 0; char-rnn: ±0.08, forget bias 1, other
    biases 0. Both a function of the seed alone."""
    from charlstm.config import ModelConfig, TrainConfig
    from charlstm.model import init_params, views

    assert TrainConfig().init == "fan-in"
    config = ModelConfig("abcdefg", hidden=hidden, layers=2, peepholes=True, dtype="float64")
    bound = 1 / np.sqrt(hidden)
    w = views(init_params(config, np.random.default_rng(5), "fan-in"), config)
    again = init_params(config, np.random.default_rng(5), "fan-in")
    assert np.array_equal(again, init_params(config, np.random.default_rng(5), "fan-in"))
    for name, value in w.items():
        if name.endswith(".p"):
            assert not value.any()
        elif name.startswith("l") and name.endswith(".b"):
            assert np.abs(value).max() <= 2 * bound and np.abs(value).max() > bound / 2
        else:
            assert np.abs(value).max() <= bound and value.std() > bound / 3
            if value.size >= 100:  # fills its range
                assert np.abs(value).max() > 0.9 * bound
    w = views(init_params(config, np.random.default_rng(5), "char-rnn"), config)
    H = hidden
    for l in range(2):
        assert np.abs(w[f"l{l}.Wh"]).max() <= 0.08 and np.abs(w[f"l{l}.Wh"]).max() > 0.07
        b = w[f"l{l}.b"]
        assert (b[H:2 * H] == 1).all() and not b[:H].any() and not b[2 * H:].any()


def test_same_options_same_bytes(tmp_path, corpus, run_cli):
    for run in ("a", "b"):
        assert run_cli("train", corpus, *TINY, "--steps", 12, "--out", tmp_path, "--run", run, "--quiet").exit_code == 0
    names = sorted(p.name for p in (tmp_path / "a").glob("*.npz"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("*.npz"))
    assert {"best.npz", "latest.npz", "step-00000010.npz", "step-00000012.npz"} <= set(names)
    for name in names:
        a = load_checkpoint(tmp_path / "a" / name)
        b = load_checkpoint(tmp_path / "b" / name)
        assert arrays(tmp_path / "a" / name) == arrays(tmp_path / "b" / name)
        assert a.manifest["checksum"] == b.manifest["checksum"]


def test_dropout_changes_training_not_validation(tmp_path, corpus, run_cli):
    """Dropout masks the training steps only: validation scores the weights as they are (the same
    loss as scoring them afresh with no dropout anywhere), and a run with dropout trains to other
    weights than one without."""
    for run, options in (("plain", ["--dropout", "0"]), ("dropout", ["--dropout", "0.5"])):
        result = run_cli("train", corpus, *TINY, *options, "--steps", 10, "--out", tmp_path, "--run", run, "--quiet")
        assert result.exit_code == 0, result.output
    plain, dropped = (load_checkpoint(tmp_path / run / "latest.npz") for run in ("plain", "dropout"))
    assert dropped.train_config.dropout == 0.5 and plain.train_config.dropout == 0.0
    assert not np.array_equal(plain.params, dropped.params)
    text = corpus.read_text(encoding="utf-8")
    ids = np.array([dropped.model_config.vocab.index(ch) for ch in text])
    n_train, _ = split(len(ids), dropped.train_config.val_frac)
    fresh, _ = validation_loss(dropped.params, dropped.model_config, ids[n_train:])
    assert dropped.manifest["metrics"]["val_loss"] == fresh


def test_loss_falls(tmp_path, corpus, run_cli):
    result = run_cli("train", corpus, *TINY, "--steps", 60, "--lr", 0.1, "--out", tmp_path, "--run", "r", "--quiet")
    assert result.exit_code == 0
    train = [v for (step, key), v in sorted(losses(tmp_path / "r").items()) if key == "train_loss"]
    assert len(train) == 12
    assert train[0] > train[-1] + 0.5, train  # from ~ln(vocab) towards the text's statistics


def test_keep_rotates_step_files(tmp_path, corpus, run_cli):
    result = run_cli("train", corpus, *TINY, "--steps", 9, "--save-every", 2, "--keep", 2, "--out", tmp_path,
                     "--run", "r", "--quiet")
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "r").glob("step-*.npz")) == ["step-00000008.npz", "step-00000009.npz"]
    assert (tmp_path / "r" / "latest.npz").exists() and (tmp_path / "r" / "best.npz").exists()


def test_output_reports_progress_and_where(tmp_path, corpus, run_cli):
    result = run_cli("train", corpus, *TINY, "--steps", 10, "--out", tmp_path, "--run", "r")
    assert result.exit_code == 0
    assert "parameters" in result.stdout and "chars per step" in result.stdout
    assert "val loss" in result.stdout and "bits/char" in result.stdout
    assert str(tmp_path / "r") in result.stdout


def test_resume_refuses_another_corpus(tmp_path, corpus, run_cli):
    assert run_cli("train", corpus, *TINY, "--steps", 5, "--out", tmp_path, "--run", "r", "--quiet").exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    latest = tmp_path / "r" / "latest.npz"
    before = latest.read_bytes()
    result = run_cli("train", other, "--resume", latest, "--steps", 10)
    assert result.exit_code != 0 and "--init-from" in result.stderr
    assert latest.read_bytes() == before


def test_init_from_fine_tunes_and_checks_vocab(tmp_path, corpus, run_cli):
    assert run_cli("train", corpus, *TINY, "--steps", 5, "--out", tmp_path, "--run", "base", "--quiet").exit_code == 0
    base = tmp_path / "base" / "latest.npz"
    subset = tmp_path / "subset.txt"
    subset.write_text("Speak, speak. " * 100)
    tuned = run_cli("train", subset, "--init-from", base, "--batch-size", 2, "--seq-length", 8, "--steps", 3,
                    "--out", tmp_path, "--run", "tuned", "--quiet")
    assert tuned.exit_code == 0, tuned.output
    ckpt = load_checkpoint(tmp_path / "tuned" / "latest.npz")
    assert ckpt.model_config == load_checkpoint(base).model_config and ckpt.manifest["step"] == 3
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("Zebras & quokkas! " * 50)
    result = run_cli("train", foreign, "--init-from", base, "--out", tmp_path, "--run", "x", "--steps", 2)
    assert result.exit_code != 0 and "'Z'" in result.stderr and "'q'" in result.stderr


def test_non_finite_loss_stops_without_saving_it(tmp_path, corpus, run_cli, monkeypatch):
    assert run_cli("train", corpus, *TINY, "--steps", 10, "--out", tmp_path, "--run", "r", "--quiet").exit_code == 0
    latest = tmp_path / "r" / "latest.npz"
    before = latest.read_bytes()
    real_loss = network.loss
    calls = []

    def poisoned(params, ws, y):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real_loss(params, ws, y)

    monkeypatch.setattr(network, "loss", poisoned)
    result = run_cli("train", "--resume", latest, "--steps", 20)
    assert result.exit_code == EXIT_NONFINITE
    assert "step 13" in result.stderr and "--lr" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert latest.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "r").glob("step-*.npz"))[-1] == "step-00000010.npz"


def test_sigint_saves_and_resume_matches_straight_run(tmp_path, corpus, run_cli):
    """A real Ctrl-C (SIGINT; Ctrl-Break on Windows) to a real training process: it saves at the
    step boundary, exits 0 and says how to resume; resuming to step N gives the bytes of a straight
    N-step run."""
    cmd = [sys.executable, "-m", "charlstm", "train", str(corpus), *TINY, "--save-every", "0", "--eval-every", "0",
           "--steps", "100000", "--out", str(tmp_path), "--run", "killed"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, **OWN_GROUP)
        deadline = time.monotonic() + seconds(120)
        while time.monotonic() < deadline and "/100000" not in err_path.read_text():
            time.sleep(0.1)
        time.sleep(seconds(0.3))
        proc.send_signal(INTERRUPT)
        out, _ = proc.communicate(timeout=seconds(60))
    err = err_path.read_text()
    assert proc.returncode == 0, err
    assert f"stopped by {INTERRUPTED}" in out and "charlstm train --resume" in out and "Traceback" not in err
    step = load_checkpoint(tmp_path / "killed" / "latest.npz").manifest["step"]
    assert step > 0
    target = step + 7
    assert run_cli("train", "--resume", tmp_path / "killed" / "latest.npz", "--steps", target, "--quiet").exit_code == 0
    straight = run_cli("train", corpus, *TINY, "--save-every", 0, "--eval-every", 0, "--steps", target, "--out", tmp_path,
                       "--run", "straight", "--quiet")
    assert straight.exit_code == 0
    assert arrays(tmp_path / "killed" / "latest.npz") == arrays(tmp_path / "straight" / "latest.npz")


# (platform, the stop signals its `signal` module defines, what train installs its handler for)
SIGNAL_MODULES = [
    ("linux", {"SIGINT": 2, "SIGTERM": 15}, {2: "SIGINT", 15: "SIGTERM"}),
    ("darwin", {"SIGINT": 2, "SIGTERM": 15}, {2: "SIGINT", 15: "SIGTERM"}),
    ("win32", {"SIGINT": 2, "SIGBREAK": 21, "SIGTERM": 15}, {2: "SIGINT", 21: "SIGBREAK"}),  # SIGTERM never arrives
    ("wasi", {"SIGINT": 2}, {2: "SIGINT"}),  # no SIGTERM at all
]


@pytest.mark.parametrize("platform, defined, handled", SIGNAL_MODULES)
def test_stop_handlers_only_for_signals_the_os_delivers(monkeypatch, platform, defined, handled):
    from charlstm import train

    with monkeypatch.context() as m:  # (pytest itself must not run as on another OS)
        m.setattr(sys, "platform", platform)
        for name in train.STOP_SIGNALS:
            if name in defined:
                m.setattr(signal, name, defined[name], raising=False)
            else:
                m.delattr(signal, name, raising=False)
        got = train.stop_signals()
    assert got == handled


def test_compile_notice_looks_at_the_kernels_the_run_will_use(monkeypatch):
    """B = 1 and B > 1 both train with the grid's kernels (engine/grid.py): "compiling kernels"
    must be decided on the ones this run calls."""
    from charlstm import train
    from charlstm.engine import jit, recurrent
    from charlstm.config import ModelConfig

    asked = []
    monkeypatch.setattr(jit, "is_cached", lambda *dispatchers: asked.append(dispatchers) or True)
    config = ModelConfig("abc", hidden=4, layers=1)
    train.kernels_cached(network.Workspace(config, 1, 5))
    train.kernels_cached(network.Workspace(config, 3, 5))
    assert asked == [(recurrent.forward_grid, recurrent.backward_grid)] * 2

