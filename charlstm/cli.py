"""The `charlstm` command line: parse options, build configs, call the library. No numerics here.

NumPy and Numba are imported inside the commands, after --threads has set the thread counts
(BLAS reads them at import) and so that `charlstm --help` answers instantly.
"""
import os
import sys

import click

POSITIVE = click.IntRange(min=1)


def set_threads(threads):
    """Threads for BLAS and Numba: must run before NumPy/SciPy/Numba are first imported."""
    if threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="charlstm")
def cli():
    """Train character-level LSTM language models on the CPU, sample text from them, score text.

    \b
    Quick start:
      charlstm train                         # trains on the bundled Shakespeare
      charlstm sample checkpoints/<run>/latest.npz --length 500
    """


@cli.command()
@click.option("--hidden", type=POSITIVE, default=8, show_default=True, help="Hidden units per layer.")
@click.option("--layers", type=POSITIVE, default=2, show_default=True, help="LSTM layers.")
@click.option("--peepholes/--no-peepholes", default=True, show_default=True, help="Check peephole weights too.")
@click.option("--batch-size", type=POSITIVE, default=3, show_default=True, help="Streams in the batch.")
@click.option("--seq-length", type=POSITIVE, default=5, show_default=True, help="Steps in the window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random model and data.")
def gradcheck(hidden, layers, peepholes, batch_size, seq_length, seed):
    """Check the kernels' gradients against central differences, in float64.

    Prints the max relative error of every parameter tensor and of the initial state h0, c0, and
    exits 1 if any is above 1e-6.

    \b
    Example:
      charlstm gradcheck --layers 2 --peepholes
    """
    from charlstm.gradcheck import TOLERANCE, gradcheck as run_gradcheck

    errors = run_gradcheck(hidden, layers, peepholes, batch_size, seq_length, seed)
    width = max(map(len, errors))
    for name, error in errors.items():
        click.echo(f"{name:<{width}}  {error:.3e}  {'ok' if error < TOLERANCE else 'FAIL'}")
    worst = max(errors, key=errors.get)
    if errors[worst] >= TOLERANCE:
        click.echo(f"gradcheck failed: {worst} has relative error {errors[worst]:.3e} > {TOLERANCE:g}", err=True)
        sys.exit(1)
    click.echo(f"gradcheck passed: max relative error {errors[worst]:.3e} ({worst}) < {TOLERANCE:g}")
