"""Bad input through the command line (SPEC §5): every user error is one line on stderr naming the
problem and what to do, a non-zero exit, no traceback, and no existing checkpoint changed.
Options, corpora and checkpoints here; crashes, locks, full disks and Numba's cache in
test_crashes.py."""
import json
import random
import subprocess
import sys

import click
import numpy as np
import pytest

from charlstm.checkpoint import VERSION, save_checkpoint
from charlstm.cli import OneLineErrors, cli

from tests.conftest import TINY, cli_runner, seconds
from tests.test_checkpoint import Bomb, full_state, make_state, write_raw


def one_line_error(result, *words, code=None):
    """The result is a refusal: exit != 0 (or == code), one 'Error: ' line on stderr holding
    every word, nothing else on stderr, no traceback anywhere. Returns that line."""
    assert result.exit_code != 0 if code is None else result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def checkpoints(folder):
    """{name: bytes} of every .npz under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.npz"))}


# ---------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("args, words", [
    (["--hidden", "0"], ["'--hidden'", "0 is not in the range x>=1"]),
    (["--layers", "-1"], ["'--layers'", "x>=1"]),
    (["--batch-size", "0"], ["'--batch-size'"]),
    (["--seq-length", "-3"], ["'--seq-length'"]),
    (["--steps", "0"], ["'--steps'"]),
    (["--threads", "0"], ["'--threads'"]),
    (["--lr", "0"], ["'--lr'", "x>0"]),
    (["--lr", "-0.1"], ["'--lr'"]),
    (["--val-frac", "1"], ["'--val-frac'", "0<=x<1"]),
    (["--val-frac", "-0.1"], ["'--val-frac'"]),
    (["--clip", "-1"], ["'--clip'"]),
    (["--epochs", "0"], ["'--epochs'"]),
    (["--time-limit", "-5"], ["'--time-limit'"]),
    (["--keep", "-1"], ["'--keep'"]),
    (["--hidden", "many"], ["'--hidden'", "'many' is not a valid integer"]),
    (["--dtype", "float16"], ["'--dtype'", "float32"]),
    (["--clip-mode", "max"], ["'--clip-mode'"]),
    (["--weight-drop", "1"], ["'--weight-drop'", "0<=x<1"]),
    (["--precision", "fp8"], ["'--precision'", "f32", "bf16"]),
    (["--precision", "bf16", "--dtype", "float64"], ["--precision bf16 needs --dtype float32"]),
    (["--hiden", "8"], ["No such option", "--hidden"]),
])
def test_bad_train_option_is_one_usage_line(tmp_path, corpus, run_cli, args, words):
    result = run_cli("train", corpus, *args, "--out", tmp_path / "out")
    line = one_line_error(result, *words, code=2)
    assert line.endswith("(see 'charlstm train --help')")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [
    (["gradcheck", "--hidden", "0"], ["'--hidden'", "(see 'charlstm gradcheck --help')"]),
    (["info"], ["Missing argument 'CHECKPOINT'", "(see 'charlstm info --help')"]),
    (["trian"], ["No such command 'trian'", "(see 'charlstm --help')"]),
])
def test_other_usage_errors_are_one_line(run_cli, args, words):
    one_line_error(run_cli(*args), *words, code=2)


@pytest.mark.parametrize("args, words", [
    (["--temperature", "0"], ["'--temperature'", "0.0 is not in the range x>0"]),
    (["--temperature", "-1"], ["'--temperature'"]),
    (["--length", "-5"], ["'--length'", "-5 is not in the range x>=0"]),
    (["--top-k", "0"], ["'--top-k'"]),
])
def test_bad_sample_option_is_one_usage_line(tmp_path, run_cli, args, words):
    line = one_line_error(run_cli("sample", tmp_path / "any.npz", *args), *words, code=2)
    assert line.endswith("(see 'charlstm sample --help')")


def test_usage_error_from_the_real_console_script_is_one_line():
    result = subprocess.run([sys.executable, "-m", "charlstm", "train", "--hidden", "0"],
                            capture_output=True, text=True, timeout=seconds(60))
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["Error: Invalid value for '--hidden': 0 is not in the range x>=1. "
                     "(see 'python -m charlstm train --help')"], result.stderr


def test_help_version_and_bare_command_still_work(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0 and "Commands:" in result.stdout and "train" in result.stdout
    result = run_cli("train", "--help")
    assert result.exit_code == 0 and "--resume" in result.stdout
    result = run_cli("--version")
    assert result.exit_code == 0 and "charlstm, version" in result.stdout
    result = cli_runner().invoke(cli, [])  # the help on stderr, exit 2 (a usage error), as click 8.2 does
    assert result.exit_code == 2 and "Commands:" in result.stderr and result.stdout == ""


@click.group(cls=OneLineErrors)
def toy():
    """A group with charlstm's error handling, for exits no real command can be made to take."""


