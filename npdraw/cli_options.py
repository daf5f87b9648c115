"""The options of npdraw's commands (npdraw/cli.py) and the plumbing they share: click
types that refuse nan and inf, the options several commands share (defined once), each
command's option stack in the order --help lists it (--help's sections are
npdraw/helpsections.py's), the options a --resume ignores, library and file-system errors
as one sentence (exit status 1), the group (Ctrl-C before a command starts) and the
checks and data loading shared by MPI ranks.

    @cli.command()
    @cli_options.SAMPLE_OPTIONS        # the arguments and options of `npdraw sample`
    @cli_options.library_errors
    def sample(checkpoint, rows, ...):
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import click

from npdraw import distributed
from npdraw.config import DATASETS, EVAL_NOISE, LR_SCHEDULES, RESUME_OVERRIDES, TRAIN_SETS
from npdraw.guards import os_error_sentence, what_blocks_a_folder
from npdraw.helpsections import SectionedGroup

# A resumed classifier run may change these (train._resumed_classify_config: the new
# epochs and device, and lr of config.RESUME_OVERRIDES; it keeps its batch size).
CLASSIFY_RESUME_OVERRIDES = tuple(f for f in RESUME_OVERRIDES if f in ("epochs", "device", "lr"))
# Options a resume reads as given (where the run and its data are, how to report, and
# --peepholes, which adds peepholes to a resumed model), so never "ignored" on --resume.
RESUME_READS = ("resume", "data_dir", "mirror", "folder", "no_progress", "peepholes")


# ----------------------------------------------------------------------------- types

class AttentionType(click.ParamType):
    """'R,W' -> (read_n, write_n), the read and write window sizes; '' (or 'none') -> None (no attention)."""
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


# ----------------------------------------------------------------------------- shared options

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

CLIP_OPTION = click.option("--clip", type=POSITIVE_FLOAT, default=10.0, show_default=True,
                           help="Global gradient-norm clipping threshold.")
RUNS_OUT_OPTION = click.option("--out", default="runs", show_default=True,
                               help="Parent folder of run dirs.")
RESUME_OPTION = click.option("--resume", type=click.Path(exists=True, file_okay=False),
                             default=None,
                             help="Continue the run in this run dir from its checkpoint.h5.")
DTYPE_OPTION = click.option("--dtype", type=click.Choice(["float32", "float64"]),
                            default="float32", show_default=True,
                            help="Floating-point precision of the computation.")
NO_PROGRESS_OPTION = click.option("--no-progress", is_flag=True,
                                  help="No progress bar on stderr.")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
EVAL_BATCH_OPTION = click.option("--bs", "--batch-size", "batch_size",
                                 type=click.IntRange(min=1), default=500, show_default=True,
                                 help="Images per evaluation batch (memory, not the result).")
CHECKPOINT_ARGUMENT = click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))


def epochs_option(default: int):
    """--epochs of train and classify, which differ in the default only."""
    return click.option("--epochs", type=click.IntRange(min=1), default=default,
                        show_default=True, help="Total epochs (with --resume: the new "
                        "total; without it, the run's own).")


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


def options(*decorators):
    """One decorator that applies ``decorators`` as if they were stacked, in this order,
    above the function (click lists the options in --help in that order)."""
    def decorate(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return decorate


# ----------------------------------------------------------------------------- errors

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
            raise click.ClickException(os_error_sentence(err, target)) from None
    return wrapper


@contextlib.contextmanager
def writing(wanted: str):
    """Turn an OSError inside the block into 'Error: cannot <wanted>: <reason>' (exit 1)."""
    try:
        yield
    except OSError as err:
        raise click.ClickException(os_error_sentence(err, wanted)) from None


def output_folder(out: Path, what: str) -> Path:
    """Create the folder ``out`` for ``what``; one-sentence errors."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise click.ClickException(f"cannot write {what} into {out}: it is "
                                   f"{what_blocks_a_folder(out)}, not a folder")
    with writing(f"create the folder {out} for {what}"):
        out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- resume

def given_options(ctx: click.Context) -> list:
    """The names of the options given on the command line, in the command's order."""
    return [p.name for p in ctx.command.params
            if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]


