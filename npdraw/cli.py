#!/usr/bin/env python
"""npdraw command line: train, sample, reconstruct, evaluate, plot, attention-demo,
classify, classify-eval (and bench, in a checkout). Installed it is `npdraw ...` (or
`python -m npdraw ...`); in a checkout also `python cli.py ...`:

    python cli.py --help
    python cli.py train --epochs 20 --name mnist-att
    python cli.py sample runs/mnist-att/best.h5 --boxes --scale 3
    python cli.py reconstruct runs/mnist-att/best.h5 --kl
    python cli.py evaluate runs/mnist-att/best.h5 --k 100
    python cli.py plot runs/mnist-att
    python cli.py attention-demo picture.png --n 12
    python cli.py classify --glimpses 8 --read 12 --name cluttered-8
    python cli.py classify-eval runs/cluttered-8 --pictures docs/pictures

See docs/TRAINING.md for what each command writes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path


from npdraw.threads import share_cores_between_ranks as _share_cores_between_ranks

_share_cores_between_ranks()   # npdraw/__init__.py does it too; NumPy must not be loaded yet

import click  # noqa: E402 - after the BLAS thread count is settled
import numpy as np  # noqa: E402

from npdraw import __version__  # noqa: E402
from npdraw.config import (DATASETS, EVAL_NOISE, LR_SCHEDULES, TRAIN_SETS,  # noqa: E402
                           ClassifierConfig, ClassifyConfig, DrawConfig, TrainConfig)
from npdraw.helpsections import SectionedGroup  # noqa: E402

# The repository root when npdraw runs from a checkout (bench/ is there; not in a wheel).
HERE = Path(__file__).resolve().parents[1]
# How this process was started, so that --ranks can start it again as MPI ranks: the
# arguments to python before the command's own (set by main(); None when called from
# Python, as click's test runner does, which then runs in one process).
_PROGRAM = None


# ----------------------------------------------------------------------------- helpers

class AttentionType(click.ParamType):
    """'R,W' -> (R, W) read and write window sizes; '' (or 'none') -> None (no attention)."""
    name = "R,W"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        text = str(value).strip()
        if text == "" or text.lower() == "none":
            return None
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2:
            self.fail(f"{value!r} is not R,W (two window sizes such as 2,5; '' for none)",
                      param, ctx)
        try:
            read_n, write_n = int(parts[0]), int(parts[1])
        except ValueError:
            self.fail(f"{value!r} is not R,W: both sizes must be integers (e.g. 2,5)", param, ctx)
        if read_n < 1 or write_n < 1:
            self.fail(f"{value!r}: window sizes must be at least 1", param, ctx)
        return (read_n, write_n)


class FiniteFloat(click.types.FloatParamType):
    """A finite float (no nan or inf), optionally > 0."""
    name = "float"

    def __init__(self, positive: bool = False):
        self.positive = positive

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value) and (value > 0 or not self.positive):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.positive and not number > 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return number


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which FloatRange lets through)."""

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


ATTENTION = AttentionType()
POSITIVE_FLOAT = FiniteRange(min=0, min_open=True)
FINITE_FLOAT = FiniteFloat()
POSITIVE_FINITE_FLOAT = FiniteFloat(positive=True)
# GIF stores a frame's delay in hundredths of a second in 16 bits: at most 655.35 s.
MIN_FPS = 0.002
FPS_OPTION = click.option("--fps", type=FiniteRange(min=MIN_FPS, max=1e6), default=10.0,
                          show_default=True, help="GIF frames per second (GIF keeps at most "
                          "50 and frames of at most 655 s).")
HOLD_OPTION = click.option("--hold", type=FiniteRange(min=0, max=600), default=2.0,
                           show_default=True,
                           help="Seconds the GIF's last frame stays before it loops.")
EVERY_OPTION = click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
                            help="The GIF shows every K-th glimpse and the last (a smaller "
                                 "file); the PNGs keep every glimpse.")


DEVICE_OPTION = click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]),
                             default="auto", show_default=True,
                             help="Where to compute: auto takes the GPU when CuPy finds one.")
RANKS_OPTION = click.option(
    "--ranks", type=click.IntRange(min=0), default=0, show_default=True,
    help="MPI ranks that share each batch (0: one per core on a CPU, 1 on a GPU; under "
         "mpiexec: its count).")


def data_options(recorded: bool):
    """--data-dir and --mirror: for a new run (converted data under data/, downloads from
    the canonical URLs) or, recorded=True, for a saved model or run (default: the data
    set's place and mirror that it recorded)."""
    if recorded:
        data_dir = dict(default=None, help="Default: the checkpoint's [env NPDRAW_DATA].")
        mirror = dict(default=None, help="Default: the checkpoint's [env NPDRAW_MIRROR].")
    else:
        data_dir = dict(default="data", show_default=True,
                        help="Where converted data sets live [env NPDRAW_DATA].")
        mirror = dict(default="", help="Folder or URL to download raw data from "
                                       "[env NPDRAW_MIRROR].")

    def decorate(fn):
        fn = click.option("--mirror", envvar="NPDRAW_MIRROR", **mirror)(fn)
        return click.option("--data-dir", envvar="NPDRAW_DATA", **data_dir)(fn)
    return decorate