@toy.command("exit")
@click.argument("code", type=int)
def toy_exit(code):
    sys.exit(code)


@toy.command("ctx-exit")
@click.argument("code", type=int)
def toy_ctx_exit(code):
    click.get_current_context().exit(code)


@toy.command("interrupt")
def toy_interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("args, code", [(["exit", "0"], 0), (["exit", "7"], 7), (["ctx-exit", "5"], 5),
                                        (["interrupt"], 130)])
def test_exit_codes_pass_through(args, code):
    result = cli_runner().invoke(toy, args, catch_exceptions=False)
    assert result.exit_code == code
    assert result.stderr.strip() == ("Aborted!" if args == ["interrupt"] else "")


def test_explicit_non_standalone_mode_keeps_clicks_behaviour():
    with pytest.raises(click.UsageError):
        cli.main(["train", "--hidden", "0"], standalone_mode=False)


@pytest.mark.parametrize("out", ["a-file", "a-file/sub"])
def test_out_that_cannot_be_a_folder(tmp_path, corpus, run_cli, out):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_cli("train", corpus, *TINY, "--steps", 2, "--out", tmp_path / out)
    one_line_error(result, "--out", "is a file, not a folder", "choose another --out", code=1)
    assert (tmp_path / "a-file").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------- corpus

@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, ["no such file", "check the corpus path"]),
    ("folder", "dir", ["is a directory"]),
    ("empty.txt", b"", ["is empty"]),
    ("one.txt", b"a", ["single character", "at least 2 characters"]),
    ("latin1.txt", "naïve café text ".encode("latin-1") * 40, ["not valid utf-8 at byte offset 2 ", "--encoding"]),
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, ["looks like binary data"]),
    ("controls.txt", bytes(range(1, 9)) * 50 + b"text", ["looks like binary data"]),
    ("short.txt", b"too short for a batch of 4 x 8" * 1, ["too few for one batch", "at least 33",
                                                        "--batch-size"]),
])
def test_bad_corpus_is_one_line(tmp_path, run_cli, name, content, words):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = run_cli("train", path, *TINY, "--val-frac", 0, "--steps", 2, "--out", tmp_path / "out")
    one_line_error(result, *words, code=1)
    assert not checkpoints(tmp_path)


# ------------------------------------------------------------------------------------ checkpoints

def bad_checkpoints(folder):
    """{case: path} of files that are not usable checkpoints, plus the words their error holds."""
    manifest, params, state, h, c = make_state()
    good = folder / "good.npz"
    save_checkpoint(good, manifest, params, state, h, c)
    cases = {"missing": (folder / "missing.npz", ["no such checkpoint file"]),
             "empty": (folder / "empty.npz", ["empty file"]),
             "truncated": (folder / "truncated.npz", ["truncated or damaged"]),
             "random bytes": (folder / "noise.npz", ["not a readable checkpoint"]),
             "foreign npz": (folder / "foreign.npz", ["not a charlstm checkpoint", "holds weights"]),
             "pickle": (folder / "pickle.npz", ["Python objects (a pickle)", "will not load"]),
             "newer version": (folder / "newer.npz", [f"format version {VERSION + 1}", "upgrade charlstm"])}
    cases["empty"][0].write_bytes(b"")
    cases["truncated"][0].write_bytes(good.read_bytes()[:good.stat().st_size * 2 // 3])
    cases["random bytes"][0].write_bytes(random.Random(0).randbytes(4096))
    np.savez(cases["foreign npz"][0], weights=np.zeros((3, 3)))
    full, arrays = full_state()
    with open(cases["pickle"][0], "wb") as f:  # a real pickle that would create a file if run
        np.savez(f, manifest=np.frombuffer(json.dumps(full).encode(), dtype=np.uint8),
                 **dict(arrays, params=np.array([Bomb(str(folder / "pwned"))], dtype=object)))
    write_raw(cases["newer version"][0], dict(full, version=VERSION + 1), **arrays)
    return cases


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return folder, bad_checkpoints(folder)


CASES = ["missing", "empty", "truncated", "random bytes", "foreign npz", "pickle", "newer version"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["info", "resume", "sample", "eval"])
def test_bad_checkpoint_is_one_line(tmp_path, corpus, run_cli, bad_files, command, case):
    folder, cases = bad_files
    path, words = cases[case]
    before = checkpoints(folder)
    if command == "resume":
        result = run_cli("train", corpus, "--resume", path, "--steps", 3, "--quiet")
    else:
        result = run_cli(command, path, *([corpus] if command == "eval" else []))
    one_line_error(result, path.name, *words, code=1)
    assert checkpoints(folder) == before  # nothing written or changed
    assert not (folder / "pwned").exists()  # the pickle never ran
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
