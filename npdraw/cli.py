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

See docs/TRAINING.md for what each command writes. Each command parses its options
(npdraw/cli_options.py holds them), makes its configs, calls the library and prints.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from npdraw.threads import share_cores_between_ranks as _share_cores_between_ranks

_share_cores_between_ranks()   # npdraw/__init__.py does it too; NumPy must not be loaded yet

import click  # noqa: E402 - after the BLAS thread count is settled
import numpy as np  # noqa: E402

from npdraw import __version__, cli_options  # noqa: E402
from npdraw.config import (RESUME_OVERRIDES, ClassifierConfig, ClassifyConfig,  # noqa: E402
                           DrawConfig, TrainConfig)

# The repository root when npdraw runs from a checkout (bench/ is there; not in a wheel).
HERE = Path(__file__).resolve().parents[1]
# How this process was started, so that --ranks can start it again as MPI ranks: the
# arguments to python before the command's own (set by main(); None when called from
# Python, as click's test runner does, which then runs in one process).
_PROGRAM = None


# ----------------------------------------------------------------------------- helpers

def _run_as_ranks(ranks: int, device: str, batch_size, what: str) -> None:
    """Start this command as MPI ranks on this machine when that is what --ranks asks for
    (0: one per core on a CPU): this process runs `mpiexec -n R python cli.py <the same
    arguments>` (or `... python -m npdraw ...`, or the npdraw script: the way it was
    started) under npdraw.launcher, which passes SIGINT and SIGTERM on to every rank,
    and exits with the job's status. Without MPI it
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


def _resumed_batch_size(run_dir) -> int:
    """The batch size recorded in RUN/checkpoint.h5 (for the rank count); 0 when it
    cannot be read (then the command runs in one process and reports why)."""
    from npdraw import runs as runs_lib
    try:
        saved = runs_lib.train_config_of(runs_lib.load_checkpoint(Path(run_dir) /
                                                                     "checkpoint.h5"))
    except (ValueError, TypeError, OSError):
        return 0
    return saved.batch_size if saved is not None else 0


def _train_cfg_or_none(ckpt):
    from npdraw import runs as runs_lib
    try:
        return runs_lib.train_config_of(ckpt)
    except (ValueError, TypeError):
        return None


def _params_on(ckpt, device, dtype=None):
    """The checkpoint's model on ``device``: its moving average of the parameters when it
    holds one (runs.model_params), else its parameters."""
    from npdraw import backend
    from npdraw import runs as runs_lib
    return runs_lib.arrays_to_device(runs_lib.model_params(ckpt)[0],
                                      backend.resolve_device(device), dtype)


def _checkpoint(path: Path, kind=DrawConfig):
    """(the file a CHECKPOINT argument names (runs.checkpoint_file), its checkpoint); a
    usage error when it cannot be read or holds the other kind of model (``kind``:
    DrawConfig or ClassifierConfig)."""
    from npdraw import runs as runs_lib
    try:
        ckpt_path = runs_lib.checkpoint_file(path)
        ckpt = runs_lib.load_checkpoint(ckpt_path)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'CHECKPOINT'") from None
    if not isinstance(ckpt.cfg, kind):
        what, use = (("a classifier", "classify-eval") if kind is DrawConfig
                     else ("a DRAW", "evaluate"))
        raise click.BadParameter(f"{ckpt_path} is {what} checkpoint; use {use}",
                                 param_hint="'CHECKPOINT'")
    return ckpt_path, ckpt


# ----------------------------------------------------------------------------- group

@click.group(cls=cli_options.Group, context_settings=dict(help_option_names=["-h", "--help"]))
@click.version_option(__version__, "--version", prog_name="npdraw")
def cli():
    """DRAW (Gregor et al. 2015) on NumPy/CuPy: train, sample, evaluate, plot."""


# ----------------------------------------------------------------------------- train

@cli.command()
@cli_options.TRAIN_OPTIONS
@click.pass_context
@cli_options.library_errors
def train(ctx, dataset, attention, T, lr, lr_schedule, lr_min, lr_hold, lr_gamma,
          lr_decay_epochs, eval_every, ema_decay, eval_noise, epochs, batch_size, enc_dim,
          dec_dim, z_dim, peepholes, name, oldmodel, resume, seed, device, ranks, data_dir,
          mirror, folder, subset, eval_subset, clip, out, dtype, no_progress, tensorboard):
    """Train DRAW; writes a run dir under --out (see docs/TRAINING.md).

    On a CPU with several cores it starts itself as one MPI rank per core, which train
    one model together, each on its slice of every batch; under `mpiexec -n N` (or srun)
    the N ranks do (docs/TRAINING.md, "Ranks")."""
    batch_given = "batch_size" in cli_options.given_options(ctx)
    _run_as_ranks(ranks, device,
                  (lambda: _resumed_batch_size(resume)) if resume and not batch_given
                  else (lambda: batch_size), "training")
    from npdraw import distributed
    from npdraw import runs as runs_lib
    from npdraw import train as train_lib

    comm = distributed.from_environment()

    # The settings that a resumed run may change when given (config.RESUME_OVERRIDES).
    schedule = dict(lr=lr, lr_schedule=lr_schedule, lr_min=lr_min, lr_hold=lr_hold,
                    lr_gamma=lr_gamma, lr_decay_epochs=lr_decay_epochs, eval_every=eval_every,
                    ema_decay=ema_decay, eval_noise=eval_noise, batch_size=batch_size,
                    tensorboard=tensorboard)
    overrides = ()
    if resume:
        ignored = cli_options.ignored_on_resume(ctx, RESUME_OVERRIDES)
        if ignored and comm.is_root:
            click.echo("note: --resume takes the model and training settings from the "
                       f"checkpoint; ignoring {', '.join(ignored)}", err=True)
        overrides = tuple(p for p in cli_options.given_options(ctx)   # epochs: the new total
                          if p in schedule or p == "epochs")
        tcfg = TrainConfig(epochs=epochs, device=device, ranks=ranks, data_dir=data_dir,
                           mirror=mirror, folder=folder, resume=str(resume),
                           **{p: schedule[p] for p in overrides if p in schedule})
        cfg = None
    else:
        tcfg = TrainConfig(dataset=dataset, data_dir=data_dir, mirror=mirror, folder=folder,
                           epochs=epochs, clip=clip, seed=seed,
                           subset=subset, eval_subset=eval_subset, device=device,
                           ranks=ranks, dtype=dtype, name=name, out=out,
                           oldmodel=oldmodel or "", **schedule)

    cli_options.check_rank_count(ranks, comm)      # before the data set is loaded
    if tcfg.tensorboard:
        from npdraw import monitor
        monitor.check_available()
    try:
        data = None
        if not resume:  # the model config needs the data set's image shape
            data = cli_options.load_data_on_ranks(tcfg, not no_progress, comm)
            c, h, w = (int(s) for s in data.shape)
            read_n, write_n = attention if attention else (2, 5)
            cfg = DrawConfig(height=h, width=w, channels=c, T=T, read_n=read_n,
                             write_n=write_n, enc_dim=enc_dim, dec_dim=dec_dim, z_dim=z_dim,
                             attention=attention is not None, peepholes=peepholes)
        train_lib.train(cfg, tcfg, log=click.echo, data=data, progress=not no_progress,
                        resume_overrides=overrides, comm=comm,
                        add_peepholes=bool(resume and peepholes))
    except runs_lib.TrainingInterrupted as err:  # train() has said where to resume from
        if comm.is_root:
            click.echo("training interrupted", err=True)
        ctx.exit(128 + err.signum)              # 130 for Ctrl-C, 143 for SIGTERM
    except runs_lib.TrainingStopped as err:    # a non-finite loss, a failed write
        if not comm.is_root:               # every rank stopped alike; rank 0 says why
            ctx.exit(1)
        raise click.ClickException(str(err)) from None
    except Exception as err:               # noqa: BLE001 - one rank's failure ends them all
        if comm.size == 1:
            raise
        comm.abort(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- sample

@cli.command()
@cli_options.SAMPLE_OPTIONS
@cli_options.library_errors
def sample(checkpoint, rows, cols, seed, out, boxes, scale, fps, hold, every, device):
    """Generate rows*cols images: frame_000.png... (one per glimpse), samples.gif and
    samples.png (the last frame)."""
    from npdraw import frames as frames_lib
    from npdraw import images as images_lib

    ckpt_path, ckpt = _checkpoint(checkpoint)
    cfg = ckpt.cfg
    params = _params_on(ckpt, device)
    if boxes and not cfg.attention:
        click.echo("note: this model has no attention; --boxes draws nothing", err=True)
    from npdraw.guards import check_memory
    check_memory(frames_lib.sample_bytes(cfg, rows, cols, scale),
                 f"{rows}x{cols} samples of T={cfg.T} glimpses at --scale {scale}")
    rng = np.random.default_rng(seed)
    canvases, windows = frames_lib.generate_samples(params, cfg, rows * cols, rng)
    frames = frames_lib.render_frames(canvases, windows, (cfg.channels, cfg.height, cfg.width),
                                      rows, cols, boxes=boxes, scale=scale)
    out = cli_options.output_folder(
        Path(out) if out is not None else ckpt_path.parent / "samples", "the samples")
    with cli_options.writing(f"write the samples into {out}"):
        width = images_lib.save_frames(out, frames, "samples", 1.0 / fps, hold, every)
    click.echo(f"wrote {len(frames)} frames ({rows}x{cols} samples, T={cfg.T}) to {out}: "
               f"frame_{0:0{width}d}.png ... frame_{len(frames) - 1:0{width}d}.png, "
               "samples.gif and samples.png")


# ----------------------------------------------------------------------------- reconstruct

@cli.command()
@cli_options.RECONSTRUCT_OPTIONS
@cli_options.library_errors
def reconstruct(checkpoint, count, cols, seed, out, scale, fps, hold, every, show_kl, data_dir,
                mirror, device):
    """Rebuild N test images glimpse by glimpse: each frame shows every image with that
    glimpse's read window beside its canvas with the write window (frame_000.png...,
    reconstruct.gif, reconstruct.png; with --kl, kl.json)."""
    from npdraw import frames as frames_lib
    from npdraw import images as images_lib
    from npdraw import runs as runs_lib
    from npdraw.guards import check_memory

    ckpt_path, ckpt = _checkpoint(checkpoint)
    cfg = ckpt.cfg
    tcfg = _recorded_data(ckpt, None, data_dir, mirror, None)
    test_x, shape = runs_lib.load_split(tcfg, "test", progress=True)   # the test split only
    runs_lib.check_data_shape(cfg, shape)
    count = min(count, len(test_x))
    rows = -(-count // min(cols, count))
    check_memory(frames_lib.sample_bytes(cfg, rows, 2 * min(cols, count), scale),
                 f"rebuilding {count} images over T={cfg.T} glimpses at --scale {scale}")
    params = _params_on(ckpt, device)
    result = frames_lib.reconstruction(params, cfg, test_x, count, cols, seed, scale)
    frames, kl = result["frames"], np.asarray(result["kl"], dtype=np.float64)
    out = cli_options.output_folder(
        Path(out) if out is not None else ckpt_path.parent / "reconstruct",
        "the reconstruction")
    with cli_options.writing(f"write the reconstruction into {out}"):
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
@cli_options.EVALUATE_OPTIONS
@cli_options.library_errors
def evaluate(checkpoint, K, split, dataset, data_dir, mirror, folder, subset, batch_size, seed,
             device, ranks, as_json):
    """Negative log-likelihood bound (nats per image) on a split, by default the test set.

    On a CPU with several cores it starts itself as one MPI rank per core (as train), and
    under `mpiexec -n N` the N ranks share every batch; rank 0 prints."""
    _run_as_ranks(ranks, device, lambda: batch_size, "evaluating")
    from npdraw import distributed

    comm = distributed.from_environment()
    distributed.stop_at_once_on_signals()         # under MPI: Ctrl-C was noted, never acted on
    cli_options.check_rank_count(ranks, comm)
    try:
        _evaluate(comm, checkpoint, K, split, dataset, data_dir, mirror, folder,
                  subset, batch_size, seed, device, as_json)
    except Exception as err:           # noqa: BLE001 - one rank's failure ends them all
        if comm.size == 1:
            raise
        comm.abort(err.format_message() if isinstance(err, click.ClickException) else
                   str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


def _given_over(saved, **given) -> dict:
    """The fields of the config ``saved``, with the options given (those not None) over them."""
    return {**saved.to_dict(), **{k: v for k, v in given.items() if v is not None}}


def _recorded_data(ckpt, dataset, data_dir, mirror, folder) -> TrainConfig:
    """The checkpoint's TrainConfig with the data options given (None: its own)."""
    saved = _train_cfg_or_none(ckpt) or TrainConfig()
    return TrainConfig.from_dict({**_given_over(saved, dataset=dataset, data_dir=data_dir,
                                                mirror=mirror, folder=folder),
                                  "resume": "", "oldmodel": ""})


