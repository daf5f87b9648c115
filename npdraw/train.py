"""Training, evaluation and sample rendering: the only module with an epoch loop.

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
epoch unless ``tcfg.eval_noise`` is "fixed": ``eval_noise_rng``), so they never disturb
the training stream.

Moving average (``tcfg.ema_decay`` d > 0): after every Adam step the run updates
ema <- d ema + (1 - d) params (optim.ema_update; Polyak averaging). The EMA is the
run's model: it is what the valid and test splits score, what selects best.h5, what
the samples show and what ``export_model`` ships; the training bound stays that of
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
    J  importance samples (IWAE; the argument ``K`` of evaluate_iwae)
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import backend
from . import checkpoint as ckpt_lib
from . import distributed
from . import guards
from . import images as images_lib
from . import model as model_lib
from . import monitor
from . import optim
from .config import RESUME_OVERRIDES, ClassifierConfig, ClassifyConfig, DrawConfig, TrainConfig
from .progress import Progress

# c0 = logit(clip(mean training image, C0_CLIP, 1 - C0_CLIP)); see init_model.
C0_CLIP = 1e-3
# Examples per forward pass during evaluation (independent of the training batch size).
EVAL_BATCH = 500
# The grid of generated images written after each epoch.
SAMPLE_ROWS = 8
SAMPLE_COLS = 8


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


# ----------------------------------------------------------------------------- helpers

def _device_of(params: dict) -> str:
    """'gpu' when the parameters are CuPy arrays, else 'cpu'."""
    for value in params.values():
        return "gpu" if backend.is_gpu_array(value) else "cpu"
    return "cpu"


def _params_dtype(params: dict):
    for value in params.values():
        return np.dtype(value.dtype)
    return np.dtype("float32")


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


def _new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def _rng_from_state(state) -> np.random.Generator:
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


def _derived_rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for evaluation/sampling noise, fixed by (seed, stream...)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])


def _host_noise(rng: np.random.Generator, cfg: DrawConfig, batch: int, dtype) -> np.ndarray:
    """eps (T, B, Z) standard normal, drawn on the host in ``dtype``."""
    return rng.standard_normal((cfg.T, batch, cfg.z_dim), dtype=np.dtype(dtype))


def _noise(rng: np.random.Generator, cfg: DrawConfig, batch: int, dtype, device: str):
    """eps (T, B, Z) standard normal, drawn on the host in ``dtype`` then moved to ``device``."""
    return backend.to_device(_host_noise(rng, cfg, batch, dtype), device)


def _examples(eps: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The noise of examples lo..hi-1 of a batch: eps (T, B, Z) -> (T, hi - lo, Z),
    contiguous (eps itself when that is the whole batch)."""
    return eps if (lo, hi) == (0, eps.shape[1]) else np.ascontiguousarray(eps[:, lo:hi])


def _cap(x: np.ndarray, subset: int) -> np.ndarray:
    return x if not subset else x[:subset]


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.2f}"


# ----------------------------------------------------------------------------- memory

def _per_example_floats(cfg: DrawConfig, training: bool) -> int:
    """Floats one example takes in a forward pass (with the caches backward keeps when
    ``training``): model.forward's stacked (features, T+1, B) buffers, the (T, B, .)
    gate, posterior and sigmoid(canvas) buffers, and per glimpse the LSTM, latent,
    canvas and attention (glimpse, patch, filterbank) arrays. An upper bound: it is
    checked against tracemalloc's peaks in tests/test_guards.py."""
    T, D, Z, He, Hd = cfg.T, cfg.D, cfg.z_dim, cfg.enc_dim, cfg.dec_dim
    rows = 2 + Z + Hd + (cfg.read_dim if cfg.attention else D) + He
    stacked = rows * (T + 1) + T * (2 * Z + 1 + D + 4 * He + 4 * Hd)
    per_glimpse = 2 * He + 2 * Hd + 4 * Z + 3 * D
    if cfg.attention:
        C, H, W, Nr, Nw = cfg.channels, cfg.height, cfg.width, cfg.read_n, cfg.write_n
        per_glimpse += (4 * C * Nr * Nr + 2 * C * Nw * Nw + 4 * (Nr + Nw) * (H + W)
                        + 2 * C * H * W)
    return stacked + (T if training else 2) * per_glimpse + 4 * D


def model_bytes(cfg: DrawConfig, batch: int, itemsize: int, training: bool,
                ema: bool = False) -> int:
    """Estimated peak bytes of one batch: training (forward, backward, gradients and Adam
    state, and the parameters' moving average with ``ema``) or a forward pass
    (evaluation, sampling); ``itemsize``: 4 or 8."""
    n_params = sum(int(np.prod(shape)) for shape in model_lib.param_shapes(cfg).values())
    param_copies = (4 if training else 2) + int(ema)   # params, grads, Adam m and v, EMA
    return itemsize * (int(batch) * _per_example_floats(cfg, training) + param_copies * n_params)


