"""A run folder and what it holds: the folder, its log.jsonl, its checkpoints, the resume
of a run from them, the shipped model (export_model), and the messages of a run that
stops early. Both epoch loops (train.py) keep their runs through these functions, so
that a DRAW run and a classifier run are written, resumed and stopped alike.

    RUN/config.json     the configs of the run as resolved
    RUN/log.jsonl       one JSON object per completed epoch (see docs/TRAINING.md)
    RUN/checkpoint.h5   the latest completed state (checkpoint.py)
    RUN/best.h5         the state with the best validation score so far

An epoch is committed log line first, then best.h5, then checkpoint.h5 (commit_epoch):
a resume keeps the log lines of the epochs its checkpoint holds and drops the rest.

Dimension legend
    D  C*H*W, one image flattened
    E  images (examples) of a split
    P  the number of parameter values (in a flat buffer)
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import signal
from pathlib import Path

import numpy as np

from . import backend
from . import checkpoint as ckpt_lib
from . import distributed
from . import evaluate
from . import guards
from . import images as images_lib
from . import optim
from .config import RESUME_OVERRIDES, ClassifierConfig, ClassifyConfig, DrawConfig, TrainConfig


# ----------------------------------------------------------------------------- stops

class TrainingStopped(RuntimeError):
    """Training ended before the target epoch; ``run_dir`` holds the last good checkpoint."""

    def __init__(self, message: str, run_dir: Path | None = None):
        super().__init__(message)
        self.run_dir = run_dir


class NonFiniteLossError(TrainingStopped):
    """A NaN or infinite loss (or gradient norm) appeared; nothing bad was saved."""


class TrainingInterrupted(TrainingStopped):
    """Ctrl-C or SIGTERM (``signum``); the checkpoint of the last completed epoch is on disk."""

    def __init__(self, message: str, run_dir: Path | None = None, signum: int = signal.SIGINT):
        super().__init__(message, run_dir)
        self.signum = int(signum)


class WriteFailed(TrainingStopped):
    """A file of the run could not be written (a full disk, permissions); the last
    checkpoint stands."""


def interrupted_message(interrupt, epoch: int, ckpt_path: Path, run_dir: Path):
    """-> (the message that a run stopped by SIGINT/SIGTERM prints, the signal number)."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return (f"interrupted{how} in epoch {epoch}; {ckpt_path} holds the last completed epoch "
            f"({saved_epoch(ckpt_path)}). Continue with: --resume {run_dir}"), signum


def write_failed_message(err, epoch: int, ckpt_path: Path) -> str:
    """The message of a failed save (WriteFailed) or log or picture write (OSError)."""
    if isinstance(err, WriteFailed):
        return str(err)
    return (guards.os_error_sentence(err, f"write the files of epoch {epoch}")
            + f"; {ckpt_path} holds the last completed epoch ({saved_epoch(ckpt_path)})")


def saved_epoch(path: Path):
    try:
        return f"epoch {int(ckpt_lib.load_checkpoint(path).epoch)}"
    except Exception:  # noqa: BLE001 - only for the message
        return "unreadable"


