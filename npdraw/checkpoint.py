"""HDF5 checkpoints: model config, parameters, Adam state, the parameters' moving
average, epoch, RNG state. No pickle.

No dimension letters: `(...)` is the shape of one parameter (each name has its own).

File layout (format_version 1; see docs/CHECKPOINT.md):
    /                 attrs: format = "npdraw-checkpoint", format_version = 1, epoch,
                             rng_state, train_config, extra (JSON strings; optional)
    /config           attrs: the DrawConfig fields, or the ClassifierConfig fields when the
                      root attr model = "classifier" (the cluttered-MNIST classifier)
    /params/<name>    one dataset (...) per parameter, dtype as given
    /optimizer        optional; attr step; subgroups m/<name>, v/<name> of shape (...)
    /ema/<name>       optional; the exponential moving average of each parameter (...)

Writes are atomic: the HDF5 file is built in memory, the free space is checked, then
the bytes are written next to the target under a temporary name, fsync'ed and renamed
over the target, so a crash or a full disk mid-save leaves the previous checkpoint as
it was (and HDF5 never sees a failing disk). Datasets carry HDF5's Fletcher-32
checksum, and loading refuses damaged or non-finite arrays, naming the array. Arrays may be CuPy; they are copied to the host here, and
loading needs neither CuPy nor a GPU (parameters come back as NumPy arrays).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import h5py
import numpy as np

from . import backend
from .config import ClassifierConfig, DrawConfig

FORMAT = "npdraw-checkpoint"
FORMAT_VERSION = 1
# The root attribute holding the sha256 of everything that loads (see content_digest),
# written last; files saved before it existed have none and load as before.
DIGEST_ATTR = "digest"
# The bit generators an rng_state may name (the loader instantiates the one named).
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")

# Marker used to carry NumPy arrays (e.g. MT19937's key vector) through JSON.
_ND_KEY = "__ndarray__"


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, or does not fit the model."""


class DiskFullError(CheckpointError):
    """No space was left to write a checkpoint; ``directory`` is where it was to go."""

    def __init__(self, message: str, directory: str):
        super().__init__(message)
        self.directory = directory


# Room kept free beyond the checkpoint's own bytes (file-system metadata, the log line).
SPACE_MARGIN = 1 << 16


@dataclass
class Checkpoint:
    cfg: DrawConfig                      # or a ClassifierConfig
    params: dict                         # {name: np.ndarray (...)}
    opt_state: Optional[dict] = None     # {"m": {name: (...)}, "v": {name: (...)}, "step": int}
    ema: Optional[dict] = None           # {name: (...)}: the parameters' moving average
    epoch: int = 0
    rng_state: Optional[dict] = None     # e.g. np.random.Generator().bit_generator.state
    train_cfg: Optional[dict] = None     # TrainConfig.to_dict()
    extra: dict = field(default_factory=dict)
    digest: Optional[str] = None         # the file's verified sha256; None: an older file


# ----------------------------------------------------------------------------- JSON

def _json_default(obj):
    # Python ints are arbitrary precision in JSON, so PCG64's 128-bit state survives;
    # NumPy scalars and arrays are turned into plain Python values first.
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray) or backend.is_gpu_array(obj):
        a = backend.to_numpy(obj)
        return {_ND_KEY: a.tolist(), "dtype": a.dtype.str, "shape": list(a.shape)}
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _json_hook(obj):
    if _ND_KEY in obj and set(obj) == {_ND_KEY, "dtype", "shape"}:
        return np.array(obj[_ND_KEY], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return obj


def _to_json(value, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} cannot be stored as JSON: {e}") from None


def _from_json(text, what: str, path):
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return json.loads(text, object_hook=_json_hook)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: attribute {what!r} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- save

def _host_arrays(arrays: dict, what: str) -> dict:
    """{name: array (...)} (NumPy or CuPy) -> {name: np.ndarray (...)}, names checked."""
    if not isinstance(arrays, dict):
        raise CheckpointError(f"{what} must be a dict name -> array, got {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            # '/' would silently create nested HDF5 groups.
            raise CheckpointError(f"{what}: invalid name {name!r} (a non-empty string without '/')")
        a = backend.to_numpy(a)
        if a.dtype.kind not in "biuf":
            raise CheckpointError(f"{what}[{name!r}]: dtype {a.dtype} cannot be stored")
        out[name] = a
    return out


def _write_arrays(group, arrays: dict) -> None:
    for name, a in arrays.items():
        # Fletcher-32 needs chunked storage, which HDF5 has for non-empty arrays only.
        checksum = a.ndim > 0 and a.size > 0
        group.create_dataset(name, data=a, fletcher32=checksum)


def free_bytes(directory) -> int | None:
    """Bytes an unprivileged process may still write in ``directory``'s file system."""
    try:
        st = os.statvfs(directory)
    except (AttributeError, OSError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (plain POSIX writes: a full
    disk is an OSError here, not an HDF5 failure with half-open objects)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open a directory; the rename is still done
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _remove_dead_temps(directory: str, name: str) -> None:
    """Remove `.NAME.tmp-PID` files of processes that no longer run: a save killed
    midway (kill -9) leaves its temporary file, which nothing else would ever remove.
    A live PID's file is another writer's, mid-save: it is left alone."""
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):]
        if not entry.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)           # signal 0: does the process exist?
            continue
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue                       # someone else's process, or no such PID value
        try:
            os.remove(os.path.join(directory, entry))
        except OSError:
            pass