def _evaluate(comm, checkpoint, K, split, dataset, data_dir, mirror, folder, subset,
              batch_size, seed, device, as_json):
    from npdraw import runs as runs_lib
    ckpt_path, ckpt = _checkpoint(checkpoint)
    cfg = ckpt.cfg
    tcfg = _recorded_data(ckpt, dataset, data_dir, mirror, folder)
    # that split only
    x, shape = cli_options.load_data_on_ranks(tcfg, not as_json, comm, split)
    runs_lib.check_data_shape(cfg, shape)
    total = len(x)
    if subset:
        from npdraw.data import spread_subset
        x = x[spread_subset(total, subset, seed)]
    from npdraw.guards import check_memory
    batch = min(batch_size, max(len(x), 1))
    from npdraw import evaluate as evaluate_lib
    itemsize = np.dtype(ckpt.params["c0"].dtype).itemsize
    check_memory(evaluate_lib.model_bytes(cfg, batch, itemsize, training=False)
                 + 8 * K * batch,                    # + log w, one per sample and example
                 f"evaluating this model (T={cfg.T}) with --k {K} in batches of {batch}",
                 data_bytes=np.asarray(x).nbytes)
    from npdraw import backend
    comm = comm.for_device(backend.resolve_device(device))   # on GPUs: one per rank
    params = _params_on(ckpt, device)
    rng = np.random.default_rng(seed)
    iwae, bound = evaluate_lib.evaluate_iwae_and_bound(params, cfg, np.asarray(x), K,
                                                       batch_size, rng, comm,
                                                       progress=not as_json and comm.is_root)
    if not comm.is_root:
        return
    ema = runs_lib.model_params(ckpt)[1]
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
@cli_options.EXPORT_OPTIONS
@cli_options.library_errors
def export(checkpoint, out, check_n, check_seed, data_dir, mirror):
    """Write CHECKPOINT's parameters (their moving average when it holds one; float32,
    no optimizer state) to OUT, the file to ship, with its epoch, its bounds from the
    run's log and a bound a test can check."""
    from npdraw import runs as runs_lib

    ckpt_path, ckpt = _checkpoint(checkpoint)
    test_x = None
    if check_n:
        tcfg = _recorded_data(ckpt, None, data_dir, mirror, None)
        test_x, shape = runs_lib.load_split(tcfg, "test", progress=False)
        runs_lib.check_data_shape(ckpt.cfg, shape)
    info = runs_lib.export_model(ckpt_path, out, test_x, check_n, check_seed)
    click.echo(f"wrote {out} (epoch {info['epoch']}): " + json.dumps(info))


