"""Training: the only module with an epoch loop.

Two loops: ``train`` (DRAW) and ``train_classifier`` (the attentive classifier of
cluttered MNIST, paper table 1), with the same run dir, log, checkpoints and resume.

``train(cfg, tcfg)`` runs one training run into ``<out>/<name>`` (the run dir):

    RUN/config.json     both configs (DrawConfig and TrainConfig) as resolved
    RUN/log.jsonl       one JSON object per completed epoch (see docs/TRAINING.md)
    RUN/checkpoint.h5   the latest completed state (params, Adam, epoch, RNG state, and
                        the params' moving average when tcfg.ema_decay > 0)
    RUN/best.h5         the state with the best validation bound so far
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
from . import evaluate
from . import guards
from . import frames as frames_lib
from . import model as model_lib
from . import monitor
from . import runs
from . import optim
from .config import RESUME_OVERRIDES, ClassifierConfig, ClassifyConfig, DrawConfig, TrainConfig
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
    ``cfg`` may be None; of ``tcfg`` only epochs (the new total), device and ranks are
    taken, the fields named in ``resume_overrides`` (a subset of
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
    resume_ckpt = None
    if tcfg.resume:
        run_dir = Path(tcfg.resume)
        ckpt_path = run_dir / "checkpoint.h5"
        if not ckpt_path.is_file():
            raise ValueError(f"cannot resume: {ckpt_path} does not exist")
        if comm.is_root:
            with runs.alone_on_root(comm):
                lock.acquire(run_dir)
        resume_ckpt = runs.load_checkpoint(ckpt_path)
        saved_tcfg = runs.train_config_of(resume_ckpt)
        if saved_tcfg is None:
            raise ValueError(f"cannot resume: {ckpt_path} records no training config")
        if cfg is not None and cfg != resume_ckpt.cfg:
            log("note: resuming with the checkpoint's model config; the one given is ignored")
        cfg = resume_ckpt.cfg
        add_peepholes = add_peepholes and not cfg.peepholes
        if add_peepholes:   # recorded in the checkpoints from here on through cfg
            log("note: resuming with peepholes True (was False)")
            cfg = dataclasses.replace(cfg, peepholes=True)
        defaults = TrainConfig()
        where = {k: (getattr(tcfg, k) if getattr(tcfg, k) != getattr(defaults, k)
                     else getattr(saved_tcfg, k)) for k in ("data_dir", "mirror", "folder")}
        unknown = set(resume_overrides) - set(RESUME_OVERRIDES)
        if unknown:
            raise ValueError(f"a resumed run keeps its {', '.join(sorted(unknown))}; only "
                             f"{', '.join(RESUME_OVERRIDES)} can change")
        changed = {k: getattr(tcfg, k) for k in ("epochs", "device", "ranks",
                                                   *resume_overrides)}
        for k in resume_overrides:
            if changed[k] != getattr(saved_tcfg, k):
                log(f"note: resuming with {k} {changed[k]!r} (was {getattr(saved_tcfg, k)!r})")
        tcfg = TrainConfig.from_dict({**saved_tcfg.to_dict(), **where, **changed,
                                      "resume": str(tcfg.resume)})
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
                        f"{tcfg.batch_size}")

    if data is None:
        data = runs.load_data(tcfg, progress)
    runs.check_data_shape(cfg, data.shape)
    train_x = np.asarray(_cap(data.train, tcfg.subset), dtype=dtype)
    valid_x = np.asarray(_cap(data.valid, tcfg.eval_subset), dtype=dtype)
    test_x = np.asarray(_cap(data.test, tcfg.eval_subset), dtype=dtype)
    n_train = int(train_x.shape[0])
    if n_train == 0:
        raise ValueError("the training split is empty")

    # ---- parameters, optimizer, RNG
    if resume_ckpt is not None:
        params, opt_state, rng, start_epoch, extra = runs.resumed_state(resume_ckpt, run_dir,
                                                                    device)
        best_valid = float(extra.get("best_valid", float("inf")))
        best_epoch = int(extra.get("best_epoch", 0))
        if add_peepholes:
            params, opt_state = _with_zero_peepholes(cfg, params), {
                **opt_state, "m": _with_zero_peepholes(cfg, opt_state["m"]),
                "v": _with_zero_peepholes(cfg, opt_state["v"])}
    else:
        params = init_model(cfg, tcfg.seed, train_x, dtype=tcfg.dtype)
        if tcfg.oldmodel:
            old = runs.load_checkpoint(tcfg.oldmodel)
            # the checkpoint's model: its moving average when it keeps one, as for
            # evaluate, sample and export
            old_params, old_is_average = runs.model_params(old)
            if cfg.peepholes and not any(n in old_params for n in PEEPHOLE_PARAMS):
                # a model without peepholes: zero ones compute what it computed
                log(f"note: --oldmodel {tcfg.oldmodel} has no peepholes: they start at zero")
                old_params = _with_zero_peepholes(cfg, old_params)
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
        params = runs.arrays_to_device(params, device, dtype)
        opt_state = optim.adam_init(params)
        rng = runs.new_rng(tcfg.seed)
        start_epoch = 0
        best_valid, best_epoch = float("inf"), 0
        run_name = tcfg.name or _dt.datetime.now().strftime("draw-%Y%m%d-%H%M%S")
        if comm.is_root:
            with runs.alone_on_root(comm):
                run_dir = runs.unique_run_dir(Path(tcfg.out), run_name)
                lock.acquire(run_dir)
        run_dir = Path(comm.broadcast_text(str(run_dir) if comm.is_root else ""))
    if comm.is_root:
        runs.remove_stale_temps(run_dir)

    log_path = run_dir / "log.jsonl"
    ckpt_path = run_dir / "checkpoint.h5"

    if comm.is_root:
        with runs.alone_on_root(comm):
            try:
                (run_dir / "config.json").write_text(json.dumps(
                    {"model": cfg.to_dict(), "train": tcfg.to_dict()}, indent=2) + "\n")
            except OSError as err:
                raise runs.WriteFailed(guards.os_error_sentence(
                    err, f"write {run_dir / 'config.json'}"), run_dir) from None
    n_params = sum(int(np.prod(np.shape(p))) for p in params.values())
    log(f"run dir: {run_dir}")
    log("model config: " + json.dumps(cfg.to_dict()))
    log("train config: " + json.dumps(tcfg.to_dict()))
    log(f"device {device}" + (f" ({comm.describe()})" if comm.size > 1 else "")
        + f", dtype {dtype.name}, {n_params:,} parameters; data "
        f"{tcfg.dataset}: {n_train} train, {valid_x.shape[0]} valid, {test_x.shape[0]} test")

    def extra_now():
        return {"best_valid": best_valid, "best_epoch": best_epoch, "run_dir": run_dir.name}

    if resume_ckpt is not None:
        # Keep the log lines of the epochs the checkpoint holds; drop any written later.
        if comm.is_root:
            with runs.alone_on_root(comm):
                rows = [r for r in runs.read_log_file(log_path, warn=log)
                        if int(r["epoch"]) <= start_epoch]
                try:
                    log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
                except OSError as err:
                    raise runs.WriteFailed(guards.os_error_sentence(err, f"rewrite {log_path}"),
                                      run_dir) from None
        log(f"resuming after epoch {start_epoch} (Adam step {opt_state['step']}), "
            f"target {tcfg.epochs} epochs")
        if start_epoch >= tcfg.epochs:
            log(f"nothing to do: the run already has {start_epoch} epochs")
            return run_dir
    ema = _start_ema(tcfg, params, resume_ckpt, device, log)
    if add_peepholes and ema is not None:
        ema = _with_zero_peepholes(cfg, ema)
    if resume_ckpt is None and comm.is_root:
        # The epoch-0 state on disk at once: an interrupted first epoch can be resumed.
        with runs.alone_on_root(comm):
            runs.save_state(ckpt_path, cfg, params, opt_state, 0, rng, tcfg, extra_now(), ema)

    n_iter = (n_train + tcfg.batch_size - 1) // tcfg.batch_size
    epoch, it = start_epoch, 0

    def non_finite(what):
        """The error that stops the run; nothing from the bad epoch has been saved."""
        return runs.NonFiniteLossError(f"{what}; training stopped. {ckpt_path} still holds epoch "
                                  f"{epoch - 1} (try a smaller --lr or --clip)", run_dir)
    noise_thread = ThreadPoolExecutor(max_workers=1)
    scope = contextlib.ExitStack()
    board = None
    try:
        scope.enter_context(comm.deferred_interrupts(stop))  # MPI: all ranks stop at one step
        if tcfg.tensorboard and comm.is_root:
            board = monitor.TensorBoardLog(run_dir, first_epoch=start_epoch + 1)
            scope.callback(board.close)
        for epoch in range(start_epoch + 1, tcfg.epochs + 1):
            t0 = time.perf_counter()
            if data.fresh_train is not None:     # data made on the fly: new every epoch
                train_x = np.asarray(data.fresh_train(evaluate.derived_rng(tcfg.seed, 3, epoch),
                                                      n_train), dtype=dtype)
            bar = Progress(f"epoch {epoch}/{tcfg.epochs}", n_iter, progress, rate_unit="it/s")
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
                    loss, grads, stats = comm.reduce_step(params, cfg.T, mine,
                                                          (hi - lo) / idx.shape[0])
                    # The next step's noise is drawn while this one's clipping and Adam run,
                    # on the core they leave idle (NumPy's generator releases the GIL). The
                    # draws come from rng in the same order as drawn inline.
                    next_eps = None if it == n_iter else noise_thread.submit(
                        evaluate.host_noise, rng, cfg,
                        min(tcfg.batch_size, n_train - it * tcfg.batch_size), dtype)
                    where = f"at epoch {epoch}, iteration {it}/{n_iter}"
                    if not math.isfinite(loss):
                        raise non_finite(f"loss is {loss} {where}")
                    gnorm = optim.global_norm(grads)
                    if not math.isfinite(gnorm):
                        raise non_finite(f"gradient norm is {gnorm} {where}")
                    lr = learning_rate(tcfg, epoch - 1 + (it - 1) / n_iter)
                    params, opt_state, snorm = optim.adam_step(     # clipping folded in
                        params, grads, opt_state, lr, tcfg.beta1, tcfg.beta2, tcfg.adam_eps,
                        grad_scale=optim.clip_scale(gnorm, tcfg.clip))
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
            params_norm = optim.global_norm(params)
            if not math.isfinite(params_norm):
                raise non_finite(f"parameters became non-finite in epoch {epoch}")
            comm.check_same(params_norm, "the parameters' norm")
            if ema is not None:
                ema_norm = optim.global_norm(ema)
                if not math.isfinite(ema_norm):
                    raise non_finite(f"the parameters' moving average became non-finite in "
                                     f"epoch {epoch}")
                comm.check_same(ema_norm, "the norm of the parameters' moving average")
            backend.synchronize(backend.get_array_module(*params.values()))
            model = params if ema is None else ema        # what is evaluated and shown
            train_time = time.perf_counter() - t0

            t1 = time.perf_counter()
            evaluated = is_eval_epoch(epoch, tcfg)
            valid_bound = test_bound = float("nan")
            if evaluated:
                shown = progress and comm.is_root
                valid_bound = evaluate.evaluate_bound(model, cfg, valid_x, eval_batch,
                                                      evaluate.eval_noise_rng(tcfg, epoch, 0),
                                                      comm, progress=shown, label="valid")
                test_bound = evaluate.evaluate_bound(model, cfg, test_x, eval_batch,
                                                     evaluate.eval_noise_rng(tcfg, epoch, 1),
                                                     comm, progress=shown, label="test")
            eval_time = time.perf_counter() - t1
            train_bound = loss_sum / n_iter
            if evaluated and not math.isfinite(valid_bound) and valid_x.shape[0] > 0:
                raise non_finite(f"validation bound is {valid_bound} after epoch {epoch}")
            # Without a validation split the train bound decides; with one, only the
            # epochs that were evaluated can be the best.
            score = (train_bound if valid_x.shape[0] == 0
                     else valid_bound if evaluated else float("inf"))
            is_best = score < best_valid
            if is_best:
                best_valid, best_epoch = score, epoch

            kl = kl_sum / n_iter
            record = {
                "epoch": epoch,
                "step": int(opt_state["step"]),
                "train_bound": train_bound,
                "train_recon": recon_sum / n_iter,
                "train_kl": float(kl.sum()),
                "valid_bound": None if math.isnan(valid_bound) else valid_bound,
                "test_bound": None if math.isnan(test_bound) else test_bound,
                "kl": [float(v) for v in kl],
                "grad_norm": gnorm_sum / n_iter,
                "step_norm": snorm_sum / n_iter,
                "lr": lr,
                "evaluated": bool(evaluated),
                "ema": ema is not None,      # valid/test/best are the moving average's
                "train_time_s": train_time,
                "eval_time_s": eval_time,
                "examples_per_s": n_train / max(train_time, 1e-9),
                "best": bool(is_best),
            }
            samples = (frames_lib.write_run_samples(run_dir, model, cfg, tcfg.seed)
                       if comm.is_root else None)
            record["wall_s"] = time.perf_counter() - t0
            record["time"] = _dt.datetime.now().isoformat(timespec="seconds")
            if comm.is_root:
                runs.commit_epoch(run_dir, record, is_best, cfg, params, opt_state, epoch, rng,
                              tcfg, extra_now(), ema)
            if board is not None:            # a view of the log line just written
                board.epoch(record, samples)
            log(f"epoch {epoch}/{tcfg.epochs}  train {train_bound:.2f}  "
                + ("EMA " if ema is not None else "") + "valid "
                f"{_fmt(record['valid_bound'])}  test {_fmt(record['test_bound'])}  "
                f"(recon {record['train_recon']:.2f} + KL {record['train_kl']:.2f})  "
                f"|g| {record['grad_norm']:.2f}  |step| {record['step_norm']:.4f}  "
                f"{record['wall_s']:.1f}s  {record['examples_per_s']:.0f} ex/s"
                + ("  *best*" if is_best else ""))
    except KeyboardInterrupt as interrupt:
        msg, signum = runs.interrupted_message(interrupt, epoch, ckpt_path, run_dir)
        if comm.size > 1 and not isinstance(interrupt, distributed.Interrupted):
            comm.abort(msg + " (a second Ctrl-C: every rank was stopped at once)")
        log(msg)
        raise runs.TrainingInterrupted(msg, run_dir, signum) from None
    except runs.NonFiniteLossError as err:
        log(str(err))
        raise
    except (runs.WriteFailed, OSError) as err:    # rank 0's files: a save, the log line, pictures
        msg = runs.write_failed_message(err, epoch, ckpt_path)
        if comm.size > 1:                    # the other ranks cannot know: stop them all
            comm.abort(msg)
        log(msg)
        raise runs.WriteFailed(msg, run_dir) from None
    except Exception as error:               # noqa: BLE001 - under MPI: stop every rank
        if comm.size == 1:
            raise
        comm.abort(f"{type(error).__name__}: {error} (in epoch {epoch}); stopping every rank. "
                   f"{ckpt_path} holds the last completed epoch ({runs.saved_epoch(ckpt_path)}). "
                   f"Continue with: --resume {run_dir}")
    finally:
        scope.close()
        noise_thread.shutdown(wait=True)
    log(f"done: {tcfg.epochs} epochs; best valid bound {best_valid:.2f} (epoch {best_epoch}); "
        f"run dir {run_dir}")
    return run_dir


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


def learning_rate(tcfg: TrainConfig, epochs_done: float) -> float:
    """The schedule's learning rate after ``epochs_done`` epochs (optim.scheduled_lr)."""
    decay_epochs = tcfg.lr_decay_epochs or max(tcfg.epochs - tcfg.lr_hold, 1e-9)
    return optim.scheduled_lr(tcfg.lr_schedule, tcfg.lr, epochs_done, lr_min=tcfg.lr_min,
                              hold=tcfg.lr_hold, gamma=tcfg.lr_gamma,
                              decay_epochs=decay_epochs)