def save_checkpoint(path, cfg: DrawConfig, params: dict, opt_state: Optional[dict] = None,
                    epoch: int = 0, rng_state: Optional[dict] = None,
                    train_cfg: Optional[dict] = None, extra: Optional[dict] = None,
                    ema: Optional[dict] = None) -> None:
    """Write a checkpoint atomically to ``path`` (an existing file there is replaced).

    cfg: DrawConfig (or its dict); params: {name: (...)}; opt_state: adam_init-style
    {"m", "v", "step"} or None; ema: {name: (...)} with params' names and shapes, or
    None (no /ema group); rng_state, train_cfg (dict or TrainConfig), extra:
    JSON-serializable (NumPy scalars/arrays allowed; tuples come back as lists).
    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    # Validate and convert everything before touching the disk.
    if isinstance(cfg, dict):
        try:
            cfg = DrawConfig.from_dict(cfg)
        except ValueError as e:
            raise CheckpointError(f"bad model config: {e}") from None
    if not isinstance(cfg, (DrawConfig, ClassifierConfig)):
        raise CheckpointError(f"cfg must be a DrawConfig or ClassifierConfig, "
                              f"got {type(cfg).__name__}")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise CheckpointError(f"epoch must be a non-negative integer, got {epoch!r}")
    host_params = _host_arrays(params, "params")
    host_opt = None
    if opt_state is not None:
        if not isinstance(opt_state, dict) or not {"m", "v", "step"} <= set(opt_state):
            raise CheckpointError("opt_state must be a dict with keys 'm', 'v' and 'step'")
        host_opt = {"m": _host_arrays(opt_state["m"], "opt_state['m']"),
                    "v": _host_arrays(opt_state["v"], "opt_state['v']"),
                    "step": int(opt_state["step"])}
    host_ema = None
    if ema is not None:
        host_ema = _host_arrays(ema, "ema")
        check_compatible(host_ema, host_params, "the moving average (ema)")
    if train_cfg is not None and hasattr(train_cfg, "to_dict"):
        train_cfg = train_cfg.to_dict()
    json_attrs = {}
    if rng_state is not None:
        json_attrs["rng_state"] = _to_json(rng_state, "rng_state")
    if train_cfg is not None:
        json_attrs["train_config"] = _to_json(train_cfg, "train_cfg")
    json_attrs["extra"] = _to_json({} if extra is None else extra, "extra")

    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot save checkpoint {path}: directory {directory} does not exist")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["epoch"] = int(epoch)
        if isinstance(cfg, ClassifierConfig):
            f.attrs["model"] = "classifier"
        for key, text in json_attrs.items():
            f.attrs[key] = text
        g = f.create_group("config", track_order=True)
        for key, value in cfg.to_dict().items():
            g.attrs[key] = value
        _write_arrays(f.create_group("params", track_order=True), host_params)
        if host_opt is not None:
            g = f.create_group("optimizer")
            g.attrs["step"] = host_opt["step"]
            _write_arrays(g.create_group("m", track_order=True), host_opt["m"])
            _write_arrays(g.create_group("v", track_order=True), host_opt["v"])
        if host_ema is not None:
            _write_arrays(f.create_group("ema", track_order=True), host_ema)
        # Last: the digest of the attributes as the file holds them and of the arrays.
        arrays = {"params": host_params}
        if host_opt is not None:
            arrays.update({"optimizer/m": host_opt["m"], "optimizer/v": host_opt["v"]})
        if host_ema is not None:
            arrays["ema"] = host_ema
        f.attrs[DIGEST_ATTR] = content_digest(f, arrays)
    data = buffer.getbuffer()
    free = free_bytes(directory)
    if free is not None and free < len(data) + SPACE_MARGIN:
        raise DiskFullError(f"no space left on {directory} to save checkpoint {path} "
                            f"({len(data):,} bytes needed, {free:,} free)", directory)
    _remove_dead_temps(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on {directory} to save checkpoint {path} "
                                f"({e.strerror})", directory) from e
        if isinstance(e, OSError):  # permissions, I/O errors
            raise CheckpointError(f"cannot save checkpoint {path}: {e}") from e
        raise
    _fsync_path(directory, directory=True)  # make the rename itself durable


# ----------------------------------------------------------------------------- load

def expected_shapes(cfg) -> dict:
    """name -> shape of every parameter of the model ``cfg`` describes (DRAW or the
    classifier): the shapes a checkpoint's datasets are checked against before reading."""
    if isinstance(cfg, ClassifierConfig):
        from .reference.classifier import param_shapes
    else:
        from .model import param_shapes
    return {name: tuple(int(n) for n in shape) for name, shape in param_shapes(cfg).items()}


