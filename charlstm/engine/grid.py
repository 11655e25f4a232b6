"""How the recurrent loops are cut across threads: a grid of stream groups x unit groups, chosen
from the shape and the core count by a cost model written down here.

A step of a layer is z = h_{t-1} @ Wh.T for the batch's B streams (backward: dh = dA_t @ Wh). A
stream needs nothing from another stream, and a unit's gates need all of its stream's h_{t-1}. So
the threads form a grid (recurrent.py's forward_grid and backward_grid):

    cell (s, g)   streams of stream group s (B cut into `groups` near-equal ranges) x the units of
                  unit group g (the unit blocks cut into `unit_groups` ranges, PANELS blocks at a time,
                  so the backward micro-kernel's panel pairs never straddle two groups)

A cell makes its units' four gate pre-activations for its streams from its slice of Wh (packed
once per window, then kept in its core's L2 from step to step: DeepCPU's layout), runs their gate
math, and meets the other cells of its stream group once a step (barrier.meet on the group's own
counter); groups never wait for each other. The corners are today's two paths: B = 1 is the grid
with one stream group, large B on few cores the grid with one unit group (no meeting at all).

THE COST MODEL. Per step, one cell with r = ceil(B / groups) streams and n = its units costs

    products  max(fmas / (FMA_RATE * chain_share),  slice bytes / bandwidth of where the slice lives)
              fmas = r * H * 4n / LANES vector fmas; chain_share = min(1, chains / CHAINS_NEEDED),
              chains = 2 x rows a block (one stream: 4, the one-row kernel's four panels): fewer
              than CHAINS_NEEDED independent fma chains leave the fma units waiting on latency;
              the slice (4n x H weights) streams from L2 if it fits in half of it, else from L3
    gates     r * n * GATE_NS + r * ROW_NS
    meeting   MEET_NS + MEET_NS_PER_THREAD * unit_groups, when unit_groups > 1

In bfloat16 (network.Workspace's precision) a weight is 2 bytes and, with the Dot product, a
vector instruction makes two multiply-adds a lane (products.py); the constants are float32's.

The grid with the least step time wins, the fewer cells on a tie within TIE (a cell that
costs nothing measurable is a thread that can only lose its core). The constants are per core,
measured on the 2-core AMD EPYC Zen 4 of 2026-12-07 with benchmarks/cores.py, which times one
cell of each chosen cut alone on one core against this model; they set the ratios between
compute, bytes and meetings, which is all the choice depends on.

The grid depends on B, H, the dtype and the core count (threads.Team.most), never on how many
threads run now: a thread that runs several cells runs each as its owner would, so the bytes are
the same on 1 thread and on all. Another core count is another grid, which changes only which
units a gate loop covers at a time: the same values, not always the same last bit.
CHARLSTM_GRID=SxU forces S stream groups x U unit groups (for tests: every cut on any machine).
"""
import os
from dataclasses import dataclass

import numpy as np

from charlstm.engine.jit import inline_kernel
from charlstm.engine.target import BF16_PRODUCT, SHAPE

# ---- the cost model's constants (module docstring): one core, nanoseconds, float32 lanes
FMA_RATE = 2.8  # vector fmas per ns at full chains: one 512-bit fma a cycle (Zen 4 splits it in two) at ~2.8 GHz
CHAINS_NEEDED = 8  # fma latency x issue width: 4 cycles x 2 pipes
L2_BYTES = 1 << 20  # a core's L2 (the smallest of the machines seen); a slice fits if it takes at most half
BANDWIDTH_L2 = 80.0  # bytes per ns a core streams from its L2
BANDWIDTH_L3 = 48.0  # bytes per ns a core streams from L3 (shared, so less when many cores read)
GATE_NS = 0.25  # the gate math of one unit of one stream (forward; backward is alike)
ROW_NS = 300.0  # each stream of a cell, each step: its gate call, and its rows of the window's
#                 arrays (input terms, state, gradients) fetched in pieces of a cell's units
MEET_NS = 150.0  # one meeting of two threads on two idle cores
MEET_NS_PER_THREAD = 40.0  # each further thread at a meeting: one more atomic add on the same line
TIE = 0.03  # cuts within 3% of the best count as equal: the fewer cells win


@dataclass(frozen=True)
class Grid:
    groups: int  # stream groups: B cut into this many ranges
    unit_groups: int  # unit groups: the unit blocks cut into this many ranges

    @property
    def cells(self):
        return self.groups * self.unit_groups

    def __str__(self):
        return f"{self.groups}x{self.unit_groups}"


