"""Training with each optimizer and an lr schedule, end to end: byte-exact resume across a decay,
the schedule's lr reaching the updates and metrics.jsonl, checkpoints of format version 1 still
resuming, a resumed run keeping its optimizer, and `charlstm info`."""
import copy
import json

import pytest

from charlstm import train as train_module
from charlstm.checkpoint import load_checkpoint

from tests.conftest import TINY
from tests.test_bad_input import one_line_error
from tests.test_checkpoint import raw_checksum, write_raw
from tests.test_train import arrays

WINDOWS = 22  # TINY's windows per epoch: a decay at the end of epoch 1 falls between steps 20 and 40
RECIPES = {
    "adagrad": ["--optim", "adagrad", "--lr-decay", "0.5", "--lr-decay-after", "1"],
    "rmsprop": ["--optim", "rmsprop", "--lr-decay", "0.97", "--lr-decay-after", "1"],
    "adam": ["--optim", "adam", "--lr-decay", "0.5", "--lr-decay-every", "1"],
}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_time(run_dir):
    """metrics.jsonl less the wall-clock stamps, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "time"} for r in records(run_dir)]


def train(run_cli, *args):
    result = run_cli("train", *args, "--quiet")
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("optim", list(RECIPES))
def test_resume_across_a_decay_is_exact_for_each_optimizer(tmp_path, corpus, run_cli, optim):
    """20 steps, resume to 40, against 40 straight: the lr decays after step 29, between the two."""
    recipe = RECIPES[optim]
    train(run_cli, corpus, *TINY, *recipe, "--steps", 40, "--out", tmp_path, "--run", "straight")
    train(run_cli, corpus, *TINY, *recipe, "--steps", 20, "--out", tmp_path, "--run", "split")
    train(run_cli, "--resume", tmp_path / "split" / "latest.npz", "--steps", 40)
    straight, split = (tmp_path / run / "latest.npz" for run in ("straight", "split"))
    assert arrays(straight) == arrays(split)
    ckpt = load_checkpoint(split)
    assert ckpt.manifest["cursor"]["windows_per_epoch"] == WINDOWS
    assert list(ckpt.optim_state) == {"adagrad": ["adagrad"], "rmsprop": ["rmsprop"],
                                      "adam": ["adam_m", "adam_v"]}[optim]
    assert ckpt.manifest["lr"] == load_checkpoint(straight).manifest["lr"] < ckpt.train_config.lr
    assert without_time(tmp_path / "straight") == without_time(tmp_path / "split")


def test_the_schedules_lr_reaches_every_update_and_metrics_line(tmp_path, corpus, run_cli, monkeypatch):
    seen = []
    real = train_module.clip_and_update

    def spy(params, grads, state, t, lr, cfg, sumsq):
        seen.append((t, lr))
        real(params, grads, state, t, lr, cfg, sumsq)

    monkeypatch.setattr(train_module, "clip_and_update", spy)
    train(run_cli, corpus, *TINY, "--optim", "adam", "--lr", 0.01, "--lr-decay", "0.5", "--lr-decay-every", "1",
          "--steps", 65, "--out", tmp_path, "--run", "r")
    # step t (1-based) is in epoch (t - 1) // 22: decays as steps 22 and 44 end
    assert seen == [(t, 0.01 * 0.5 ** ((t - 1) // WINDOWS)) for t in range(1, 66)]
    lines = records(tmp_path / "r")
    assert len(lines) >= 20
    for r in lines:  # the lr in force: the next step's
        assert r["lr"] == 0.01 * 0.5 ** (r["step"] // WINDOWS) and r["chars_seen"] == r["step"] * 4 * 8
    times = [r["time"] for r in lines]
    assert times == sorted(times) and 0 < times[-1] < 600
    assert load_checkpoint(tmp_path / "r" / "latest.npz").manifest["lr"] == 0.01 * 0.25  # step 65: 2 epochs done


def test_the_clock_continues_across_resume(tmp_path, corpus, run_cli):
    train(run_cli, corpus, *TINY, "--steps", 20, "--out", tmp_path, "--run", "r")
    log = tmp_path / "r" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    last["time"] = 1000.0  # as if the first 20 steps had taken 1000 s
    log.write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    train(run_cli, "--resume", tmp_path / "r" / "latest.npz", "--steps", 30)
    later = [r for r in records(tmp_path / "r") if r["step"] > 20]
    assert later and all(1000.0 < r["time"] < 1600.0 for r in later)


def as_version_1(path):
    """Rewrite an Adagrad checkpoint as format version 1 wrote it: no optimizer section, no lr in
    force, none of the options that came with version 2; checksum over params, adagrad, h, c."""
    ckpt = load_checkpoint(path)
    manifest = copy.deepcopy(ckpt.manifest)
    del manifest["optimizer"], manifest["lr"]
    for key in ("optim", "rmsprop_alpha", "rmsprop_eps", "adam_beta1", "adam_beta2", "adam_eps",
                "lr_decay", "lr_decay_after", "lr_decay_every"):
        del manifest["train"][key]
    members = {"params": ckpt.params, "adagrad": ckpt.optim_state["adagrad"], "h": ckpt.h, "c": ckpt.c}
    manifest.update(version=1, checksum=raw_checksum(*members.values()))
    write_raw(path, manifest, **members)


def test_a_version_1_checkpoint_resumes_exactly_as_adagrad(tmp_path, corpus, run_cli):
    adagrad = ["--optim", "adagrad"]  # the only optimizer of version 1
    train(run_cli, corpus, *TINY, *adagrad, "--steps", 40, "--out", tmp_path, "--run", "straight")
    train(run_cli, corpus, *TINY, *adagrad, "--steps", 20, "--out", tmp_path, "--run", "old")
    old = tmp_path / "old" / "latest.npz"
    as_version_1(old)
    ckpt = load_checkpoint(old)
    assert ckpt.manifest["version"] == 1 and ckpt.train_config.optim == "adagrad"
    assert "Adagrad lr 0.02" in run_cli("info", old).stdout
    train(run_cli, "--resume", old, "--steps", 40)
    assert arrays(tmp_path / "straight" / "latest.npz") == arrays(old)
    assert load_checkpoint(old).manifest["version"] == 2


def test_resume_keeps_the_optimizer_and_schedule(tmp_path, corpus, run_cli):
    train(run_cli, corpus, *TINY, *RECIPES["rmsprop"], "--steps", 5, "--out", tmp_path, "--run", "r")
    latest = tmp_path / "r" / "latest.npz"
    before = latest.read_bytes()
    for args, words in ((["--optim", "adam"], ["--optim adam (checkpoint: rmsprop)", "drop them"]),
                        (["--lr-decay", "0.5", "--lr-decay-every", "2"], ["--lr-decay 0.5 (checkpoint: 0.97)"])):
        one_line_error(run_cli("train", "--resume", latest, "--steps", 10, *args), *words, code=1)
    assert latest.read_bytes() == before
    train(run_cli, "--resume", latest, "--steps", 10, "--optim", "rmsprop")  # the same optimizer is fine
    assert load_checkpoint(latest).train_config.optim == "rmsprop"


def test_info_shows_the_optimizer_and_its_state(tmp_path, corpus, run_cli):
    train(run_cli, corpus, *TINY, *RECIPES["adam"], "--steps", 30, "--out", tmp_path, "--run", "r")
    out = run_cli("info", tmp_path / "r" / "latest.npz").stdout
    assert "Adam lr 0.002 (betas 0.9, 0.999, eps 1e-08), lr x0.5 every 1 epochs; lr now 0.001" in out
    assert "state adam_m, adam_v: 2 x " in out and "float32 values" in out
