"""Training: the only module with an epoch loop.

Two loops: ``train`` (DRAW) and ``train_classifier`` (the attentive classifier of
cluttered MNIST, paper table 1), with the same run dir, log, checkpoints and resume.

``train(cfg, tcfg)`` runs one training run into ``<out>/<name>`` (the run dir), whose
config.json, log.jsonl, checkpoint.h5 and best.h5 runs.py writes (the checkpoints with
the params' moving average when tcfg.ema_decay > 0), and beside them:

    RUN/samples.png     a grid of generated images (final canvases)
    RUN/samples.gif     the same grid, animated over the T glimpses

Randomness: one ``np.random.Generator`` (PCG64, seeded with ``tcfg.seed``) draws the
batch order and the training noise eps on the host; its state is saved with every
checkpoint, so a resumed run continues bit for bit (on NumPy). Evaluation and sample
noise come from separate generators derived from the seed (and, for evaluations, the
epoch unless ``tcfg.eval_noise`` is "fixed": evaluate.eval_noise_rng), so they never disturb
the training stream.

Moving average (``tcfg.ema_decay`` d > 0): after every Adam step the run updates
ema <- d ema + (1 - d) params (optim.ema_update; Polyak averaging). The EMA is the
run's model: it is what the valid and test splits score, what selects best.h5, what
the samples show and what runs.export_model ships; the training bound stays that of
the params that take the steps.

Data parallelism over MPI ranks (``mpiexec -n N``; see distributed.py): every rank runs
this same loop with the same generators, so each draws the same batch order and the
same (T, B, Z) noise of the whole global batch, and takes the slice of its examples.
The noise an example gets is thus the one it gets in one process, whatever the number
of ranks. Only rank 0 writes the run dir and prints.

Dimension legend
    B  batch
    T  glimpses
    Z  latent size
    D  C*H*W, one image flattened
    E  images (examples) of a split
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import backend
from . import checkpoint as ckpt_lib
from . import distributed
from . import engine_layers
from . import evaluate
from . import frames as frames_lib
from . import guards
from . import model as model_lib
from . import monitor
from . import optim
from . import runs
from .config import ClassifierConfig, ClassifyConfig, DrawConfig, TrainConfig
from .progress import Progress

# c0 = logit(clip(mean training image, C0_CLIP, 1 - C0_CLIP)); see init_model.
C0_CLIP = 1e-3


# ----------------------------------------------------------------------------- helpers

def _cap(x: np.ndarray, subset: int) -> np.ndarray:
    return x if not subset else x[:subset]


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}"


# ----------------------------------------------------------------------------- setup

def init_model(cfg: DrawConfig, seed: int, train_x: np.ndarray, dtype: str = "float32") -> dict:
    """Fresh parameters with c0 set to the logit of the mean training image.

    c0 is the canvas before the first glimpse, so sigmoid(c0) is what the model
    outputs when the decoder writes nothing. Starting it at the per-pixel mean of the
    training images (clipped to [C0_CLIP, 1 - C0_CLIP], so always-black pixels give a
    finite logit of about -6.9) makes the initial reconstruction cost that of the mean
    image rather than 784*log 2, and the first updates go to the writes.
    """
    params = model_lib.init_params(cfg, seed, dtype=dtype)
    if "c0" in params and train_x.shape[0] > 0:
        mean = np.clip(np.asarray(train_x, dtype=np.float64).mean(axis=0), C0_CLIP, 1.0 - C0_CLIP)
        c0 = np.log(mean) - np.log1p(-mean)
        params["c0"] = c0.reshape(np.shape(params["c0"])).astype(params["c0"].dtype)
    return params


# ----------------------------------------------------------------------------- train

def train(cfg: DrawConfig | None, tcfg: TrainConfig, log=print, *, data=None,
          progress: bool = True, eval_batch: int = evaluate.EVAL_BATCH,
          resume_overrides=(), comm=None, add_peepholes: bool = False) -> Path:
    """Train DRAW; returns the run directory.

    cfg: the model (height/width/channels must match the data). With ``tcfg.resume`` set
    to a run dir, the model and training settings come from RUN/checkpoint.h5 and
    ``cfg`` may be None; of ``tcfg`` only epochs (the new total, unless left at the
    default: see runs.resumed_epochs), device and ranks are taken, the fields named in ``resume_overrides`` (a subset of
    config.RESUME_OVERRIDES: the learning-rate schedule, eval_every, ema_decay and
    eval_noise, for
    the next phase of a long run), and data_dir, mirror and folder where they differ from
    TrainConfig's defaults (else the recorded ones). ``add_peepholes``: on resume, give a
    model without peepholes zero ones (the one model change a resume may make; the loss
    is unchanged at first, Adam's moments for them start at zero). ``data``: a DataSplits to use
    instead of loading ``tcfg.dataset``. ``progress``: the per-iteration bar on stderr.
    ``comm``: the ranks that train together (distributed.py); by default MPI's when the
    process was started by mpiexec or srun with more than one rank, else one process;
    ``tcfg.ranks`` must be 0 or their number. Every rank calls train() alike; only rank 0
    logs and writes the run dir.

    Raises NonFiniteLossError on a NaN/inf loss, TrainingInterrupted on Ctrl-C or
    SIGTERM and WriteFailed when a file cannot be written (all TrainingStopped, with
    ``run_dir``; checkpoint.h5 then holds the last completed epoch; under MPI every rank
    raises the first two together), ValueError for bad configs, data or checkpoints, a
    run folder that another process is training in (guards.RunFolderBusy) or a model
    too large for this machine's memory. Under MPI any other failure of a rank in the
    epoch loop ends every rank (MPI_Abort) after printing one line.

    While it runs, rank 0 locks the run folder (guards.RunLock) and, in the main
    thread, SIGINT and SIGTERM only set a flag that is checked between steps
    (guards.StopSignals; under MPI the flag travels with each step's reduction, see
    distributed.py); a second signal stops at once. Both are undone on return.
    """
    with guards.StopSignals() as stop, guards.RunLock() as lock:
        return _train(cfg, tcfg, log, data, progress, eval_batch, resume_overrides, comm,
                      stop, lock, add_peepholes)


def _train(cfg, tcfg, log, data, progress, eval_batch, resume_overrides, comm, stop,
           lock, add_peepholes=False) -> Path:
    """train()'s body; ``stop``: a guards.StopSignals, ``lock``: a guards.RunLock that
    rank 0 takes once the run folder is known."""
    backend.retain_freed_memory()            # every step reuses the same host buffers
    comm = distributed.from_environment() if comm is None else comm
    if not comm.is_root:                     # rank 0 speaks for all
        log, progress = (lambda *args, **kwargs: None), False
    resume_ckpt = run_dir = None
    if tcfg.resume:
        run_dir, resume_ckpt = runs.open_resumed(tcfg.resume, lock, comm)
        cfg, tcfg, add_peepholes = runs.resumed_configs(cfg, tcfg, resume_ckpt,
                                                        resume_overrides, add_peepholes, log)
    elif cfg is None:
        raise ValueError("train needs a model config unless it resumes a run")

    device = backend.resolve_device(tcfg.device)
    if tcfg.tensorboard:
        monitor.check_available()            # before the data are loaded
    distributed.check_rank_count(tcfg.ranks, comm)
    comm = comm.for_device(device)           # on GPUs: one per rank, NCCL between them
    dtype = np.dtype(tcfg.dtype)
    guards.check_memory(evaluate.model_bytes(cfg, tcfg.batch_size, dtype.itemsize,
                                             training=True, ema=tcfg.ema_decay > 0),
                        f"training this model ({_cfg_summary(cfg)}) with batches of "
                        f"{tcfg.batch_size}", data_bytes=0 if data is None else  # on --resume: later
                        sum(a.nbytes for a in (data.train, data.valid, data.test)))

    if data is None:
        data = runs.load_data(tcfg, progress)
    runs.check_data_shape(cfg, data.shape)
    splits = _Splits(np.asarray(_cap(data.train, tcfg.subset), dtype=dtype),
                     np.asarray(_cap(data.valid, tcfg.eval_subset), dtype=dtype),
                     np.asarray(_cap(data.test, tcfg.eval_subset), dtype=dtype), data)
    if splits.train.shape[0] == 0:
        raise ValueError("the training split is empty")

    if resume_ckpt is not None:
        state = runs.resumed_run_state(resume_ckpt, run_dir, device, "best_valid")
        if add_peepholes:
            zero = model_lib.with_zero_peepholes
            state.params = zero(cfg, state.params)
            state.opt_state = {**state.opt_state, "m": zero(cfg, state.opt_state["m"]),
                               "v": zero(cfg, state.opt_state["v"])}
    else:
        state = runs.fresh_run_state(_initial_params(cfg, tcfg, splits.train, device, log),
                                     tcfg.seed)
        run_dir = runs.new_run_dir(tcfg.out, tcfg.name, "draw", lock, comm)
    if comm.is_root:
        runs.remove_stale_temps(run_dir)
        with runs.alone_on_root(comm):
            runs.write_config(run_dir, {"model": cfg.to_dict(), "train": tcfg.to_dict()},
                              stops=True)
    n_params = sum(int(np.prod(np.shape(p))) for p in state.params.values())
    log(f"run dir: {run_dir}")
    log("model config: " + json.dumps(cfg.to_dict()))
    log("train config: " + json.dumps(tcfg.to_dict()))
    log(f"device {device}" + (f" ({comm.describe()})" if comm.size > 1 else "")
        + (", Numba kernels" if device == "cpu" and engine_layers.kernels() == "numba" else "")
        + f", dtype {dtype.name}, {n_params:,} parameters; data {tcfg.dataset}: "
        f"{splits.train.shape[0]} train, {splits.valid.shape[0]} valid, "
        f"{splits.test.shape[0]} test")

    if resume_ckpt is not None:
        if comm.is_root:
            with runs.alone_on_root(comm):
                runs.keep_log_until(run_dir, state.epoch, log, stops=True)
        if runs.announce_resume(log, state.epoch, state.opt_state["step"], tcfg.epochs):
            return run_dir
    state.ema = _start_ema(tcfg, state.params, resume_ckpt, device, log)
    if add_peepholes and state.ema is not None:
        state.ema = model_lib.with_zero_peepholes(cfg, state.ema)
    if resume_ckpt is None and comm.is_root:
        # The epoch-0 state on disk at once: an interrupted first epoch can be resumed.
        with runs.alone_on_root(comm):
            runs.save_state(run_dir / "checkpoint.h5", cfg, state.params, state.opt_state, 0,
                            state.rng, tcfg, state.extra("best_valid", run_dir), state.ema)

    run = _Run(cfg, tcfg, comm, device, dtype, run_dir, log, progress, eval_batch)
    _draw_epochs(run, state, splits, stop)
    log(f"done: {tcfg.epochs} epochs; best valid bound {state.best:.2f} (epoch "
        f"{state.best_epoch}); run dir {run_dir}")
    return run_dir


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed through the epochs of a run (DRAW's, or the classifier's: then
    tcfg is its ClassifyConfig)."""
    cfg: DrawConfig | ClassifierConfig
    tcfg: TrainConfig | ClassifyConfig
    comm: object             # distributed.SingleProcess or MPIRanks
    device: str
    dtype: np.dtype
    run_dir: Path
    log: object              # log(message)
    progress: bool
    eval_batch: int


@dataclasses.dataclass(frozen=True)
class _Splits:
    """A run's images (E, D), capped by subset and eval_subset, and the data set they
    come from (its fresh_train makes new training images each epoch, or is None)."""
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: object


def _initial_params(cfg: DrawConfig, tcfg: TrainConfig, train_x: np.ndarray, device: str,
                    log) -> dict:
    """A new run's parameters on ``device``: init_model's, or those of --oldmodel."""
    dtype = np.dtype(tcfg.dtype)
    params = init_model(cfg, tcfg.seed, train_x, dtype=tcfg.dtype)
    if tcfg.oldmodel:
        old = runs.load_checkpoint(tcfg.oldmodel)
        # the checkpoint's model: its moving average when it keeps one, as for
        # evaluate, sample and export
        old_params, old_is_average = runs.model_params(old)
        if cfg.peepholes and not any(n in old_params for n in model_lib.PEEPHOLE_PARAMS):
            # a model without peepholes: zero ones compute what it computed
            log(f"note: --oldmodel {tcfg.oldmodel} has no peepholes: they start at zero")
            old_params = model_lib.with_zero_peepholes(cfg, old_params)
        try:
            ckpt_lib.check_compatible(old_params, params)
        except ValueError as err:
            raise ValueError(f"--oldmodel {tcfg.oldmodel} does not fit this model "
                             f"({_cfg_summary(cfg)}; the checkpoint is "
                             f"{_cfg_summary(old.cfg)}): {err}") from err
        if old.cfg is not None and old.cfg != cfg:
            log(f"note: --oldmodel was trained with {_cfg_summary(old.cfg)}; "
                f"its parameters fit and are used for {_cfg_summary(cfg)}")
        if old_is_average:
            log(f"note: --oldmodel {tcfg.oldmodel}: starting from the moving average "
                f"of its parameters (its model)")
        params = {name: np.asarray(old_params[name]).astype(dtype) for name in params}
    return runs.arrays_to_device(params, device, dtype)


def _draw_epochs(run: _Run, state: runs.RunState, splits: _Splits, stop) -> None:
    """Epochs state.epoch + 1 .. tcfg.epochs, each committed when it ends; runs.Stops
    says how a run that stops early ends. ``stop``: the run's guards.StopSignals."""
    comm = run.comm
    noise_thread = ThreadPoolExecutor(max_workers=1)
    scope = contextlib.ExitStack()
    try:
        with runs.Stops(run.run_dir, comm, run.log, state.epoch) as stops:
            scope.enter_context(comm.deferred_interrupts(stop))  # MPI: all ranks stop at one step
            board = None
            if run.tcfg.tensorboard and comm.is_root:
                board = monitor.TensorBoardLog(run.run_dir, first_epoch=state.epoch + 1)
                scope.callback(board.close)
            for epoch in range(state.epoch + 1, run.tcfg.epochs + 1):
                stops.epoch = epoch
                _draw_epoch(run, state, splits, epoch, stop, stops, noise_thread, board)
    finally:
        scope.close()
        noise_thread.shutdown(wait=True)


def _draw_epoch(run: _Run, state: runs.RunState, splits: _Splits, epoch: int, stop, stops,
                noise_thread, board) -> None:
    """One epoch: its steps, the scores of its model, its record committed and logged."""
    cfg, tcfg, comm = run.cfg, run.tcfg, run.comm
    t0 = time.perf_counter()
    train_x = splits.train
    if splits.source.fresh_train is not None:     # data made on the fly: new every epoch
        train_x = np.asarray(splits.source.fresh_train(
            evaluate.derived_rng(tcfg.seed, 3, epoch), train_x.shape[0]), dtype=run.dtype)
    means = _draw_steps(run, state, train_x, epoch, stop, stops, noise_thread)
    model = _finite_model(run, state, epoch, stops)   # what is evaluated and shown
    train_time = time.perf_counter() - t0

    t1 = time.perf_counter()
    evaluated = is_eval_epoch(epoch, tcfg)
    valid_bound = test_bound = float("nan")
    if evaluated:
        shown = run.progress and comm.is_root
        valid_bound = evaluate.evaluate_bound(model, cfg, splits.valid, run.eval_batch,
                                              evaluate.eval_noise_rng(tcfg, epoch, 0), comm,
                                              progress=shown, label="valid")
        test_bound = evaluate.evaluate_bound(model, cfg, splits.test, run.eval_batch,
                                             evaluate.eval_noise_rng(tcfg, epoch, 1), comm,
                                             progress=shown, label="test")
    eval_time = time.perf_counter() - t1
    train_bound = means["train_bound"]
    if evaluated and not math.isfinite(valid_bound) and splits.valid.shape[0] > 0:
        raise stops.non_finite(f"validation bound is {valid_bound} after epoch {epoch}")
    # Without a validation split the train bound decides; with one, only the
    # epochs that were evaluated can be the best.
    score = (train_bound if splits.valid.shape[0] == 0
             else valid_bound if evaluated else float("inf"))
    is_best = score < state.best
    if is_best:
        state.best, state.best_epoch = score, epoch

    kl = means["kl"]
    record = {
        "epoch": epoch,
        "step": int(state.opt_state["step"]),
        "train_bound": train_bound,
        "train_recon": means["train_recon"],
        "train_kl": float(kl.sum()),
        "valid_bound": None if math.isnan(valid_bound) else valid_bound,
        "test_bound": None if math.isnan(test_bound) else test_bound,
        "kl": [float(v) for v in kl],
        "grad_norm": means["grad_norm"],
        "step_norm": means["step_norm"],
        "lr": means["lr"],
        "evaluated": bool(evaluated),
        "ema": state.ema is not None,      # valid/test/best are the moving average's
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "examples_per_s": train_x.shape[0] / max(train_time, 1e-9),
        "best": bool(is_best),
    }
    samples = (frames_lib.write_run_samples(run.run_dir, model, cfg, tcfg.seed)
               if comm.is_root else None)
    record["wall_s"] = time.perf_counter() - t0
    record["time"] = _dt.datetime.now().isoformat(timespec="seconds")
    if comm.is_root:
        runs.commit_epoch(run.run_dir, record, is_best, cfg, state.params, state.opt_state,
                          epoch, state.rng, tcfg, state.extra("best_valid", run.run_dir),
                          state.ema)
    state.epoch = epoch
    if board is not None:            # a view of the log line just written
        board.epoch(record, samples)
    run.log(f"epoch {epoch}/{tcfg.epochs}  train {train_bound:.2f}  "
            + ("EMA " if state.ema is not None else "") + "valid "
            f"{_fmt(record['valid_bound'])}  test {_fmt(record['test_bound'])}  "
            f"(recon {record['train_recon']:.2f} + KL {record['train_kl']:.2f})  "
            f"|g| {record['grad_norm']:.2f}  |step| {record['step_norm']:.4f}  "
            f"{record['wall_s']:.1f}s  {record['examples_per_s']:.0f} ex/s"
            + ("  *best*" if is_best else ""))


def _draw_steps(run: _Run, state: runs.RunState, train_x: np.ndarray, epoch: int, stop,
                stops, noise_thread) -> dict:
    """An epoch's Adam steps over ``train_x`` (E, D) in the order state.rng draws; state's
    params, Adam state and EMA move on. -> the means over its steps of the bound, L^x, KL
    (T,), |g| and |step|, and the last step's learning rate."""
    cfg, tcfg, comm, device, dtype = run.cfg, run.tcfg, run.comm, run.device, run.dtype
    rng, params, opt_state, ema = state.rng, state.params, state.opt_state, state.ema
    n_train = int(train_x.shape[0])
    n_iter = (n_train + tcfg.batch_size - 1) // tcfg.batch_size
    bar = Progress(f"epoch {epoch}/{tcfg.epochs}", n_iter, run.progress, rate_unit="it/s")
    perm = rng.permutation(n_train)
    loss_sum = recon_sum = gnorm_sum = snorm_sum = 0.0
    kl_sum = np.zeros(cfg.T, dtype=np.float64)
    try:
        next_eps = None
        for it in range(1, n_iter + 1):
            stop.check()             # Ctrl-C / SIGTERM: stop between steps
            idx = perm[(it - 1) * tcfg.batch_size: it * tcfg.batch_size]
            batch_eps = (next_eps.result() if next_eps is not None   # the whole batch's
                         else evaluate.host_noise(rng, cfg, idx.shape[0], dtype))
            lo, hi = comm.shard(idx.shape[0])          # this rank's examples
            mine = None                                # (loss, grads, stats) of them
            if hi > lo:
                xb = backend.to_device(train_x[idx[lo:hi]], device)
                eps = backend.to_device(evaluate.example_noise(batch_eps, lo, hi), device)
                mine = model_lib.loss_and_grads(params, cfg, xb, eps)
            loss, grads, stats = comm.reduce_step(params, cfg.T, mine, (hi - lo) / idx.shape[0])
            # The next step's noise is drawn while this one's clipping and Adam run, on
            # the core they leave idle (NumPy's generator releases the GIL). The draws
            # come from rng in the same order as drawn inline.
            next_eps = None if it == n_iter else noise_thread.submit(
                evaluate.host_noise, rng, cfg,
                min(tcfg.batch_size, n_train - it * tcfg.batch_size), dtype)
            gnorm = _finite_step(loss, grads, stops, epoch, it, n_iter)
            lr = optim.learning_rate(tcfg, epoch - 1 + (it - 1) / n_iter)
            params, opt_state, snorm = optim.adam_step(     # clipping folded in
                params, grads, opt_state, lr, tcfg.beta1, tcfg.beta2, tcfg.adam_eps,
                grad_scale=optim.clip_scale(gnorm, tcfg.clip))
            state.params, state.opt_state = params, opt_state
            if ema is not None:
                optim.ema_update(ema, params, tcfg.ema_decay)
            loss_sum += loss
            recon_sum += stats["recon"]
            kl_sum += stats["kl"]
            gnorm_sum += gnorm
            snorm_sum += snorm
            bar.update(it, f"loss {loss:8.2f}")
    finally:
        bar.close()
    return {"train_bound": loss_sum / n_iter, "train_recon": recon_sum / n_iter,
            "kl": kl_sum / n_iter, "grad_norm": gnorm_sum / n_iter,
            "step_norm": snorm_sum / n_iter, "lr": lr}


def _finite_step(loss: float, grads: dict, stops, epoch: int, it: int, n_iter: int) -> float:
    """The global norm of a step's gradients; stops.non_finite unless it and the loss
    are finite (both loops)."""
    if not math.isfinite(loss):
        raise stops.non_finite(f"loss is {loss} at epoch {epoch}, iteration {it}/{n_iter}")
    gnorm = optim.global_norm(grads)
    if not math.isfinite(gnorm):
        raise stops.non_finite(f"gradient norm is {gnorm} at epoch {epoch}, iteration "
                               f"{it}/{n_iter}")
    return gnorm


def _finite_model(run: _Run, state: runs.RunState, epoch: int, stops) -> dict:
    """The run's model after ``epoch``, the EMA when it keeps one, else the params; their
    norms checked finite and alike on every rank."""
    params_norm = optim.global_norm(state.params)
    if not math.isfinite(params_norm):
        raise stops.non_finite(f"parameters became non-finite in epoch {epoch}")
    run.comm.check_same(params_norm, "the parameters' norm")
    if state.ema is not None:
        ema_norm = optim.global_norm(state.ema)
        if not math.isfinite(ema_norm):
            raise stops.non_finite(f"the parameters' moving average became non-finite in "
                                   f"epoch {epoch}")
        run.comm.check_same(ema_norm, "the norm of the parameters' moving average")
    backend.synchronize(backend.get_array_module(*state.params.values()))
    return state.params if state.ema is None else state.ema


def _start_ema(tcfg: TrainConfig, params: dict, resume_ckpt, device: str, log):
    """The parameters' moving average of a run, {name: (P,)} on ``device``, or None when
    tcfg.ema_decay is 0: the resumed checkpoint's, else a copy of ``params`` (P,)."""
    saved = None if resume_ckpt is None else resume_ckpt.ema
    if not tcfg.ema_decay > 0:
        if saved is not None:
            log("note: ema_decay is 0: the checkpoint's moving average of the parameters is "
                "dropped; the parameters themselves are evaluated and saved from now on")
        return None
    about = f"decay {tcfg.ema_decay!r}, about the last {1 / (1 - tcfg.ema_decay):.0f} steps"
    if saved is not None:
        log(f"moving average of the parameters ({about}): continued from the checkpoint")
        return runs.arrays_to_device(saved, device)
    where = ("the checkpoint holds none: started from its parameters"
             if resume_ckpt is not None else "started from the initial parameters")
    log(f"moving average of the parameters ({about}): {where}")
    return optim.ema_init(params)


def is_eval_epoch(epoch: int, tcfg: TrainConfig) -> bool:
    """Whether the valid and test splits are evaluated after ``epoch``: every
    ``eval_every`` epochs, and always after the run's last epoch."""
    return epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs


def _cfg_summary(cfg) -> str:
    if cfg is None:
        return "unknown config"
    att = f"attention {cfg.read_n},{cfg.write_n}" if cfg.attention else "no attention"
    return (f"{cfg.channels}x{cfg.height}x{cfg.width}, T={cfg.T}, {att}, "
            f"enc {cfg.enc_dim}, dec {cfg.dec_dim}, z {cfg.z_dim}"
            + (", peepholes" if cfg.peepholes else ""))


# ----------------------------------------------------------------------------- classifier

def train_classifier(cfg: ClassifierConfig | None, ccfg: ClassifyConfig, log=print, *,
                     digits=None, progress: bool = True, eval_batch: int = evaluate.EVAL_BATCH,
                     resume_overrides=()) -> Path:
    """Train the attentive classifier on cluttered MNIST; returns the run directory.

    The run dir holds config.json, log.jsonl (one record per epoch: train/valid/test
    cross-entropy and error), checkpoint.h5 (the latest epoch, with Adam and RNG state)
    and best.h5 (the lowest validation error), as ``train`` writes them. Each epoch
    clutters the training digits afresh (noise from (seed, 3, epoch), so a resumed run
    sees the same images); validation and test sets are fixed (synthetic.py's seeds).
    digits: a synthetic.LabelledDigits to use instead of loading the labelled MNIST files.
    With ``ccfg.resume`` the model and settings come from RUN/checkpoint.h5 (cfg may be
    None), as for ``train``, but for ``resume_overrides`` (("lr",) or ()). Raises
    NonFiniteLossError, TrainingInterrupted (Ctrl-C or SIGTERM, between steps) and
    WriteFailed like ``train``, and locks the run folder as it does (one process, no MPI).
    """
    with guards.StopSignals() as stop, guards.RunLock() as lock:
        return _train_classifier(cfg, ccfg, log, digits, progress, eval_batch,
                                 resume_overrides, stop, lock)


def _train_classifier(cfg, ccfg, log, digits, progress, eval_batch, resume_overrides, stop,
                      lock) -> Path:
    """train_classifier()'s body; ``stop``: a guards.StopSignals, ``lock``: a guards.RunLock."""
    from . import classifier as clf
    from .data import synthetic
    one = distributed.SingleProcess()        # the classifier trains in one process
    resume_ckpt = run_dir = None
    if ccfg.resume:
        run_dir, resume_ckpt = runs.open_resumed(ccfg.resume, lock, one)
        cfg, ccfg = runs.resumed_classify_config(cfg, ccfg, resume_ckpt, resume_overrides, log)
    elif cfg is None:
        raise ValueError("train_classifier needs a model config unless it resumes a run")
    if cfg.height != cfg.width:
        raise ValueError(f"cluttered MNIST is square: height {cfg.height} != width {cfg.width}")
    if cfg.height < synthetic.DIGIT:
        raise ValueError(f"the image must be at least {synthetic.DIGIT} pixels wide "
                         f"to hold a digit, got {cfg.height}")

    device = backend.resolve_device(ccfg.device)
    dtype = np.dtype(ccfg.dtype)
    if digits is None:
        digits = synthetic.load_labelled_mnist(ccfg.data_dir, ccfg.mirror, ccfg.valid_size,
                                               ccfg.train_set)
    train_digits, train_y = _cap(digits.train_x, ccfg.subset), _cap(digits.train_y, ccfg.subset)
    valid, test = synthetic.cluttered_eval_sets(ccfg, cfg, digits)
    n_train = int(train_digits.shape[0])
    if n_train == 0:
        raise ValueError("the training split is empty")

    if resume_ckpt is not None:
        state = runs.resumed_run_state(resume_ckpt, run_dir, device, "best_valid_error")
        clf.check_params(state.params, cfg)
    else:
        state = runs.fresh_run_state(
            runs.arrays_to_device(clf.init_params(cfg, ccfg.seed, ccfg.dtype), device, dtype),
            ccfg.seed)
        run_dir = runs.new_run_dir(ccfg.out, ccfg.name, "classify", lock, one)
    runs.remove_stale_temps(run_dir)
    runs.write_config(run_dir, {"model": cfg.to_dict(), "classify": ccfg.to_dict()},
                      stops=False)
    n_params = sum(int(np.prod(np.shape(p))) for p in state.params.values())
    log(f"run dir: {run_dir}")
    log("model config: " + json.dumps(cfg.to_dict()))
    log("classify config: " + json.dumps(ccfg.to_dict()))
    log(f"device {device}, dtype {dtype.name}, {n_params:,} parameters; cluttered MNIST: "
        f"{n_train} train digits ({ccfg.train_set}; the paper had 60,000), "
        f"{valid[0].shape[0]} valid, {test[0].shape[0]} test")

    if resume_ckpt is not None:
        runs.keep_log_until(run_dir, state.epoch, log, stops=False)
        if runs.announce_resume(log, state.epoch, state.opt_state["step"], ccfg.epochs):
            return run_dir
    else:
        runs.save_state(run_dir / "checkpoint.h5", cfg, state.params, state.opt_state, 0,
                        state.rng, ccfg, state.extra("best_valid_error", run_dir))

    run = _Run(cfg, ccfg, one, device, dtype, run_dir, log, progress, eval_batch)
    with runs.Stops(run_dir, one, log, state.epoch) as stops:
        for epoch in range(state.epoch + 1, ccfg.epochs + 1):
            stops.epoch = epoch
            _classifier_epoch(run, state, (train_digits, train_y), valid, test, epoch, stop,
                              stops)
    log(f"done: {ccfg.epochs} epochs; best valid error {100 * state.best:.2f}% (epoch "
        f"{state.best_epoch}; {n_train} training digits); run dir {run_dir}")
    return run_dir


def _classifier_epoch(run: _Run, state: runs.RunState, train: tuple, valid: tuple,
                      test: tuple, epoch: int, stop, stops) -> None:
    """One epoch of the classifier on digits cluttered afresh: its steps, its scores, its
    record committed and logged. train: (digits, labels); valid, test: (x, y)."""
    from . import classifier as clf
    from .data import synthetic
    cfg, ccfg, device, eval_batch = run.cfg, run.tcfg, run.device, run.eval_batch
    t0 = time.perf_counter()
    train_digits, train_y = train
    n_train = int(train_digits.shape[0])
    train_x = synthetic.clutter(train_digits, train_digits,
                                evaluate.derived_rng(ccfg.seed, 3, epoch), cfg.height,
                                ccfg.distractors, ccfg.crop).astype(run.dtype, copy=False)
    n_iter = (n_train + ccfg.batch_size - 1) // ccfg.batch_size
    bar = Progress(f"epoch {epoch}/{ccfg.epochs}", n_iter, run.progress, rate_unit="it/s")
    perm = state.rng.permutation(n_train)
    loss_sum = gnorm_sum = 0.0
    errors = 0
    try:
        for it in range(1, n_iter + 1):
            stop.check()             # Ctrl-C / SIGTERM: stop between steps
            idx = perm[(it - 1) * ccfg.batch_size: it * ccfg.batch_size]
            xb = backend.to_device(train_x[idx], device)
            yb = backend.to_device(train_y[idx], device)
            loss, grads, stats = clf.loss_and_grads(state.params, cfg, xb, yb)
            gnorm = _finite_step(loss, grads, stops, epoch, it, n_iter)
            state.params, state.opt_state, _ = optim.adam_step(
                state.params, grads, state.opt_state, ccfg.lr, ccfg.beta1, ccfg.beta2,
                ccfg.adam_eps, grad_scale=optim.clip_scale(gnorm, ccfg.clip))
            loss_sum += loss * idx.shape[0]
            errors += stats["errors"]
            gnorm_sum += gnorm
            bar.update(it, f"loss {loss:7.4f}")
    finally:
        bar.close()
    train_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    valid_loss, valid_error = clf.evaluate(state.params, cfg, *valid, eval_batch)
    test_loss, test_error = clf.evaluate(state.params, cfg, *test, eval_batch)
    if not math.isfinite(valid_loss):
        raise stops.non_finite(f"validation loss is {valid_loss} after epoch {epoch}")
    is_best = valid_error < state.best
    if is_best:
        state.best, state.best_epoch = valid_error, epoch
    record = {
        "epoch": epoch, "step": int(state.opt_state["step"]),
        "train_loss": loss_sum / n_train, "train_error": errors / n_train,
        "valid_loss": valid_loss, "valid_error": valid_error,
        "test_loss": test_loss, "test_error": test_error,
        "train_digits": n_train, "grad_norm": gnorm_sum / n_iter, "lr": ccfg.lr,
        "train_time_s": train_time, "eval_time_s": time.perf_counter() - t1,
        "best": bool(is_best), "wall_s": time.perf_counter() - t0,
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    runs.commit_epoch(run.run_dir, record, is_best, cfg, state.params, state.opt_state, epoch,
                      state.rng, ccfg, state.extra("best_valid_error", run.run_dir))
    state.epoch = epoch
    run.log(f"epoch {epoch}/{ccfg.epochs}  train {record['train_loss']:.4f} "
            f"({100 * record['train_error']:.2f}% wrong)  valid {valid_loss:.4f} "
            f"({100 * valid_error:.2f}%)  test {test_loss:.4f} ({100 * test_error:.2f}%)  "
            f"|g| {record['grad_norm']:.2f}  {record['wall_s']:.1f}s"
            + ("  *best*" if is_best else ""))
