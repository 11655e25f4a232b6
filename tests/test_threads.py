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


def test_a_surge_no_count_escapes_costs_one_probe(monkeypatch, running):
    """Everything slows 10-fold (on both counts): one probe shows the other count no better, and
    the slow units become the usual, rather than each unit finding the same surge and probing
    again."""
    monkeypatch.setattr(threads, "PROBE_EVERY", 3600.0)
    governor = threads.Governor(most=2)
    seconds_at = {1: 0.004, 2: 0.002}
    for _ in range(40):  # past the first probe
        governor.run(timed_work(seconds_at, running))
    seconds_at.update({1: 0.04, 2: 0.02})
    counts = [governor.run(timed_work(seconds_at, running)) for _ in range(200)]
    assert governor.current == 2
    assert counts.count(1) == threads.PROBE_UNITS


@pytest.mark.parametrize("most, rungs", [
    (1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (16, [1, 2, 3, 4, 6, 8, 16]),
    (64, [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16, 22, 32, 64])])
def test_the_ladder_keeps_the_counts_that_lower_the_busiest_threads_shares(most, rungs):
    """Of 64 shares, 9 threads work 8 each as 8 do, 12 work 6 as 11 do: only the first count of
    each ceil(most / k) is a rung."""
    assert threads.ladder(most) == rungs


def sixteen_cores(base, free):
    """Seconds a unit takes on n threads of a 16-core machine with `free` cores left by a neighbour:
    the busiest thread's ceil(16 / n) shares, and 5 times that where threads outnumber the free
    cores (a thread that loses its core holds the others up where they meet)."""
    return {n: base * -(-16 // n) * (1 if n <= free else 5) for n in range(1, 17)}


def governed(governor, seconds_at, running, units):
    """Runs `units` units; returns [(count the unit ran on, count kept after it)], and the clock's
    seconds spent at the count kept and at probed counts."""
    log, seconds = [], {"kept": 0.0, "probed": 0.0}

    def work():
        ran, kept = running[0], governor.current  # before the unit: a probe may end on it
        running.clock.now += seconds_at[ran]
        seconds["kept" if ran == kept else "probed"] += seconds_at[ran]
        return ran
    for _ in range(units):
        log.append((governor.run(work), governor.current))
    return log, seconds


def test_beside_a_neighbour_it_walks_to_the_fastest_rung_and_back_when_it_leaves(monkeypatch, running):
    """16 cores, a neighbour holding 4: 16 threads collapse (5 ms a unit), 8 take 2 ms, the rungs
    either side of 8 (6: 3 ms, 16) are slower. From 16 it settles on 8 and keeps it, only probes
    running other counts; when the neighbour leaves (16: 1 ms), it climbs back to 16."""
    monkeypatch.setattr(threads, "PROBE_EVERY", 0.1)
    governor = threads.Governor(most=16)
    seconds_at = sixteen_cores(0.001, free=12)
    log, _ = governed(governor, seconds_at, running, 1000)
    assert governor.current == 8
    settled = log[500:]
    assert {kept for _, kept in settled} == {8}
    assert [ran for ran, _ in settled].count(8) >= 0.9 * len(settled)

    seconds_at.update(sixteen_cores(0.001, free=16))  # the neighbour leaves
    log, _ = governed(governor, seconds_at, running, 2000)
    assert governor.current == 16
    settled = log[1000:]
    assert {kept for _, kept in settled} == {16}
    assert [ran for ran, _ in settled].count(16) >= 0.9 * len(settled)


def test_a_surge_on_the_ladder_probes_the_rung_below_at_once(monkeypatch, running):
    """Settled on 8 beside a neighbour holding 4 cores, with the last probe gone below (the next
    periodic one would go up), the neighbour takes 6 more: 8 threads collapse (10 ms), 6 take 3 ms,
    16 take 5 ms. It probes 6, not 16, within a few units (not a gap later), and moves there."""
    monkeypatch.setattr(threads, "PROBE_EVERY", 0.1)
    governor = threads.Governor(most=16)
    seconds_at = sixteen_cores(0.001, free=12)
    unit, probed = governed(governor, seconds_at, running, 1000)[0][-1], None
    for _ in range(2000):  # on to the end of a probe of 6
        if unit == (8, 8) and probed == 6:
            break
        (unit,), _ = governed(governor, seconds_at, running, 1)
        probed = unit[0] if unit[0] != unit[1] else probed
    else:
        pytest.fail("not settled on 8 after a probe of 6")
    seconds_at.update(sixteen_cores(0.001, free=6))  # the neighbour grows
    log, _ = governed(governor, seconds_at, running, threads.SURGE_UNITS + threads.PROBE_UNITS)
    assert {ran for ran, _ in log} == {8, 6}
    assert governor.current == 6


def test_probing_takes_at_most_its_share_of_the_time(monkeypatch, running):
    """Alone on 16 cores, a long steady run at 16 threads: the probes of 8 (each unit twice as
    slow) take at most PROBE_SHARE of the clock's time, beside the first probe (it comes as soon
    as there is a usual to compare with)."""
    monkeypatch.setattr(threads, "PROBE_EVERY", 0.1)
    governor = threads.Governor(most=16)
    seconds_at = sixteen_cores(0.001, free=16)
    log, seconds = governed(governor, seconds_at, running, 20000)
    assert {kept for _, kept in log} == {16}
    first_probe = threads.PROBE_UNITS * seconds_at[8]
    total = seconds["kept"] + seconds["probed"]
    assert seconds["probed"] > 10 * first_probe  # it did keep probing
    assert seconds["probed"] <= threads.PROBE_SHARE * total + first_probe


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
        assert len({d[3] for d in done}) <= size  # shares go to whichever thread is free first

    def fails_in_the_last(lo, hi, slot):
        if slot == 2:
            raise ValueError(f"share {slot} failed")
    for _ in range(3):
        with pytest.raises(ValueError, match="share 2 failed"):
            team.run(fails_in_the_last, team.shares(9, 1))
    done = []
    team.run(lambda lo, hi, slot: done.append(slot), team.shares(9, 1))
    assert sorted(done) == [0, 1, 2]


def test_a_helper_that_never_comes_holds_no_run_call_up():
    """Team.run ends when every share is done, not every helper: with the posts to the helpers
    lost (a helper that has not started yet), the caller works every share itself and returns."""
    import threading as th

    team = threads.Team(3)
    team.size = 3
    team._post = lambda job, count: None  # the helpers never hear of the call
    done, finished = [], th.Event()

    def call():
        team.run(lambda lo, hi, slot: done.append(slot), team.shares(9, 1))
        finished.set()
    th.Thread(target=call, daemon=True).start()
    assert finished.wait(10) and sorted(done) == [0, 1, 2]