def _check_memory_of(f, shapes: dict, path) -> None:
    """CheckpointError when the arrays that the file's config gives its model (parameters,
    Adam's two moments, the moving average, as far as the file has them; 8 bytes a value
    at most) would not fit in memory: the declared shapes are checked against the config,
    so a config claiming a huge model, with datasets declared to match it, would
    otherwise be allocated as it is read."""
    from .guards import MemoryEstimateError, check_memory
    values = sum(int(np.prod(s)) for s in shapes.values())
    copies = 1 + (2 if "optimizer" in f else 0) + (1 if "ema" in f else 0)
    try:
        check_memory(8 * values * copies, f"reading its {values:,} parameters")
    except MemoryEstimateError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None


def _read_arrays(group, where: str, path, shapes: Optional[dict]) -> dict:
    """The datasets of a group as NumPy arrays. With ``shapes`` (name -> expected shape),
    each dataset's declared shape and dtype are checked before anything is read: a
    model parameter may hold at most the values of its shape, any other name at most
    those of the whole model, so that a file declaring a huge dataset is refused, not
    allocated (check_compatible then compares the exact shapes)."""
    bound = None if shapes is None else max(1, sum(int(np.prod(s)) for s in shapes.values()))
    out = {}
    for name, ds in group.items():
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(f"checkpoint {path}: {where}/{name} is not a dataset")
        declared = tuple(int(n) for n in ds.shape) if ds.shape is not None else None
        if ds.dtype.kind not in "biuf" or ds.dtype.itemsize > 8 or declared is None:
            raise CheckpointError(f"checkpoint {path}: array {where}/{name} has dtype "
                                  f"{ds.dtype} and shape {ds.shape}, not a numeric array")
        if shapes is not None:
            allowed = int(np.prod(shapes[name])) if name in shapes else bound
            if int(np.prod(declared)) > allowed:
                wanted = (f"the model's config gives it shape {shapes[name]}" if name in shapes
                          else f"the whole model has {bound:,} values")
                raise CheckpointError(f"checkpoint {path}: array {where}/{name} is declared "
                                      f"with shape {declared}, but {wanted}; the file is "
                                      "damaged or not this model's")
        try:
            out[name] = np.asarray(ds[()])
        except (OSError, RuntimeError, ValueError) as e:   # e.g. a Fletcher-32 mismatch
            raise CheckpointError(f"checkpoint {path}: array {where}/{name} is damaged "
                                  f"({e})") from None
    return out


def _check_finite(arrays: dict, where: str, path) -> None:
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"checkpoint {path}: array {where}/{name} holds {bad} NaN "
                                  f"or infinite value{'s' if bad > 1 else ''} of {a.size}; "
                                  "the file is damaged or was saved from a diverged model")