def is_eval_epoch(epoch: int, tcfg: TrainConfig) -> bool:
    """Whether the valid and test splits are evaluated after ``epoch``: every
    ``eval_every`` epochs, and always after the run's last epoch."""
    return epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs


PEEPHOLE_PARAMS = ("enc_peep", "dec_peep")


def _with_zero_peepholes(cfg: DrawConfig, arrays: dict) -> dict:
    """{name: (P,)} of a model without peepholes -> those of cfg's (with them), in
    param_shapes' order, the peepholes zero (on the arrays' device and dtype)."""
    like = arrays["c0"]
    xp = backend.get_array_module(like)
    shapes = model_lib.param_shapes(cfg)
    out = {name: arrays[name] if name in arrays else xp.zeros(shape, like.dtype)
           for name, shape in shapes.items() if name in arrays or name in PEEPHOLE_PARAMS}
    # names cfg lacks stay, for check_compatible to report
    return {**out, **{name: a for name, a in arrays.items() if name not in shapes}}


def _cfg_summary(cfg) -> str:
    if cfg is None:
        return "unknown config"
    att = f"attention {cfg.read_n},{cfg.write_n}" if cfg.attention else "no attention"
    return (f"{cfg.channels}x{cfg.height}x{cfg.width}, T={cfg.T}, {att}, "
            f"enc {cfg.enc_dim}, dec {cfg.dec_dim}, z {cfg.z_dim}"
            + (", peepholes" if cfg.peepholes else ""))


