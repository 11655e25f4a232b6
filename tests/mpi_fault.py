"""`charlstm train`, with a fault planted in one rank: run under mpiexec by tests/test_mpi.py.

    mpiexec -n N python tests/mpi_fault.py RANK STEP KIND train ARGS...

KIND `exception`: RANK raises RuntimeError as it starts step STEP (counting from 1); `nan`: RANK's
loss at step STEP is NaN, as an overflow in its share of the batch would make it; `diverge`: RANK
nudges one parameter after step STEP, which the ranks' checksum comparison must catch.
"""
import os
import sys

from charlstm import train
from charlstm.engine import network
from charlstm.cli import cli

rank, step, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
mine = os.environ.get("PMI_RANK") == str(rank)
real_step, real_loss, calls = train.Trainer.step, network.loss, []


def step_with_fault(self):
    if mine and kind == "exception" and self.state.step + 1 == step:
        raise RuntimeError(f"planted fault at step {step}")
    loss = real_step(self)
    if mine and kind == "diverge" and self.state.step == step:
        self.state.params[0] += 1e-3
    return loss


def loss_with_fault(params, ws, y):
    calls.append(1)
    return float("nan") if mine and kind == "nan" and len(calls) == step else real_loss(params, ws, y)


train.Trainer.step = step_with_fault
network.loss = loss_with_fault
cli.main(sys.argv[4:], prog_name="charlstm")