class Stops:
    """How an epoch loop that ends early ends, alike for both loops.

    ``with runs.Stops(run_dir, comm, log, epoch) as stops:`` around the loop, which sets
    ``stops.epoch`` to the epoch under way (before the first: ``epoch``, the last one
    completed) and raises ``stops.non_finite(what)`` on a loss, gradient or bound that is
    not finite. On the way out, each message logged once:

    - Ctrl-C or SIGTERM: a TrainingInterrupted that says where to resume from (under MPI,
      a Ctrl-C that reached one rank alone ends every rank);
    - NonFiniteLossError: raised on;
    - WriteFailed or OSError (rank 0's files: a save, the log line, the pictures): a
      WriteFailed that says what is intact; under MPI every rank ends, as the others
      cannot know;
    - any other error: under MPI it ends every rank; in one process it is raised on.
    """

    def __init__(self, run_dir: Path, comm, log, epoch: int):
        self.run_dir, self.comm, self.log, self.epoch = run_dir, comm, log, epoch
        self.ckpt_path = run_dir / "checkpoint.h5"

    def non_finite(self, what: str) -> NonFiniteLossError:
        """The error that stops the run; nothing from the bad epoch has been saved."""
        return NonFiniteLossError(f"{what}; training stopped. {self.ckpt_path} still holds "
                                  f"epoch {self.epoch - 1} (try a smaller --lr or --clip)",
                                  self.run_dir)

    def __enter__(self):
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        comm, epoch, ckpt_path, run_dir = self.comm, self.epoch, self.ckpt_path, self.run_dir
        if err is None:
            return False
        if isinstance(err, KeyboardInterrupt):
            msg, signum = interrupted_message(err, epoch, ckpt_path, run_dir)
            if comm.size > 1 and not isinstance(err, distributed.Interrupted):
                comm.abort(msg + " (a second Ctrl-C: every rank was stopped at once)")
            self.log(msg)
            raise TrainingInterrupted(msg, run_dir, signum) from None
        if isinstance(err, NonFiniteLossError):
            self.log(str(err))
            return False
        if isinstance(err, (WriteFailed, OSError)):
            msg = write_failed_message(err, epoch, ckpt_path)
            if comm.size > 1:
                comm.abort(msg)
            self.log(msg)
            raise WriteFailed(msg, run_dir) from None
        if not isinstance(err, Exception) or comm.size == 1:
            return False
        comm.abort(f"{type(err).__name__}: {err} (in epoch {epoch}); stopping every rank. "
                   f"{ckpt_path} holds the last completed epoch ({saved_epoch(ckpt_path)}). "
                   f"Continue with: --resume {run_dir}")
        return True          # MPI_Abort does not return; a test's stand-in for it may


# ----------------------------------------------------------------------------- state

def arrays_to_device(arrays: dict, device: str, dtype=None) -> dict:
    """{name: array} -> owned, writable copies on ``device`` ('cpu'/'gpu'), floats cast to
    ``dtype`` when given."""
    out = {}
    for name, value in arrays.items():
        host = np.array(backend.to_numpy(value), copy=True)  # writable, owned
        if dtype is not None and host.dtype.kind == "f":
            host = host.astype(dtype, copy=False)
        out[name] = backend.to_device(host, device)
    return out


def _to_host_dict(arrays: dict) -> dict:
    return {name: backend.to_numpy(value) for name, value in arrays.items()}


def _opt_state_to(state: dict, device: str, dtype=None) -> dict:
    return {"m": arrays_to_device(state["m"], device, dtype),
            "v": arrays_to_device(state["v"], device, dtype),
            "step": int(state["step"])}


def _opt_state_host(state: dict) -> dict:
    return {"m": _to_host_dict(state["m"]), "v": _to_host_dict(state["v"]),
            "step": int(state["step"])}


def new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def rng_from_state(state) -> np.random.Generator:
    if isinstance(state, (str, bytes)):
        state = json.loads(state)
    if not isinstance(state, dict) or "bit_generator" not in state:
        raise ValueError("checkpoint holds no usable RNG state; it cannot be resumed exactly")
    name = state["bit_generator"]     # never call a name that is not a bit generator
    bit_gen_cls = getattr(np.random, name, None) if name in ckpt_lib.BIT_GENERATORS else None
    if bit_gen_cls is None:
        raise ValueError(f"checkpoint RNG {state['bit_generator']!r} is unknown to this NumPy")
    bit_gen = bit_gen_cls()
    bit_gen.state = state
    return np.random.Generator(bit_gen)


# ----------------------------------------------------------------------------- run folder

