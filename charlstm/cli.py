"""The `charlstm` command line: parse options, build configs, call the library. No numerics here.

NumPy and Numba are imported inside the commands, after --threads has set the thread counts
(BLAS reads them at import) and so that `charlstm --help` answers instantly.
"""
import os
import sys

import click

from charlstm.config import (DEFAULT_LR, DYNAMIC_ETA, DYNAMIC_LAMBDA, DYNAMIC_SEGMENT, INITS, LR_DECAY,
                             LR_DECAY_AFTER, OPTIMIZERS, PRECISIONS, RMS_TEXT_CHARS)
from charlstm.errors import UserError

POSITIVE = click.IntRange(min=1)
UNIT = click.FloatRange(min=0, max=1, max_open=True)  # [0, 1): RMSprop's alpha, Adam's betas
EPS = click.FloatRange(min=0, min_open=True)


# What each of the engine's bfloat16 products is (engine/target.py picks one per machine).
BF16_PRODUCT_WORDS = {"dot": "AVX512_BF16 vdpbf16ps", "widen": "bfloat16 weights widened to float32"}


def set_threads(threads):
    """Threads for the engine's team (and the cap for BLAS). BLAS reads its count when it loads, so
    this runs before NumPy, SciPy and Numba are imported, and the team takes its size from
    NUMBA_NUM_THREADS; in a process that already made its team (tests), the team runs that many."""
    if not threads:
        return
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if "charlstm.engine.threads" in sys.modules:
        from charlstm.engine.threads import use

        use(threads)
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)


class OneLineErrors(click.Group):
    """The `charlstm` group: every error, click's usage errors included, is one line on stderr.

    click's standalone mode prints a usage error as four lines (usage, hint, blank, error), so main
    runs click in non-standalone mode and reports errors itself: a usage error exits 2, any other
    ClickException (UserError, CheckpointError) its exit_code (1), Ctrl-C outside training 130.
    `--help`, `--version` and ctx.exit(n) come back as exit codes; sys.exit(n) in a command passes
    through untouched. An explicit main(standalone_mode=False) keeps click's own behaviour.
    """

    def parse_args(self, ctx, args):
        # A bare `charlstm` prints the help on stderr and exits 2, on every click we admit: click 8.2
        # and later raise NoArgsIsHelpError (a usage error) for it, click 8.1 printed the help on
        # stdout and exited 0.
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), err=True, color=ctx.color)
            ctx.exit(2)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"Error: {one_line(e.format_message())}{help_hint(e)}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:
            click.echo("Aborted!", err=True)
            # click raises Abort inside its `except KeyboardInterrupt` ("from e" since 8.2, "from None"
            # in 8.1): __context__ holds the interrupt on both.
            sys.exit(130 if isinstance(e.__context__, KeyboardInterrupt) else 1)  # 128 + SIGINT
        # Commands return None; an int here is the code of ctx.exit(n), --help or --version.
        sys.exit(code if isinstance(code, int) else 0)


def one_line(message):
    return " ".join(message.split())


def help_hint(error):
    """' (see 'charlstm train --help')' for a usage error that knows its command, else ''."""
    ctx = getattr(error, "ctx", None)
    if not isinstance(error, click.UsageError) or ctx is None or ctx.command.get_help_option(ctx) is None:
        return ""
    return f" (see '{ctx.command_path} {max(ctx.command.get_help_option_names(ctx), key=len)}')"


@click.group("charlstm", cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="charlstm")
def cli():
    """Train character-level LSTM language models on the CPU, sample text from them, score text.

    \b
    Quick start:
      charlstm train                         # trains on the bundled Shakespeare
      charlstm sample checkpoints/<run>/latest.npz --length 500
    """


