"""Typed configuration: DrawConfig (the model) and TrainConfig (a training run);
ClassifierConfig and ClassifyConfig, the same pair for the attentive classifier of
cluttered MNIST (paper section 4.1, table 1).

DrawConfig's defaults are the paper's binarized-MNIST model with attention
(Gregor et al. 2015, table 3): 28x28x1 images, T=64 glimpses, read 2x2,
write 5x5, 256-unit LSTMs, 100 latent units. Both dataclasses validate on
construction and raise ValueError naming the bad field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _check_positive_ints(obj, names):
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


@dataclass(frozen=True)
class DrawConfig:
    height: int = 28
    width: int = 28
    channels: int = 1
    T: int = 64
    read_n: int = 2
    write_n: int = 5
    enc_dim: int = 256
    dec_dim: int = 256
    z_dim: int = 100
    attention: bool = True
    peepholes: bool = False       # Graves 2013 eq 7-11: gates see the cell (docs/MODEL.md)

    def __post_init__(self):
        _check_positive_ints(self, ("height", "width", "channels", "T", "read_n", "write_n",
                                    "enc_dim", "dec_dim", "z_dim"))
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be True or False, got {self.attention!r}")
        if not isinstance(self.peepholes, bool):
            raise ValueError(f"peepholes must be True or False, got {self.peepholes!r}")

    @property
    def D(self) -> int:
        """Flattened image size C*H*W."""
        return self.channels * self.height * self.width

    @property
    def read_dim(self) -> int:
        """Width of r_t: 2*C*N_r^2 with attention (eq 27), 2*D without (eq 17)."""
        if self.attention:
            return 2 * self.channels * self.read_n ** 2
        return 2 * self.D

    @property
    def write_dim(self) -> int:
        """Width of the write layer's output: the patch C*N_w^2 (eq 28), or D (eq 18)."""
        if self.attention:
            return self.channels * self.write_n ** 2
        return self.D

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DrawConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown DrawConfig fields: {sorted(unknown)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                kwargs[f.name] = bool(v) if f.name in ("attention", "peepholes") else int(v)
        return cls(**kwargs)


DATASETS = ("bmnist", "mnist", "fashion-mnist", "cifar10", "svhn", "folder", "two-digit-mnist")
LR_SCHEDULES = ("constant", "exponential", "cosine")
# The noise of the valid/test evaluations: the same at every epoch (the default), so that
# the bounds of two epochs differ only by the model (docs/RESULTS.md, "The end"), or drawn
# afresh for each epoch (the behaviour of every run before the field existed).
EVAL_NOISE = ("epoch", "fixed")
# the classifier's training digits: the project's npm10k files, or MNIST's standard 60,000
TRAIN_SETS = ("npm10k", "mnist")
# The TrainConfig fields that a resumed run may change (a new phase of a long campaign);
# every other field is the checkpoint's, so that the run stays what it was.
RESUME_OVERRIDES = ("epochs", "device", "ranks", "lr", "lr_schedule", "lr_min", "lr_hold",
                    "lr_gamma", "lr_decay_epochs", "eval_every", "ema_decay", "eval_noise",
                    "batch_size", "tensorboard")
# Fields that runs of earlier versions saved and that no longer exist: dropped when a saved
# config is read. workers: the CPU processes of the retired parallel.py, whose place the
# MPI ranks took (docs/DESIGN.md, item 15); the rank count is never taken from a checkpoint.
RETIRED_TRAIN_FIELDS = ("workers",)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The CLI's `train` options map one to one onto these fields."""
    dataset: str = "bmnist"
    data_dir: str = "data"
    mirror: str = ""
    folder: str = ""              # the image folder when dataset == "folder"
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | exponential | cosine (see optim.scheduled_lr)
    lr_min: float = 0.0           # the floor of exponential; the end of cosine
    lr_hold: float = 0.0          # epochs at lr before any decay starts
    lr_gamma: float = 1.0         # exponential: the factor per epoch after lr_hold
    lr_decay_epochs: float = 0.0  # cosine: epochs from lr to lr_min after lr_hold; 0: until `epochs`
    eval_every: int = 1           # evaluate valid/test every K epochs, and at the last one
    ema_decay: float = 0.0        # evaluate, select and export an EMA of the params; 0: off
    eval_noise: str = "fixed"     # fixed | epoch: the evaluations' noise (EVAL_NOISE)
    tensorboard: bool = False     # also write each epoch to RUN/tensorboard/ (npdraw.monitor)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip: float = 10.0
    seed: int = 0
    subset: int = 0               # train on the first N training images; 0: all of them
    eval_subset: int = 0          # evaluate on the first N of valid/test; 0: the whole splits
    device: str = "auto"
    ranks: int = 0                # MPI ranks sharing each batch; 0: one per core on a CPU, 1 on a GPU
    dtype: str = "float32"
    name: str = ""
    out: str = "runs"
    oldmodel: str = ""
    resume: str = ""

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        _check_positive_ints(self, ("epochs", "batch_size", "eval_every"))
        for name in ("subset", "eval_subset"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (all) or positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be between 0 and lr ({self.lr}), got {self.lr_min}")
        for name in ("lr_hold", "lr_decay_epochs"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number of epochs >= 0, "
                                 f"got {getattr(self, name)}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no moving average of the "
                             f"parameters), got {self.ema_decay}")
        if self.eval_noise not in EVAL_NOISE:
            raise ValueError(f"eval_noise must be one of {', '.join(EVAL_NOISE)}, "
                             f"got {self.eval_noise!r}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 0:
            raise ValueError(f"ranks must be 0 (automatic) or a positive integer, "
                             f"got {self.ranks!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.name and (self.name in (".", "..") or "/" in self.name or "\\" in self.name
                          or self.name != self.name.strip() or "\0" in self.name):
            raise ValueError(f"name must be a single folder name (no '/', not '.' or '..'), "
                             f"got {self.name!r}; the run folder is <out>/<name>")
        if self.dataset == "folder" and not self.folder:
            raise ValueError("dataset 'folder' needs the image folder (--folder)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """As saved by to_dict, also by earlier versions (RETIRED_TRAIN_FIELDS are dropped).
        A config saved before `eval_noise` existed ran with fresh noise each epoch: it stays
        "epoch", whatever today's default, so that its run resumes as it was."""
        values = {k: v for k, v in values.items() if k not in RETIRED_TRAIN_FIELDS}
        values.setdefault("eval_noise", "epoch")
        return _typed_from_dict(cls, values)


@dataclass(frozen=True)
class ClassifierConfig:
    """The attentive classifier ("differentiable RAM", paper table 1): one LSTM reading one
    read_n x read_n attention glimpse of the image per step, a softmax on its last state."""
    height: int = 100
    width: int = 100
    glimpses: int = 8
    read_n: int = 12
    hidden: int = 256
    classes: int = 10

    def __post_init__(self):
        _check_positive_ints(self, ("height", "width", "glimpses", "read_n", "hidden"))
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < 2:
            raise ValueError(f"classes must be an integer of at least 2, got {self.classes!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifierConfig":
        return _typed_from_dict(cls, values)


@dataclass(frozen=True)
class ClassifyConfig:
    """One classifier training run on cluttered MNIST. The CLI's `classify` options map one
    to one onto these fields (and ClassifierConfig's)."""
    data_dir: str = "data"
    mirror: str = ""
    valid_size: int = 1000        # labelled training digits held out for validation
    train_set: str = "npm10k"     # TRAIN_SETS: npm10k (10,000) or mnist (the standard 60,000)
    distractors: int = 8          # clutter pieces per image
    crop: int = 8                 # side of each clutter piece
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    clip: float = 10.0
    seed: int = 0
    subset: int = 0               # train on the first N training digits; 0: all of them
    eval_subset: int = 0          # evaluate on the first N of valid/test; 0: all
    device: str = "auto"
    dtype: str = "float32"
    name: str = ""
    out: str = "runs"
    resume: str = ""

    def __post_init__(self):
        _check_positive_ints(self, ("valid_size", "epochs", "batch_size", "crop"))
        for name in ("subset", "eval_subset", "distractors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be 0 or a positive integer, got {value!r}")
        if self.train_set not in TRAIN_SETS:
            raise ValueError(f"train_set must be one of {', '.join(TRAIN_SETS)}, "
                             f"got {self.train_set!r}")
        if self.crop > 28:
            raise ValueError(f"crop must be at most 28 (a digit's side), got {self.crop}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifyConfig":
        return _typed_from_dict(cls, values)


def _typed_from_dict(cls, values: dict):
    """cls(**values), each value converted to its field's default's type (JSON and HDF5
    attributes give back floats as ints, NumPy ints...); unknown names are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: type(fields[k].default)(v) for k, v in values.items()})