# ----------------------------------------------------------------------------- classifier


def cluttered_eval_sets(ccfg: ClassifyConfig, cfg: ClassifierConfig, digits):
    """The fixed cluttered validation and test sets, of the first eval_subset digits of each
    split (all with 0) -> ((valid_x, valid_y), (test_x, test_y)), float32 (M, H*W)."""
    from .data import synthetic
    if ccfg.eval_subset:
        digits = synthetic.LabelledDigits(
            digits.train_x, digits.train_y, digits.valid_x[:ccfg.eval_subset],
            digits.valid_y[:ccfg.eval_subset], digits.test_x[:ccfg.eval_subset],
            digits.test_y[:ccfg.eval_subset])
    return synthetic.cluttered_splits(digits, cfg.height, ccfg.distractors, ccfg.crop)


def _resumed_classify_config(ccfg: ClassifyConfig, saved: ClassifyConfig,
                             overrides=()) -> ClassifyConfig:
    """The saved run's settings, with the new epochs and device, the fields named in
    ``overrides`` (only "lr": a lower rate for the next phase), and data_dir and mirror
    where the new ones differ from the defaults."""
    if set(overrides) - {"lr"}:
        raise ValueError(f"a resumed classifier run keeps its "
                         f"{', '.join(sorted(set(overrides) - {'lr'}))}; only lr can change")
    defaults = ClassifyConfig()
    where = {k: (getattr(ccfg, k) if getattr(ccfg, k) != getattr(defaults, k)
                 else getattr(saved, k)) for k in ("data_dir", "mirror")}
    return ClassifyConfig.from_dict({**saved.to_dict(), **where, "epochs": ccfg.epochs,
                                     "device": ccfg.device, "resume": str(ccfg.resume),
                                     **{k: getattr(ccfg, k) for k in overrides}})


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
    resume_ckpt = None
    if ccfg.resume:
        run_dir = Path(ccfg.resume)
        ckpt_path = run_dir / "checkpoint.h5"
        if not ckpt_path.is_file():
            raise ValueError(f"cannot resume: {ckpt_path} does not exist")
        lock.acquire(run_dir)
        resume_ckpt = runs.load_checkpoint(ckpt_path)
        saved = runs.classify_config_of(resume_ckpt)
        if saved is None or not isinstance(resume_ckpt.cfg, ClassifierConfig):
            raise ValueError(f"cannot resume: {ckpt_path} is not a classifier run")
        if cfg is not None and cfg != resume_ckpt.cfg:
            log("note: resuming with the checkpoint's model config; the one given is ignored")
        if "lr" in resume_overrides and ccfg.lr != saved.lr:
            log(f"note: resuming with lr {ccfg.lr!r} (was {saved.lr!r})")
        cfg, ccfg = resume_ckpt.cfg, _resumed_classify_config(ccfg, saved, resume_overrides)
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
    (valid_x, valid_y), (test_x, test_y) = cluttered_eval_sets(ccfg, cfg, digits)
    n_train = int(train_digits.shape[0])
    if n_train == 0:
        raise ValueError("the training split is empty")

    if resume_ckpt is not None:
        params, opt_state, rng, start_epoch, extra = runs.resumed_state(resume_ckpt, run_dir,
                                                                    device)
        clf.check_params(params, cfg)
        best_error = float(extra.get("best_valid_error", float("inf")))
        best_epoch = int(extra.get("best_epoch", 0))
    else:
        params = runs.arrays_to_device(clf.init_params(cfg, ccfg.seed, ccfg.dtype), device, dtype)
        opt_state = optim.adam_init(params)
        rng = runs.new_rng(ccfg.seed)
        start_epoch, best_error, best_epoch = 0, float("inf"), 0
        run_name = ccfg.name or _dt.datetime.now().strftime("classify-%Y%m%d-%H%M%S")
        run_dir = runs.unique_run_dir(Path(ccfg.out), run_name)
        lock.acquire(run_dir)
    runs.remove_stale_temps(run_dir)
    log_path, ckpt_path = run_dir / "log.jsonl", run_dir / "checkpoint.h5"
    (run_dir / "config.json").write_text(json.dumps(
        {"model": cfg.to_dict(), "classify": ccfg.to_dict()}, indent=2) + "\n")
    n_params = sum(int(np.prod(np.shape(p))) for p in params.values())
    log(f"run dir: {run_dir}")
    log("model config: " + json.dumps(cfg.to_dict()))
    log("classify config: " + json.dumps(ccfg.to_dict()))
    log(f"device {device}, dtype {dtype.name}, {n_params:,} parameters; cluttered MNIST: "
        f"{n_train} train digits ({ccfg.train_set}; the paper had 60,000), "
        f"{valid_x.shape[0]} valid, "
        f"{test_x.shape[0]} test")

    def extra_now():
        return {"best_valid_error": best_error, "best_epoch": best_epoch, "run_dir": run_dir.name}

    if resume_ckpt is not None:
        rows = [r for r in runs.read_log_file(log_path, warn=log) if int(r["epoch"]) <= start_epoch]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"resuming after epoch {start_epoch} (Adam step {opt_state['step']}), "
            f"target {ccfg.epochs} epochs")
        if start_epoch >= ccfg.epochs:
            log(f"nothing to do: the run already has {start_epoch} epochs")
            return run_dir
    else:
        runs.save_state(ckpt_path, cfg, params, opt_state, 0, rng, ccfg, extra_now())

    n_iter = (n_train + ccfg.batch_size - 1) // ccfg.batch_size
    epoch = start_epoch

    def non_finite(what):
        return runs.NonFiniteLossError(f"{what}; training stopped. {ckpt_path} still holds epoch "
                                  f"{epoch - 1} (try a smaller --lr or --clip)", run_dir)
    try:
        for epoch in range(start_epoch + 1, ccfg.epochs + 1):
            t0 = time.perf_counter()
            train_x = synthetic.clutter(train_digits, train_digits,
                                        evaluate.derived_rng(ccfg.seed, 3, epoch), cfg.height,
                                        ccfg.distractors, ccfg.crop).astype(dtype, copy=False)
            bar = Progress(f"epoch {epoch}/{ccfg.epochs}", n_iter, progress, rate_unit="it/s")
            perm = rng.permutation(n_train)
            loss_sum = gnorm_sum = 0.0
            errors = 0
            try:
                for it in range(1, n_iter + 1):
                    stop.check()             # Ctrl-C / SIGTERM: stop between steps
                    idx = perm[(it - 1) * ccfg.batch_size: it * ccfg.batch_size]
                    xb = backend.to_device(train_x[idx], device)
                    yb = backend.to_device(train_y[idx], device)
                    loss, grads, stats = clf.loss_and_grads(params, cfg, xb, yb)
                    where = f"at epoch {epoch}, iteration {it}/{n_iter}"
                    if not math.isfinite(loss):
                        raise non_finite(f"loss is {loss} {where}")
                    gnorm = optim.global_norm(grads)
                    if not math.isfinite(gnorm):
                        raise non_finite(f"gradient norm is {gnorm} {where}")
                    params, opt_state, _ = optim.adam_step(
                        params, grads, opt_state, ccfg.lr, ccfg.beta1, ccfg.beta2,
                        ccfg.adam_eps, grad_scale=optim.clip_scale(gnorm, ccfg.clip))
                    loss_sum += loss * idx.shape[0]
                    errors += stats["errors"]
                    gnorm_sum += gnorm
                    bar.update(it, f"loss {loss:7.4f}")
            finally:
                bar.close()
            train_time = time.perf_counter() - t0
            t1 = time.perf_counter()
            valid_loss, valid_error = clf.evaluate(params, cfg, valid_x, valid_y, eval_batch)
            test_loss, test_error = clf.evaluate(params, cfg, test_x, test_y, eval_batch)
            if not math.isfinite(valid_loss):
                raise non_finite(f"validation loss is {valid_loss} after epoch {epoch}")
            is_best = valid_error < best_error
            if is_best:
                best_error, best_epoch = valid_error, epoch
            record = {
                "epoch": epoch, "step": int(opt_state["step"]),
                "train_loss": loss_sum / n_train, "train_error": errors / n_train,
                "valid_loss": valid_loss, "valid_error": valid_error,
                "test_loss": test_loss, "test_error": test_error,
                "train_digits": n_train, "grad_norm": gnorm_sum / n_iter, "lr": ccfg.lr,
                "train_time_s": train_time, "eval_time_s": time.perf_counter() - t1,
                "best": bool(is_best), "wall_s": time.perf_counter() - t0,
                "time": _dt.datetime.now().isoformat(timespec="seconds"),
            }
            runs.commit_epoch(run_dir, record, is_best, cfg, params, opt_state, epoch, rng, ccfg,
                          extra_now())
            log(f"epoch {epoch}/{ccfg.epochs}  train {record['train_loss']:.4f} "
                f"({100 * record['train_error']:.2f}% wrong)  valid {valid_loss:.4f} "
                f"({100 * valid_error:.2f}%)  test {test_loss:.4f} ({100 * test_error:.2f}%)  "
                f"|g| {record['grad_norm']:.2f}  {record['wall_s']:.1f}s"
                + ("  *best*" if is_best else ""))
    except KeyboardInterrupt as interrupt:
        msg, signum = runs.interrupted_message(interrupt, epoch, ckpt_path, run_dir)
        log(msg)
        raise runs.TrainingInterrupted(msg, run_dir, signum) from None
    except runs.NonFiniteLossError as err:
        log(str(err))
        raise
    except (runs.WriteFailed, OSError) as err:    # a save or the log line
        msg = runs.write_failed_message(err, epoch, ckpt_path)
        log(msg)
        raise runs.WriteFailed(msg, run_dir) from None
    log(f"done: {ccfg.epochs} epochs; best valid error {100 * best_error:.2f}% (epoch "
        f"{best_epoch}; {n_train} training digits); run dir {run_dir}")
    return run_dir
