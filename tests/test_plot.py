"""`charlstm plot`: a PNG of the right size from real metrics files of real runs, by step, chars and
time; a run in progress plots what it has; bad input is refused in one line."""
import json
import shutil
import struct
import sys

import pytest

from charlstm.cli import cli
from charlstm.plot import DPI, HEIGHT_IN, WIDTH_IN, read_run

from tests.conftest import TINY, cli_runner
from tests.test_bad_input import one_line_error

pytest.importorskip("matplotlib")  # the test extra installs it; without it only the refusal is testable


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short real runs (Adagrad, and Adam with a schedule) in one --out folder."""
    out = tmp_path_factory.mktemp("runs")
    corpus = out / "corpus.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 10)
    for run, recipe in (("adagrad", []), ("adam", ["--optim", "adam", "--lr-decay", "0.5", "--lr-decay-every", "1"])):
        result = cli_runner().invoke(cli, ["train", str(corpus), *TINY, *recipe, "--steps", "230", "--out", str(out),
                                          "--run", run, "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return out


def png_size(path):
    """(width, height) from a PNG's IHDR chunk: the 8-byte signature, then length, 'IHDR', w, h."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("x_axis", ["step", "chars", "time"])
def test_plot_writes_a_png_of_the_fixed_size(tmp_path, runs, run_cli, x_axis):
    out = tmp_path / "curves.png"
    result = run_cli("plot", runs / "adagrad", runs / "adam", "-o", out, "--x", x_axis)
    assert result.exit_code == 0, result.output
    assert png_size(out) == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
    assert 10_000 < out.stat().st_size < 200_000
    best = {run: min(json.loads(line)["val_loss"] for line in (runs / run / "metrics.jsonl").read_text().splitlines()
                     if "val_loss" in line) for run in ("adagrad", "adam")}
    for run, loss in best.items():
        assert f"{run}: best validation {loss:.4f} nats" in result.stdout
    assert result.stdout.splitlines()[-1] == f"wrote {out}" and result.stderr == ""


def test_curves_are_read_against_each_axis(runs):
    lines = [json.loads(line) for line in (runs / "adam" / "metrics.jsonl").read_text().splitlines()]
    for x_axis, key in (("step", "step"), ("chars", "chars_seen"), ("time", "time")):
        run = read_run(runs / "adam", x_axis, "adam", warn=pytest.fail)
        assert run.train == [(r[key], r["train_loss"]) for r in lines if "train_loss" in r]
        assert run.val == [(r[key], r["val_loss"]) for r in lines if "val_loss" in r]
    assert len(run.train) == len(run.val) == 46  # 230 steps validated every 5, each after a train line


def test_a_run_in_progress_plots_what_it_has(tmp_path, runs, run_cli):
    live = tmp_path / "live"
    shutil.copytree(runs / "adam", live)
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"chars_seen": 7392, "lr": 0.0005, "step": 231, "val_lo')  # the trainer mid-write
    result = run_cli("plot", live, "-o", tmp_path / "live.png")
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "live.png") == (900, 550)
    assert result.stderr.count("\n") == 1 and "skipped line 93, not finished" in result.stderr


def damaged(tmp_path, runs, edit):
    """A copy of the adagrad run whose metrics.jsonl lines went through edit(lines)."""
    folder = tmp_path / "damaged"
    shutil.copytree(runs / "adagrad", folder)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in edit(lines)))
    return folder


def without_time(lines):
    return [json.dumps({k: v for k, v in json.loads(line).items() if k != "time"}) for line in lines]


@pytest.mark.parametrize("case, edit, words", [
    ("empty", lambda lines: [], ["no train or validation loss in it yet (0 lines)"]),
    ("no losses", lambda lines: ['{"step": 0, "lr": 0.02}'], ["no train or validation loss"]),
    ("garbage", lambda lines: lines[:3] + ["<<<<<<< HEAD"] + lines[3:], ["line 4 is not a JSON object"]),
    ("cut short mid-file", lambda lines: lines[:3] + [lines[3][:20]] + lines[4:], ["line 4 is not a JSON object"]),
    ("a list", lambda lines: ["[1, 2]"] + lines, ["line 1 is not a JSON object"]),
    ("bad number", lambda lines: lines + ['{"step": 500, "time": 9.5, "val_loss": "low"}'], ["val_loss 'low' is not a number"]),
    ("older log", without_time, ["has no 'time'", "--x step"]),
])
def test_bad_metrics_are_one_line(tmp_path, runs, run_cli, case, edit, words):
    folder = damaged(tmp_path, runs, edit)
    result = run_cli("plot", runs / "adam", folder, "-o", tmp_path / "c.png", "--x", "time")
    one_line_error(result, "damaged/metrics.jsonl", *words, code=1)
    assert not (tmp_path / "c.png").exists()


def test_what_is_not_a_run_is_one_line(tmp_path, runs, run_cli):
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", ["no such folder"]), (tmp_path / "empty", ["no metrics.jsonl"]),
             (runs / "adam" / "latest.npz", ["not a run folder"])]
    for path, words in cases:
        one_line_error(run_cli("plot", path, "-o", tmp_path / "c.png"), str(path), *words, code=1)
    one_line_error(run_cli("plot", "-o", tmp_path / "c.png"), "Missing argument 'RUNS...'", code=2)
    one_line_error(run_cli("plot", runs / "adam", "-o", tmp_path / "no" / "c.png"), "cannot write", code=1)
    one_line_error(run_cli("plot", runs / "adam", "--x", "epochs"), "'--x'", code=2)
    assert not (tmp_path / "c.png").exists()


def test_without_matplotlib_it_says_how_to_get_it(tmp_path, runs, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run_cli("plot", runs / "adam", "-o", tmp_path / "c.png")
    one_line_error(result, "plotting needs matplotlib: pip install 'charlstm[plot]'", code=1)
