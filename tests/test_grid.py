"""The recurrent grid (engine/grid.py): every cut the cost model can choose, forced, against the
NumPy reference, and the very same bits whatever number of threads runs the cut's cells."""
import numpy as np
import pytest

from charlstm.engine import grid, network
from charlstm.engine.grid import Grid

from tests.test_kernels import assert_matches_reference, random_case, random_masks, run_network

# (layers, peepholes, B, H): B = 1, 3, 7, 50 and H = 3, 37, 100, 256 each more than once,
# L = 1..3, peepholes on and off.
CASES = [(1, False, 1, 3), (2, True, 1, 37), (3, False, 1, 100), (1, True, 1, 256), (2, False, 3, 37),
         (3, True, 3, 256), (2, True, 7, 3), (3, True, 7, 100), (1, False, 50, 37), (2, True, 50, 100),
         (1, False, 50, 256)]
# Cuts forced: the corners (1 x 1, streams only, units only) and mixed grids; grid.py clips a cut
# to what a shape has (B = 1 has one stream group; H = 3 one unit group).
CUTS = ["1x1", "2x1", "7x1", "1x2", "1x3", "2x2", "3x2"]


def threads_to_try(cells):
    """1 thread (every cell in turn), one thread per cell (each stream group meets on its own
    counter), and a count in between (everyone meets on one counter)."""
    return sorted({1, cells, max(1, cells - 1)})


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("layers,peepholes,B,H", CASES)
def test_every_cut_matches_reference_and_the_thread_count_changes_no_bit(monkeypatch, team_of, layers, peepholes,
                                                                        B, H, dtype, tol):
    case = random_case(layers, peepholes, B, 5, dtype, hidden=H)
    masks = random_masks(case[0], B, 5, p=0.3, seed=2)
    for text in CUTS:
        monkeypatch.setenv("CHARLSTM_GRID", text)
        cut = grid.choose(B, H, dtype, 1)
        assert cut.groups <= B and cut.unit_groups <= grid.unit_pairs(H, dtype)
        runs = {}
        for threads in threads_to_try(cut.cells):
            team_of(max(cut.cells, 2), threads)
            runs[threads] = run_network(*case, masks=masks)
        first = runs[1]
        assert_matches_reference(case, first, tol, masks)
        for threads, results in runs.items():
            for ours, theirs in zip(results, first):
                assert np.array_equal(ours, theirs), (text, threads)


def test_the_workspace_runs_the_cut_the_model_chooses(monkeypatch, team_of):
    monkeypatch.delenv("CHARLSTM_GRID", raising=False)
    config = random_case(2, False, 50, 5, "float32", hidden=256)[0]
    for cores in (1, 2, 16, 64):
        team_of(cores, 1)
        assert network.Workspace(config, 50, 5).grid == grid.choose(50, 256, "float32", cores)


@pytest.mark.parametrize("B,H", [(1, 256), (4, 256), (6, 512), (32, 1024), (50, 256), (50, 512)])
@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 32, 64])
def test_the_chosen_cut_is_a_cheapest_one_the_machine_can_run(monkeypatch, B, H, cores):
    """Within the cores, no group without streams or units, and no cheaper cut left out (the
    model's own figures: the choice is only a fewer-cells tie-break away from the minimum)."""
    monkeypatch.delenv("CHARLSTM_GRID", raising=False)
    cut = grid.choose(B, H, "float32", cores)
    assert cut.cells <= cores and cut.groups <= B and cut.unit_groups <= grid.unit_pairs(H, "float32")
    costs = [grid.cell_cost(B, H, "float32", g)["step"] for g in grid.candidates(B, H, "float32", cores)]
    assert grid.cell_cost(B, H, "float32", cut)["step"] <= min(costs) * (1 + grid.TIE)


def test_the_corners_are_the_two_old_paths(monkeypatch):
    """One stream is cut by units only; many streams on two cores by streams only (no meeting)."""
    monkeypatch.delenv("CHARLSTM_GRID", raising=False)
    assert grid.choose(1, 256, "float32", 2) == Grid(1, 2)
    assert grid.choose(50, 256, "float32", 2) == Grid(2, 1)
    assert grid.choose(50, 256, "float32", 1) == Grid(1, 1)


def test_few_streams_on_many_cores_cut_units_too(monkeypatch):
    """B = 4 on 16 cores: a streams-only cut would leave 12 cores idle."""
    monkeypatch.delenv("CHARLSTM_GRID", raising=False)
    cut = grid.choose(4, 512, "float32", 16)
    assert cut.unit_groups > 1 and cut.cells > 4


@pytest.mark.parametrize("unit_groups,blocks,panels", [(1, 16, 2), (3, 16, 2), (8, 16, 2), (2, 3, 2), (3, 7, 4)])
def test_unit_blocks_cover_every_block_once_in_whole_runs(unit_groups, blocks, panels):
    cuts = [grid.unit_blocks(g, unit_groups, blocks, panels) for g in range(unit_groups)]
    assert cuts[0][0] == 0 and cuts[-1][1] == blocks
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
    assert all(lo % panels == 0 for lo, _ in cuts)


def test_a_bad_forced_cut_says_what_it_expects(monkeypatch):
    monkeypatch.setenv("CHARLSTM_GRID", "two")
    with pytest.raises(ValueError, match="expected SxU"):
        grid.choose(4, 32, "float32", 2)


def test_a_run_resumed_on_another_core_count_continues_in_value(tmp_path, corpus, run_cli, team_of):
    """The cut follows the core count (the grid, the batched work's shares), so a checkpoint taken
    on 2 cores and resumed on 3 continues the same run in value, not in the last bits: its weights
    after 20 steps agree with the straight run's to float32 rounding, grown over 10 steps."""
    from charlstm.checkpoint import load_checkpoint

    args = ["--hidden", "40", "--layers", "2", "--batch-size", "16", "--seq-length", "16", "--eval-every", "5",
            "--save-every", "10", "--threads", "1", "--out", tmp_path, "--quiet"]
    team_of(2, 1)
    assert run_cli("train", corpus, *args, "--steps", 20, "--run", "straight").exit_code == 0
    assert run_cli("train", corpus, *args, "--steps", 10, "--run", "split").exit_code == 0
    team_of(3, 1)
    assert run_cli("train", "--resume", tmp_path / "split" / "latest.npz", "--steps", 20, "--quiet").exit_code == 0
    straight = load_checkpoint(tmp_path / "straight" / "latest.npz")
    resumed = load_checkpoint(tmp_path / "split" / "latest.npz")
    assert resumed.manifest["step"] == 20
    assert np.allclose(resumed.params, straight.params, rtol=1e-4, atol=1e-5)
