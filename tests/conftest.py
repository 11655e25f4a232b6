import math
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from charlstm.cli import cli

SHAKESPEARE_HEAD = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""

# A tiny model and corpus: an epoch is 22 windows, so 40 steps cross an epoch boundary.
TINY = ["--hidden", "12", "--layers", "2", "--batch-size", "4", "--seq-length", "8", "--eval-every", "5",
        "--save-every", "10", "--threads", "1"]


def _slowdown():
    text = os.environ.get("CHARLSTM_TEST_SLOWDOWN", "1")
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"CHARLSTM_TEST_SLOWDOWN={text!r}: give a factor > 0 (e.g. 10 under QEMU emulation)")
    return factor


SLOWDOWN = _slowdown()


def seconds(limit):
    """A wall-clock limit of `limit` seconds, stretched for a slow machine: times
    CHARLSTM_TEST_SLOWDOWN (default 1; about 10 under QEMU emulation, where a cold process that
    compiles its kernels cannot meet a native deadline). Every timeout, deadline and timed wait in
    the tests goes through it."""
    return limit * SLOWDOWN


# How a test stops a training process as a user's Ctrl-C would. Windows cannot aim Ctrl-C at one
# process, only at every process on the console (pytest too); it can aim Ctrl-Break at a process
# group of its own, and charlstm takes Ctrl-Break as Ctrl-C.
if sys.platform == "win32":
    INTERRUPT, INTERRUPTED = signal.CTRL_BREAK_EVENT, "SIGBREAK"
    OWN_GROUP = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # Popen options to receive it
else:
    INTERRUPT, INTERRUPTED, OWN_GROUP = signal.SIGINT, "SIGINT", {}


@pytest.fixture(autouse=True)
def whole_team():
    """Every test starts with the team as the process made it (--threads 1 in a test sets its size)."""
    from charlstm.engine.threads import team

    most, size = team.most, team.size
    yield
    team.most, team.size = most, size


@pytest.fixture
def team_of():
    """team_of(most, size): cut the engine's work into `most` shares and run them on `size` threads."""
    from charlstm.engine.threads import team

    def set_team(most, size):
        team.most, team.size = most, size
    return set_team


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text((SHAKESPEARE_HEAD * 3)[:1000], encoding="utf-8")
    return path


def cli_runner():
    """A CliRunner that keeps stdout and stderr apart, so result.stdout and result.stderr are each
    one stream and result.output is stdout (with stderr too on click 8.2 and later). Click 8.1 mixes
    them unless told (and has no result.stderr then); click 8.2 removed the mix_stderr argument."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture
def run_cli():
    def run(*args):
        return cli_runner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return run