def unique_run_dir(out: Path, name: str) -> Path:
    """``out/name``, or ``out/name-2``, ``-3``... when taken; created here (no clobbering).
    ValueError with one sentence when the folder cannot be made."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"cannot create the run folder under --out {out}: "
                         f"{out} is {guards.what_blocks_a_folder(out)}, not a folder") from None
    except OSError as err:
        raise ValueError(guards.os_error_sentence(err, f"create the --out folder {out}")) from None
    candidate, i = out / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            i += 1
            candidate = out / f"{name}-{i}"
        except OSError as err:
            raise ValueError(guards.os_error_sentence(
                err, f"create the run folder {candidate}")) from None


@contextlib.contextmanager
def alone_on_root(comm):
    """Work that rank 0 does alone before the epoch loop (the lock, the run folder, its
    first files). Should it fail, the other ranks would wait for rank 0 in their next
    collective forever: under MPI its error, in one sentence, ends every rank."""
    try:
        yield
    except Exception as err:                 # noqa: BLE001 - any error leaves them waiting
        if comm.size > 1:
            comm.abort(str(err))
        raise


def remove_stale_temps(run_dir: Path) -> None:
    """Temporary checkpoint files left by a process that was killed mid-save (the caller
    holds the run folder's lock, so no other process is writing them)."""
    for tmp in run_dir.glob(".*.h5.tmp-*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def open_resumed(run_dir, lock, comm) -> tuple:
    """(run_dir, its checkpoint.h5 loaded) of a run to resume; rank 0 locks the folder
    first. ValueError when there is no checkpoint to resume from."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.h5"
    if not ckpt_path.is_file():
        raise ValueError(f"cannot resume: {ckpt_path} does not exist")
    if comm.is_root:
        with alone_on_root(comm):
            lock.acquire(run_dir)
    return run_dir, load_checkpoint(ckpt_path)


def new_run_dir(out, name: str, kind: str, lock, comm) -> Path:
    """The folder of a new run, out/name (or out/<kind>-<date>-<time> without a name; see
    unique_run_dir), made and locked by rank 0; every rank gets its path."""
    run_name = name or _dt.datetime.now().strftime(f"{kind}-%Y%m%d-%H%M%S")
    run_dir = None
    if comm.is_root:
        with alone_on_root(comm):
            run_dir = unique_run_dir(Path(out), run_name)
            lock.acquire(run_dir)
    return Path(comm.broadcast_text(str(run_dir) if comm.is_root else ""))


def write_config(run_dir: Path, configs: dict, stops: bool) -> None:
    """RUN/config.json: {name: a config's to_dict()}. ``stops``: an OSError becomes a
    WriteFailed (DRAW's loop, whose ranks all stop on one); else it is raised as is."""
    path = run_dir / "config.json"
    with _write_failed_if(stops, f"write {path}", run_dir):
        images_lib.save_text(path, json.dumps(configs, indent=2) + "\n")   # atomic


@contextlib.contextmanager
def _write_failed_if(stops: bool, what: str, run_dir: Path):
    try:
        yield
    except OSError as err:
        if not stops:
            raise
        raise WriteFailed(guards.os_error_sentence(err, what), run_dir) from None


# ----------------------------------------------------------------------------- log

def read_log_file(path: Path, warn=None) -> list:
    """The records of a log.jsonl (a missing file holds none), checked.

    A last line without its newline that is not valid JSON was cut off by a crash while
    it was written: it is dropped, with a message to ``warn`` (default: a
    RuntimeWarning). Any other bad line, or epochs that do not increase (two processes
    writing one log), is a ValueError naming the line.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows, previous = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise ValueError(f"{path}, line {number}: nested too deeply to be an epoch "
                             "record") from None
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                message = (f"{path}: dropped the cut-off last line {number} (an interrupted "
                           "write)")
                if warn is None:
                    import warnings
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                else:
                    warn(f"note: {message}")
                break
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column "
                             f"{err.colno})") from None
        epoch = row.get("epoch") if isinstance(row, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"{path}, line {number}: not an epoch record (no integer 'epoch')")
        if previous is not None and epoch <= previous:
            raise ValueError(f"{path}, line {number}: epoch {epoch} follows epoch {previous}; "
                             "the log holds duplicated or out-of-order epochs (did two "
                             "processes write into this run folder?)")
        previous = epoch
        rows.append(row)
    return rows


def read_log(run_dir, warn=None) -> list:
    """The epoch records of RUN/log.jsonl (list of dicts); ValueError when absent/empty
    or damaged (see _read_log; ``warn`` receives the note on a cut-off last line)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise ValueError(f"no training log at {path}")
    rows = read_log_file(path, warn)
    if not rows:
        raise ValueError(f"{path} holds no epochs yet")
    return rows


def append_log(path: Path, record: dict) -> None:
    """Append one line to log.jsonl; a failed write (a full disk, a second Ctrl-C) is
    undone, so the log never ends in a partial line written by this process."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    with open(path, "ab") as fh:
        size = fh.tell()
        try:
            fh.write(line)
            fh.flush()
        except BaseException as err:
            try:
                fh.truncate(size)
            except OSError:
                pass
            raise guards.naming(err, path)   # a full disk's OSError names no file


def keep_log_until(run_dir: Path, epoch: int, warn, stops: bool) -> None:
    """Keep the lines of RUN/log.jsonl up to ``epoch`` (what the checkpoint being resumed
    holds) and drop any written later; ``warn``: as for read_log_file, ``stops``: as for
    write_config."""
    path = run_dir / "log.jsonl"
    rows = [r for r in read_log_file(path, warn=warn) if int(r["epoch"]) <= epoch]
    with _write_failed_if(stops, f"rewrite {path}", run_dir):
        images_lib.save_text(path, "".join(json.dumps(r) + "\n" for r in rows))   # atomic


# ----------------------------------------------------------------------------- checkpoints

def train_config_of(ckpt) -> TrainConfig | None:
    """The TrainConfig a checkpoint recorded, or None."""
    tc = getattr(ckpt, "train_cfg", None)
    if tc is None or isinstance(tc, TrainConfig):
        return tc
    if isinstance(tc, str):
        tc = json.loads(tc)
    return TrainConfig.from_dict(dict(tc))


def classify_config_of(ckpt) -> ClassifyConfig | None:
    """The ClassifyConfig a classifier checkpoint recorded, or None."""
    tc = getattr(ckpt, "train_cfg", None)
    if tc is None or isinstance(tc, ClassifyConfig):
        return tc
    return ClassifyConfig.from_dict(dict(json.loads(tc) if isinstance(tc, str) else tc))


def resumed_epochs(new: int, saved: int, given: bool, default: int) -> int:
    """The total epochs of a resumed run: ``new`` when given (the CLI says so by naming
    "epochs" among the overrides; a caller of the library by a total other than the
    config's ``default``), else the run's own, ``saved``: a --resume without --epochs
    carries on to the total the run was started with."""
    return new if given or new != default else saved


def resumed_configs(cfg, tcfg: TrainConfig, ckpt, resume_overrides, add_peepholes: bool,
                     log) -> tuple:
    """(cfg, tcfg, add_peepholes) of a run resumed from ``ckpt``: its model (with zero
    peepholes added when asked and it has none) and its TrainConfig with the new device,
    ranks, the ``resume_overrides``, the data's whereabouts where given, and the epochs
    of resumed_epochs."""
    saved_tcfg = train_config_of(ckpt)
    if saved_tcfg is None:
        raise ValueError(f"cannot resume: {Path(tcfg.resume) / 'checkpoint.h5'} records no "
                         "training config")
    if cfg is not None and cfg != ckpt.cfg:
        log("note: resuming with the checkpoint's model config; the one given is ignored")
    cfg = ckpt.cfg
    add_peepholes = add_peepholes and not cfg.peepholes
    if add_peepholes:   # recorded in the checkpoints from here on through cfg
        log("note: resuming with peepholes True (was False)")
        cfg = dataclasses.replace(cfg, peepholes=True)
    defaults = TrainConfig()
    where = {k: (getattr(tcfg, k) if getattr(tcfg, k) != getattr(defaults, k)
                 else getattr(saved_tcfg, k)) for k in ("data_dir", "mirror", "folder")}
    if where["mirror"] == saved_tcfg.mirror and _missing_folder(saved_tcfg.mirror):
        # a run moved to another machine (a committed run's state): its folder is not here
        log(f"note: the run's mirror folder {saved_tcfg.mirror} is not on this machine; "
            "resuming without it (give --mirror for another)")
        where["mirror"] = ""
    unknown = set(resume_overrides) - set(RESUME_OVERRIDES)
    if unknown:
        raise ValueError(f"a resumed run keeps its {', '.join(sorted(unknown))}; only "
                         f"{', '.join(RESUME_OVERRIDES)} can change")
    changed = {k: getattr(tcfg, k) for k in ("device", "ranks", *resume_overrides)}
    changed["epochs"] = resumed_epochs(tcfg.epochs, saved_tcfg.epochs,
                                       "epochs" in resume_overrides, defaults.epochs)
    for k in resume_overrides:
        if changed[k] != getattr(saved_tcfg, k):
            log(f"note: resuming with {k} {changed[k]!r} (was {getattr(saved_tcfg, k)!r})")
    tcfg = TrainConfig.from_dict({**saved_tcfg.to_dict(), **where, **changed,
                                  "resume": str(tcfg.resume)})
    return cfg, tcfg, add_peepholes


def resumed_classify_config(cfg, ccfg: ClassifyConfig, ckpt, overrides, log) -> tuple:
    """(cfg, ccfg) of a classifier run resumed from ``ckpt``: its model, and its settings
    with the new device, the fields named in ``overrides`` (only "lr", a lower rate for
    the next phase, and "epochs", see resumed_epochs), and data_dir and mirror where the
    new ones differ from the defaults."""
    saved = classify_config_of(ckpt)
    if saved is None or not isinstance(ckpt.cfg, ClassifierConfig):
        raise ValueError(f"cannot resume: {Path(ccfg.resume) / 'checkpoint.h5'} is not a "
                         "classifier run")
    if cfg is not None and cfg != ckpt.cfg:
        log("note: resuming with the checkpoint's model config; the one given is ignored")
    if "lr" in overrides and ccfg.lr != saved.lr:
        log(f"note: resuming with lr {ccfg.lr!r} (was {saved.lr!r})")
    if set(overrides) - {"lr", "epochs"}:
        raise ValueError(f"a resumed classifier run keeps its "
                         f"{', '.join(sorted(set(overrides) - {'lr', 'epochs'}))}; only "
                         "lr and epochs can change")
    defaults = ClassifyConfig()
    where = {k: (getattr(ccfg, k) if getattr(ccfg, k) != getattr(defaults, k)
                 else getattr(saved, k)) for k in ("data_dir", "mirror")}
    return ckpt.cfg, ClassifyConfig.from_dict({
        **saved.to_dict(), **where, "device": ccfg.device, "resume": str(ccfg.resume),
        **{k: getattr(ccfg, k) for k in overrides},
        "epochs": resumed_epochs(ccfg.epochs, saved.epochs, "epochs" in overrides,
                                 defaults.epochs)})


def checkpoint_file(path) -> Path:
    """The file a checkpoint argument names: a run dir means its best.h5, else its
    checkpoint.h5; a file means itself. ValueError if a run dir holds neither."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.h5", "checkpoint.h5"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path} holds neither best.h5 nor checkpoint.h5")
    return path


def load_checkpoint(path):
    """checkpoint.load_checkpoint with every read failure as a ValueError naming the file
    (path: a file or a run dir, see checkpoint_file)."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = ckpt_lib.load_checkpoint(path)
        ckpt_lib.check_complete(ckpt, path)   # e.g. no params/c0: one sentence, not KeyError
        return ckpt
    except ValueError:  # CheckpointError: its message names the file already
        raise
    except (OSError, KeyError, TypeError) as err:  # anything checkpoint.py did not wrap
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def model_params(ckpt) -> tuple:
    """(the parameters that a checkpoint's model is, whether they are a moving average):
    its EMA {name: (P,)} when it holds one (a run with ema_decay > 0), else its params,
    which an exported model (``export_model``) says are an average in its extra."""
    ema = getattr(ckpt, "ema", None)
    if ema is not None:
        return ema, True
    return ckpt.params, bool((getattr(ckpt, "extra", None) or {}).get("ema", False))


def save_state(path: Path, cfg, params, opt_state, epoch, rng, tcfg, extra, ema=None) -> None:
    """save_checkpoint (ema: the parameters' moving average, or None); a failure is a
    WriteFailed that says what is still intact."""
    try:
        ckpt_lib.save_checkpoint(path, cfg, _to_host_dict(params),
                                 opt_state=_opt_state_host(opt_state), epoch=int(epoch),
                                 rng_state=rng.bit_generator.state, train_cfg=tcfg, extra=extra,
                                 ema=None if ema is None else _to_host_dict(ema))
    except ckpt_lib.CheckpointError as err:
        what = f"the checkpoint {path}" if path.name == "checkpoint.h5" else str(path)
        intact = (f"the checkpoint of epoch {epoch - 1} is intact" if epoch > 0
                  else "no epoch had been trained yet")
        if isinstance(err, ckpt_lib.DiskFullError):
            message = f"no space left on the device while saving {what} of epoch {epoch}"
        else:
            message = f"{err} (while saving {what} of epoch {epoch})"
        raise WriteFailed(f"{message}; {intact}", path.parent) from None


@dataclasses.dataclass
class RunState:
    """What a run's epochs move on and its checkpoints keep: the parameters {name: (P,)},
    Adam's state, the generator of the batch order (and of DRAW's training noise), the
    last completed epoch, the best score so far and its epoch, and the parameters'
    moving average (None without one)."""
    params: dict
    opt_state: dict
    rng: np.random.Generator
    epoch: int = 0
    best: float = float("inf")
    best_epoch: int = 0
    ema: dict | None = None

    def extra(self, best_key: str, run_dir: Path) -> dict:
        """A checkpoint's extra: the best score (named ``best_key``), its epoch, the run."""
        return {best_key: self.best, "best_epoch": self.best_epoch, "run_dir": run_dir.name}


def fresh_run_state(params: dict, seed: int) -> RunState:
    """Epoch 0 of a new run: Adam at its start, the generator seeded with ``seed``."""
    return RunState(params, optim.adam_init(params), new_rng(seed))


def resumed_run_state(ckpt, run_dir: Path, device: str, best_key: str) -> RunState:
    """The state of a checkpoint being resumed, on ``device``; ``best_key``: as in
    RunState.extra."""
    if ckpt.opt_state is None:
        raise ValueError(f"cannot resume: {run_dir / 'checkpoint.h5'} holds no optimizer state")
    extra = dict(ckpt.extra or {})
    return RunState(arrays_to_device(ckpt.params, device), _opt_state_to(ckpt.opt_state, device),
                    rng_from_state(ckpt.rng_state), int(ckpt.epoch),
                    float(extra.get(best_key, float("inf"))), int(extra.get("best_epoch", 0)))


def announce_resume(log, epoch: int, step: int, epochs: int) -> bool:
    """Log where a resumed run continues; True when it already has its ``epochs``."""
    log(f"resuming after epoch {epoch} (Adam step {step}), target {epochs} epochs")
    if epoch >= epochs:
        log(f"nothing to do: the run already has {epoch} epochs")
        return True
    return False


def commit_epoch(run_dir: Path, record: dict, is_best: bool, cfg, params, opt_state,
                  epoch, rng, tcfg, extra, ema=None) -> None:
    """An epoch's record into RUN/log.jsonl, then its state (with the EMA ``ema`` when
    not None) into best.h5 (when best) and checkpoint.h5. The log line comes first:
    should the saves not happen, a resume from the previous checkpoint drops this line
    again."""
    append_log(run_dir / "log.jsonl", record)
    if is_best:
        save_state(run_dir / "best.h5", cfg, params, opt_state, epoch, rng, tcfg, extra, ema)
    save_state(run_dir / "checkpoint.h5", cfg, params, opt_state, epoch, rng, tcfg, extra, ema)


def export_model(ckpt_path, out_path, test_x: np.ndarray | None = None,
                 check_n: int = 100, check_seed: int = 0) -> dict:
    """Write the parameters of a checkpoint, float32 and nothing else that trains, to
    ``out_path``: the model to ship. They are the checkpoint's moving average of its
    parameters when it holds one (``model_params``; then ``"ema": true`` and the
    decay are recorded), else its parameters.

    The file records the model config, the epoch and, from RUN/log.jsonl beside the
    checkpoint, that epoch's valid and test bounds. With ``test_x`` (E, D) it also
    records ``fixed_noise_bound`` of its first ``check_n`` images (seed ``check_seed``),
    the figure a test recomputes. Returns what it recorded (the file's ``extra``).
    """
    ckpt_path = Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    source, is_ema = model_params(ckpt)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in source.items()}
    info = {"epoch": int(ckpt.epoch), "source": ckpt_path.name}
    if is_ema:
        saved = train_config_of(ckpt)
        info.update(ema=True, ema_decay=None if saved is None else saved.ema_decay)
    log_path = ckpt_path.parent / "log.jsonl"
    if log_path.is_file():
        rows = [r for r in read_log_file(log_path) if int(r.get("epoch", 0)) <= int(ckpt.epoch)]
        if rows and int(rows[-1]["epoch"]) == int(ckpt.epoch):
            for key in ("train_bound", "valid_bound", "test_bound", "step", "lr"):
                info[key] = rows[-1].get(key)
            info["hours"] = sum(float(r.get("wall_s", 0.0)) for r in rows) / 3600.0
    if test_x is not None:
        x = np.asarray(test_x[:check_n])
        cfg, n = ckpt.cfg, int(x.shape[0])               # a float64 forward and its noise
        guards.check_memory(evaluate.model_bytes(cfg, n, 8, training=False)
                            + 8 * cfg.T * n * cfg.z_dim,
                            f"exporting this model (T={cfg.T}) with a check of {n} test images",
                            data_bytes=np.asarray(test_x).nbytes)
        info["check"] = {"split": "test", "n": int(x.shape[0]), "seed": int(check_seed),
                         "dtype": "float64",
                         "bound": evaluate.fixed_noise_bound(params, ckpt.cfg, x, check_seed)}
    ckpt_lib.save_checkpoint(out_path, ckpt.cfg, params, opt_state=None,
                             epoch=int(ckpt.epoch), train_cfg=_portable(train_config_of(ckpt)),
                             extra=info)
    return info


def _missing_folder(mirror: str) -> bool:
    """Whether ``mirror`` names a local folder that does not exist (not a URL, not blank)."""
    return bool(mirror) and "://" not in mirror and not Path(mirror).expanduser().is_dir()


def _portable(tcfg: TrainConfig | None) -> TrainConfig | None:
    """The training config as a shipped model records it: without the training machine's
    folders (a folder mirror, an absolute data folder), which mean nothing elsewhere and
    would name that machine; a URL mirror is kept."""
    if tcfg is None:
        return None
    mirror = tcfg.mirror if tcfg.mirror.startswith(("http://", "https://")) else ""
    data_dir = tcfg.data_dir if not Path(tcfg.data_dir).is_absolute() else TrainConfig.data_dir
    return dataclasses.replace(tcfg, mirror=mirror, data_dir=data_dir)


# ----------------------------------------------------------------------------- data

def check_data_shape(cfg: DrawConfig, shape) -> None:
    """ValueError unless the data set's (C, H, W) is the model's."""
    c, h, w = (int(s) for s in shape)
    if (cfg.channels, cfg.height, cfg.width) != (c, h, w):
        raise ValueError(f"the model is for {cfg.channels}x{cfg.height}x{cfg.width} images, "
                         f"the data set has {c}x{h}x{w}")


def load_data(tcfg: TrainConfig, progress: bool):
    """data.load_splits for the data set, folder and mirror that ``tcfg`` names."""
    from . import data as data_lib  # imported lazily: only training/evaluation need it
    return data_lib.load_splits(tcfg.dataset, data_dir=tcfg.data_dir, mirror=tcfg.mirror,
                                folder=tcfg.folder, progress=progress)


def load_split(tcfg: TrainConfig, split: str, progress: bool) -> tuple:
    """data.load_split: one split (E, D) and the image shape, for what ``tcfg`` names."""
    from . import data as data_lib
    return data_lib.load_split(tcfg.dataset, split, data_dir=tcfg.data_dir, mirror=tcfg.mirror,
                               folder=tcfg.folder, progress=progress)