def sample_bytes(cfg: DrawConfig, rows: int, cols: int, scale: int) -> int:
    """Estimated peak bytes of generating and rendering a rows x cols grid of samples:
    the decoder's forward pass, the canvases (T, B, D), and T RGB frames
    (rows*(H*scale+1)+1, cols*(W*scale+1)+1, 3) held twice (the pictures and their GIF
    encoding) plus one frame's tiles."""
    count, scale = int(rows) * int(cols), max(int(scale), 1)
    frame = (rows * (cfg.height * scale + 1) + 1) * (cols * (cfg.width * scale + 1) + 1) * 3
    tiles = count * cfg.height * cfg.width * scale * scale * 3
    return (model_bytes(cfg, count, 8, training=False) + 8 * cfg.T * count * cfg.D
            + 2 * cfg.T * frame + 2 * tiles)


# ----------------------------------------------------------------------------- evaluation

def eval_noise_rng(tcfg: TrainConfig, epoch: int, split: int) -> np.random.Generator:
    """The generator of the noise that scores ``split`` (0 valid, 1 test) after ``epoch``:
    its own for each epoch (tcfg.eval_noise "epoch"), or the same at every epoch ("fixed"),
    which makes the bounds of two epochs a paired comparison of their models."""
    if tcfg.eval_noise == "fixed":
        return _derived_rng(tcfg.seed, 4, split)
    return _derived_rng(tcfg.seed, 1, epoch, split)