def _need_group(f, name: str, path):
    if name not in f or not isinstance(f[name], h5py.Group):
        raise CheckpointError(f"checkpoint {path}: group '{name}' is missing")
    return f[name]


def _read_raw(f, shapes: Optional[dict], path) -> dict:
    """{"params", "optimizer/m", "optimizer/v", "ema"} -> {name: array}, for the groups
    the file holds (params always)."""
    arrays = {"params": _read_arrays(_need_group(f, "params", path), "params", path, shapes)}
    if "optimizer" in f:
        g = _need_group(f, "optimizer", path)
        for key in ("m", "v"):
            arrays[f"optimizer/{key}"] = _read_arrays(_need_group(g, key, path),
                                                      f"optimizer/{key}", path, shapes)
    if "ema" in f:
        arrays["ema"] = _read_arrays(_need_group(f, "ema", path), "ema", path, shapes)
    return arrays


def _digest_value(value) -> tuple:
    """(a tag naming the type, dtype and shape; the bytes) of an attribute value."""
    if isinstance(value, bytes):
        return "bytes", value
    if isinstance(value, str):
        return "str", value.encode("utf-8", "surrogatepass")
    a = np.asarray(value)
    if a.dtype.kind in "OSU":
        return f"text{a.shape}", json.dumps([str(v) for v in a.ravel()]).encode("utf-8")
    return f"{a.dtype.str}{a.shape}", np.ascontiguousarray(a).tobytes()


def content_digest(f, arrays: dict) -> str:
    """sha256 (hex) over everything a checkpoint loads, in a canonical order: the root
    attributes but the digest, the attributes of /config and /optimizer (sorted by
    name), then each group of ``arrays`` (as _read_raw returns them; groups and names
    sorted), each array as its name, dtype, shape and bytes."""
    h = hashlib.sha256()

    def feed(kind: str, name: str, tag: str, data: bytes) -> None:
        h.update(f"{kind}\0{name}\0{tag}\0{len(data)}\0".encode("utf-8", "surrogatepass"))
        h.update(data)

    for where, attrs in (("/", f.attrs), ("config", f["config"].attrs if "config" in f
                                          else {}),
                         ("optimizer", f["optimizer"].attrs if "optimizer" in f else {})):
        for key in sorted(attrs.keys()):
            if where == "/" and key == DIGEST_ATTR:
                continue
            feed("attr", f"{where}@{key}", *_digest_value(attrs[key]))
    for where in sorted(arrays):
        feed("group", where, "", b"")
        for name in sorted(arrays[where]):
            a = np.asarray(arrays[where][name])
            a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # one byte order
            feed("array", f"{where}/{name}", f"{a.dtype.str}{a.shape}", a.tobytes())
    return h.hexdigest()


def _check_rng_state(state, path) -> None:
    """Refuse an rng_state that does not name a known bit generator or does not fit it
    (the loader instantiates the generator it names)."""
    if state is None:
        return
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or name not in BIT_GENERATORS:
        raise CheckpointError(f"checkpoint {path}: rng_state names bit generator {name!r}; "
                              f"only {', '.join(BIT_GENERATORS)} are accepted")
    try:
        getattr(np.random, name)().state = state
    except (TypeError, ValueError, KeyError, OverflowError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path}: rng_state is not a valid {name} state "
                              f"({e})") from None


def _check_train_config(value, model: str, path) -> None:
    """Refuse a train_config that its config class cannot read (a null or list field)."""
    if value is None:
        return
    from .config import ClassifyConfig, TrainConfig
    config_cls = ClassifyConfig if model == "classifier" else TrainConfig
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {path}: train_config is a {type(value).__name__}, "
                              "not a JSON object")
    try:
        config_cls.from_dict(dict(value))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: train_config is not a valid "
                              f"{config_cls.__name__} ({e})") from None