# ----------------------------------------------------------------------------- classify

@cli.command()
@cli_options.CLASSIFY_OPTIONS
@click.pass_context
@cli_options.library_errors
def classify(ctx, glimpses, read_n, hidden, size, distractors, crop, valid_size, train_set, lr,
             epochs, batch_size, clip, seed, subset, eval_subset, name, out, resume, device,
             data_dir, mirror, dtype, no_progress):
    """Train the attentive classifier on cluttered MNIST (paper table 1); writes a run dir."""
    from npdraw import runs as runs_lib
    from npdraw import train as train_lib

    overrides = ()
    if resume:
        ignored = cli_options.ignored_on_resume(ctx, cli_options.CLASSIFY_RESUME_OVERRIDES)
        if ignored:
            click.echo("note: --resume takes the model and training settings from the "
                       f"checkpoint; ignoring {', '.join(ignored)}", err=True)
        overrides = tuple(p for p in ("lr", "epochs") if p in cli_options.given_options(ctx))
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
    except runs_lib.TrainingInterrupted as err:  # train_classifier has said where it stopped
        click.echo("training interrupted", err=True)
        ctx.exit(128 + err.signum)              # 130 for Ctrl-C, 143 for SIGTERM, as train
    except (runs_lib.NonFiniteLossError, runs_lib.WriteFailed) as err:
        raise click.ClickException(str(err)) from None


