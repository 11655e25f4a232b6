#!/usr/bin/env python3
"""What the engine would do on 2 to 64 cores, predicted from this machine: the recurrent grid's cut
(charlstm/engine/grid.py) against the old streams-only cut, step time and chars/s against the ideal.

    python benchmarks/cores.py [--shapes 256x50x50x2 512x50x50x2 1024x32x50x1] [--cores 2 4 8 16 32 64]

Measured here, once per shape:
  - the 2-core step: `charlstm bench`'s training step (dropout off) on both threads; the ideal on
    N cores is its throughput times N / 2;
  - the batched work: a whole step on one thread, less its recurrent loops; on N cores it divides
    among the shares the engine cuts it into (network.SHARE_ROWS positions at least);
  - one meeting of two threads (barrier.meet, both spinning), modelled for k threads as k / 2 of
    them (each arrival moves the counter's cache line once);
  - what a team call costs per helper: posting it (Team.run: the caller posts to each helper, and
    the call ends when every share is done, so a late helper costs nothing more), and starting it
    (Team.together, the grid: every thread must be there, and the helpers' Python runs one at a
    time under the GIL), each modelled on N cores as N - 1 times the cost for one helper.
Then for each N and each cut (the grid the engine chooses on N cores, and the old cut: the B
streams in at most N shares of at least ROWS streams, no unit groups), one cell of that cut is
timed alone on one core: its streams, its slice of Wh, its gates, forward and backward over a
window, with its meetings made free (its counters preset), and its meetings added from the
model above. The busiest cell sets the pace:

    predicted step(N) = batched / shares(N) + L x (busiest cell, forward + backward)
                        + L x 2T meetings of its unit groups
                        + (run calls x posting + together calls x starting) x (N - 1)

"no calls" is the efficiency without the team calls' cost: the grid's own, what a team whose
helpers did not wait in turn for Python's GIL would reach. A prediction, not a measurement of an
N-core machine: it assumes each core runs its cell as fast
as this machine's one core does alone (its slice in its own L2), and L3 and memory keep up.
Prints numbers, asserts nothing; run it on a quiet machine.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_of(fn, reps=5):
    """The least of `reps` timings of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="*", default=["256x50x50x2", "512x50x50x2", "1024x32x50x1"], help="HxBxTxL")
    p.add_argument("--cores", nargs="*", type=int, default=[2, 4, 8, 16, 32, 64])
    args = p.parse_args()
    from charlstm.cli import set_threads

    set_threads(2)
    import numpy as np

    from charlstm.config import ModelConfig, TrainConfig
    from charlstm.engine import barrier, grid, network, packed, recurrent
    from charlstm.engine.grid import Grid
    from charlstm.engine.threads import team, use
    from charlstm.model import init_params
    from charlstm.optim import new_state
    from charlstm.train import train_step

    meeting = meeting_cost(barrier, team, use, np)
    posting, starting = per_helper_costs(team, use)
    print(f"measured: a meeting of 2 threads {meeting * 1e6:.2f} us; per helper, posting a call "
          f"{posting * 1e6:.1f} us, starting a call whose threads all must come {starting * 1e6:.1f} us\n")
    rng = np.random.default_rng(0)
    vocab = "".join(chr(33 + i) for i in range(65))
    for shape in args.shapes:
        H, B, T, L = map(int, shape.split("x"))
        model, cfg = ModelConfig(vocab, hidden=H, layers=L), TrainConfig(batch_size=B, seq_length=T, dropout=0.0)
        params = init_params(model, rng, cfg.init)
        grads, state = np.zeros_like(params), new_state(cfg.optim, params)
        xs = rng.integers(0, 65, (T, B))
        h, c = np.zeros((L, B, H), np.float32), np.zeros((L, B, H), np.float32)

        def step_on(threads):
            team.most = threads
            use(threads)
            ws = network.Workspace(model, B, T)
            return best_of(lambda: train_step(params, grads, state, ws, xs, xs, h, c, cfg, 1, cfg.lr)), ws

        two, _ = step_on(2)
        runs, togethers = count_team_calls(team, lambda: step_on(2))
        one, ws1 = step_on(1)
        recurrent_one = L * cell_seconds(recurrent, packed, network, model, B, T, Grid(1, 1), 0, np, rng)
        batched = one - recurrent_one
        positions = team_shares_count(B * T, network.SHARE_ROWS)
        print(f"{shape} (H x B x T x L): 2-core step {two * 1e3:.1f} ms ({B * T / two:,.0f} chars/s); on one "
              f"thread {one * 1e3:.1f} ms, of which recurrent {recurrent_one * 1e3:.1f} ms; team calls a step: "
              f"{runs} run, {togethers} together")
        print(f"{'cores':>5} {'cut':>6} {'cell fwd+bwd':>12} {'model':>9} {'meetings':>9} {'calls':>7} {'step':>9} "
              f"{'chars/s':>10} {'ideal':>10} {'efficiency':>10} {'no calls':>9}   {'old cut':>7} {'step':>9} {'efficiency':>10}")
        for N in args.cores:
            ideal = two * 2 / N
            rows = []
            for cut in (grid.choose(B, H, "float32", N), Grid(max(1, min(N, B // packed.ROWS)), 1)):
                cell = L * max(cell_seconds(recurrent, packed, network, model, B, T, cut, k, np, rng)
                               for k in busiest_cells(cut, B, H))
                meets = L * 2 * T * meeting * cut.unit_groups / 2 if cut.unit_groups > 1 else 0.0
                dispatch = (runs * posting + togethers * starting) * (N - 1)
                predicted = batched / min(N, positions(N)) + cell + meets + dispatch
                model_cell = L * 2 * T * (lambda cost: cost["products"] + cost["gates"])(
                    grid.cell_cost(B, H, "float32", cut)) * 1e-9
                rows.append((cut, cell, meets, dispatch, predicted, model_cell))
            (cut, cell, meets, dispatch, predicted, model_cell), old = rows
            print(f"{N:>5} {str(cut):>6} {cell * 1e3:>9.2f} ms {model_cell * 1e3:>6.2f} ms {meets * 1e3:>6.2f} ms {dispatch * 1e3:>4.2f} ms "
                  f"{predicted * 1e3:>6.2f} ms {B * T / predicted:>10,.0f} {B * T / ideal:>10,.0f} "
                  f"{100 * ideal / predicted:>9.0f}% {100 * ideal / (predicted - dispatch):>8.0f}%   {str(old[0]):>7} {old[4] * 1e3:>6.2f} ms "
                  f"{100 * ideal / old[4]:>9.0f}%", flush=True)
        print()


def busiest_cells(cut, B, H):
    """The cells of `cut` with the most streams or the most units (the last of each cut is the
    largest: near-equal ranges round down first)."""
    return sorted({cut.cells - 1, (cut.groups - 1) * cut.unit_groups, cut.unit_groups - 1})


def cell_seconds(recurrent, packed, network, model, B, T, cut, cell, np, rng):
    """One window of one layer, forward and backward, of cell `cell` of `cut` alone on this thread,
    its meetings made free (every counter preset past any meeting it could wait for)."""
    from charlstm.engine.barrier import ARRIVED, SYNC_SIZE

    H, G = model.hidden, 4 * model.hidden
    f32 = np.float32
    fwd_shape, bwd_shape, row = packed.packed_shapes(H, "float32")
    Wh = (rng.standard_normal((G, H)) * 0.05).astype(f32)
    Wf, Wb, scratch = np.zeros(fwd_shape, f32), np.zeros(bwd_shape, f32), np.zeros((B, row), f32)
    A = rng.standard_normal((T, B, G)).astype(f32)
    hs, cs = np.zeros((T + 1, B, H), f32), np.zeros((T + 1, B, H), f32)
    tc = np.zeros((T, B, H), f32)
    dH, dA = rng.standard_normal((T, B, H)).astype(f32) * 0.01, np.zeros((T, B, G), f32)
    dh, dc = np.zeros((B, H), f32), np.zeros((B, H), f32)
    peep = np.zeros(0, f32)
    sync = np.zeros((cut.groups + 1, SYNC_SIZE), np.int64)

    def window():  # forward leaves the gates in A: the next window's input terms are those (same work)
        sync[:, ARRIVED] = 1 << 40
        recurrent.forward_grid(A, Wh, Wf, peep, hs, hs, cs, tc, scratch, cell, cut.cells, cut.groups, cut.unit_groups,
                               sync)
        recurrent.backward_grid(A, cs, tc, peep, Wh, Wb, dH, dA, dA, dh, dc, scratch, cell, cut.cells,
                                cut.groups, cut.unit_groups, sync)
    return best_of(window)


def meeting_cost(barrier, team, use, np):
    """Seconds per meeting of two threads meeting 20,000 times in one team call (both spinning)."""
    from charlstm.engine.jit import kernel

    @kernel
    def meet_often(sync, times, threads):
        for m in range(1, times + 1):
            barrier.meet(sync, m, threads)

    team.most = 2
    use(2)
    times = 20000
    team.together(lambda rank, threads, sync: meet_often(sync[0], 10, threads), 2)  # compile, start the helper
    return best_of(lambda: team.together(lambda rank, threads, sync: meet_often(sync[0], times, threads), 2)) / times


def per_helper_costs(team, use):
    """Seconds per helper of posting a Team.run call and of starting a Team.together call: empty
    calls on two threads less the same on one."""
    team.most = 2
    calls = 2000

    def empty_calls(call, threads):
        use(threads)
        return best_of(lambda: [call() for _ in range(calls)]) / calls
    run = lambda: team.run(lambda lo, hi, slot: None, [(0, 1), (1, 2)])
    together = lambda: team.together(lambda rank, threads, sync: None, 2)
    return (max(0.0, empty_calls(run, 2) - empty_calls(run, 1)),
            max(0.0, empty_calls(together, 2) - empty_calls(together, 1)))


def count_team_calls(team, step):
    """Team calls in one training step: (run calls, together calls)."""
    counted = {"run": 0, "together": 0}
    calls = {name: getattr(team, name) for name in counted}

    def counting(name):
        def wrapped(*a, **k):
            counted[name] += 1
            return calls[name](*a, **k)
        return wrapped
    for name in counted:
        setattr(team, name, counting(name))
    try:
        step()  # best_of runs 1 + 5 steps
    finally:
        for name in counted:
            delattr(team, name)  # the class's methods again
    return round(counted["run"] / 6), round(counted["together"] / 6)


def team_shares_count(positions, smallest):
    """shares(N): how many shares the engine cuts a window's batched work into on N cores."""
    return lambda N: max(1, min(N, positions // smallest))


if __name__ == "__main__":
    main()