def library_errors(fn):
    """Turn the library's ValueErrors into click errors (message, exit code 1, no
    traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:  # a file-system error no command step below described
            target = f"use {err.filename}" if getattr(err, "filename", None) else "finish"
            from npdraw.guards import os_error_sentence
            raise click.ClickException(os_error_sentence(err, target)) from None
    return wrapper


def _run_as_ranks(ranks: int, device: str, batch_size, what: str) -> None:
    """Start this command as MPI ranks on this machine when that is what --ranks asks for
    (0: one per core on a CPU): this process becomes `mpiexec -n R python cli.py <the
    same arguments>` (or `... python -m npdraw ...`, or the npdraw script: the way it was
    started; os.execve, so its pid stays the one the user sees; MPICH's mpiexec passes
    SIGINT and SIGTERM on to every rank and exits with their status). Without MPI it
    prints one line saying how to install it and returns: one process. Only when started
    through main(): called from Python (click's test runner) it returns.
    batch_size: a function giving the batch size that the automatic count depends on."""
    from npdraw import backend, distributed
    if distributed.under_launcher() or ranks == 1:
        return
    resolved = backend.resolve_device(device)   # ValueError: --device gpu without one
    count, mpiexec, note = distributed.launch_plan(ranks, resolved,
                                                   batch_size() if not ranks else 0)
    if note:
        click.echo(note.replace("one process", f"{what} in one process", 1), err=True)
    if mpiexec is None or _PROGRAM is None:
        return
    distributed.exec_as_ranks(count, mpiexec, _PROGRAM, sys.argv[1:])


def _check_rank_count(ranks: int, comm) -> None:
    """--ranks must fit the ranks running: a usage error that every rank finds alike, so
    rank 0 says it and all exit with status 1 (no MPI_Abort needed)."""
    from npdraw import distributed
    try:
        distributed.check_rank_count(ranks, comm)
    except ValueError as err:
        if not comm.is_root:
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(str(err)) from None


def _resumed_batch_size(run_dir) -> int:
    """The batch size recorded in RUN/checkpoint.h5 (for the rank count); 0 when it
    cannot be read (then the command runs in one process and reports why)."""
    from npdraw import train as train_lib
    try:
        saved = train_lib.train_config_of(train_lib.load_checkpoint(Path(run_dir) /
                                                                     "checkpoint.h5"))
    except (ValueError, TypeError, OSError):
        return 0
    return saved.batch_size if saved is not None else 0


@contextlib.contextmanager
def _writing(wanted: str):
    """Turn an OSError inside the block into 'Error: cannot <wanted>: <reason>' (exit 1)."""
    from npdraw.guards import os_error_sentence
    try:
        yield
    except OSError as err:
        raise click.ClickException(os_error_sentence(err, wanted)) from None


def _output_folder(out: Path, what: str) -> Path:
    """Create the folder ``out`` for ``what``; one-sentence errors."""
    from npdraw.guards import what_blocks_a_folder
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise click.ClickException(f"cannot write {what} into {out}: it is "
                                   f"{what_blocks_a_folder(out)}, not a folder")
    with _writing(f"create the folder {out} for {what}"):
        out.mkdir(parents=True, exist_ok=True)
    return out


def _load_ckpt(path, param_hint="'CHECKPOINT'"):
    from npdraw import train as train_lib
    try:
        return train_lib.load_checkpoint(path)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=param_hint) from None


def _train_cfg_or_none(ckpt):
    from npdraw import train as train_lib
    try:
        return train_lib.train_config_of(ckpt)
    except (ValueError, TypeError):
        return None


def _params_on(ckpt, device, dtype=None):
    """The checkpoint's model on ``device``: its moving average of the parameters when it
    holds one (train.model_params), else its parameters."""
    from npdraw import backend
    from npdraw import train as train_lib
    return train_lib.arrays_to_device(train_lib.model_params(ckpt)[0],
                                      backend.resolve_device(device), dtype)


def _draw_cfg(ckpt, ckpt_path):
    """The checkpoint's DrawConfig; a clear error for a classifier checkpoint."""
    if not isinstance(ckpt.cfg, DrawConfig):
        raise click.BadParameter(f"{ckpt_path} is a classifier checkpoint; use classify-eval",
                                 param_hint="'CHECKPOINT'")
    return ckpt.cfg


def _ckpt_file(path: Path) -> Path:
    """The file a CHECKPOINT argument names (train.checkpoint_file)."""
    from npdraw import train as train_lib
    try:
        return train_lib.checkpoint_file(path)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'CHECKPOINT'") from None


# ----------------------------------------------------------------------------- group

class _Group(SectionedGroup):
    """The npdraw group: a Ctrl-C that arrives before a command has set up its own
    handling (loading NumPy, the data, the model) exits 130 as a later one does, not
    click's "Aborted!" with status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings=dict(help_option_names=["-h", "--help"]))
@click.version_option(__version__, "--version", prog_name="npdraw")
def cli():
    """DRAW (Gregor et al. 2015) on NumPy/CuPy: train, sample, evaluate, plot."""


# ----------------------------------------------------------------------------- train

@cli.command()
@click.option("--dataset", type=click.Choice(DATASETS), default="bmnist", show_default=True,
              help="Data set; the image size comes from it.")
@click.option("--attention", type=ATTENTION, default="2,5", show_default=True,
              help="Read,write window sizes; '' for the attention-free model.")
@click.option("--glimpses", "--niter", "T", type=click.IntRange(min=1), default=64,
              show_default=True, help="Glimpses T: the steps of reading and writing per image "
              "(--niter is the old name).")
@click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True,
              help="Adam learning rate.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="constant",
              show_default=True, help="How the learning rate decays after --lr-hold epochs.")
@click.option("--lr-min", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="exponential: the floor; cosine: the final rate.")
@click.option("--lr-hold", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Epochs at --lr before the decay starts.")
@click.option("--lr-gamma", type=FiniteRange(min=0, max=1, min_open=True), default=1.0,
              show_default=True, help="exponential: the factor per epoch.")
@click.option("--lr-decay-epochs", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="cosine: epochs from --lr to --lr-min (0: until --epochs).")
@click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate valid and test every K epochs (and after the last).")
@click.option("--ema-decay", type=FiniteRange(min=0, max=1, max_open=True), default=0.0,
              show_default=True,
              help="Evaluate, select and export an exponential moving average of the "
                   "parameters with this decay per step (0: off; 0.999 averages about the "
                   "last 1000 steps).")
@click.option("--eval-noise", type=click.Choice(EVAL_NOISE), default="epoch", show_default=True,
              help="The noise of the valid/test evaluations: drawn afresh each epoch, or "
                   "fixed, the same every epoch, so that epochs compare as paired figures.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Total epochs (with --resume: the new total).")
@click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=100,
              show_default=True, help="Minibatch size (with --resume: a new phase's).")
@click.option("--enc-dim", type=click.IntRange(min=1), default=256, show_default=True,
              help="Encoder LSTM units.")
@click.option("--dec-dim", type=click.IntRange(min=1), default=256, show_default=True,
              help="Decoder LSTM units.")
@click.option("--z-dim", type=click.IntRange(min=1), default=100, show_default=True,
              help="Latent variables per glimpse.")
@click.option("--peepholes", is_flag=True,
              help="Peephole LSTMs (Graves 2013 eq 7-11), started at zero; allowed on "
                   "--resume and --oldmodel from a model without them (docs/TRAINING.md).")
@click.option("--name", default="", help="Run name (default: draw-<date>-<time>).")
@click.option("--oldmodel", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Initialise the parameters from this checkpoint's model (same shapes; "
                   "its moving average when it keeps one).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue the run in this run dir from its checkpoint.h5.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the initial parameters, the batch order and the noise.")
@DEVICE_OPTION
@RANKS_OPTION
@data_options(recorded=False)
@click.option("--folder", default="", help="Image folder for --dataset folder.")
@click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train on the first N training images only (0: all).")
@click.option("--eval-subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate each epoch on the first N valid/test images (0: whole splits).")
@click.option("--clip", type=POSITIVE_FLOAT, default=10.0, show_default=True,
              help="Global gradient-norm clipping threshold.")
@click.option("--out", default="runs", show_default=True, help="Parent folder of run dirs.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Floating-point precision of the computation.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--tensorboard/--no-tensorboard", default=False, show_default=True,
              help="Also write each epoch's scalars and samples to RUN/tensorboard/ "
                   "(tensorboard --logdir runs); needs the [tensorboard] extra.")
@click.pass_context
@library_errors
def train(ctx, dataset, attention, T, lr, lr_schedule, lr_min, lr_hold, lr_gamma,
          lr_decay_epochs, eval_every, ema_decay, eval_noise, epochs, batch_size, enc_dim,
          dec_dim, z_dim, peepholes, name, oldmodel, resume, seed, device, ranks, data_dir,
          mirror, folder, subset, eval_subset, clip, out, dtype, no_progress, tensorboard):
    """Train DRAW; writes a run dir under --out (see docs/TRAINING.md).

    On a CPU with several cores it starts itself as one MPI rank per core, which train
    one model together, each on its slice of every batch; under `mpiexec -n N` (or srun)
    the N ranks do (docs/TRAINING.md, "Ranks")."""
    batch_given = (ctx.get_parameter_source("batch_size")
                   == click.core.ParameterSource.COMMANDLINE)
    _run_as_ranks(ranks, device,
                  (lambda: _resumed_batch_size(resume)) if resume and not batch_given
                  else (lambda: batch_size), "training")
    from npdraw import distributed
    from npdraw import train as train_lib

    comm = distributed.from_environment()

    # The settings that a resumed run may change when given (config.RESUME_OVERRIDES).
    schedule = dict(lr=lr, lr_schedule=lr_schedule, lr_min=lr_min, lr_hold=lr_hold,
                    lr_gamma=lr_gamma, lr_decay_epochs=lr_decay_epochs, eval_every=eval_every,
                    ema_decay=ema_decay, eval_noise=eval_noise, batch_size=batch_size,
                    tensorboard=tensorboard)
    overrides = ()
    if resume:
        given = [p for p in ctx.params
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        ignored = [p for p in ("dataset", "attention", "T", "enc_dim",
                               "dec_dim", "z_dim", "name", "oldmodel", "seed", "subset",
                               "eval_subset", "clip", "out", "dtype") if p in given]
        if ignored and comm.is_root:
            click.echo("note: --resume takes the model and training settings from the "
                       f"checkpoint; ignoring {', '.join(ignored)}", err=True)
        overrides = tuple(p for p in schedule if p in given)
        tcfg = TrainConfig(epochs=epochs, device=device, ranks=ranks, data_dir=data_dir,
                           mirror=mirror, folder=folder, resume=str(resume),
                           **{p: schedule[p] for p in overrides})
        cfg = None
    else:
        tcfg = TrainConfig(dataset=dataset, data_dir=data_dir, mirror=mirror, folder=folder,
                           epochs=epochs, clip=clip, seed=seed,
                           subset=subset, eval_subset=eval_subset, device=device,
                           ranks=ranks, dtype=dtype, name=name, out=out,
                           oldmodel=oldmodel or "", **schedule)

    _check_rank_count(ranks, comm)                  # before the data set is loaded
    if tcfg.tensorboard:
        from npdraw import monitor
        monitor.check_available()
    try:
        data = None
        if not resume:  # the model config needs the data set's image shape
            data = _load_data_on_ranks(train_lib, tcfg, not no_progress, comm)
            c, h, w = (int(s) for s in data.shape)
            read_n, write_n = attention if attention else (2, 5)
            cfg = DrawConfig(height=h, width=w, channels=c, T=T, read_n=read_n,
                             write_n=write_n, enc_dim=enc_dim, dec_dim=dec_dim, z_dim=z_dim,
                             attention=attention is not None, peepholes=peepholes)
        train_lib.train(cfg, tcfg, log=click.echo, data=data, progress=not no_progress,
                        resume_overrides=overrides, comm=comm,
                        add_peepholes=bool(resume and peepholes))
    except train_lib.TrainingInterrupted as err:  # train() has said where to resume from
        if comm.is_root:
            click.echo("training interrupted", err=True)
        ctx.exit(128 + err.signum)              # 130 for Ctrl-C, 143 for SIGTERM
    except train_lib.TrainingStopped as err:    # a non-finite loss, a failed write
        if not comm.is_root:               # every rank stopped alike; rank 0 says why
            ctx.exit(1)
        raise click.ClickException(str(err)) from None
    except Exception as err:               # noqa: BLE001 - one rank's failure ends them all
        if comm.size == 1:
            raise
        comm.abort(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


def _load_data_on_ranks(train_lib, tcfg, progress, comm, split=None):
    """train.load_data on every rank (or, with ``split``, train.load_split: (x, shape));
    rank 0 first, so that a download or conversion into the data dir happens once (the
    others wait for it, then read its result)."""
    def load(show):
        return (train_lib.load_data(tcfg, show) if split is None
                else train_lib.load_split(tcfg, split, show))
    data = load(progress and comm.is_root) if comm.is_root else None
    comm.sum([0.0])                         # every rank waits here for rank 0
    return data if data is not None else load(False)


# ----------------------------------------------------------------------------- sample

@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--rows", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows of samples in each picture.")
@click.option("--cols", type=click.IntRange(min=1), default=8, show_default=True,
              help="Columns of samples in each picture.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Prior noise seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: samples/ next to the checkpoint).")
@click.option("--boxes/--no-boxes", default=False, show_default=True,
              help="Outline each glimpse's write window in red.")
@click.option("--scale", type=click.IntRange(min=1), default=2, show_default=True,
              help="Enlarge every image this many times.")
@FPS_OPTION
@HOLD_OPTION
@EVERY_OPTION
@DEVICE_OPTION
@library_errors
def sample(checkpoint, rows, cols, seed, out, boxes, scale, fps, hold, every, device):
    """Generate rows*cols images: frame_000.png... (one per glimpse), samples.gif and
    samples.png (the last frame)."""
    from npdraw import images as images_lib
    from npdraw import train as train_lib

    ckpt_path = _ckpt_file(checkpoint)
    ckpt = _load_ckpt(ckpt_path)
    cfg = _draw_cfg(ckpt, ckpt_path)
    params = _params_on(ckpt, device)
    if boxes and not cfg.attention:
        click.echo("note: this model has no attention; --boxes draws nothing", err=True)
    from npdraw.guards import check_memory
    check_memory(train_lib.sample_bytes(cfg, rows, cols, scale),
                 f"{rows}x{cols} samples of T={cfg.T} glimpses at --scale {scale}")
    rng = np.random.default_rng(seed)
    canvases, windows = train_lib.generate_samples(params, cfg, rows * cols, rng)
    frames = train_lib.render_frames(canvases, windows, (cfg.channels, cfg.height, cfg.width),
                                     rows, cols, boxes=boxes, scale=scale)
    out = _output_folder(Path(out) if out is not None else ckpt_path.parent / "samples",
                         "the samples")
    with _writing(f"write the samples into {out}"):
        width = images_lib.save_frames(out, frames, "samples", 1.0 / fps, hold, every)
    click.echo(f"wrote {len(frames)} frames ({rows}x{cols} samples, T={cfg.T}) to {out}: "
               f"frame_{0:0{width}d}.png ... frame_{len(frames) - 1:0{width}d}.png, "
               "samples.gif and samples.png")


# ----------------------------------------------------------------------------- reconstruct

@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--n", "count", type=click.IntRange(min=1), default=8, show_default=True,
              help="Test images to rebuild, spread over the test split: one drawn with --seed "
                   "from each of N equal stretches.")
@click.option("--cols", type=click.IntRange(min=1), default=4, show_default=True,
              help="Image and canvas pairs per row.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the choice of images and of the posterior noise.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: reconstruct/ next to the checkpoint).")
@click.option("--scale", type=click.IntRange(min=1), default=3, show_default=True,
              help="Enlarge every image this many times.")
@FPS_OPTION
@HOLD_OPTION
@EVERY_OPTION
@click.option("--kl", "show_kl", is_flag=True,
              help="Print the KL of each glimpse (mean over the images) and write kl.json.")
@data_options(recorded=True)
@DEVICE_OPTION
@library_errors
def reconstruct(checkpoint, count, cols, seed, out, scale, fps, hold, every, show_kl, data_dir,
                mirror, device):
    """Rebuild N test images glimpse by glimpse: each frame shows every image with that
    glimpse's read window beside its canvas with the write window (frame_000.png...,
    reconstruct.gif, reconstruct.png; with --kl, kl.json)."""
    from npdraw import images as images_lib
    from npdraw import train as train_lib
    from npdraw.guards import check_memory

    ckpt_path = _ckpt_file(checkpoint)
    ckpt = _load_ckpt(ckpt_path)
    cfg = _draw_cfg(ckpt, ckpt_path)
    tcfg = _recorded_data(ckpt, None, data_dir, mirror, None)
    test_x, shape = train_lib.load_split(tcfg, "test", progress=True)   # the test split only
    train_lib.check_data_shape(cfg, shape)
    count = min(count, len(test_x))
    rows = -(-count // min(cols, count))
    check_memory(train_lib.sample_bytes(cfg, rows, 2 * min(cols, count), scale),
                 f"rebuilding {count} images over T={cfg.T} glimpses at --scale {scale}")
    params = _params_on(ckpt, device)
    result = train_lib.reconstruction(params, cfg, test_x, count, cols, seed, scale)
    frames, kl = result["frames"], np.asarray(result["kl"], dtype=np.float64)
    out = _output_folder(Path(out) if out is not None else ckpt_path.parent / "reconstruct",
                         "the reconstruction")
    with _writing(f"write the reconstruction into {out}"):
        width = images_lib.save_frames(out, frames, "reconstruct", 1.0 / fps, hold, every)
        if not show_kl and (out / "kl.json").is_file():  # an earlier run's would pass for ours
            (out / "kl.json").unlink()
        if show_kl:
            images_lib.save_text(out / "kl.json", json.dumps(
                {"checkpoint": str(ckpt_path), "test_indices": result["indices"].tolist(),
                 "kl_mean": kl.mean(axis=1).tolist(), "kl": kl.T.tolist()}) + "\n")
    click.echo(f"rebuilt test images {', '.join(str(i) for i in result['indices'])} over "
               f"T={cfg.T} glimpses; wrote {len(frames)} frames to {out}: frame_{0:0{width}d}"
               f".png ... frame_{len(frames) - 1:0{width}d}.png, reconstruct.gif"
               + (", reconstruct.png and kl.json" if show_kl else " and reconstruct.png"))
    if show_kl:
        click.echo("KL of each glimpse, nats (mean over the images): "
                   + " ".join(f"{v:.2f}" for v in kl.mean(axis=1))
                   + f"; total {kl.sum(axis=0).mean():.2f}")


# ----------------------------------------------------------------------------- evaluate

@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--k", "K", type=click.IntRange(min=1), default=1, show_default=True,
              help="Importance samples per image (K > 1 adds the IWAE estimate).")
@click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test",
              show_default=True, help="The split to score.")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              help="Default: the data set the checkpoint was trained on.")
@data_options(recorded=True)
@click.option("--folder", default=None, help="Default: the checkpoint's.")
@click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate N images spread over the split, one drawn with --seed from each "
                   "of N equal stretches (the test file is sorted by label; 0: all).")
@click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=500,
              show_default=True, help="Images per evaluation batch (memory, not the result).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the posterior noise (the same seed gives the same figures).")
@DEVICE_OPTION
@RANKS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@library_errors
def evaluate(checkpoint, K, split, dataset, data_dir, mirror, folder, subset, batch_size, seed,
             device, ranks, as_json):
    """Negative log-likelihood bound (nats per image) on a split, by default the test set.

    On a CPU with several cores it starts itself as one MPI rank per core (as train), and
    under `mpiexec -n N` the N ranks share every batch; rank 0 prints."""
    _run_as_ranks(ranks, device, lambda: batch_size, "evaluating")
    from npdraw import distributed
    from npdraw import train as train_lib

    comm = distributed.from_environment()
    _check_rank_count(ranks, comm)
    try:
        _evaluate(train_lib, comm, checkpoint, K, split, dataset, data_dir, mirror, folder,
                  subset, batch_size, seed, device, as_json)
    except Exception as err:           # noqa: BLE001 - one rank's failure ends them all
        if comm.size == 1:
            raise
        comm.abort(err.format_message() if isinstance(err, click.ClickException) else
                   str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


def _recorded_data(ckpt, dataset, data_dir, mirror, folder) -> TrainConfig:
    """The checkpoint's TrainConfig with the data options given (None: its own)."""
    saved = _train_cfg_or_none(ckpt) or TrainConfig()
    return TrainConfig.from_dict({**saved.to_dict(),
                                  "dataset": dataset or saved.dataset,
                                  "data_dir": data_dir if data_dir is not None else saved.data_dir,
                                  "mirror": mirror if mirror is not None else saved.mirror,
                                  "folder": folder if folder is not None else saved.folder,
                                  "resume": "", "oldmodel": ""})


