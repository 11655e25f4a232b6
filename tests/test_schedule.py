"""The lr schedule: its value at epoch boundaries (the default's, char-rnn's and torch-rnn's
counting), the default filling in the options left out, and options refused in one usage line when
they do not go together."""
import pytest

from charlstm.checkpoint import load_checkpoint
from charlstm.config import TrainConfig
from charlstm.schedule import dropout_at, lr_at

from tests.conftest import TINY
from tests.test_bad_input import one_line_error


def lrs(cfg, epochs):
    return [lr_at(cfg, e) / cfg.lr for e in range(epochs)]


def test_no_schedule_keeps_lr():
    assert lrs(TrainConfig(lr=0.02, lr_decay_after=None), 30) == [1.0] * 30


def test_the_default_decays_by_0_85_from_the_end_of_epoch_7():
    got = lrs(TrainConfig(), 10)
    assert got[:7] == [1.0] * 7
    assert got[7:] == pytest.approx([0.85, 0.85 ** 2, 0.85 ** 3], rel=1e-15)


def test_char_rnn_decays_at_every_epoch_end_from_epoch_after():
    """char-rnn decays after iteration i when i/ntrain >= decay_after: with 10, the first decay
    comes as epoch 10 ends, so the 11th epoch (10 completed) runs at lr * 0.97."""
    got = lrs(TrainConfig(lr=2e-3, lr_decay=0.97, lr_decay_after=10), 14)
    assert got[:10] == [1.0] * 10
    assert got[10:] == pytest.approx([0.97, 0.97 ** 2, 0.97 ** 3, 0.97 ** 4], rel=1e-15)
    for after in (0, 1):  # epoch counts start at 1: both decay at every epoch end
        assert lrs(TrainConfig(lr=1.0, lr_decay=0.5, lr_decay_after=after), 4) == [1.0, 0.5, 0.25, 0.125]


def test_torch_rnn_steps_every_n_epochs():
    got = lrs(TrainConfig(lr=2e-3, lr_decay=0.5, lr_decay_after=None, lr_decay_every=5), 16)
    assert got == [1.0] * 5 + [0.5] * 5 + [0.25] * 5 + [0.125]


def test_factor_one_is_no_decay():
    assert lrs(TrainConfig(lr=0.02, lr_decay=1.0, lr_decay_after=None, lr_decay_every=1), 5) == [1.0] * 5


@pytest.mark.parametrize("args, words", [
    (["--lr-decay", "0.5", "--lr-decay-after", "2", "--lr-decay-every", "3"], ["give only one"]),
    (["--lr-decay", "0", "--lr-decay-every", "1"], ["'--lr-decay'", "0<x<=1"]),
    (["--lr-decay", "1.5", "--lr-decay-every", "1"], ["'--lr-decay'"]),
    (["--lr-decay", "0.5", "--lr-decay-every", "0"], ["'--lr-decay-every'", "x>=1"]),
    (["--lr-decay", "0.5", "--lr-decay-after", "-1"], ["'--lr-decay-after'", "x>=0"]),
    (["--optim", "sgd"], ["'--optim'", "adagrad", "rmsprop", "adam"]),
    (["--optim", "rmsprop", "--rmsprop-alpha", "1"], ["'--rmsprop-alpha'", "0<=x<1"]),
    (["--optim", "adam", "--adam-beta2", "1"], ["'--adam-beta2'"]),
    (["--optim", "adam", "--adam-eps", "0"], ["'--adam-eps'", "x>0"]),
    (["--optim", "rmsprop", "--adam-beta1", "0.8"], ["--adam-beta1 is an option of --optim adam",
                                                     "--optim rmsprop"]),
    (["--adagrad-eps", "1e-8", "--optim", "adam"], ["--adagrad-eps is an option of --optim adagrad"]),
])
def test_bad_recipe_is_one_usage_line(tmp_path, corpus, run_cli, args, words):
    result = run_cli("train", corpus, *args, "--out", tmp_path / "out")
    line = one_line_error(result, *words, code=2)
    assert line.endswith("(see 'charlstm train --help')")
    assert not (tmp_path / "out").exists()


def test_dropout_ramps_up_in_a_straight_line_then_holds():
    """--dropout-warmup E: p = P * step / (E * steps per epoch) until it reaches P; 0 means P at once."""
    cfg = TrainConfig(dropout=0.3, dropout_warmup=2.0)
    per_epoch = 100
    assert dropout_at(cfg, 0, per_epoch) == 0.0
    assert dropout_at(cfg, 50, per_epoch) == pytest.approx(0.3 * 50 / 200, rel=1e-15)
    assert dropout_at(cfg, 199, per_epoch) < 0.3
    assert [dropout_at(cfg, s, per_epoch) for s in (200, 201, 10 ** 6)] == [0.3] * 3
    assert dropout_at(TrainConfig(dropout=0.3, dropout_warmup=0.0), 0, per_epoch) == 0.3
    assert dropout_at(TrainConfig(dropout=0.0, dropout_warmup=5.0), 123, per_epoch) == 0.0


@pytest.mark.parametrize("args, schedule", [
    ([], (0.85, 7, None)),
    (["--lr-decay", "0.5"], (0.5, 7, None)),
    (["--lr-decay", "1"], (1.0, 7, None)),
    (["--lr-decay-after", "2"], (0.85, 2, None)),
    (["--lr-decay-every", "3"], (0.85, None, 3)),
    (["--lr-decay", "0.5", "--lr-decay-every", "3"], (0.5, None, 3)),
])
def test_options_left_out_take_the_defaults_schedule(tmp_path, corpus, run_cli, args, schedule):
    result = run_cli("train", corpus, *TINY, *args, "--steps", 1, "--out", tmp_path, "--run", "r", "--quiet")
    assert result.exit_code == 0, result.output
    cfg = load_checkpoint(tmp_path / "r" / "latest.npz").train_config
    assert (cfg.lr_decay, cfg.lr_decay_after, cfg.lr_decay_every) == schedule
