"""threads.Governor: it keeps the thread count that measures faster, and switching counts mid-run
leaves the trained bytes unchanged (so a run that shared the machine for a while stays exact)."""

import pytest

from charlstm import train
from charlstm.engine import blas, threads

from tests.conftest import TINY
from tests.test_train import arrays

needs_two = pytest.mark.skipif(threads.team.most < 2, reason="needs 2 threads")


class Clock:
    """The governor's clock, made to move only when work says so: work that "takes" 2 ms takes
    exactly 2 ms, however loaded the machine running the tests is."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class Recorder(list):
    """running: a list holding the count, with the clock beside it."""


@pytest.fixture
def running(monkeypatch):
    """The count threads.use last set, recorded instead of set (so these tests depend on nothing
    else in the process's thread state); the governor reads a Clock that only work moves."""
    count = Recorder([None])
    monkeypatch.setattr(threads, "use", lambda n: count.__setitem__(0, n))
    clock = Clock()
    monkeypatch.setattr(threads, "time", clock)
    count.clock = clock
    return count


def timed_work(seconds_at, running):
    """Work that takes seconds_at[n] seconds, by the governor's clock, when run on n threads."""
    def work():
        running.clock.now += seconds_at[running[0]]
        return running[0]
    return work


@pytest.mark.parametrize("faster", [1, 2])
def test_governor_keeps_the_faster_count(monkeypatch, running, faster):
    monkeypatch.setattr(threads, "PROBE_EVERY", 0.1)  # seconds: a probe every ~30 units here
    governor = threads.Governor(most=2)
    slower = 3 - faster
    work = timed_work({faster: 0.002, slower: 0.006}, running)
    counts = [governor.run(work) for _ in range(120)]
    assert governor.current == faster
    assert counts[-60:].count(faster) >= 40  # only probes run the slower count


def test_a_surge_triggers_a_probe_at_once(monkeypatch, running):
    """Two threads fast, then another process arrives (2 threads now slow): it moves to one thread
    within a few units, long before the periodic probe."""
    monkeypatch.setattr(threads, "PROBE_EVERY", 3600.0)
    governor = threads.Governor(most=2)
    seconds_at = {1: 0.004, 2: 0.002}
    for _ in range(20):
        governor.run(timed_work(seconds_at, running))
    assert governor.current == 2
    seconds_at[2] = 0.02  # the surge
    for _ in range(20):
        governor.run(timed_work(seconds_at, running))
    assert governor.current == 1


@needs_two
def test_use_sets_the_team_and_leaves_blas_on_one():
    threads.use(1)
    assert threads.team.size == 1 and blas.threads() in (1, None)
    threads.use(2)
    assert threads.team.size == min(2, threads.team.most)
    assert blas.threads() in (1, None)


class Alternating(threads.Governor):
    """A governor that switches thread counts every step, whatever it measures."""

    def run(self, work):
        self.units += 1
        threads.use(1 + self.units % 2)
        return work()


@needs_two
@pytest.mark.parametrize("shape", [["--batch-size", "4"], ["--batch-size", "1", "--hidden", "192", "--layers", "1"]])
def test_switching_threads_every_step_trains_the_same_bytes(tmp_path, corpus, run_cli, monkeypatch, shape):
    """B > 1 (streams and batched products cut across the team) and B = 1 at H=192 (each step's
    units split across the team, meeting once a step)."""
    args = [*TINY, "--steps", "6", "--eval-every", "3", *shape, "--threads", "2"]
    assert run_cli("train", corpus, *args, "--out", tmp_path, "--run", "steady").exit_code == 0
    monkeypatch.setattr(train, "Governor", Alternating)
    assert run_cli("train", corpus, *args, "--out", tmp_path, "--run", "switching").exit_code == 0
    assert arrays(tmp_path / "steady" / "latest.npz") == arrays(tmp_path / "switching" / "latest.npz")


@needs_two
@pytest.mark.parametrize("shape", [["--batch-size", "4"], ["--batch-size", "1", "--hidden", "40"]])
def test_weight_drop_trains_the_same_bytes_on_one_thread_and_two(tmp_path, corpus, run_cli, monkeypatch, shape):
    """--weight-drop: B > 1 and B = 1 (H = 40: units in 3 blocks, split across the team), on 1
    thread and switching between 1 and 2 every step, the same bytes; the option is in the
    checkpoint, and it changes training."""
    from charlstm.checkpoint import load_checkpoint

    args = [*TINY, *shape, "--weight-drop", "0.4", "--steps", "8", "--out", tmp_path, "--quiet"]
    assert run_cli("train", corpus, *args, "--threads", "1", "--run", "one").exit_code == 0
    assert run_cli("train", corpus, *args, "--weight-drop", "0", "--threads", "1", "--run", "none").exit_code == 0
    monkeypatch.setattr(train, "Governor", Alternating)
    assert run_cli("train", corpus, *args, "--threads", "2", "--run", "two").exit_code == 0
    assert arrays(tmp_path / "one" / "latest.npz") == arrays(tmp_path / "two" / "latest.npz")
    assert load_checkpoint(tmp_path / "two" / "latest.npz").train_config.weight_drop == 0.4
    assert arrays(tmp_path / "one" / "latest.npz") != arrays(tmp_path / "none" / "latest.npz")


@pytest.mark.parametrize("size", [1, 2, 3])
def test_team_runs_every_share_once_and_passes_errors_on(size):
    """Team.run: each share once, whatever the thread count; an error in a helper's share reaches
    the caller, and the team's doorbells stay in step for the calls after it."""
    import threading as th

    team = threads.Team(3)
    team.size = size
    for _ in range(50):
        done = []
        team.run(lambda lo, hi, slot: done.append((lo, hi, slot, th.current_thread().name)), team.shares(9, 1))
        assert sorted(d[:3] for d in done) == [(0, 3, 0), (3, 6, 1), (6, 9, 2)]
        assert len({d[3] for d in done}) == size  # every thread took part

    def fails_in_the_last(lo, hi, slot):
        if slot == 2:
            raise ValueError(f"share {slot} failed")
    for _ in range(3):
        with pytest.raises(ValueError, match="share 2 failed"):
            team.run(fails_in_the_last, team.shares(9, 1))
    done = []
    team.run(lambda lo, hi, slot: done.append(slot), team.shares(9, 1))
    assert sorted(done) == [0, 1, 2]