def _evaluate(train_lib, comm, checkpoint, K, split, dataset, data_dir, mirror, folder, subset,
              batch_size, seed, device, as_json):
    ckpt_path = _ckpt_file(checkpoint)
    ckpt = _load_ckpt(ckpt_path)
    cfg = _draw_cfg(ckpt, ckpt_path)
    tcfg = _recorded_data(ckpt, dataset, data_dir, mirror, folder)
    x, shape = _load_data_on_ranks(train_lib, tcfg, not as_json, comm, split)  # that split only
    train_lib.check_data_shape(cfg, shape)
    total = len(x)
    if subset:
        from npdraw.data import spread_subset
        x = x[spread_subset(total, subset, seed)]
    from npdraw.guards import check_memory
    batch = min(batch_size, max(len(x), 1))
    check_memory(train_lib.model_bytes(cfg, batch, np.dtype(ckpt.params["c0"].dtype).itemsize,
                                       training=False) + 8 * K * batch,     # + log w (K, B)
                 f"evaluating this model (T={cfg.T}) with --k {K} in batches of {batch}")
    from npdraw import backend
    comm = comm.for_device(backend.resolve_device(device))   # on GPUs: one per rank
    params = _params_on(ckpt, device)
    rng = np.random.default_rng(seed)
    iwae, bound = train_lib.evaluate_iwae_and_bound(params, cfg, np.asarray(x), K, batch_size,
                                                    rng, comm,
                                                    progress=not as_json and comm.is_root)
    if not comm.is_root:
        return
    ema = train_lib.model_params(ckpt)[1]
    result = {"checkpoint": str(ckpt_path), "epoch": int(ckpt.epoch), "dataset": tcfg.dataset,
              "split": split, "n": int(len(x)), "of": int(total),
              "subset": "spread" if len(x) < total else "all", "k": K, "seed": seed,
              "ranks": comm.size,
              "ema": ema, "digest": ckpt.digest is not None,
              "nll_bound": bound, "nll_iwae": iwae}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{ckpt_path} (epoch {ckpt.epoch}"
               + (", the moving average of its parameters" if ema else "")
               + f") on {tcfg.dataset} {split}, {len(x)} images"
               + (f" (a spread subset of its {total}, drawn with seed {seed})"
                  if len(x) < total else "") + ":")
    click.echo(f"  NLL bound (L^x + L^z, mean over {K} draw{'s' if K > 1 else ''}): "
               f"{bound:.2f} nats")
    label = "single-sample bound, log-weight form" if K == 1 else f"IWAE, K={K}"
    click.echo(f"  -log p(x) estimate ({label}): {iwae:.2f} nats")
    if ckpt.digest is None:      # saved before checkpoints carried one (docs/CHECKPOINT.md)
        click.echo(f"  note: {ckpt_path.name} has no digest (saved by an earlier version), so "
                   "a change to its content could not be detected")