def _read(f, path) -> Checkpoint:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if fmt is None:
        raise CheckpointError(f"{path} is an HDF5 file but not an npdraw checkpoint "
                              "(no 'format' attribute)")
    if fmt != FORMAT:
        raise CheckpointError(f"{path} is not an npdraw checkpoint (format {fmt!r}, "
                              f"expected {FORMAT!r})")
    if "format_version" not in f.attrs:
        raise CheckpointError(f"checkpoint {path} has no 'format_version' attribute")
    version = int(f.attrs["format_version"])
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {version}; "
                              f"this npdraw reads version {FORMAT_VERSION}")

    cfg_group = _need_group(f, "config", path)
    try:
        model = f.attrs.get("model", "draw")
        model = model.decode("utf-8", "replace") if isinstance(model, bytes) else str(model)
        if model not in ("draw", "classifier"):
            raise CheckpointError(f"checkpoint {path}: unknown model kind {model!r}")
        config_cls = ClassifierConfig if model == "classifier" else DrawConfig
        cfg = config_cls.from_dict({k: v for k, v in cfg_group.attrs.items()})
        shapes = expected_shapes(cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model config: {e}") from None
    if "optimizer" in f and "step" not in _need_group(f, "optimizer", path).attrs:
        raise CheckpointError(f"checkpoint {path}: optimizer has no 'step' attribute")
    _check_memory_of(f, shapes, path)
    arrays = _read_raw(f, shapes, path)
    digest = None
    if DIGEST_ATTR in f.attrs:
        stored = f.attrs[DIGEST_ATTR]
        stored = stored.decode("utf-8", "replace") if isinstance(stored, bytes) else str(stored)
        digest = content_digest(f, arrays)
        if stored != digest:
            raise CheckpointError(f"checkpoint {path} does not match its sha256 digest: the "
                                  "file was changed or damaged after it was saved")
    for where, group in arrays.items():
        _check_finite(group, where, path)
    params = arrays["params"]
    opt_state = None
    if "optimizer" in f:
        opt_state = {"m": arrays["optimizer/m"], "v": arrays["optimizer/v"],
                     "step": int(f["optimizer"].attrs["step"])}
    ema = arrays.get("ema")
    if ema is not None:
        check_compatible(ema, params, f"the moving average (ema) of checkpoint {path}")

    json_values = {key: (_from_json(f.attrs[key], key, path) if key in f.attrs else None)
                   for key in ("rng_state", "train_config", "extra")}
    _check_rng_state(json_values["rng_state"], path)
    _check_train_config(json_values["train_config"], model, path)
    return Checkpoint(cfg=cfg, params=params, opt_state=opt_state, ema=ema,
                      epoch=int(f.attrs.get("epoch", 0)),
                      rng_state=json_values["rng_state"],
                      train_cfg=json_values["train_config"],
                      extra=json_values["extra"] or {}, digest=digest)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; arrays come back as NumPy.

    Any problem (missing, not HDF5, truncated, wrong format, missing groups) is a
    CheckpointError that names the path.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not is_hdf5:
        raise CheckpointError(f"{path} is not an HDF5 file (not an npdraw checkpoint)")
    try:
        with h5py.File(path, "r") as f:
            return _read(f, path)
    except CheckpointError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError,
            OverflowError, AttributeError, SystemError, UnicodeError) as e:
        # h5py reports damaged files (a flipped bit in HDF5's own structures) through
        # many exception types.
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({e})") from None


def check_compatible(ckpt_params: dict, params: dict, what: str = "the checkpoint") -> None:
    """Raise CheckpointError unless both dicts have the same names and shapes.

    ckpt_params, params: {name: (...)} (NumPy or CuPy); ``what`` names ckpt_params in the
    message (a checkpoint's parameters, or its moving average of them). The message
    names the first mismatch, taking the model's names in order and then any extra names.
    """
    for name, p in params.items():
        if name not in ckpt_params:
            raise CheckpointError(f"{what} lacks parameter {name!r} "
                                  f"(model shape {tuple(p.shape)})")
        a = ckpt_params[name]
        if tuple(a.shape) != tuple(p.shape):
            raise CheckpointError(f"parameter {name!r} has shape {tuple(a.shape)} in "
                                  f"{what} but {tuple(p.shape)} in the model")
    for name, a in ckpt_params.items():
        if name not in params:
            raise CheckpointError(f"{what} has parameter {name!r} (shape {tuple(a.shape)}) "
                                  "that the model does not have")


def check_complete(ckpt: Checkpoint, path) -> None:
    """Raise CheckpointError unless the checkpoint holds every parameter its own config
    needs, with its shape (and no other), so that no later step meets a KeyError."""
    shapes = {name: np.broadcast_to(np.float32(0), shape)     # shapes only, no memory
              for name, shape in expected_shapes(ckpt.cfg).items()}
    check_compatible(ckpt.params, shapes, f"checkpoint {path}")
