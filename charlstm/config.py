"""The two configurations a run is made of, as dataclasses stored whole in every checkpoint, and
dynamic evaluation's settings.

ModelConfig fixes the network (and so the parameter layout); TrainConfig holds every training
option under the name of its CLI option with underscores, as SPEC §3 asks of the manifest;
DynamicConfig the options of `eval --dynamic` and `sample --adapt` (dynamic.py).
"""
from dataclasses import asdict, dataclass, fields

from charlstm.errors import UserError

DTYPES = ("float32", "float64")
# The matrix products' operands (--precision): float32, or bfloat16 with float32 accumulation
# (engine/bf16.py); engine/network.py's Workspace takes the same names.
PRECISIONS = ("f32", "bf16")
CLIP_MODES = ("value", "norm")


def check_precision(precision, dtype):
    """Refuse (UserError) a precision not in PRECISIONS, and bf16 for a model that is not float32
    (bfloat16 products accumulate in float32)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and str(dtype) != "float32":
        raise UserError(f"--precision bf16 needs a float32 model, and this one is {dtype}; drop --precision bf16")


# Each optimizer's state arrays, in checkpoint and checksum order; each has the layout of params.
# Adagrad's keeps SPEC's key `adagrad`, so an Adagrad checkpoint holds what version 1 held.
OPTIMIZER_STATE = {"adagrad": ("adagrad",), "rmsprop": ("rmsprop",), "adam": ("adam_m", "adam_v")}
OPTIMIZERS = tuple(OPTIMIZER_STATE)
# model.init_params's schemes (--init); fan-in is the default, measured per step (docs/training.md).
INITS = ("fan-in", "char-rnn")
# --lr when none is given: the project's measured Adagrad rate; char-rnn's and torch-rnn's 2e-3.
DEFAULT_LR = {"adagrad": 0.02, "rmsprop": 2e-3, "adam": 2e-3}
# The lr schedule when no --lr-decay option is given: lr x LR_DECAY at every epoch end from the end
# of epoch LR_DECAY_AFTER (char-rnn's schedule, sooner and steeper), measured in 10-minute runs
# (docs/training.md#the-learning-rate-decay).
LR_DECAY = 0.85
LR_DECAY_AFTER = 7


@dataclass(frozen=True)
class ModelConfig:
    vocab: str  # the code points in id order
    hidden: int = 256
    layers: int = 2
    peepholes: bool = False
    dtype: str = "float32"

    @property
    def vocab_size(self):
        return len(self.vocab)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 50
    seq_length: int = 50
    optim: str = "rmsprop"  # measured best in 10 minutes at the defaults (docs/training.md)
    lr: float = 2e-3
    adagrad_eps: float = 1e-20
    rmsprop_alpha: float = 0.95
    rmsprop_eps: float = 1e-8
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_decay: float = LR_DECAY  # multiply lr by this at the epoch ends that lr_decay_after/every name
    lr_decay_after: int | None = LR_DECAY_AFTER  # None when lr_decay_every is the schedule
    lr_decay_every: int | None = None
    clip: float = 5.0
    clip_mode: str = "value"
    dropout: float = 0.3  # reached after dropout_warmup epochs
    init: str = "fan-in"  # one of INITS
    dropout_warmup: float = 20.0  # epochs over which dropout ramps up from 0 (schedule.dropout_at)
    weight_drop: float = 0.0  # DropConnect on each layer's Wh, a mask per window (engine/dropout.py)
    precision: str = "f32"  # the matrix products' operands: one of PRECISIONS (bf16 needs a float32 model)
    val_frac: float = 0.05
    seed: int = 0
    steps: int | None = None
    epochs: float | None = None
    time_limit: float | None = None
    eval_every: int = 500
    save_every: int = 1000
    keep: int = 3
    threads: int | None = None

    def to_dict(self):
        return asdict(self)

    def recipe(self):
        """The optimizer, its options and the lr schedule, in words (for the summary and info)."""
        options = {"adagrad": f"eps {self.adagrad_eps:g}",
                   "rmsprop": f"alpha {self.rmsprop_alpha:g}, eps {self.rmsprop_eps:g}",
                   "adam": f"betas {self.adam_beta1:g}, {self.adam_beta2:g}, eps {self.adam_eps:g}"}[self.optim]
        name = {"adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam"}[self.optim]
        text = f"{name} lr {self.lr:g} ({options})"
        if self.lr_decay == 1:
            text += ", no lr decay"
        elif self.lr_decay_after is not None:
            text += f", lr x{self.lr_decay:g} at every epoch end from epoch {max(self.lr_decay_after, 1)}"
        elif self.lr_decay_every is not None:
            text += f", lr x{self.lr_decay:g} every {self.lr_decay_every} epochs"
        return text

    @classmethod
    def from_dict(cls, d):
        """Options a manifest lacks take the value they had before the option existed."""
        d = {**BEFORE_OPTION, **d}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# Checkpoints written before an option existed trained with these values.
BEFORE_OPTION = {"init": "char-rnn", "dropout": 0.0, "dropout_warmup": 0.0, "optim": "adagrad", "weight_drop": 0.0,
                 "precision": "f32", "lr_decay": 1.0, "lr_decay_after": None, "lr_decay_every": None}


# ---- Dynamic evaluation's defaults (dynamic.py), in one block to change. Chosen by
# benchmarks/dynamic_eval.py: tuned on the first half of the bundled corpus's validation split,
# reported on the second (docs/dynamic-evaluation.md has the grid and the table).
DYNAMIC_SEGMENT = 50  # n: characters per segment
DYNAMIC_ETA = 1.4e-4  # eta: the step, in units of g / RMS (RMS from the checkpoint's optimizer state)
DYNAMIC_LAMBDA = 0.002  # lambda: the pull back towards the checkpoint's weights, per segment
DYNAMIC_EPS = 1e-5  # eps: added to RMS, so a parameter that saw little gradient in training moves boundedly
RMS_TEXT_CHARS = 100_000  # characters of training text --rms-text measures RMS on, at most


@dataclass(frozen=True)
class DynamicConfig:
    segment: int = DYNAMIC_SEGMENT
    eta: float = DYNAMIC_ETA
    lam: float = DYNAMIC_LAMBDA  # lambda
    eps: float = DYNAMIC_EPS

    def problem(self):
        """What is wrong with these settings, as one line, or None (the CLI's ranges say the same)."""
        if self.segment < 1:
            return f"the segment length must be at least 1, got {self.segment}"
        if not self.eta >= 0:
            return f"eta must be >= 0, got {self.eta:g}"
        if not 0 <= self.lam < 1:
            return f"lambda must be in [0, 1), got {self.lam:g}"
        if not self.eps > 0:
            return f"eps must be > 0, got {self.eps:g}"
        return None

    def describe(self):
        return f"segments of {self.segment}, eta {self.eta:g}, lambda {self.lam:g}, eps {self.eps:g}"