# ----------------------------------------------------------------------------- export

@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check-n", type=click.IntRange(min=0), default=100, show_default=True,
              help="Record the float64 bound of the first N test images (0: none).")
@click.option("--check-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Noise seed of that bound.")
@data_options(recorded=True)
@library_errors
def export(checkpoint, out, check_n, check_seed, data_dir, mirror):
    """Write CHECKPOINT's parameters (their moving average when it holds one; float32,
    no optimizer state) to OUT, the file to ship, with its epoch, its bounds from the
    run's log and a bound a test can check."""
    from npdraw import train as train_lib

    ckpt_path = _ckpt_file(checkpoint)
    ckpt = _load_ckpt(ckpt_path)
    _draw_cfg(ckpt, ckpt_path)
    test_x = None
    if check_n:
        saved = _train_cfg_or_none(ckpt) or TrainConfig()
        tcfg = TrainConfig.from_dict({**saved.to_dict(), "resume": "", "oldmodel": "",
                                      "data_dir": data_dir if data_dir is not None
                                      else saved.data_dir,
                                      "mirror": mirror if mirror is not None else saved.mirror})
        test_x, shape = train_lib.load_split(tcfg, "test", progress=False)
        train_lib.check_data_shape(ckpt.cfg, shape)
    info = train_lib.export_model(ckpt_path, out, test_x, check_n, check_seed)
    click.echo(f"wrote {out} (epoch {info['epoch']}): " + json.dumps(info))