def evaluate_bound(params: dict, cfg: DrawConfig, x: np.ndarray, batch_size: int,
                   rng: np.random.Generator, comm=None, progress: bool = False,
                   label: str = "evaluating") -> float:
    """Mean negative variational bound (L^x + L^z, nats per example) over all of ``x``.

    x: (E, D) host array in [0, 1]; one fresh noise draw per example from ``rng``.
    Returns NaN for an empty ``x``. comm: a distributed communicator whose ranks each
    take their slice of every batch (the same figures as one process, up to rounding;
    every rank gets the result). progress: a bar on stderr over the batches, named label.
    """
    n = int(x.shape[0])
    if n == 0:
        return float("nan")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device, dtype = _device_of(params), _params_dtype(params)
    comm = distributed.SingleProcess() if comm is None else comm
    total = 0.0
    bar = Progress(f"{label} {n} images", (n + batch_size - 1) // batch_size, progress,
                   rate_unit="it/s")
    for start in range(0, n, batch_size):
        batch = np.asarray(x[start:start + batch_size], dtype=dtype)
        eps = _host_noise(rng, cfg, batch.shape[0], dtype)      # the whole batch's, on every rank
        lo, hi = comm.shard(batch.shape[0])
        if hi > lo:
            per_example, _ = model_lib.loss_only(
                params, cfg, backend.to_device(batch[lo:hi], device),
                backend.to_device(_examples(eps, lo, hi), device))
            total += float(np.sum(backend.to_numpy(per_example), dtype=np.float64))
        bar.update(start // batch_size + 1)
    bar.close()
    return float(comm.sum([total])[0]) / n


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def evaluate_iwae_and_bound(params: dict, cfg: DrawConfig, x: np.ndarray, K: int,
                            batch_size: int, rng: np.random.Generator, comm=None,
                            progress: bool = False):
    """Both estimates from one pass of K noise draws per example.

    Returns (iwae_nll, bound_nll), nats per example:
      iwae_nll  = -mean_n [logsumexp_k log w_nk - log K],
                  log w = log p(x|z) + log p(z) - log q(z|x)   (Burda et al. 2016)
      bound_nll = mean over n and k of the model's per-example loss L^x + L^z.
    With K = 1 the IWAE estimate is a (noisier) single-sample bound; as K grows it
    tightens towards -log p(x), so iwae_nll <= bound_nll in expectation.
    comm: as in evaluate_bound. progress: a bar on stderr over the K passes of
    all batches, with the running bound (of this rank's examples).
    """
    n = int(x.shape[0])
    if K < 1:
        raise ValueError(f"K (importance samples) must be at least 1, got {K}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if n == 0:
        return float("nan"), float("nan")
    device, dtype = _device_of(params), _params_dtype(params)
    comm = distributed.SingleProcess() if comm is None else comm
    iwae_total, bound_total = 0.0, 0.0
    n_batches = (n + batch_size - 1) // batch_size
    bar = Progress(f"evaluating {n} images, K={K}", n_batches * K, progress, rate_unit="it/s")
    seen = 0
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            batch = np.asarray(x[start:start + batch_size], dtype=dtype)
            lo, hi = comm.shard(batch.shape[0])
            xb = backend.to_device(batch[lo:hi], device)
            log_w = np.empty((K, hi - lo), dtype=np.float64)
            for k in range(K):
                eps = _host_noise(rng, cfg, batch.shape[0], dtype)  # the whole batch: every rank
                bar.update(i * K + k + 1, f"bound {bound_total / max(seen, 1):.2f}")
                if hi == lo:
                    continue
                per_example, stats = model_lib.loss_only(
                    params, cfg, xb, backend.to_device(_examples(eps, lo, hi), device),
                    return_terms=True)
                log_w[k] = backend.to_numpy(stats["log_weight"]).astype(np.float64)
                bound_total += float(np.sum(backend.to_numpy(per_example), dtype=np.float64))
                seen += hi - lo
            iwae_total += float(np.sum(_logsumexp(log_w, axis=0) - math.log(K)))
    finally:
        bar.close()
    iwae_total, bound_total = comm.sum([iwae_total, bound_total])
    return -float(iwae_total) / n, float(bound_total) / (n * K)


def evaluate_iwae(params: dict, cfg: DrawConfig, x: np.ndarray, K: int, batch_size: int,
                  rng: np.random.Generator, comm=None) -> float:
    """Importance-weighted estimate of -log p(x) (nats per example) with K samples."""
    return evaluate_iwae_and_bound(params, cfg, x, K, batch_size, rng, comm)[0]


# ----------------------------------------------------------------------------- samples

def window_box(cx: float, cy: float, stride: float, n: int, height: int, width: int,
               scale: int = 1):
    """Pixel box (x0, y0, x1, y1), inclusive 0-based indices of a ``scale``-times enlarged
    image, of the region a window covers, or None when it lies wholly outside.

    The window with centre (cx, cy) in 1-based pixel coordinates (pixel a covers
    [a - 0.5, a + 0.5]) and stride delta covers [cx - delta*N/2, cx + delta*N/2]
    horizontally (its N filter centres and half a stride on either side), likewise
    vertically. In 0-based continuous coordinates (pixel j covers [j, j + 1]) that is
    shifted by -0.5; the box is that interval scaled and clipped to the image.
    """
    half = abs(float(stride)) * n / 2.0
    left, right = (cx - 0.5 - half) * scale, (cx - 0.5 + half) * scale
    top, bottom = (cy - 0.5 - half) * scale, (cy - 0.5 + half) * scale
    w, h = width * scale, height * scale
    if not all(math.isfinite(v) for v in (left, right, top, bottom)):
        return None
    x0, x1 = int(math.floor(left)), int(math.ceil(right)) - 1
    y0, y1 = int(math.floor(top)), int(math.ceil(bottom)) - 1
    x1, y1 = max(x1, x0), max(y1, y0)
    if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
        return None
    return max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)


def _tile_rgb(image, shape, scale: int) -> np.ndarray:
    """One flattened image (D,) in [0, 1] -> uint8 RGB (H*scale, W*scale, 3)."""
    c, h, w = shape
    tile = images_lib.to_uint8(np.asarray(image).reshape(c, h, w)).transpose(1, 2, 0)
    if c == 1:
        tile = np.repeat(tile, 3, axis=2)
    elif c != 3:
        raise ValueError(f"only grey or RGB images can be drawn, got {c} channels")
    return images_lib.upscale(tile, scale) if scale > 1 else tile


def _window_n(n_value, t: int, i: int) -> int:
    """The window size N: an int, or a (T, B) array."""
    if np.ndim(n_value) == 0:
        return int(n_value)
    return int(np.asarray(n_value)[t, i])


def render_frames(canvases, windows, shape, rows: int, cols: int, boxes: bool = False,
                  scale: int = 1) -> list:
    """Generated canvases -> one RGB uint8 grid per glimpse.

    canvases: (T, B, D) probabilities, B >= rows*cols (the first rows*cols are shown);
    windows: None or the model's dict of (T, B) arrays "cx", "cy", "stride", "N";
    boxes: outline each glimpse's write window in red (needs windows).
    Returns a list of T arrays (rows*(H*scale+1)+1, cols*(W*scale+1)+1, 3) uint8, as
    laid out by images.image_grid.
    """
    canvases = np.asarray(backend.to_numpy(canvases))
    t_steps, batch = canvases.shape[0], canvases.shape[1]
    count = rows * cols
    if batch < count:
        raise ValueError(f"{rows}x{cols} grid needs {count} images, got {batch}")
    c, h, w = shape
    scale = max(int(scale), 1)
    win = None
    if boxes and windows is not None:
        win = {k: np.asarray(backend.to_numpy(v)) for k, v in windows.items()}
    frames = []
    for t in range(t_steps):
        tiles = []
        for i in range(count):
            tile = _tile_rgb(canvases[t, i], shape, scale)
            if win is not None:
                box = window_box(float(win["cx"][t, i]), float(win["cy"][t, i]),
                                 float(win["stride"][t, i]), _window_n(win["N"], t, i),
                                 h, w, scale)
                if box is not None:
                    tile = images_lib.draw_box(tile, *box, color=(255, 0, 0))
            tiles.append(tile)
        grid_in = np.stack(tiles).transpose(0, 3, 1, 2)          # (count, 3, H*s, W*s)
        frames.append(images_lib.image_grid(grid_in, (3, h * scale, w * scale), rows, cols))
    return frames


def render_glimpse_frames(images, windows, shape, rows: int, cols: int, scale: int = 2) -> list:
    """The classifier's read windows over its input images, one grid per glimpse.

    images: (B, D) in [0, 1], B >= rows*cols;  windows: glimpse_windows' dict of (T, B)
    arrays "cx", "cy", "stride" and "N". Frame t shows glimpses 1..t+1, each window
    outlined in its own colour (images.series_colors: tab10 up to 10 glimpses), so the
    final frame holds all T windows.
    -> T arrays (rows*(H*scale+1)+1, cols*(W*scale+1)+1, 3) uint8.
    """
    images = np.asarray(backend.to_numpy(images))
    count = rows * cols
    if images.shape[0] < count:
        raise ValueError(f"{rows}x{cols} grid needs {count} images, got {images.shape[0]}")
    c, h, w = shape
    scale = max(int(scale), 1)
    t_steps = np.shape(windows["cx"])[0]
    colors = images_lib.series_colors(t_steps)
    tiles = [_tile_rgb(images[i], shape, scale) for i in range(count)]
    frames = []
    for t in range(t_steps):
        for i in range(count):
            box = window_box(float(windows["cx"][t, i]), float(windows["cy"][t, i]),
                             float(windows["stride"][t, i]), _window_n(windows["N"], t, i),
                             h, w, scale)
            if box is not None:
                tiles[i] = images_lib.draw_box(tiles[i], *box,
                                               color=tuple(int(v) for v in colors[t]))
        grid_in = np.stack(tiles).transpose(0, 3, 1, 2)
        frames.append(images_lib.image_grid(grid_in, (3, h * scale, w * scale), rows, cols))
    return frames


def generate_samples(params: dict, cfg: DrawConfig, count: int, rng: np.random.Generator):
    """Draw ``count`` images from the prior: returns (canvases (T, B, D), windows) on host."""
    device, dtype = _device_of(params), _params_dtype(params)
    eps = _noise(rng, cfg, count, dtype, device)
    canvases, windows = model_lib.generate(params, cfg, eps)
    canvases = backend.to_numpy(canvases)
    if windows is not None:
        windows = _host_windows(windows)
    return canvases, windows


def _host_windows(windows):
    return {k: (int(v) if isinstance(v, (int, np.integer)) else backend.to_numpy(v))
            for k, v in windows.items()}


def reconstruct_images(params: dict, cfg: DrawConfig, x: np.ndarray, rng: np.random.Generator):
    """Rebuild images with the inference network, glimpse by glimpse (model.reconstruct),
    with eq 6's noise from ``rng``: returns (canvases (T, B, D), windows, kl (T, B)) on
    the host; windows is None without attention, else {"read": ..., "write": ...}."""
    device, dtype = _device_of(params), _params_dtype(params)
    eps = _noise(rng, cfg, int(x.shape[0]), dtype, device)
    x = backend.to_device(np.asarray(x, dtype=dtype), device)
    canvases, windows, kl = model_lib.reconstruct(params, cfg, x, eps)
    if windows is not None:
        windows = {which: _host_windows(w) for which, w in windows.items()}
    return backend.to_numpy(canvases), windows, backend.to_numpy(kl)


def render_reconstruction_frames(images, canvases, windows, shape, cols: int,
                                 scale: int = 2) -> list:
    """One RGB frame per glimpse t: each image with glimpse t's read window (red) beside
    its canvas after glimpse t with the write window (red), ``cols`` such pairs a row.

    images: (B, D) in [0, 1]; canvases: (T, B, D); windows: reconstruct_images' (or None).
    Laid out by render_frames as a grid of pairs (the last row padded with blank tiles).
    """
    images = np.asarray(backend.to_numpy(images))
    canvases = np.asarray(backend.to_numpy(canvases))
    t_steps, count = canvases.shape[0], images.shape[0]
    cols = max(1, min(int(cols), count))
    rows = -(-count // cols)
    slots = rows * cols
    tiles = np.zeros((t_steps, 2 * slots, canvases.shape[2]), canvases.dtype)
    tiles[:, 0:2 * count:2] = images[None]
    tiles[:, 1:2 * count:2] = canvases
    boxes = None
    if windows is not None:
        boxes = {}
        for key in ("cx", "cy", "stride"):
            both = np.full((t_steps, 2 * slots), np.nan)
            both[:, 0:2 * count:2] = windows["read"][key]
            both[:, 1:2 * count:2] = windows["write"][key]
            boxes[key] = both
        sizes = np.zeros((t_steps, 2 * slots), np.int64)
        sizes[:, 0::2], sizes[:, 1::2] = windows["read"]["N"], windows["write"]["N"]
        boxes["N"] = sizes
    return render_frames(tiles, boxes, shape, rows, 2 * cols, boxes=boxes is not None,
                         scale=scale)


def reconstruction(params: dict, cfg: DrawConfig, x: np.ndarray, count: int, cols: int,
                   seed: int, scale: int = 2) -> dict:
    """DRAW rebuilding ``count`` images of ``x`` (data.spread_subset with ``seed``), one
    frame per glimpse (render_reconstruction_frames), eq 6's noise from ``seed`` too.
    -> {"indices" (n,), "canvases" (T, n, D), "kl" (T, n) nats, "frames": T pictures}."""
    from . import data as data_lib
    indices = data_lib.spread_subset(len(x), count, seed)
    images = np.asarray(x[indices])
    canvases, windows, kl = reconstruct_images(params, cfg, images, _derived_rng(seed, 3))
    frames = render_reconstruction_frames(images, canvases, windows,
                                          (cfg.channels, cfg.height, cfg.width), cols, scale)
    return {"indices": indices, "canvases": canvases, "kl": kl, "frames": frames}


def _write_run_samples(run_dir: Path, params: dict, cfg: DrawConfig, seed: int) -> np.ndarray:
    """RUN/samples.png (final canvases) and RUN/samples.gif (all glimpses); the same
    prior noise every epoch, so the pictures of successive epochs compare directly.
    Returns samples.png's picture, uint8 (H, W, 3)."""
    canvases, _ = generate_samples(params, cfg, SAMPLE_ROWS * SAMPLE_COLS, _derived_rng(seed, 2))
    shape = (cfg.channels, cfg.height, cfg.width)
    frames = render_frames(canvases, None, shape, SAMPLE_ROWS, SAMPLE_COLS, boxes=False, scale=1)
    images_lib.save_png(run_dir / "samples.png", frames[-1])
    images_lib.save_gif(run_dir / "samples.gif", frames, duration=0.1, loop=0)
    return frames[-1]


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


def _unique_run_dir(out: Path, name: str) -> Path:
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


def _read_log(path: Path, warn=None) -> list:
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
    rows = _read_log(path, warn)
    if not rows:
        raise ValueError(f"{path} holds no epochs yet")
    return rows


def _append_log(path: Path, record: dict) -> None:
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


@contextlib.contextmanager
def _alone_on_root(comm):
    """Work that rank 0 does alone before the epoch loop (the lock, the run folder, its
    first files). Should it fail, the other ranks would wait for rank 0 in their next
    collective forever: under MPI its error, in one sentence, ends every rank."""
    try:
        yield
    except Exception as err:                 # noqa: BLE001 - any error leaves them waiting
        if comm.size > 1:
            comm.abort(str(err))
        raise


def _remove_stale_temps(run_dir: Path) -> None:
    """Temporary checkpoint files left by a process that was killed mid-save (the caller
    holds the run folder's lock, so no other process is writing them)."""
    for tmp in run_dir.glob(".*.h5.tmp-*"):
        try:
            tmp.unlink()
        except OSError:
            pass


def train_config_of(ckpt) -> TrainConfig | None:
    """The TrainConfig a checkpoint recorded, or None."""
    tc = getattr(ckpt, "train_cfg", None)
    if tc is None or isinstance(tc, TrainConfig):
        return tc
    if isinstance(tc, str):
        tc = json.loads(tc)
    return TrainConfig.from_dict(dict(tc))


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


def _save(path: Path, cfg, params, opt_state, epoch, rng, tcfg, extra, ema=None) -> None:
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


# ----------------------------------------------------------------------------- train

def train(cfg: DrawConfig | None, tcfg: TrainConfig, log=print, *, data=None,
          progress: bool = True, eval_batch: int = EVAL_BATCH,
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
            with _alone_on_root(comm):
                lock.acquire(run_dir)
        resume_ckpt = load_checkpoint(ckpt_path)
        saved_tcfg = train_config_of(resume_ckpt)
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
    guards.check_memory(model_bytes(cfg, tcfg.batch_size, dtype.itemsize, training=True,
                                    ema=tcfg.ema_decay > 0),
                        f"training this model ({_cfg_summary(cfg)}) with batches of "
                        f"{tcfg.batch_size}", data_bytes=0 if data is None else  # on --resume: later
                        sum(a.nbytes for a in (data.train, data.valid, data.test)))

    if data is None:
        data = load_data(tcfg, progress)
    check_data_shape(cfg, data.shape)
    train_x = np.asarray(_cap(data.train, tcfg.subset), dtype=dtype)
    valid_x = np.asarray(_cap(data.valid, tcfg.eval_subset), dtype=dtype)
    test_x = np.asarray(_cap(data.test, tcfg.eval_subset), dtype=dtype)
    n_train = int(train_x.shape[0])
    if n_train == 0:
        raise ValueError("the training split is empty")

    # ---- parameters, optimizer, RNG
    if resume_ckpt is not None:
        params, opt_state, rng, start_epoch, extra = _resumed_state(resume_ckpt, run_dir,
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
            old = load_checkpoint(tcfg.oldmodel)
            # the checkpoint's model: its moving average when it keeps one, as for
            # evaluate, sample and export
            old_params, old_is_average = model_params(old)
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
        params = arrays_to_device(params, device, dtype)
        opt_state = optim.adam_init(params)
        rng = _new_rng(tcfg.seed)
        start_epoch = 0
        best_valid, best_epoch = float("inf"), 0
        run_name = tcfg.name or _dt.datetime.now().strftime("draw-%Y%m%d-%H%M%S")
        if comm.is_root:
            with _alone_on_root(comm):
                run_dir = _unique_run_dir(Path(tcfg.out), run_name)
                lock.acquire(run_dir)
        run_dir = Path(comm.broadcast_text(str(run_dir) if comm.is_root else ""))
    if comm.is_root:
        _remove_stale_temps(run_dir)

    log_path = run_dir / "log.jsonl"
    ckpt_path = run_dir / "checkpoint.h5"

    if comm.is_root:
        with _alone_on_root(comm):
            try:
                images_lib.save_text(run_dir / "config.json", json.dumps(   # atomic
                    {"model": cfg.to_dict(), "train": tcfg.to_dict()}, indent=2) + "\n")
            except OSError as err:
                raise WriteFailed(guards.os_error_sentence(
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
            with _alone_on_root(comm):
                rows = [r for r in _read_log(log_path, warn=log)
                        if int(r["epoch"]) <= start_epoch]
                try:
                    images_lib.save_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))
                except OSError as err:
                    raise WriteFailed(guards.os_error_sentence(err, f"rewrite {log_path}"),
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
        with _alone_on_root(comm):
            _save(ckpt_path, cfg, params, opt_state, 0, rng, tcfg, extra_now(), ema)

    n_iter = (n_train + tcfg.batch_size - 1) // tcfg.batch_size
    epoch, it = start_epoch, 0

    def non_finite(what):
        """The error that stops the run; nothing from the bad epoch has been saved."""
        return NonFiniteLossError(f"{what}; training stopped. {ckpt_path} still holds epoch "
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
                train_x = np.asarray(data.fresh_train(_derived_rng(tcfg.seed, 3, epoch), n_train),
                                     dtype=dtype)
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
                                 else _host_noise(rng, cfg, idx.shape[0], dtype))
                    lo, hi = comm.shard(idx.shape[0])          # this rank's examples
                    mine = None                                # (loss, grads, stats) of them
                    if hi > lo:
                        xb = backend.to_device(train_x[idx[lo:hi]], device)
                        eps = backend.to_device(_examples(batch_eps, lo, hi), device)
                        mine = model_lib.loss_and_grads(params, cfg, xb, eps)
                    loss, grads, stats = comm.reduce_step(params, cfg.T, mine,
                                                          (hi - lo) / idx.shape[0])
                    # The next step's noise is drawn while this one's clipping and Adam run,
                    # on the core they leave idle (NumPy's generator releases the GIL). The
                    # draws come from rng in the same order as drawn inline.
                    next_eps = None if it == n_iter else noise_thread.submit(
                        _host_noise, rng, cfg, min(tcfg.batch_size, n_train - it * tcfg.batch_size),
                        dtype)
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
                valid_bound = evaluate_bound(model, cfg, valid_x, eval_batch,
                                             eval_noise_rng(tcfg, epoch, 0), comm,
                                             progress=shown, label="valid")
                test_bound = evaluate_bound(model, cfg, test_x, eval_batch,
                                            eval_noise_rng(tcfg, epoch, 1), comm,
                                            progress=shown, label="test")
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
            samples = _write_run_samples(run_dir, model, cfg, tcfg.seed) if comm.is_root else None
            record["wall_s"] = time.perf_counter() - t0
            record["time"] = _dt.datetime.now().isoformat(timespec="seconds")
            if comm.is_root:
                _commit_epoch(run_dir, record, is_best, cfg, params, opt_state, epoch, rng,
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
        msg, signum = _interrupted_message(interrupt, epoch, ckpt_path, run_dir)
        if comm.size > 1 and not isinstance(interrupt, distributed.Interrupted):
            comm.abort(msg + " (a second Ctrl-C: every rank was stopped at once)")
        log(msg)
        raise TrainingInterrupted(msg, run_dir, signum) from None
    except NonFiniteLossError as err:
        log(str(err))
        raise
    except (WriteFailed, OSError) as err:    # rank 0's files: a save, the log line, pictures
        msg = _write_failed_message(err, epoch, ckpt_path)
        if comm.size > 1:                    # the other ranks cannot know: stop them all
            comm.abort(msg)
        log(msg)
        raise WriteFailed(msg, run_dir) from None
    except Exception as error:               # noqa: BLE001 - under MPI: stop every rank
        if comm.size == 1:
            raise
        comm.abort(f"{type(error).__name__}: {error} (in epoch {epoch}); stopping every rank. "
                   f"{ckpt_path} holds the last completed epoch ({_saved_epoch(ckpt_path)}). "
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
        return arrays_to_device(saved, device)
    where = ("the checkpoint holds none: started from its parameters"
             if resume_ckpt is not None else "started from the initial parameters")
    log(f"moving average of the parameters ({about}): {where}")
    return optim.ema_init(params)


def fixed_noise_bound(params: dict, cfg: DrawConfig, x: np.ndarray, seed: int) -> float:
    """The mean bound over ``x`` in float64 with noise from ``default_rng(seed)``.

    params: {name: array}, cast to float64 on the host; x: (E, D) in [0, 1]. The
    figure depends on the parameters, the images and the seed only (float64 makes it
    independent of the BLAS kernel to about 1e-13), so it pins a shipped model to the
    number stated beside it.
    """
    params64 = {k: np.asarray(backend.to_numpy(v), dtype=np.float64) for k, v in params.items()}
    x64 = np.asarray(x, dtype=np.float64)
    eps = np.random.default_rng(seed).standard_normal((cfg.T, x64.shape[0], cfg.z_dim))
    per_example, _ = model_lib.loss_only(params64, cfg, x64, eps)
    return float(np.mean(per_example))


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
        rows = [r for r in _read_log(log_path) if int(r.get("epoch", 0)) <= int(ckpt.epoch)]
        if rows and int(rows[-1]["epoch"]) == int(ckpt.epoch):
            for key in ("train_bound", "valid_bound", "test_bound", "step", "lr"):
                info[key] = rows[-1].get(key)
            info["hours"] = sum(float(r.get("wall_s", 0.0)) for r in rows) / 3600.0
    if test_x is not None:
        x = np.asarray(test_x[:check_n])
        info["check"] = {"split": "test", "n": int(x.shape[0]), "seed": int(check_seed),
                         "dtype": "float64",
                         "bound": fixed_noise_bound(params, ckpt.cfg, x, check_seed)}
    ckpt_lib.save_checkpoint(out_path, ckpt.cfg, params, opt_state=None,
                             epoch=int(ckpt.epoch), train_cfg=train_config_of(ckpt),
                             extra=info)
    return info


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


def _interrupted_message(interrupt, epoch: int, ckpt_path: Path, run_dir: Path):
    """-> (the message that a run stopped by SIGINT/SIGTERM prints, the signal number)."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    return (f"interrupted{how} in epoch {epoch}; {ckpt_path} holds the last completed epoch "
            f"({_saved_epoch(ckpt_path)}). Continue with: --resume {run_dir}"), signum


def _write_failed_message(err, epoch: int, ckpt_path: Path) -> str:
    """The message of a failed save (WriteFailed) or log or picture write (OSError)."""
    if isinstance(err, WriteFailed):
        return str(err)
    return (guards.os_error_sentence(err, f"write the files of epoch {epoch}")
            + f"; {ckpt_path} holds the last completed epoch ({_saved_epoch(ckpt_path)})")


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


def _resumed_state(ckpt, run_dir: Path, device: str):
    """(params, opt_state, rng, epoch, extra) of a checkpoint being resumed, on ``device``."""
    if ckpt.opt_state is None:
        raise ValueError(f"cannot resume: {run_dir / 'checkpoint.h5'} holds no optimizer state")
    return (arrays_to_device(ckpt.params, device), _opt_state_to(ckpt.opt_state, device),
            _rng_from_state(ckpt.rng_state), int(ckpt.epoch), dict(ckpt.extra or {}))


def _commit_epoch(run_dir: Path, record: dict, is_best: bool, cfg, params, opt_state,
                  epoch, rng, tcfg, extra, ema=None) -> None:
    """An epoch's record into RUN/log.jsonl, then its state (with the EMA ``ema`` when
    not None) into best.h5 (when best) and checkpoint.h5. The log line comes first:
    should the saves not happen, a resume from the previous checkpoint drops this line
    again."""
    _append_log(run_dir / "log.jsonl", record)
    if is_best:
        _save(run_dir / "best.h5", cfg, params, opt_state, epoch, rng, tcfg, extra, ema)
    _save(run_dir / "checkpoint.h5", cfg, params, opt_state, epoch, rng, tcfg, extra, ema)


def _saved_epoch(path: Path):
    try:
        return f"epoch {int(ckpt_lib.load_checkpoint(path).epoch)}"
    except Exception:  # noqa: BLE001 - only for the message
        return "unreadable"


def _cfg_summary(cfg) -> str:
    if cfg is None:
        return "unknown config"
    att = f"attention {cfg.read_n},{cfg.write_n}" if cfg.attention else "no attention"
    return (f"{cfg.channels}x{cfg.height}x{cfg.width}, T={cfg.T}, {att}, "
            f"enc {cfg.enc_dim}, dec {cfg.dec_dim}, z {cfg.z_dim}"
            + (", peepholes" if cfg.peepholes else ""))


# ----------------------------------------------------------------------------- classifier

def classify_config_of(ckpt) -> ClassifyConfig | None:
    """The ClassifyConfig a classifier checkpoint recorded, or None."""
    tc = getattr(ckpt, "train_cfg", None)
    if tc is None or isinstance(tc, ClassifyConfig):
        return tc
    return ClassifyConfig.from_dict(dict(json.loads(tc) if isinstance(tc, str) else tc))


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
                     digits=None, progress: bool = True, eval_batch: int = EVAL_BATCH,
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
        resume_ckpt = load_checkpoint(ckpt_path)
        saved = classify_config_of(resume_ckpt)
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
        params, opt_state, rng, start_epoch, extra = _resumed_state(resume_ckpt, run_dir,
                                                                    device)
        clf.check_params(params, cfg)
        best_error = float(extra.get("best_valid_error", float("inf")))
        best_epoch = int(extra.get("best_epoch", 0))
    else:
        params = arrays_to_device(clf.init_params(cfg, ccfg.seed, ccfg.dtype), device, dtype)
        opt_state = optim.adam_init(params)
        rng = _new_rng(ccfg.seed)
        start_epoch, best_error, best_epoch = 0, float("inf"), 0
        run_name = ccfg.name or _dt.datetime.now().strftime("classify-%Y%m%d-%H%M%S")
        run_dir = _unique_run_dir(Path(ccfg.out), run_name)
        lock.acquire(run_dir)
    _remove_stale_temps(run_dir)
    log_path, ckpt_path = run_dir / "log.jsonl", run_dir / "checkpoint.h5"
    images_lib.save_text(run_dir / "config.json", json.dumps(   # atomic; an OSError names it
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
        rows = [r for r in _read_log(log_path, warn=log) if int(r["epoch"]) <= start_epoch]
        images_lib.save_text(log_path, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"resuming after epoch {start_epoch} (Adam step {opt_state['step']}), "
            f"target {ccfg.epochs} epochs")
        if start_epoch >= ccfg.epochs:
            log(f"nothing to do: the run already has {start_epoch} epochs")
            return run_dir
    else:
        _save(ckpt_path, cfg, params, opt_state, 0, rng, ccfg, extra_now())

    n_iter = (n_train + ccfg.batch_size - 1) // ccfg.batch_size
    epoch = start_epoch

    def non_finite(what):
        return NonFiniteLossError(f"{what}; training stopped. {ckpt_path} still holds epoch "
                                  f"{epoch - 1} (try a smaller --lr or --clip)", run_dir)
    try:
        for epoch in range(start_epoch + 1, ccfg.epochs + 1):
            t0 = time.perf_counter()
            train_x = synthetic.clutter(train_digits, train_digits,
                                        _derived_rng(ccfg.seed, 3, epoch), cfg.height,
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
            _commit_epoch(run_dir, record, is_best, cfg, params, opt_state, epoch, rng, ccfg,
                          extra_now())
            log(f"epoch {epoch}/{ccfg.epochs}  train {record['train_loss']:.4f} "
                f"({100 * record['train_error']:.2f}% wrong)  valid {valid_loss:.4f} "
                f"({100 * valid_error:.2f}%)  test {test_loss:.4f} ({100 * test_error:.2f}%)  "
                f"|g| {record['grad_norm']:.2f}  {record['wall_s']:.1f}s"
                + ("  *best*" if is_best else ""))
    except KeyboardInterrupt as interrupt:
        msg, signum = _interrupted_message(interrupt, epoch, ckpt_path, run_dir)
        log(msg)
        raise TrainingInterrupted(msg, run_dir, signum) from None
    except NonFiniteLossError as err:
        log(str(err))
        raise
    except (WriteFailed, OSError) as err:    # a save or the log line
        msg = _write_failed_message(err, epoch, ckpt_path)
        log(msg)
        raise WriteFailed(msg, run_dir) from None
    log(f"done: {ccfg.epochs} epochs; best valid error {100 * best_error:.2f}% (epoch "
        f"{best_epoch}; {n_train} training digits); run dir {run_dir}")
    return run_dir
