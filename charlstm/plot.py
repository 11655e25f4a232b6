"""`charlstm plot`: the train and validation loss curves of one or more runs, overlaid, from their
metrics.jsonl (the lines train.Trainer.log writes: step, chars_seen, lr, time, and train_loss or
val_loss in nats).

Reading is tolerant of a run in progress and strict about anything else: the last line, when the
file does not end in a newline, is one the trainer is writing now (or a crash cut short; resuming
drops it), so it is skipped with a warning; an unparsable line anywhere else is damage, refused
in one line. matplotlib is an optional extra, imported only here.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from charlstm.errors import UserError

# Fixed size, so a picture is the same size whatever it shows (and the tests can check it).
WIDTH_IN, HEIGHT_IN, DPI = 9.0, 5.5, 100  # 900 x 550 pixels
X_AXES = {"step": ("step", "optimizer steps"), "chars": ("chars_seen", "characters seen"),
          "time": ("time", "wall-clock seconds (validation included)")}
LN2 = math.log(2)
LATE = 0.1  # the y axis covers the train curve after this fraction of the x range, and all of validation


@dataclass
class Run:
    name: str
    train: list = field(default_factory=list)  # [(x, nats)] in file order
    val: list = field(default_factory=list)


def metrics_file(path):
    """A run folder's metrics.jsonl (the file itself may be given too)."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.jsonl":
        return path
    if not path.exists():
        raise UserError(f"{path}: no such folder; pass a run folder such as checkpoints/<run>")
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder; pass the folder that holds metrics.jsonl (checkpoints/<run>)")
    if not (path / "metrics.jsonl").is_file():
        raise UserError(f"{path}: no metrics.jsonl, so not a run folder of charlstm train (or it has not logged "
                        "yet); pass checkpoints/<run>")
    return path / "metrics.jsonl"


def read_run(path, x_axis, name, warn):
    """The train and validation curves of one run against x_axis ('step', 'chars' or 'time')."""
    source = metrics_file(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    lines = text.split("\n")  # a complete file ends in "\n", so its last item is ""
    if lines[-1]:
        warn(f"{source}: skipped line {len(lines)}, not finished (the run is writing it, or a crash cut it short)")
    run, key = Run(name), X_AXES[x_axis][0]
    for number, line in enumerate(lines[:-1], 1):
        if line.strip():
            _add(run, _record(source, number, line), key, f"{source}: line {number}", x_axis)
    if not run.train and not run.val:
        raise UserError(f"{source}: no train or validation loss in it yet ({len(lines) - 1} lines); a run logs its "
                        "train loss every 100 steps and validates every --eval-every steps")
    return run


def _record(source, number, line):
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{source}: line {number} is not a JSON object (damaged?): {line[:60]!r}")
    return record


def _add(run, record, key, where, x_axis):
    for loss_key, curve in (("train_loss", run.train), ("val_loss", run.val)):
        if loss_key not in record:
            continue
        x, loss = record.get(key), record[loss_key]
        if x is None:
            raise UserError(f"{where} has no {key!r} (written by an older charlstm?); plot with --x step")
        if not all(_is_number(v) for v in (x, loss)):
            raise UserError(f"{where}: {key} {x!r} or {loss_key} {loss!r} is not a number (damaged?)")
        curve.append((x, loss))


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def labels(paths):
    """Each run's folder name; runs that share one are told apart by their parent folder."""
    names = [Path(p).resolve() for p in paths]
    names = [p.parent if p.name == "metrics.jsonl" else p for p in names]
    short = [p.name for p in names]
    return [f"{p.parent.name}/{p.name}" if short.count(p.name) > 1 else p.name for p in names]


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'charlstm[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    return plt


def best(run):
    """(x, nats) of the lowest validation loss, or None."""
    return min(run.val, key=lambda point: point[1]) if run.val else None


def draw(runs, x_axis, output):
    """Write the figure to output (its format from the extension, e.g. .png or .svg)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.train:
            ax.plot(*zip(*run.train), color=color, lw=1, alpha=0.5, label=f"{run.name} train")
        if run.val:
            ax.plot(*zip(*run.val), color=color, lw=2, marker="o", ms=3, label=f"{run.name} validation")
            x, nats = best(run)
            ax.plot([x], [nats], marker="*", ms=14, color=color, mec="black", ls="none", zorder=3)
            ax.annotate(f"{nats:.3f} ({nats / LN2:.3f} bpc)", (x, nats), xytext=(0, -14),
                        textcoords="offset points", ha="center", fontsize=8, color=color)
    ax.set_ylim(*y_range(runs))
    ax.set_xlabel(X_AXES[x_axis][1])
    ax.set_ylabel("loss, nats per char")
    right = ax.secondary_yaxis("right", functions=(lambda n: n / LN2, lambda b: b * LN2))
    right.set_ylabel("bits per char")
    ax.set_title("train (thin) and validation (thick) loss; star: best validation", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()  # arranges inside the fixed canvas; the size stays WIDTH_IN x HEIGHT_IN
    try:
        fig.savefig(output, dpi=DPI)
    except (OSError, ValueError) as e:  # no such folder, no permission, a format matplotlib lacks
        raise UserError(f"cannot write {output}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        plt.close(fig)


def y_range(runs):
    """Every validation point and the train curves after their first tenth: the steep fall from
    ln(vocab) at the start would otherwise squash the part of the curves worth comparing."""
    last_x = max(x for run in runs for x, _ in run.train + run.val)
    shown = [nats for run in runs for x, nats in run.train if x >= LATE * last_x]
    shown += [nats for run in runs for _, nats in run.val]
    shown = shown or [nats for run in runs for _, nats in run.train]
    low, high = min(shown), max(shown)
    span = high - low or 0.5
    return low - 0.12 * span, high + 0.05 * span  # room below for the best points' labels


def plot(paths, output, x_axis, warn):
    """`charlstm plot`: read every run first (so a bad one is refused before drawing), then draw.
    Returns one line per run for the terminal: its best validation loss, where."""
    runs = [read_run(path, x_axis, name, warn) for path, name in zip(paths, labels(paths))]
    draw(runs, x_axis, output)
    report = []
    for run in runs:
        point = best(run)
        where = "no validation yet" if point is None else (
            f"best validation {point[1]:.4f} nats ({point[1] / LN2:.4f} bits/char) at {x_axis} {point[0]:,}")
        report.append(f"{run.name}: {where}")
    return report