# ----------------------------------------------------------------------------- classify

@cli.command()
@click.option("--glimpses", type=click.IntRange(min=1), default=8, show_default=True,
              help="Glimpses (LSTM steps) per image.")
@click.option("--read", "read_n", type=click.IntRange(min=1), default=12, show_default=True,
              help="Read window size N (N x N filters).")
@click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True,
              help="LSTM units.")
@click.option("--size", type=click.IntRange(min=28), default=100, show_default=True,
              help="Side of the cluttered canvas.")
@click.option("--distractors", type=click.IntRange(min=0), default=8, show_default=True,
              help="Clutter pieces per image.")
@click.option("--crop", type=click.IntRange(min=1, max=28), default=8, show_default=True,
              help="Side of each clutter piece.")
@click.option("--valid-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Labelled training digits held out for validation.")
@click.option("--train-set", type=click.Choice(TRAIN_SETS), default="npm10k", show_default=True,
              help="Training digits: the project's npm10k files (10,000) or mnist, MNIST's "
                   "standard train-*-ubyte files (60,000, the paper's), from the data folder "
                   "or the mirror.")
@click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True,
              help="Adam learning rate (with --resume: the one to continue with).")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Total epochs (with --resume: the new total).")
@click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=100,
              show_default=True, help="Minibatch size.")
