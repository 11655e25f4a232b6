"""The two configurations a run is made of, as dataclasses stored whole in every checkpoint.

ModelConfig fixes the network (and so the parameter layout); TrainConfig holds every training
option under the name of its CLI option with underscores, as SPEC §3 asks of the manifest.
"""
from dataclasses import asdict, dataclass, fields

DTYPES = ("float32", "float64")
CLIP_MODES = ("value", "norm")


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
    lr: float = 0.02
    adagrad_eps: float = 1e-20
    clip: float = 5.0
    clip_mode: str = "value"
    dropout: float = 0.15
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

    @classmethod
    def from_dict(cls, d):
        """Options a manifest lacks take the value they had before the option existed."""
        d = {**BEFORE_OPTION, **d}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# Checkpoints written before an option existed trained with these values.
BEFORE_OPTION = {"dropout": 0.0}