@cli.command()
@click.argument("corpus", required=False, type=click.Path(dir_okay=True))
@click.option("--hidden", type=POSITIVE, default=256, show_default=True, help="Hidden units per layer.")
@click.option("--layers", type=POSITIVE, default=2, show_default=True, help="Stacked LSTM layers.")
@click.option("--peepholes/--no-peepholes", default=False, show_default=True, help="Peephole connections (Gers 2000).")
@click.option("--seq-length", type=POSITIVE, default=50, show_default=True, help="Steps of truncated BPTT per window.")
@click.option("--batch-size", type=POSITIVE, default=50, show_default=True, help="Parallel streams per step.")
@click.option("--optim", type=click.Choice(OPTIMIZERS), default="rmsprop", show_default=True,
              help="Optimizer (formulas in docs/model.md; RMSprop measured best for 10-minute runs).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate [default: 0.002 for rmsprop and adam, 0.02 for adagrad].")
@click.option("--adagrad-eps", type=click.FloatRange(min=0), default=1e-20, show_default=True,
              help="Adagrad's eps: w -= lr * g / sqrt(mem + eps).")
@click.option("--rmsprop-alpha", type=UNIT, default=0.95, show_default=True,
              help="RMSprop's decay (char-rnn's -decay_rate; PyTorch's alpha is 0.99): ms = alpha*ms + (1-alpha)*g*g.")
@click.option("--rmsprop-eps", type=EPS, default=1e-8, show_default=True,
              help="RMSprop's eps: w -= lr * g / (sqrt(ms) + eps).")
@click.option("--adam-beta1", type=UNIT, default=0.9, show_default=True, help="Adam's decay of the mean of g.")
@click.option("--adam-beta2", type=UNIT, default=0.999, show_default=True, help="Adam's decay of the mean of g*g.")
@click.option("--adam-eps", type=EPS, default=1e-8, show_default=True,
              help="Adam's eps, outside the root (as PyTorch and torch-rnn).")
@click.option("--lr-decay", type=click.FloatRange(min=0, max=1, min_open=True), metavar="FACTOR",
              help=f"Multiply lr by FACTOR at the epoch ends that --lr-decay-after or --lr-decay-every name; "
                   f"1 is no decay.  [default: {LR_DECAY:g}]")
@click.option("--lr-decay-after", type=click.IntRange(min=0), metavar="EPOCHS",
              help=f"char-rnn's schedule: decay at every epoch end from the end of epoch EPOCHS on.  "
                   f"[default: {LR_DECAY_AFTER} unless --lr-decay-every is given]")
@click.option("--lr-decay-every", type=POSITIVE, metavar="EPOCHS",
              help="torch-rnn's schedule instead: decay at the end of every EPOCHS-th epoch.")
@click.option("--clip", type=click.FloatRange(min=0), default=5.0, show_default=True, help="Gradient clip; 0 is off.")
@click.option("--clip-mode", type=click.Choice(["value", "norm"]), default="value", show_default=True,
              help="Clip each entry (char-rnn) or the global L2 norm.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.3, show_default=True,
              help="Dropout on each layer's output on its way up (not on h -> h), reached after "
                   "--dropout-warmup epochs; 0 is off.")
@click.option("--weight-drop", type=UNIT, default=0.0, show_default=True, metavar="P",
              help="DropConnect on the recurrent weights (AWD-LSTM's weight drop): each window drops each "
                   "weight of every layer's Wh with probability P, the same at every step; 0 is off.")
@click.option("--init", type=click.Choice(INITS), default="fan-in", show_default=True,
              help="Initialisation: fan-in is PyTorch's (all weights and biases in ±1/sqrt(H)); char-rnn is "
                   "weights in ±0.08 and forget bias 1.")
@click.option("--dropout-warmup", type=click.FloatRange(min=0), default=20.0, show_default=True, metavar="EPOCHS",
              help="Ramp dropout up in a straight line from 0 to --dropout over this many epochs (0: "
                   "--dropout from the first step).")
@click.option("--val-frac", type=click.FloatRange(min=0, max=1, max_open=True), default=0.05, show_default=True,
              help="Tail fraction of the corpus held out for validation.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="f32", show_default=True,
              help="The matrix products' operands: float32, or bfloat16 with float32 accumulation (a float32 "
                   "model; weights, gradients and state stay float32). A resumed run keeps its checkpoint's.")