@click.option("--clip", type=POSITIVE_FLOAT, default=10.0, show_default=True,
              help="Global gradient-norm clipping threshold.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the initial parameters, the batch order and the clutter.")
@click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Train on the first N training digits only (0: all).")
@click.option("--eval-subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate each epoch on the first N valid/test digits (0: all).")
@click.option("--name", default="", help="Run name (default: classify-<date>-<time>).")
@click.option("--out", default="runs", show_default=True, help="Parent folder of run dirs.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue the run in this run dir from its checkpoint.h5.")
@DEVICE_OPTION
@data_options(recorded=False)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True, help="Floating-point precision of the computation.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.pass_context
@library_errors
def classify(ctx, glimpses, read_n, hidden, size, distractors, crop, valid_size, train_set, lr,
             epochs, batch_size, clip, seed, subset, eval_subset, name, out, resume, device,
             data_dir, mirror, dtype, no_progress):
    """Train the attentive classifier on cluttered MNIST (paper table 1); writes a run dir."""
    from npdraw import train as train_lib

    overrides = ()
    if resume:
        given = [p for p in ctx.params
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        ignored = [p for p in ("glimpses", "read_n", "hidden", "size", "distractors", "crop",
                               "valid_size", "train_set", "batch_size", "clip", "seed", "subset",
                               "eval_subset", "name", "out", "dtype") if p in given]
        if ignored:
            click.echo("note: --resume takes the model and training settings from the "
                       f"checkpoint; ignoring {', '.join(ignored)}", err=True)
        overrides = ("lr",) if "lr" in given else ()
        cfg = None
        ccfg = ClassifyConfig(epochs=epochs, device=device, data_dir=data_dir, mirror=mirror,
                              resume=str(resume), lr=lr)
    else:
        cfg = ClassifierConfig(height=size, width=size, glimpses=glimpses, read_n=read_n,
                               hidden=hidden)
        ccfg = ClassifyConfig(data_dir=data_dir, mirror=mirror, valid_size=valid_size,
                              train_set=train_set, distractors=distractors, crop=crop,
                              epochs=epochs, batch_size=batch_size, lr=lr, clip=clip,
                              seed=seed, subset=subset, eval_subset=eval_subset, device=device,
                              dtype=dtype, name=name, out=out)
    try:
        train_lib.train_classifier(cfg, ccfg, log=click.echo, progress=not no_progress,
                                   resume_overrides=overrides)
    except train_lib.TrainingInterrupted as err:  # train_classifier has said where it stopped
        click.echo("training interrupted", err=True)
        ctx.exit(128 + err.signum)              # 130 for Ctrl-C, 143 for SIGTERM, as train
    except (train_lib.NonFiniteLossError, train_lib.WriteFailed) as err:
        raise click.ClickException(str(err)) from None


@cli.command("classify-eval")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="The fixed cluttered set to score.")
@click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Evaluate only the first N digits of the split (0: all).")
@data_options(recorded=True)
@click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=500,
              show_default=True, help="Images per evaluation batch (memory, not the result).")
@click.option("--pictures", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also draw the glimpse windows over the split's first images into this "
                   "folder: glimpses.png and glimpses.gif.")