@cli.command("classify-eval")
@cli_options.CLASSIFY_EVAL_OPTIONS
@cli_options.library_errors
def classify_eval(checkpoint, split, subset, data_dir, mirror, batch_size, pictures, rows, cols,
                  scale, device, as_json):
    """Error rate of a classifier checkpoint on the fixed cluttered test (or valid) set."""
    from npdraw import classifier as clf
    from npdraw import frames as frames_lib
    from npdraw import images as images_lib
    from npdraw.data import synthetic
    from npdraw import runs as runs_lib

    ckpt_path, ckpt = _checkpoint(checkpoint, ClassifierConfig)
    cfg = ckpt.cfg
    saved = runs_lib.classify_config_of(ckpt) or ClassifyConfig()
    ccfg = ClassifyConfig.from_dict({**_given_over(saved, data_dir=data_dir, mirror=mirror),
                                     "eval_subset": subset, "resume": ""})
    digits = synthetic.load_labelled_mnist(ccfg.data_dir, ccfg.mirror, ccfg.valid_size,
                                           ccfg.train_set)
    valid, test = synthetic.cluttered_eval_sets(ccfg, cfg, digits)
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
        frames = frames_lib.render_glimpse_frames(x[:count], windows, (1, cfg.height, cfg.width),
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
@cli_options.PLOT_OPTIONS
@cli_options.library_errors
def plot(run_dir, out, from_epoch):
    """learning_curves (per epoch), learning_curves_hours (per hour), kl_per_glimpse (a heat
    map) and optimizer (lr, |g|, |step|) from RUN_DIR/log.jsonl, each as .png and .pdf (a
    classifier run: error_curves)."""
    from npdraw import pictures
    from npdraw import runs as runs_lib

    try:
        rows = runs_lib.read_log(run_dir, warn=lambda message: click.echo(message, err=True))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'RUN_DIR'") from None
    try:
        shown, _ = pictures.select_epochs(rows, from_epoch)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--from-epoch'") from None
    out = cli_options.output_folder(Path(out) if out is not None else Path(run_dir), "the plots")
    with cli_options.writing(f"write the plots in {out}"):
        written = pictures.plot_run(rows, out, from_epoch, pictures.run_dataset(run_dir))
    first = f" from epoch {from_epoch}" if from_epoch > 1 else ""
    click.echo(f"wrote {', '.join(str(p) for p in written)} and a .pdf beside each "
               f"({len(shown)} epochs{first})")


# ----------------------------------------------------------------------------- attention-demo

@cli.command("attention-demo")
@cli_options.ATTENTION_DEMO_OPTIONS
@cli_options.library_errors
def attention_demo(img, N, cx, cy, stride, sigma, out):
    """Read an N x N glimpse from IMG with the attention filterbank, write it back."""
    from npdraw import images as images_lib
    from npdraw import pictures          # loads matplotlib: only for the commands that draw
    from npdraw.guards import check_memory

    try:
        image = images_lib.load_image(img)
    except (ValueError, OSError) as err:
        raise click.BadParameter(str(err), param_hint="'IMG'") from None
    c, h, w = image.shape
    check_memory(pictures.attention_demo_bytes(c, h, w, N),
                 f"a {N}x{N} glimpse of a {w}x{h} image")
    # A window far larger than the image, or centred far off it, shows nothing and
    # overflows the filterbank's squares: one sentence instead.
    limit = 1e6 * max(h, w)
    for flag, value in (("--cx", cx), ("--cy", cy), ("--stride", stride), ("--sigma", sigma)):
        if value is not None and abs(value) > limit:
            raise click.BadParameter(f"{value:g} is beyond {limit:g} pixels (a million times "
                                     f"the image's side)", param_hint=f"'{flag}'")
    demo = pictures.attention_demo(image, N, cx, cy, stride, sigma)

    out = cli_options.output_folder(Path(out), "the attention pictures")
    paths = {kind: out / f"{Path(img).stem}_{kind}.png" for kind in ("original", "read", "write")}
    with cli_options.writing(f"write the attention pictures into {out}"):
        for kind, path in paths.items():
            images_lib.save_png(path, demo[kind])
    cx, cy, stride, sigma = demo["window"]
    click.echo(f"image {c}x{h}x{w}; window N={N}, centre ({cx:g}, {cy:g}), stride {stride:g}, "
               f"sigma {sigma:g}")
    click.echo(f"original: {paths['original']}")
    click.echo(f"read:     {paths['read']} ({N}x{N} glimpse shown {demo['view']}x enlarged)")
    click.echo(f"write:    {paths['write']} (the glimpse written back at full size, "
               "divided by the write of an all-ones patch)")


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
