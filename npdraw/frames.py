"""DRAW's glimpses as pictures: the canvases after each glimpse and the windows it read
and wrote, drawn into RGB frames (``cli.py sample``, ``reconstruct``, ``classify-eval``
and a run's RUN/samples.png and samples.gif).

NumPy and images.py only, no matplotlib (pictures.py draws the plots with it), so that
training, which writes samples every epoch, never loads matplotlib.

Dimension legend
    B  batch
    T  glimpses
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import backend
from . import evaluate
from . import images as images_lib
from . import model as model_lib
from .config import DrawConfig

# The grid of generated images written after each epoch.
SAMPLE_ROWS = 8
SAMPLE_COLS = 8


def sample_bytes(cfg: DrawConfig, rows: int, cols: int, scale: int) -> int:
    """Estimated peak bytes of generating and rendering a rows x cols grid of samples:
    the decoder's forward pass, the canvases (T, B, D), and T RGB frames
    (rows*(H*scale+1)+1, cols*(W*scale+1)+1, 3) held twice (the pictures and their GIF
    encoding) plus one frame's tiles."""
    count, scale = int(rows) * int(cols), max(int(scale), 1)
    frame = (rows * (cfg.height * scale + 1) + 1) * (cols * (cfg.width * scale + 1) + 1) * 3
    tiles = count * cfg.height * cfg.width * scale * scale * 3
    return (evaluate.model_bytes(cfg, count, 8, training=False) + 8 * cfg.T * count * cfg.D
            + 2 * cfg.T * frame + 2 * tiles)


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
    device, dtype = evaluate.device_of(params), evaluate.params_dtype(params)
    eps = evaluate.device_noise(rng, cfg, count, dtype, device)
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
    device, dtype = evaluate.device_of(params), evaluate.params_dtype(params)
    eps = evaluate.device_noise(rng, cfg, int(x.shape[0]), dtype, device)
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
    canvases, windows, kl = reconstruct_images(params, cfg, images, evaluate.derived_rng(seed, 3))
    frames = render_reconstruction_frames(images, canvases, windows,
                                          (cfg.channels, cfg.height, cfg.width), cols, scale)
    return {"indices": indices, "canvases": canvases, "kl": kl, "frames": frames}


def write_run_samples(run_dir: Path, params: dict, cfg: DrawConfig, seed: int) -> np.ndarray:
    """RUN/samples.png (final canvases) and RUN/samples.gif (all glimpses); the same
    prior noise every epoch, so the pictures of successive epochs compare directly.
    Returns samples.png's picture, uint8 (H, W, 3)."""
    canvases, _ = generate_samples(params, cfg, SAMPLE_ROWS * SAMPLE_COLS,
                                   evaluate.derived_rng(seed, 2))
    shape = (cfg.channels, cfg.height, cfg.width)
    frames = render_frames(canvases, None, shape, SAMPLE_ROWS, SAMPLE_COLS, boxes=False, scale=1)
    images_lib.save_png(run_dir / "samples.png", frames[-1])
    images_lib.save_gif(run_dir / "samples.gif", frames, duration=0.1, loop=0)
    return frames[-1]