@click.option("--rows", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rows of images in the --pictures.")
@click.option("--cols", type=click.IntRange(min=1), default=4, show_default=True,
              help="Columns of images in the --pictures.")
@click.option("--scale", type=click.IntRange(min=1), default=2, show_default=True,
              help="Enlarge the --pictures this many times.")
@DEVICE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@library_errors
def classify_eval(checkpoint, split, subset, data_dir, mirror, batch_size, pictures, rows, cols,
                  scale, device, as_json):
    """Error rate of a classifier checkpoint on the fixed cluttered test (or valid) set."""
    from npdraw import classifier as clf
    from npdraw import images as images_lib
    from npdraw.data import synthetic
    from npdraw import train as train_lib

    ckpt_path = _ckpt_file(checkpoint)
    ckpt = _load_ckpt(ckpt_path)
    if not isinstance(ckpt.cfg, ClassifierConfig):
        raise click.BadParameter(f"{ckpt_path} is a DRAW checkpoint; use evaluate",
                                 param_hint="'CHECKPOINT'")
    cfg = ckpt.cfg
    saved = train_lib.classify_config_of(ckpt) or ClassifyConfig()
    ccfg = ClassifyConfig.from_dict({**saved.to_dict(), "eval_subset": subset, "resume": "",
                                     "data_dir": (data_dir if data_dir is not None
                                                  else saved.data_dir),
                                     "mirror": mirror if mirror is not None else saved.mirror})
    digits = synthetic.load_labelled_mnist(ccfg.data_dir, ccfg.mirror, ccfg.valid_size,
                                           ccfg.train_set)
    valid, test = train_lib.cluttered_eval_sets(ccfg, cfg, digits)
    x, y = test if split == "test" else valid
    params = _params_on(ckpt, device)
    loss, error = clf.evaluate(params, cfg, x, y, batch_size)
    n_train = int(digits.train_x.shape[0])
    if ccfg.subset:                                     # it trained with classify --subset N
        n_train = min(n_train, ccfg.subset)
    result = {"checkpoint": str(ckpt_path), "epoch": int(ckpt.epoch), "split": split,
              "n": int(len(x)), "glimpses": cfg.glimpses, "read_n": cfg.read_n,
              "cross_entropy": loss, "error": error, "train_digits": n_train,
              "train_set": ccfg.train_set}
    if pictures is not None:
        count = rows * cols
        if count > len(x):
            raise click.BadParameter(f"{rows}x{cols} pictures need {count} images; the split "
                                     f"has {len(x)}", param_hint="'--rows'/'--cols'")
        windows = clf.glimpse_windows(params, cfg, x[:count])
        frames = train_lib.render_glimpse_frames(x[:count], windows, (1, cfg.height, cfg.width),
                                                 rows, cols, scale)
        pictures.mkdir(parents=True, exist_ok=True)
        images_lib.save_png(pictures / "glimpses.png", frames[-1])
        images_lib.save_gif(pictures / "glimpses.gif", frames, duration=0.5, loop=0)
        result["pictures"] = [str(pictures / "glimpses.png"), str(pictures / "glimpses.gif")]
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{ckpt_path} (epoch {ckpt.epoch}, {cfg.glimpses} glimpses of {cfg.read_n}x"
               f"{cfg.read_n}) on cluttered MNIST {split}, {len(x)} images:")
    click.echo(f"  error {100 * error:.2f}%  cross-entropy {loss:.4f}  "
               f"(trained on {n_train} digits of {ccfg.train_set}; the paper had 60,000)")
    if pictures is not None:
        click.echo(f"  wrote {pictures / 'glimpses.png'} and {pictures / 'glimpses.gif'}")


# ----------------------------------------------------------------------------- plot

@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the run dir).")
@click.option("--from-epoch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Plot the epochs from this one on (the late, flat end of a long run).")
@library_errors
def plot(run_dir, out, from_epoch):
    """learning_curves (per epoch), learning_curves_hours (per hour), kl_per_glimpse (a heat
    map) and optimizer (lr, |g|, |step|) from RUN_DIR/log.jsonl, each as .png and .pdf (a
    classifier run: error_curves)."""
    from npdraw import pictures
    from npdraw import train as train_lib

    try:
        rows = train_lib.read_log(run_dir, warn=lambda message: click.echo(message, err=True))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'RUN_DIR'") from None
    try:
        pictures.select_epochs(rows, from_epoch)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--from-epoch'") from None
    out = _output_folder(Path(out) if out is not None else Path(run_dir), "the plots")
    with _writing(f"write the plots in {out}"):
        written = pictures.plot_run(rows, out, from_epoch, pictures.run_dataset(run_dir))
    n = sum(int(r["epoch"]) >= from_epoch for r in rows)
    first = f" from epoch {from_epoch}" if from_epoch > 1 else ""
    click.echo(f"wrote {', '.join(str(p) for p in written)} and a .pdf beside each "
               f"({n} epochs{first})")


# ----------------------------------------------------------------------------- attention-demo

@cli.command("attention-demo")
@click.argument("img", type=click.Path(path_type=Path))
@click.option("--n", "N", type=click.IntRange(min=1), default=12, show_default=True,
              help="Window size N (an N x N glimpse).")
@click.option("--cx", type=FINITE_FLOAT, default=None,
              help="Window centre x, 1-based pixels (default: image centre (W+1)/2).")
@click.option("--cy", type=FINITE_FLOAT, default=None,
              help="Window centre y, 1-based pixels (default: image centre (H+1)/2).")
@click.option("--stride", type=POSITIVE_FINITE_FLOAT, default=None,
              help="Filter spacing delta (default: 0.9*(max(H,W)-1)/(N-1), filters "
                   "spanning 90% of the image).")
@click.option("--sigma", type=POSITIVE_FINITE_FLOAT, default=None,
              help="Filter standard deviation (default: stride/2).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Folder for the original, read and write pictures.")