def ignored_on_resume(ctx: click.Context, changeable) -> list:
    """The options given that a --resume ignores: all but those it may change
    (``changeable``: config.RESUME_OVERRIDES, or CLASSIFY_RESUME_OVERRIDES) and those it
    reads (RESUME_READS)."""
    return [name for name in given_options(ctx)
            if name not in changeable and name not in RESUME_READS]


# ----------------------------------------------------------------------------- group and ranks

class Group(SectionedGroup):
    """The npdraw group: a Ctrl-C that arrives before a command has set up its own
    handling (loading NumPy, the data, the model) exits 130 as a later one does, not
    click's "Aborted!" with status 1. An MPI rank ends every rank so: alone, it would wait
    in MPI_Finalize while the others wait in a collective."""

    def invoke(self, ctx):
        try:
            from npdraw import engine_layers
            if os.environ.get(engine_layers.KERNELS_VARIABLE):   # unavailable: one sentence
                try:
                    engine_layers.kernels()
                except ValueError as err:
                    raise click.ClickException(str(err)) from None
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            distributed.end_every_rank(130)
            ctx.exit(130)


def check_rank_count(ranks: int, comm) -> None:
    """--ranks must fit the ranks running: a usage error that every rank finds alike, so
    rank 0 says it and all exit with status 1 (no MPI_Abort needed)."""
    try:
        distributed.check_rank_count(ranks, comm)
    except ValueError as err:
        if not comm.is_root:
            raise click.exceptions.Exit(1) from None
        raise click.ClickException(str(err)) from None


def load_data_on_ranks(tcfg, progress, comm, split=None):
    """runs.load_data on every rank (or, with ``split``, runs.load_split: (x, shape));
    rank 0 first, so that a download or conversion into the data dir happens once (the
    others wait for it, then read its result)."""
    from npdraw import runs

    def load(show):
        return (runs.load_data(tcfg, show) if split is None
                else runs.load_split(tcfg, split, show))
    data = load(progress and comm.is_root) if comm.is_root else None
    comm.sum([0.0])                         # every rank waits here for rank 0
    return data if data is not None else load(False)


# ----------------------------------------------------------------------------- commands

# train
TRAIN_OPTIONS = options(
    click.option("--dataset", type=click.Choice(DATASETS), default="bmnist", show_default=True,
                 help="Data set; the image size comes from it."),
    click.option("--attention", type=ATTENTION, default="2,5", show_default=True,
                 help="Read,write window sizes; '' for the attention-free model."),
    click.option("--glimpses", "--niter", "T", type=click.IntRange(min=1), default=64,
                 show_default=True, help="Glimpses T: the steps of reading and writing per image "
                 "(--niter is the old name)."),
    click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True,
                 help="Adam learning rate."),
    click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="constant",
                 show_default=True, help="How the learning rate decays after --lr-hold epochs."),
    click.option("--lr-min", type=FiniteRange(min=0), default=0.0, show_default=True,
                 help="exponential: the floor; cosine: the final rate."),
    click.option("--lr-hold", type=FiniteRange(min=0), default=0.0, show_default=True,
                 help="Epochs at --lr before the decay starts."),
    click.option("--lr-gamma", type=FiniteRange(min=0, max=1, min_open=True), default=1.0,
                 show_default=True, help="exponential: the factor per epoch."),
    click.option("--lr-decay-epochs", type=FiniteRange(min=0), default=0.0, show_default=True,
                 help="cosine: epochs from --lr to --lr-min (0: until --epochs)."),
    click.option("--eval-every", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Evaluate valid and test every K epochs (and after the last)."),
    click.option("--ema-decay", type=FiniteRange(min=0, max=1, max_open=True), default=0.0,
                 show_default=True,
                 help="Evaluate, select and export an exponential moving average of the "
                      "parameters with this decay per step (0: off; 0.999 averages about the "
                      "last 1000 steps)."),
    click.option("--eval-noise", type=click.Choice(EVAL_NOISE), default="fixed", show_default=True,
                 help="The noise of the valid/test evaluations: fixed, the same every epoch, "
                      "so that epochs compare as paired figures, or drawn afresh each epoch "
                      "(runs saved without this setting)."),
    epochs_option(default=20),
    click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=100,
                 show_default=True, help="Minibatch size (with --resume: a new phase's)."),
    click.option("--enc-dim", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Encoder LSTM units."),
    click.option("--dec-dim", type=click.IntRange(min=1), default=256, show_default=True,
                 help="Decoder LSTM units."),
    click.option("--z-dim", type=click.IntRange(min=1), default=100, show_default=True,
                 help="Latent variables per glimpse."),
    click.option("--peepholes", is_flag=True,
                 help="Peephole LSTMs (Graves 2013 eq 7-11), started at zero; allowed on "
                      "--resume and --oldmodel from a model without them (docs/TRAINING.md)."),
    click.option("--name", default="", help="Run name (default: draw-<date>-<time>)."),
    click.option("--oldmodel", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Initialise the parameters from this checkpoint's model (same shapes; "
                      "its moving average when it keeps one)."),
    RESUME_OPTION,
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the initial parameters, the batch order and the noise."),
    DEVICE_OPTION,
    RANKS_OPTION,
    data_options(recorded=False),
    click.option("--folder", default="", help="Image folder for --dataset folder."),
    click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Train on the first N training images only (0: all)."),
    click.option("--eval-subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate each epoch on the first N valid/test images (0: whole splits)."),
    CLIP_OPTION,
    RUNS_OUT_OPTION,
    DTYPE_OPTION,
    NO_PROGRESS_OPTION,
    click.option("--tensorboard/--no-tensorboard", default=False, show_default=True,
                 help="Also write each epoch's scalars and samples to RUN/tensorboard/ "
                      "(tensorboard --logdir runs); needs the [tensorboard] extra."),
)