@click.option("--steps", type=POSITIVE, help="Stop at this total step count (a resumed run counts from 0).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Stop after this many epochs.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many seconds of training (default 300 when no other stop is given).")
@click.option("--eval-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Steps between validation runs; 0 validates only at the end.")
@click.option("--save-every", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps between checkpoints; 0 saves only at the end.")
@click.option("--keep", type=click.IntRange(min=0), default=3, show_default=True,
              help="Step checkpoints kept (latest.npz and best.npz always are); 0 keeps all.")
@click.option("--out", type=click.Path(), default="checkpoints", show_default=True, help="Folder of run folders.")
@click.option("--run", help="Run folder name (default: the corpus name, numbered if taken).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialisation and samples.")
@click.option("--threads", type=POSITIVE, help="Threads for kernels and BLAS (default: all cores).")
@click.option("--resume", type=click.Path(), help="Continue the run that wrote this checkpoint, exactly.")
@click.option("--init-from", type=click.Path(), help="Start a new run from this checkpoint's weights.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of the corpus.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def train(ctx, corpus, resume, init_from, out, run, quiet, encoding, **options):
    """Train a character-level LSTM on CORPUS (default: the bundled tinyshakespeare.txt).

    Checkpoints go to OUT/RUN/ (step-XXXXXXXX.npz, latest.npz, best.npz) with metrics.jsonl
    beside them. Ctrl-C saves and stops; --resume continues exactly where a run stopped.

    \b
    Examples:
      charlstm train                                    # Shakespeare, 5 minutes
      charlstm train my.txt --time-limit 600 --hidden 512
      charlstm train --optim rmsprop --lr-decay 0.97 --lr-decay-after 10    # char-rnn's recipe
      charlstm train --optim adam --lr-decay 0.5 --lr-decay-every 5         # torch-rnn's
      charlstm train --resume checkpoints/tinyshakespeare/latest.npz --steps 20000
    """
    given = {name for name in options if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    check_recipe(ctx, options, given, resume)
    from charlstm import mpi

    comm = mpi.world() if mpi.launched() else None  # MPI first: its ranks per machine set the default threads
    set_threads(options["threads"] or (mpi.threads_per_rank(comm) if comm else None))
    from charlstm.train import train as run_training

    args = (corpus, options, given, out, run, resume, init_from, quiet, encoding)
    if comm is None:
        sys.exit(run_training(*args))
    from charlstm.distributed import Job

    sys.exit(Job(comm).run(run_training, *args))


def check_recipe(ctx, options, given, resume):
    """Refuse optimizer, schedule and precision options that do not go together (one usage line
    each), then fill in the ones that depend on others: --lr from --optim, the schedule from the
    --lr-decay options given (a resumed run keeps its checkpoint's whatever is filled in here)."""
    from charlstm.schedule import fill_schedule, schedule_problem

    problem = schedule_problem(options["lr_decay_after"], options["lr_decay_every"])
    if problem:
        raise click.UsageError(problem, ctx)
    if options["precision"] == "bf16" and options["dtype"] != "float32":
        raise click.UsageError("--precision bf16 needs --dtype float32 (its products accumulate in float32)", ctx)
    # A resumed run's optimizer is the checkpoint's, whatever --optim says (train checks they agree).
    strays = [name for name in sorted(given) if name.split("_")[0] in OPTIMIZERS and name.split("_")[0] != options["optim"]]
    if strays and not resume:
        flag = strays[0].replace("_", "-")
        raise click.UsageError(f"--{flag} is an option of --optim {strays[0].split('_')[0]}, and this run uses "
                               f"--optim {options['optim']}", ctx)
    options["lr_decay"], options["lr_decay_after"], options["lr_decay_every"] = fill_schedule(
        options["lr_decay"], options["lr_decay_after"], options["lr_decay_every"])
    options["lr"] = DEFAULT_LR[options["optim"]] if options["lr"] is None else options["lr"]


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(checkpoint, as_json):
    """Show what a checkpoint holds: model, training options, progress, losses and sizes.

    \b
    Example:
      charlstm info checkpoints/tinyshakespeare/latest.npz
    """
    from charlstm.info import describe

    click.echo(describe(checkpoint, as_json))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", default="curves.png", show_default=True, type=click.Path(),
              help="Picture to write; the format follows the extension (.png, .svg, .pdf).")
@click.option("--x", "x_axis", type=click.Choice(["step", "chars", "time"]), default="step", show_default=True,
              help="Horizontal axis: optimizer steps, characters seen, or wall-clock seconds.")
def plot(runs, output, x_axis):
    """Plot the train and validation loss of one or more RUNS (run folders), overlaid.

    Reads each run's metrics.jsonl (a run still training plots what it has logged), draws the loss
    in nats with bits/char on the right axis, marks each run's best validation point, and prints
    it. Needs matplotlib: pip install 'charlstm[plot]'.

    \b
    Examples:
      charlstm plot checkpoints/tinyshakespeare
      charlstm plot checkpoints/adagrad checkpoints/adam -o compare.png --x time
    """
    from charlstm.plot import plot as draw_runs

    for line in draw_runs(runs, output, x_axis, warn=lambda m: click.echo(f"Warning: {m}", err=True)):
        click.echo(line)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("corpus", required=False, type=click.Path())
@click.option("--hidden", type=POSITIVE, help="Hidden units per layer.")
@click.option("--batch-size", type=POSITIVE, help="Streams per step.")
@click.option("--seq-length", type=POSITIVE, help="Steps per window.")
@click.option("--layers", type=POSITIVE, help="Stacked layers.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="Time each shape for at least this long (after 3 warm-up steps).")
@click.option("--threads", type=POSITIVE, help="Threads for kernels and BLAS (default: all cores).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="f32", show_default=True,
              help="The matrix products' operands: float32, or bfloat16 (docs/engine.md).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: chars_per_s, gflops (and with bf16, product: dot or widen).")
def bench(corpus, hidden, batch_size, seq_length, layers, seconds, threads, precision, as_json):
    """Time full training steps (forward, backward, clipping, the optimizer) on CORPUS.

    Prints chars/s and the achieved GFLOP/s of the useful matrix products. With no shape options
    it runs the grid of shapes the project is measured on and prints a table.

    \b
    Examples:
      charlstm bench --hidden 256 --batch-size 32 --seq-length 64 --layers 1
      charlstm bench            # the whole grid
    """
    set_threads(threads)
    import json

    import tempfile

    from charlstm.bench import GRID, measure
    from charlstm.data import load_corpus
    from charlstm.engine.target import BF16_PRODUCT
    from charlstm.train import bundled_corpus

    with tempfile.TemporaryDirectory() as cache:
        data = load_corpus(corpus or bundled_corpus(), cache)
        shape_given = any(v is not None for v in (hidden, batch_size, seq_length, layers))
        grid = [(hidden or 256, batch_size or 32, seq_length or 64, layers or 1)] if shape_given else GRID
        rows = []
        for H, B, T, L in grid:
            rows.append(((H, B, T, L), measure(data.ids, data.vocab, H, B, T, L, seconds, precision=precision)))
    product = {"product": BF16_PRODUCT} if precision == "bf16" else {}  # which bfloat16 product ran
    if as_json:
        result = {**rows[0][1], **product} if shape_given else [
            {"hidden": H, "batch_size": B, "seq_length": T, "layers": L, **r, **product} for (H, B, T, L), r in rows]
        click.echo(json.dumps(result))
        return
    if product:
        click.echo(f"bf16 product: {BF16_PRODUCT} ({BF16_PRODUCT_WORDS[BF16_PRODUCT]})")
    click.echo(f"{'H':>5} {'B':>4} {'T':>4} {'L':>3} {'chars/s':>12} {'GFLOP/s':>9}")
    for (H, B, T, L), r in rows:
        click.echo(f"{H:>5} {B:>4} {T:>4} {L:>3} {r['chars_per_s']:>12,.0f} {r['gflops']:>9.1f}")


@cli.command()
@click.option("--hidden", type=POSITIVE, default=8, show_default=True, help="Hidden units per layer.")
@click.option("--layers", type=POSITIVE, default=2, show_default=True, help="LSTM layers.")
@click.option("--peepholes/--no-peepholes", default=True, show_default=True, help="Check peephole weights too.")
@click.option("--batch-size", type=POSITIVE, default=3, show_default=True, help="Streams in the batch.")
@click.option("--seq-length", type=POSITIVE, default=5, show_default=True, help="Steps in the window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random model and data.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Check with this dropout (one fixed set of masks).")
@click.option("--weight-drop", type=UNIT, default=0.0, show_default=True,
              help="Check with this weight drop on Wh (one fixed mask).")
def gradcheck(hidden, layers, peepholes, batch_size, seq_length, seed, dropout, weight_drop):
    """Check the kernels' gradients against central differences, in float64.

    Prints the max relative error of every parameter tensor and of the initial state h0, c0, and
    exits 1 if any is above 1e-6.

    \b
    Example:
      charlstm gradcheck --layers 2 --peepholes
    """
    from charlstm.gradcheck import TOLERANCE, gradcheck as run_gradcheck

    errors = run_gradcheck(hidden, layers, peepholes, batch_size, seq_length, seed, dropout, weight_drop)
    width = max(map(len, errors))
    for name, error in errors.items():
        click.echo(f"{name:<{width}}  {error:.3e}  {'ok' if error < TOLERANCE else 'FAIL'}")
    worst = max(errors, key=errors.get)
    if errors[worst] >= TOLERANCE:
        click.echo(f"gradcheck failed: {worst} has relative error {errors[worst]:.3e} > {TOLERANCE:g}", err=True)
        sys.exit(1)
    click.echo(f"gradcheck passed: max relative error {errors[worst]:.3e} ({worst}) < {TOLERANCE:g}")


UNKNOWN = click.Choice(["error", "skip"])
PRECISION = click.option("--precision", type=click.Choice(PRECISIONS), default="f32", show_default=True,
                         help="The matrix products' operands: float32, or bfloat16 (a float32 model; the "
                              "weights read as bfloat16, sums in float32).")
DYNAMIC_OPTIONS = ("segment", "eta", "lam", "rms_text", "rms_chars")


def dynamic_options(command):
    """The options of dynamic evaluation (dynamic.py), shared by `eval --dynamic` and `sample --adapt`."""
    options = [
        click.option("--segment", type=POSITIVE, default=DYNAMIC_SEGMENT, show_default=True, metavar="N",
                     help="Dynamic evaluation: characters per segment (a step after each)."),
        click.option("--eta", type=click.FloatRange(min=0), default=DYNAMIC_ETA, show_default=True,
                     help="Dynamic evaluation: the step, theta -= eta * g / (RMS + eps)."),
        click.option("--lambda", "lam", type=UNIT, default=DYNAMIC_LAMBDA, show_default=True,
                     help="Dynamic evaluation: the pull back to the checkpoint's weights, in [0, 1)."),
        click.option("--rms-text", type=click.Path(), metavar="FILE",
                     help="Measure the gradient scale RMS on this training text [default: from the "
                          "checkpoint's optimizer state]."),
        click.option("--rms-chars", type=click.IntRange(min=2), default=RMS_TEXT_CHARS, show_default=True,
                     help="Characters of --rms-text to measure on, at most."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def dynamic_settings(ctx, flag, on, options):
    """The DynamicConfig of the options given; an option given without `flag` is a usage error."""
    if not on:
        given = [name for name in DYNAMIC_OPTIONS
                 if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT]
        if given:
            name = "lambda" if given[0] == "lam" else given[0].replace("_", "-")
            raise click.UsageError(f"--{name} is an option of {flag}", ctx)
        return None
    from charlstm.config import DynamicConfig

    return DynamicConfig(options["segment"], options["eta"], options["lam"])


def rms_for(ckpt, checkpoint, settings, options, unknown, encoding="utf-8"):
    """RMS for dynamic evaluation and a few words on its source: measured on --rms-text, or the
    checkpoint's optimizer state."""
    from charlstm import gradient_scale as scale

    if options["rms_text"] is None:
        return scale.from_checkpoint(ckpt, checkpoint)
    return scale.from_text(ckpt, options["rms_text"], settings.segment, options["rms_chars"], encoding, unknown,
                           warn=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--length", "-n", type=click.IntRange(min=0), default=500, show_default=True,
              help="Characters to generate per sample (the prime is not counted).")
@click.option("--temperature", "-t", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Divides the logits: below 1 plays safe, above 1 takes risks.")
@click.option("--top-k", type=POSITIVE, help="Draw only among the K most likely characters.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Draw only among the most likely characters that together hold this much probability "
                   "(nucleus sampling; 1 keeps all).")
@click.option("--argmax", is_flag=True, help="Always take the most likely character (greedy).")
@click.option("--seed", type=click.IntRange(min=0), help="The same seed gives the same text [default: new each run].")
@click.option("--prime", help="Text to warm up the model with; printed first.")
@click.option("--prime-file", type=click.Path(), help="Read the prime from this UTF-8 file.")
@click.option("--unknown", type=UNKNOWN, default="error", show_default=True,
              help="Prime (and --adapt) characters outside the vocabulary: stop with an error, or skip them with "
                   "a warning.")
@click.option("--stop", help="End each sample right after the first occurrence of this text in it.")
@click.option("--samples", type=POSITIVE, default=1, show_default=True, help="Independent samples, separated by a blank line.")
@click.option("--adapt", type=click.Path(), metavar="FILE",
              help="Dynamic evaluation over FILE first (the model learns as it reads), then sample.")
@dynamic_options
@PRECISION
@click.option("--threads", type=POSITIVE, help="Threads for the kernels [default: all cores].")
@click.pass_context
def sample(ctx, checkpoint, length, temperature, top_k, top_p, argmax, seed, prime, prime_file, unknown, stop, samples, adapt,
           precision, threads, **options):
    """Stream text generated by the model in CHECKPOINT to stdout, as it is made.

    Each sample starts from zero state, warmed by the prime if one is given (else its first
    character is drawn uniformly from the vocabulary), and ends with a newline. Memory use is
    constant, so any --length works.

    \b
    Examples:
      charlstm sample checkpoints/tinyshakespeare/best.npz --length 2000 --temperature 0.8
      charlstm sample best.npz --prime "ROMEO:" --stop $'\\n\\n' --samples 3 --seed 1
      charlstm sample best.npz --length 10000000 > out.txt
      charlstm sample best.npz --adapt docs/examples/new_speakers.txt --prime "QUILLAN:"
    """
    set_threads(threads)
    if stop == "":
        raise click.BadParameter("must not be empty", param_hint="'--stop'")
    settings = dynamic_settings(ctx, "--adapt", adapt is not None, options)
    from charlstm import sample as sampling
    from charlstm.checkpoint import load_checkpoint
    from charlstm.config import check_precision
    from charlstm.dynamic import kernels_cached as dynamic_kernels_cached

    ckpt = load_checkpoint(checkpoint)
    check_precision(precision, ckpt.model_config.dtype)
    text = sampling.read_prime(prime, prime_file)
    text = sampling.check_prime(text, ckpt.model_config.vocab, unknown, warn=lambda m: click.echo(m, err=True))
    adapting_cold = settings is not None and not dynamic_kernels_cached()
    if not sampling.kernels_cached(ckpt.model_config, precision) or adapting_cold:
        click.echo("compiling kernels (first run only)...", err=True)
    params = ckpt.params
    if settings is not None:
        params = adapt_to(ckpt, checkpoint, adapt, settings, options, unknown, precision)
    try:
        sampling.write_samples(sys.stdout, params, ckpt.model_config, seed, samples, length, text, precision,
                               temperature=temperature, top_k=top_k or 0, top_p=top_p, greedy=argmax, stop=stop)
    except BrokenPipeError:  # `charlstm sample ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def adapt_to(ckpt, checkpoint, path, settings, options, unknown, precision="f32"):
    """The checkpoint's weights after dynamic evaluation over the file at `path` (sample --adapt),
    products in `precision`, saying on stderr what it did."""
    from charlstm.dynamic import adapt
    from charlstm.evaluate import open_text

    warn = lambda m: click.echo(m, err=True)
    text = open_text(ckpt.model_config, path, unknown=unknown, warn=warn, what="--adapt file")
    rms, source = rms_for(ckpt, checkpoint, settings, options, unknown)
    params, result = adapt(ckpt.params, ckpt.model_config, text, settings, rms, precision=precision)
    warn(f"adapted to {path}: {result.score.chars:,} characters, {result.score.nats_per_char:.4f} nats/char "
         f"while reading, {result.seconds:.1f} s ({settings.describe()}; RMS from {source})")
    return params


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with nats_per_char, bits_per_char, perplexity, chars.")
@click.option("--unknown", type=UNKNOWN, default="error", show_default=True,
              help="Characters outside the vocabulary: stop with an error, or skip them and report how many.")
@click.option("--encoding", default="utf-8", show_default=True, help="Text encoding of FILE (and --rms-text).")
@click.option("--dynamic", is_flag=True,
              help="Dynamic evaluation (Krause et al. 2018): after scoring each segment the model takes a "
                   "step on it; prints the static and the dynamic score side by side, with their times.")
@dynamic_options
@PRECISION
@click.option("--threads", type=POSITIVE, help="Threads for the kernels [default: all cores].")
@click.pass_context
def evaluate(ctx, checkpoint, file, as_json, unknown, encoding, dynamic, precision, threads, **options):
    """Score FILE under the model in CHECKPOINT: nats and bits per character, and perplexity.

    FILE is read as one stream from zero state; the score is the mean over its characters after
    the first of -log p(char | every earlier char). The file is streamed, never held whole.

    With --dynamic the model keeps learning as it reads: FILE is cut into segments of --segment
    characters, each scored first, then backpropagated, then the weights move by
    theta -= eta * g / (RMS + eps) and back towards the checkpoint's by lambda (RMS: the gradient
    scale of training). The checkpoint is only read.

    \b
    Examples:
      charlstm eval checkpoints/tinyshakespeare/best.npz held-out.txt --json
      charlstm eval best.npz held-out.txt --dynamic --eta 0.003 --segment 50
    """
    set_threads(threads)
    settings = dynamic_settings(ctx, "--dynamic", dynamic, options)
    # BLAS on one thread: eval's products are small, and idle OpenBLAS threads spin on the cores
    # that the step kernel's threads need (it measured 2-3x slower on 2 cores).
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from charlstm.checkpoint import load_checkpoint
    from charlstm.config import check_precision
    from charlstm.dynamic import kernels_cached as dynamic_kernels_cached
    from charlstm.evaluate import evaluate_file, kernels_cached, report

    ckpt = load_checkpoint(checkpoint)
    check_precision(precision, ckpt.model_config.dtype)
    if not (kernels_cached(ckpt.model_config, precision) if settings is None else dynamic_kernels_cached()):
        click.echo("compiling kernels (first run only)...", err=True)
    if settings is None:
        score = evaluate_file(ckpt.params, ckpt.model_config, file, encoding, unknown,
                              warn=lambda m: click.echo(m, err=True), precision=precision)
        click.echo(report(score, file, as_json, skipping=unknown == "skip"))
        return
    from charlstm.dynamic import evaluate_dynamic, report_dynamic
    from charlstm.evaluate import open_text

    text = open_text(ckpt.model_config, file, encoding, unknown, warn=lambda m: click.echo(m, err=True))
    rms, source = rms_for(ckpt, checkpoint, settings, options, unknown, encoding)
    static, dynamic = evaluate_dynamic(ckpt.params, ckpt.model_config, text, settings, rms, precision=precision)
    click.echo(report_dynamic(static, dynamic, file, settings, source, as_json, skipping=unknown == "skip"))


@cli.command(name="export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
def export_weights(checkpoint, out):
    """Write CHECKPOINT's weights to OUT (a .safetensors file) for PyTorch's nn.LSTM + nn.Linear.

    Tensors are named as a module with children `lstm` and `out` names them (lstm.weight_ih_l0,
    ..., out.weight, out.bias), gates in PyTorch's order; the metadata holds the vocabulary (id
    order, as JSON), hidden, layers and dtype. docs/export.md shows the PyTorch code that loads it.
    Needs the safetensors package (pip install 'charlstm[export]'). Peephole models cannot be
    exported: nn.LSTM has no peepholes.

    \b
    Example:
      charlstm export checkpoints/tinyshakespeare/best.npz shakespeare.safetensors
    """
    from charlstm.export import export

    meta = export(checkpoint, out)
    click.echo(f"wrote {out}: nn.LSTM({meta['vocab_size']}, {meta['hidden']}, {meta['layers']}) + "
               f"nn.Linear({meta['hidden']}, {meta['vocab_size']}), {meta['dtype']}, step {meta['step']}")


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; give it an --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", help="Require 'Authorization: Bearer KEY' on the API.")
@click.option("--api-key-file", type=click.Path(), help="Read the key from this file (kept out of the process list).")
@click.option("--max-streams", type=POSITIVE, default=32, show_default=True,
              help="Completions generated at once, stepped together.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a stream; beyond that they get 503 and Retry-After.")
@click.option("--max-tokens-limit", type=POSITIVE, default=4096, show_default=True,
              help="The most characters one request may ask for.")
@PRECISION
@click.option("--threads", type=POSITIVE, help="Threads for the kernels [default: all cores].")
def serve(source, host, port, api_key, api_key_file, max_streams, max_queue, max_tokens_limit, precision, threads):
    """Serve SOURCE (a checkpoint, or a run folder followed as it trains) on a web page and an
    OpenAI-style HTTP API: POST /v1/completions (streamed as server-sent events with "stream":
    true), GET /v1/models, /health, /metrics (Prometheus). Needs the serve extra
    (pip install 'charlstm[serve]'). docs/serve.md has the details.

    \b
    Examples:
      charlstm serve checkpoints/tinyshakespeare/best.npz          # then open http://127.0.0.1:8000/
      charlstm serve checkpoints/tinyshakespeare --port 8080        # a run folder, live while it trains
      curl -N localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 200, "stream": true}'
    """
    set_threads(threads)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise UserError("charlstm serve needs aiohttp: pip install 'charlstm[serve]'") from None
    from charlstm.config import check_precision
    from charlstm.sample import kernels_cached
    from charlstm.serve.app import is_loopback, serve as run_server
    from charlstm.serve.source import Source

    if api_key is not None and api_key_file is not None:
        raise UserError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        api_key = read_key(api_key_file)
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty; give a non-empty --api-key")
    source = Source(source)
    model = source.model
    check_precision(precision, model.config.dtype)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use "
                   "the server", err=True)
    if not kernels_cached(model.config, precision):
        click.echo("compiling kernels (first run only)...", err=True)
    # the address to open: a wildcard host listens on every interface, loopback included
    everywhere = host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if everywhere else f"[{host}]" if ":" in host else host
    ready = lambda bound: click.echo(
        f"charlstm serve: {model.name} ({model.config.layers}x{model.config.hidden} LSTM, step "
        f"{model.manifest.get('step', 0):,}, {precision}) at http://{shown}:{bound}/"
        f"{' (and on every interface)' if everywhere else ''} (Ctrl-C stops)", err=True)
    try:
        run_server(source, host, port, api_key, max_streams, max_queue, max_tokens_limit, precision, ready)
    except OSError as e:
        raise UserError(f"{e}; choose another --port or --host") from None


def read_key(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        raise UserError(f"--api-key-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--api-key-file {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