@library_errors
def attention_demo(img, N, cx, cy, stride, sigma, out):
    """Read an N x N glimpse from IMG with the attention filterbank, write it back."""
    from npdraw import images as images_lib
    from npdraw import reference

    try:
        image = images_lib.load_image(img)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="'IMG'") from None
    image = np.asarray(image, dtype=np.float64)
    c, h, w = image.shape
    from npdraw.guards import check_memory
    check_memory(attention_demo_bytes(c, h, w, N), f"a {N}x{N} glimpse of a {w}x{h} image")
    # A window far larger than the image, or centred far off it, shows nothing and
    # overflows the filterbank's squares: one sentence instead.
    limit = 1e6 * max(h, w)
    for flag, value in (("--cx", cx), ("--cy", cy), ("--stride", stride), ("--sigma", sigma)):
        if value is not None and abs(value) > limit:
            raise click.BadParameter(f"{value:g} is beyond {limit:g} pixels (a million times "
                                     f"the image's side)", param_hint=f"'{flag}'")
    cx = (w + 1) / 2.0 if cx is None else cx
    cy = (h + 1) / 2.0 if cy is None else cy
    if stride is None:
        stride = 0.9 * (max(h, w) - 1) / max(N - 1, 1)
        stride = stride if stride > 0 else 1.0
    if sigma is None:
        sigma = stride / 2.0
    one = lambda v: np.array([float(v)], dtype=np.float64)  # noqa: E731
    Fx, _ = reference.filterbank_forward(one(cx), one(stride), one(sigma ** 2), N, w)
    Fy, _ = reference.filterbank_forward(one(cy), one(stride), one(sigma ** 2), N, h)
    gamma = one(1.0)
    glimpse, _ = reference.read_forward(image[None], Fy, Fx, gamma)        # (1, C, N, N)
    written, _ = reference.write_forward(glimpse, Fy, Fx, gamma)           # (1, C, H, W)
    glimpse, written = glimpse[0], written[0]
    # The raw write (1/gamma) Fy^T g Fx spreads each glimpse value over ~stride^2 pixels
    # with unit-sum filter rows, so it is far dimmer than the image, and brighter where
    # truncated edge filters pile up. Dividing by the write of an all-ones patch (the
    # coverage) shows what the glimpse says about each pixel: the read upsampled.
    coverage, _ = reference.write_forward(np.ones_like(glimpse[None]), Fy, Fx, gamma)
    coverage = coverage[0]
    seen = coverage > 1e-3 * float(coverage.max())
    upsampled = np.where(seen, written / np.where(seen, coverage, 1.0), 0.0)

    out = _output_folder(Path(out), "the attention pictures")
    stem = Path(img).stem
    view = max(1, int(round(max(h, w) / N)))
    paths = {"original": out / f"{stem}_original.png", "read": out / f"{stem}_read.png",
             "write": out / f"{stem}_write.png"}
    enlarged = np.repeat(np.repeat(glimpse, view, axis=1), view, axis=2)
    with _writing(f"write the attention pictures into {out}"):
        images_lib.save_png(paths["original"], _to_hwc(image))
        images_lib.save_png(paths["read"], _to_hwc(enlarged))
        images_lib.save_png(paths["write"], _to_hwc(upsampled))
    click.echo(f"image {c}x{h}x{w}; window N={N}, centre ({cx:g}, {cy:g}), stride {stride:g}, "
               f"sigma {sigma:g}")
    click.echo(f"original: {paths['original']}")
    click.echo(f"read:     {paths['read']} ({N}x{N} glimpse shown {view}x enlarged)")
    click.echo(f"write:    {paths['write']} (the glimpse written back at full size, "
               "divided by the write of an all-ones patch)")


def attention_demo_bytes(c: int, h: int, w: int, n: int) -> int:
    """Estimated peak bytes of attention-demo: float64 filterbanks (N, H) and (N, W), the
    glimpse and its enlarged view (C, N*v, N*v) with v = max(1, round(max(H, W)/N)),
    the write, coverage and picture copies (C, H, W), each a few times over."""
    view = max(1, int(round(max(h, w) / n)))
    return 8 * (4 * c * n * (h + w) + 8 * max(c, 3) * (n * view) ** 2 + 12 * c * h * w)


def _to_hwc(chw: np.ndarray) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, 3) uint8 (grey repeated to RGB)."""
    img = np.clip(np.asarray(chw, dtype=np.float64), 0.0, 1.0)
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    elif img.shape[0] != 3:
        img = np.repeat(img.mean(axis=0, keepdims=True), 3, axis=0)
    return np.round(img.transpose(1, 2, 0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- bench

if (HERE / "bench" / "run.py").is_file():
    @cli.command(context_settings=dict(ignore_unknown_options=True, allow_extra_args=True,
                                       help_option_names=[]))
    @click.pass_context
    def bench(ctx):
        """Benchmarks (bench/run.py); all arguments are passed through (try: bench --help)."""
        import importlib
        if str(HERE) not in sys.path:
            sys.path.insert(0, str(HERE))
        runner = importlib.import_module("bench.run")
        ctx.exit(int(runner.main(list(ctx.args), launch=_PROGRAM is not None) or 0))


# ----------------------------------------------------------------------------- entry

def _own_program() -> list:
    """The arguments to python that start this command again: ['-m', 'npdraw'] under
    `python -m npdraw`, else the script that python ran (cli.py, or the npdraw console
    script, a Python file)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name in ("npdraw.__main__", "npdraw.cli"):
        return ["-m", spec.name.removesuffix(".__main__")]
    return [os.path.abspath(sys.argv[0])]


def main(args=None) -> None:
    """The command line's entry point: the npdraw console script, `python -m npdraw` and
    `python cli.py` (exits with the command's status)."""
    global _PROGRAM
    _PROGRAM = _own_program()
    cli(args=args)


if __name__ == "__main__":
    main()