def _widths(dtype):
    """(accumulator lanes a vector, bytes a weight, vector instructions an fma of float32 lanes
    costs) for the products' dtype: "bfloat16" is bfloat16 weights into float32 lanes, half an
    instruction a multiply-add with the Dot product (two a lane), one with Widen (products.py)."""
    if str(dtype) == "bfloat16":
        return SHAPE.vector_bytes // 4, 2, 0.5 if BF16_PRODUCT == "dot" else 1.0
    itemsize = np.dtype(dtype).itemsize
    return SHAPE.vector_bytes // itemsize, itemsize, itemsize / 4  # float64 lanes are half as many per fma


def unit_pairs(H, dtype):
    """The unit groups a layer of H units can have at most: its unit blocks (packed.py's panels of
    LANES units) in runs of PANELS."""
    lanes = _widths(dtype)[0]
    return -(-(-(-H // lanes)) // SHAPE.panels)


def cell_cost(B, H, dtype, grid):
    """The model's step time in ns of the busiest cell of `grid` (module docstring), and its parts.
    dtype is the products': "float32", "float64" or "bfloat16" (network.Workspace's precision)."""
    lanes, itemsize, per_fma = _widths(dtype)
    pairs = unit_pairs(H, dtype)
    r = -(-B // grid.groups)
    n = min(-(-pairs // grid.unit_groups) * SHAPE.panels * lanes, H)
    fmas = r * H * 4 * n / lanes * per_fma
    if r == 1:
        chains = 4
    else:
        blocks = -(-r // SHAPE.rows)
        chains = SHAPE.panels * (r // blocks)
    compute = fmas / (FMA_RATE * min(1.0, chains / CHAINS_NEEDED))
    slice_bytes = 4 * n * H * itemsize
    bandwidth = BANDWIDTH_L2 if slice_bytes <= L2_BYTES // 2 else BANDWIDTH_L3
    products = max(compute, slice_bytes / bandwidth)
    gates = r * n * GATE_NS + r * ROW_NS
    meeting = MEET_NS + MEET_NS_PER_THREAD * grid.unit_groups if grid.unit_groups > 1 else 0.0
    return {"products": products, "gates": gates, "meeting": meeting, "step": products + gates + meeting}


def candidates(B, H, dtype, cores):
    """Every grid the engine may run: at most `cores` cells, no group without a stream or a unit."""
    pairs = unit_pairs(H, dtype)
    return [Grid(s, u) for s in range(1, min(B, cores) + 1) for u in range(1, min(pairs, cores // s) + 1)]


def choose(B, H, dtype, cores):
    """The grid for B streams of H units on `cores` cores: the least modelled step time, the fewest
    cells among those within TIE of it (CHARLSTM_GRID overrides, for tests)."""
    forced = os.environ.get("CHARLSTM_GRID")
    if forced:
        return _forced(forced, B, H, dtype)
    costs = {grid: cell_cost(B, H, dtype, grid)["step"] for grid in candidates(B, H, dtype, cores)}
    best = min(costs.values())
    return min((grid for grid, cost in costs.items() if cost <= best * (1 + TIE)),
               key=lambda grid: (grid.cells, costs[grid]))


def _forced(text, B, H, dtype):
    """CHARLSTM_GRID=SxU, clipped to what the shape has (a test forcing 3x4 on B = 1 gets 1x4)."""
    try:
        groups, unit_groups = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"CHARLSTM_GRID={text}: expected SxU, e.g. 2x3") from None
    return Grid(max(1, min(groups, B)), max(1, min(unit_groups, unit_pairs(H, dtype))))


# ---------------------------------------------------------------- the cut, inside the kernels

@inline_kernel
def stream_range(group, groups, B):
    """Streams lo..hi-1 of stream group `group` of `groups`: near-equal contiguous ranges."""
    return group * B // groups, (group + 1) * B // groups


@inline_kernel
def unit_blocks(group, unit_groups, blocks, panels):
    """Unit blocks b0..b1-1 of unit group `group`: the `blocks` blocks cut `panels` at a time into
    near-equal ranges (the last run may be short)."""
    runs = -(-blocks // panels)
    return min(group * runs // unit_groups * panels, blocks), min((group + 1) * runs // unit_groups * panels, blocks)