# sample
SAMPLE_OPTIONS = options(
    CHECKPOINT_ARGUMENT,
    click.option("--rows", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Rows of samples in each picture."),
    click.option("--cols", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Columns of samples in each picture."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Prior noise seed."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Output folder (default: samples/ next to the checkpoint)."),
    click.option("--boxes/--no-boxes", default=False, show_default=True,
                 help="Outline each glimpse's write window in red."),
    click.option("--scale", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Enlarge every image this many times."),
    FPS_OPTION,
    HOLD_OPTION,
    EVERY_OPTION,
    DEVICE_OPTION,
)

# reconstruct
RECONSTRUCT_OPTIONS = options(
    CHECKPOINT_ARGUMENT,
    click.option("--n", "count", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Test images to rebuild, spread over the test split: one drawn with --seed "
                      "from each of N equal stretches."),
    click.option("--cols", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Image and canvas pairs per row."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the choice of images and of the posterior noise."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Output folder (default: reconstruct/ next to the checkpoint)."),
    click.option("--scale", type=click.IntRange(min=1), default=3, show_default=True,
                 help="Enlarge every image this many times."),
    FPS_OPTION,
    HOLD_OPTION,
    EVERY_OPTION,
    click.option("--kl", "show_kl", is_flag=True,
                 help="Print the KL of each glimpse (mean over the images) and write kl.json."),
    data_options(recorded=True),
    DEVICE_OPTION,
)

# evaluate
EVALUATE_OPTIONS = options(
    CHECKPOINT_ARGUMENT,
    click.option("--k", "K", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Importance samples per image (K > 1 adds the IWAE estimate)."),
    click.option("--split", type=click.Choice(["test", "valid", "train"]), default="test",
                 show_default=True, help="The split to score."),
    click.option("--dataset", type=click.Choice(DATASETS), default=None,
                 help="Default: the data set the checkpoint was trained on."),
    data_options(recorded=True),
    click.option("--folder", default=None, help="Default: the checkpoint's."),
    click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate N images spread over the split, one drawn with --seed from each "
                      "of N equal stretches (the test file is sorted by label; 0: all)."),
    EVAL_BATCH_OPTION,
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the posterior noise (the same seed gives the same figures)."),
    DEVICE_OPTION,
    RANKS_OPTION,
    JSON_OPTION,
)

# export
EXPORT_OPTIONS = options(
    CHECKPOINT_ARGUMENT,
    click.argument("out", type=click.Path(dir_okay=False, path_type=Path)),
    click.option("--check-n", type=click.IntRange(min=0), default=100, show_default=True,
                 help="Record the float64 bound of the first N test images (0: none)."),
    click.option("--check-seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Noise seed of that bound."),
    data_options(recorded=True),
)

# classify
CLASSIFY_OPTIONS = options(
    click.option("--glimpses", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Glimpses (LSTM steps) per image."),
    click.option("--read", "read_n", type=click.IntRange(min=1), default=12, show_default=True,
                 help="Read window size N (N x N filters)."),
    click.option("--hidden", type=click.IntRange(min=1), default=256, show_default=True,
                 help="LSTM units."),
    click.option("--size", type=click.IntRange(min=28), default=100, show_default=True,
                 help="Side of the cluttered canvas."),
    click.option("--distractors", type=click.IntRange(min=0), default=8, show_default=True,
                 help="Clutter pieces per image."),
    click.option("--crop", type=click.IntRange(min=1, max=28), default=8, show_default=True,
                 help="Side of each clutter piece."),
    click.option("--valid-size", type=click.IntRange(min=1), default=1000, show_default=True,
                 help="Labelled training digits held out for validation."),
    click.option("--train-set", type=click.Choice(TRAIN_SETS), default="npm10k", show_default=True,
                 help="Training digits: the project's npm10k files (10,000) or mnist, MNIST's "
                      "standard train-*-ubyte files (60,000, the paper's), from the data folder "
                      "or the mirror."),
    click.option("--lr", type=POSITIVE_FLOAT, default=1e-3, show_default=True,
                 help="Adam learning rate (with --resume: the one to continue with)."),
    epochs_option(default=100),
    click.option("--bs", "--batch-size", "batch_size", type=click.IntRange(min=1), default=100,
                 show_default=True, help="Minibatch size."),
    CLIP_OPTION,
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the initial parameters, the batch order and the clutter."),
    click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Train on the first N training digits only (0: all)."),
    click.option("--eval-subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate each epoch on the first N valid/test digits (0: all)."),
    click.option("--name", default="", help="Run name (default: classify-<date>-<time>)."),
    RUNS_OUT_OPTION,
    RESUME_OPTION,
    DEVICE_OPTION,
    data_options(recorded=False),
    DTYPE_OPTION,
    NO_PROGRESS_OPTION,
)

# classify-eval
CLASSIFY_EVAL_OPTIONS = options(
    CHECKPOINT_ARGUMENT,
    click.option("--split", type=click.Choice(["test", "valid"]), default="test",
                 show_default=True, help="The fixed cluttered set to score."),
    click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Evaluate only the first N digits of the split (0: all)."),
    data_options(recorded=True),
    EVAL_BATCH_OPTION,
    click.option("--pictures", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Also draw the glimpse windows over the split's first images into this "
                      "folder: glimpses.png and glimpses.gif."),
    click.option("--rows", type=click.IntRange(min=1), default=3, show_default=True,
                 help="Rows of images in the --pictures."),
    click.option("--cols", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Columns of images in the --pictures."),
    click.option("--scale", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Enlarge the --pictures this many times."),
    DEVICE_OPTION,
    JSON_OPTION,
)

# plot
PLOT_OPTIONS = options(
    click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path)),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Output folder (default: the run dir)."),
    click.option("--from-epoch", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Plot the epochs from this one on (the late, flat end of a long run)."),
)

# attention-demo
ATTENTION_DEMO_OPTIONS = options(
    click.argument("img", type=click.Path(path_type=Path)),
    click.option("--n", "N", type=click.IntRange(min=1), default=12, show_default=True,
                 help="Window size N (an N x N glimpse)."),
    click.option("--cx", type=FINITE_FLOAT, default=None,
                 help="Window centre x, 1-based pixels (default: image centre (W+1)/2)."),
    click.option("--cy", type=FINITE_FLOAT, default=None,
                 help="Window centre y, 1-based pixels (default: image centre (H+1)/2)."),
    click.option("--stride", type=POSITIVE_FINITE_FLOAT, default=None,
                 help="Filter spacing delta (default: 0.9*(max(H,W)-1)/(N-1), filters "
                      "spanning 90% of the image)."),
    click.option("--sigma", type=POSITIVE_FINITE_FLOAT, default=None,
                 help="Filter standard deviation (default: stride/2)."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
                 show_default=True, help="Folder for the original, read and write pictures."),
)
