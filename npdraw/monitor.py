"""Live monitoring of a training run in TensorBoard (``train --tensorboard``).

Each epoch's scalars and the sample picture go to RUN/tensorboard/ as TensorBoard event
files, written by tensorboardX (the optional extra ``tensorboard``); ``tensorboard --logdir
runs`` shows every run under runs/. RUN/log.jsonl stays the source of truth: these files
are a view of it, and can be deleted at any time.

Dimension legend
    H, W  image height, image width
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from .guards import naming

FOLDER = "tensorboard"
# (TensorBoard tag, log.jsonl key): the scalars of each epoch, its number as the step.
SCALARS = (
    ("bound/train", "train_bound"), ("bound/valid", "valid_bound"),
    ("bound/test", "test_bound"), ("kl/train", "train_kl"), ("recon/train", "train_recon"),
    ("optim/lr", "lr"), ("optim/grad_norm", "grad_norm"), ("optim/step_norm", "step_norm"),
    ("speed/examples_per_s", "examples_per_s"),
)
SAMPLES_TAG = "samples"
MISSING = ("--tensorboard needs the tensorboardX package, which is not installed: "
           "pip install -e \".[tensorboard]\"")


def check_available() -> None:
    """Raise ValueError (one sentence) when tensorboardX cannot be imported."""
    if importlib.util.find_spec("tensorboardX") is None:
        raise ValueError(MISSING)


class TensorBoardLog:
    """The event files of one run, RUN/tensorboard/. first_epoch: the epoch this
    session starts at; events of that epoch and later that an interrupted session left
    are hidden (TensorBoard's purge_step), so that a resumed run shows each epoch once."""

    def __init__(self, run_dir, first_epoch: int = 1):
        check_available()
        from tensorboardX import SummaryWriter
        self.folder = Path(run_dir) / FOLDER
        # The file's name counts seconds: a session that starts within the second of the
        # last one (a quick resume) would overwrite its file without the suffix.
        self.writer = SummaryWriter(logdir=str(self.folder),
                                    purge_step=first_epoch if first_epoch > 1 else None,
                                    filename_suffix=f".{os.getpid()}.from-epoch-{first_epoch}")

    def epoch(self, record: dict, samples=None) -> None:
        """Write one log.jsonl record's scalars (the missing and non-finite ones left out)
        and ``samples``, a uint8 (H, W, 3) picture, at step record["epoch"]."""
        step = int(record["epoch"])
        try:
            for tag, key in SCALARS:
                value = record.get(key)
                if value is not None and math.isfinite(float(value)):
                    self.writer.add_scalar(tag, float(value), step)
            if samples is not None:
                self.writer.add_image(SAMPLES_TAG, np.asarray(samples, np.uint8), step,
                                      dataformats="HWC")
            self.writer.flush()
        except OSError as err:            # a full disk's names no file: name the folder
            raise naming(err, self.folder) from None

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as err:
            raise naming(err, self.folder) from None
