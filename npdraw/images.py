"""Pictures with NumPy and imageio only: sample grids, attention boxes, PNG/GIF files,
image loading and the colours of glimpses (charts: npdraw/pictures.py, on matplotlib).

Dimension legend
    E  images (examples) in a grid or a file
    C, H, W  channels (1 grey, 3 RGB), image height (rows), image width (columns)
    D  = C*H*W, one image flattened
    F  frames of an animation
    Y  series (glimpses drawn in their own colours)

Conventions: model images are float in [0, 1], laid out (C, H, W) and flattened
C-major to (D,); pictures on disk are uint8 (H, W, 3) RGB or (H, W) grey. Pixel
coordinates are x = column, y = row, origin at the top-left. Inputs may be CuPy
arrays; they are brought to the host with backend.to_numpy, since everything here
ends in a file.
"""
from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .backend import to_numpy
from .guards import naming


class ImageNotFoundError(ValueError, FileNotFoundError):
    """A missing image file; catchable both as ValueError and as FileNotFoundError."""


# ----------------------------------------------------------------------------- basics

def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8 in [0, 255], clipped and rounded.

    uint8 input is returned as a copy; bool maps to 0/255; NaN maps to 0.
    """
    a = to_numpy(images)
    if a.dtype == np.uint8:
        return a.copy()
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"images must be numeric, got dtype {a.dtype}")
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.floor(np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _as_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W) | (H, W, 1) | (H, W, 3) -> (H, W, 3)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) picture, got shape {a.shape}")
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def image_grid(images, shape, rows: int, cols: int, pad: int = 1, pad_value: float = 0.5) -> np.ndarray:
    """Tile images into one RGB picture, row-major (image i at row i // cols, column i % cols).

    images: (E, D) or (E, C, H, W), floats in [0, 1] (or uint8); shape: (C, H, W) with
    C in {1, 3}; N <= rows*cols, empty cells take pad_value.
    Returns uint8 (rows*(H+pad)+pad, cols*(W+pad)+pad, 3); image i's top-left pixel is at
    (pad + (i // cols)*(H+pad), pad + (i % cols)*(W+pad)). Grey is replicated to RGB.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape!r}")
    C, H, W = (int(s) for s in shape)
    if C not in (1, 3):
        raise ValueError(f"image_grid draws 1 (grey) or 3 (RGB) channels, got C={C}")
    for name, v in (("rows", rows), ("cols", cols)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    rows, cols, pad = int(rows), int(cols), int(pad)
    a = to_uint8(images)
    if a.ndim < 1 or a.size % (C * H * W) or (a.ndim > 1 and a[0].size != C * H * W):
        raise ValueError(f"images of shape {a.shape} do not hold images of shape {(C, H, W)}")
    a = a.reshape(-1, C, H, W)
    n = a.shape[0]
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    a = np.repeat(a, 3, axis=1) if C == 1 else a
    a = a.transpose(0, 2, 3, 1)                                   # (E, H, W, 3)

    fill = to_uint8(np.float64(pad_value))
    out = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), fill, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = a[i]
    return out


def _round(v) -> int:
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"box coordinates must be finite, got {v}")
    return int(math.floor(v + 0.5))    # half up, not Python's half-to-even


def draw_box(canvas_rgb, x0, y0, x1, y1, color=(255, 0, 0)) -> np.ndarray:
    """A 1-px rectangle outline with corners (x0, y0), (x1, y1) (inclusive, x = column).

    canvas_rgb: uint8 (H, W, 3) (grey (H, W) is promoted to RGB). Float coordinates are
    rounded; the outline is clipped to the picture. Returns a new (H, W, 3) array.
    """
    out = _as_rgb(to_numpy(canvas_rgb)).copy()
    if out.dtype != np.uint8:
        raise ValueError(f"canvas must be uint8, got {out.dtype}")
    color = np.asarray(color, dtype=np.int64)
    if color.shape != (3,) or color.min() < 0 or color.max() > 255:
        raise ValueError(f"color must be three values in 0..255, got {color.tolist()}")
    color = color.astype(np.uint8)
    H, W = out.shape[:2]
    xa, xb = sorted((_round(x0), _round(x1)))
    ya, yb = sorted((_round(y0), _round(y1)))
    cx0, cx1 = max(xa, 0), min(xb, W - 1)          # clipped spans
    cy0, cy1 = max(ya, 0), min(yb, H - 1)
    if cx0 <= cx1:
        for y in (ya, yb):
            if 0 <= y < H:
                out[y, cx0:cx1 + 1] = color
    if cy0 <= cy1:
        for x in (xa, xb):
            if 0 <= x < W:
                out[cy0:cy1 + 1, x] = color
    return out


def upscale(image_uint8, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: (H, W[, C]) -> (H*factor, W*factor[, C])."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    a = to_numpy(image_uint8)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) picture, got shape {a.shape}")
    factor = int(factor)
    return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)


# ----------------------------------------------------------------------------- files

def _check_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path}: directory {parent} does not exist")


def _check_picture(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 (use to_uint8), got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"{what} must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{what} is empty (shape {a.shape})")
    return a


def _write_atomically(path: str, data: bytes) -> None:
    """Write data to path through a temporary file beside it and os.replace: a picture
    that was there stays whole until the new one is complete (a training run rewrites
    its samples every epoch, and may be stopped or run out of disk at any moment)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise naming(err, path)       # a full disk's OSError names no file, or the temporary


def save_png(path, array_uint8) -> None:
    """Write a uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA picture as PNG."""
    path = os.fspath(path)
    a = _check_picture(to_numpy(array_uint8), "picture")
    _check_parent(path)
    _write_atomically(path, iio.imwrite("<bytes>", np.ascontiguousarray(a), extension=".png"))


def _sub_blocks_end(data: bytes, pos: int) -> int:
    """Index just past a GIF sub-block chain starting at pos (ends with a 0 byte)."""
    while True:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


def _gif_frame_parts(single: bytes):
    """(colour table, image descriptor bytes, LZW data bytes) of a one-frame GIF."""
    if single[:3] != b"GIF":
        raise ValueError("the GIF encoder did not produce a GIF")
    packed = single[10]
    pos = 13
    table = b""
    if packed & 0x80:
        n = 3 * (2 << (packed & 7))
        table, pos = single[pos:pos + n], pos + n
    while pos < len(single):
        b = single[pos]
        if b == 0x21:                                  # extension: skip it
            pos = _sub_blocks_end(single, pos + 2)
        elif b == 0x2C:                                # image descriptor
            desc = single[pos:pos + 10]
            pos += 10
            if desc[9] & 0x80:                         # a local table wins over the global one
                n = 3 * (2 << (desc[9] & 7))
                table, pos = single[pos:pos + n], pos + n
            end = _sub_blocks_end(single, pos + 1)     # +1: LZW minimum code size byte
            return table, desc, single[pos:end]
        else:
            break
    raise ValueError("the GIF encoder produced no image")


def _palettize(f: np.ndarray):
    """uint8 (H, W) | (H, W, 3) -> (indices (H, W) uint8, palette (P, 3) uint8) or None.

    Grey frames are exact; colour frames are exact up to 256 colours, or keep up to 128
    non-grey colours exactly and spread the greys over the remaining entries (the usual
    DRAW picture: grey canvases with coloured attention boxes). None: let Pillow quantise.
    """
    if f.ndim == 3 and (f[:, :, 0] == f[:, :, 1]).all() and (f[:, :, 0] == f[:, :, 2]).all():
        f = f[:, :, 0]
    ramp = np.arange(256, dtype=np.uint8)
    if f.ndim == 2:
        # Reversed ramp: Pillow reads an identity grey table as a paletteless "L" frame and
        # then fails on later frames that carry a colour table.
        return 255 - f, np.repeat(ramp[::-1, None], 3, axis=1)
    packed = (f[:, :, 0].astype(np.uint32) << 16) | (f[:, :, 1].astype(np.uint32) << 8) | f[:, :, 2]
    uniq, inv = np.unique(packed, return_inverse=True)
    unpack = lambda p: np.stack([(p >> 16) & 255, (p >> 8) & 255, p & 255], axis=1).astype(np.uint8)
    if len(uniq) <= 256:
        return inv.reshape(f.shape[:2]).astype(np.uint8), unpack(uniq)
    grey = (f[:, :, 0] == f[:, :, 1]) & (f[:, :, 0] == f[:, :, 2])
    colours, cinv = np.unique(packed[~grey], return_inverse=True)
    if len(colours) > 128:
        return None
    levels = 256 - len(colours)
    idx = np.empty(f.shape[:2], np.uint8)
    idx[grey] = np.floor(f[:, :, 0][grey] * ((levels - 1) / 255.0) + 0.5).astype(np.uint8)
    idx[~grey] = (levels + cinv.ravel()).astype(np.uint8)
    greys = np.floor(np.arange(levels) * (255.0 / (levels - 1)) + 0.5).astype(np.uint8)
    return idx, np.concatenate([np.repeat(greys[:, None], 3, axis=1), unpack(colours)])


def _is_identity_grey(table: bytes) -> bool:
    t = np.frombuffer(table, np.uint8).reshape(-1, 3)
    return bool((t == np.arange(len(t))[:, None]).all())


def _gif_frame(f: np.ndarray):
    """One frame -> (colour table bytes, image descriptor, LZW data), LZW by imageio/Pillow."""
    pal = _palettize(f)
    if pal is None:
        single = iio.imwrite("<bytes>", np.ascontiguousarray(f), extension=".gif")
        table, desc, lzw = _gif_frame_parts(single)
    else:
        idx, palette = pal
        # optimize=False keeps Pillow from reordering; its grey table maps code j to
        # our index value table[j], so compose the two either way.
        single = iio.imwrite("<bytes>", np.ascontiguousarray(idx), extension=".gif", optimize=False)
        codes, desc, lzw = _gif_frame_parts(single)
        codes = np.frombuffer(codes, np.uint8)[0::3].astype(np.int64)
        table = palette[np.minimum(codes, len(palette) - 1)].tobytes()
    if not table:
        raise ValueError("the GIF encoder wrote a frame without a colour table")
    entries = 2
    while entries * 3 < len(table):
        entries *= 2
    table = table.ljust(entries * 3, b"\x00")
    if _is_identity_grey(table) and entries < 256:
        table = table.ljust(entries * 6, b"\x00")     # a zero entry breaks the identity (see _palettize)
    return table, desc, lzw


GIF_MAX_DURATION = 655.35       # a frame's delay: 16 bits of hundredths of a second


def save_gif(path, frames, duration=0.1, loop=0) -> None:
    """Write an animated GIF with exactly one GIF frame per input frame.

    frames: list of uint8 (H, W) or (H, W, 3), all the same shape (F >= 1).
    duration: seconds per frame, one number or a list of F (GIF keeps hundredths;
    at least 0.02 s, as browsers slow down anything faster). loop: 0 loops forever,
    n > 0 stores the loop count n, None plays once.

    imageio's encoder (Pillow) merges identical consecutive frames, which would change
    the frame count; so each frame is LZW-encoded alone by imageio and the frames are
    joined here, each with its own exact colour table (grey frames, and colour frames of
    up to 256 colours or up to 128 non-grey colours, are lossless up to 1 grey level;
    others are quantised by Pillow).
    """
    path = os.fspath(path)
    frames = [_check_picture(to_numpy(f), f"frame {i}") for i, f in enumerate(frames)]
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    shape = frames[0].shape
    for i, f in enumerate(frames):
        if f.shape != shape:
            raise ValueError(f"frame {i} has shape {f.shape}, frame 0 has {shape}")
        if f.ndim == 3 and f.shape[2] == 4:
            raise ValueError(f"frame {i} has an alpha channel; GIF frames are (H, W) or (H, W, 3)")
    durations = list(duration) if np.ndim(duration) else [duration] * len(frames)
    if len(durations) != len(frames):
        raise ValueError(f"{len(durations)} durations for {len(frames)} frames")
    if any(not (isinstance(d, (int, float, np.number)) and 0 <= d <= GIF_MAX_DURATION)
           for d in durations):
        raise ValueError(f"durations must be numbers of seconds from 0 to {GIF_MAX_DURATION} "
                         f"(GIF's longest frame), got {duration!r}")
    if loop is not None and (int(loop) != loop or not 0 <= loop <= 65535):
        raise ValueError(f"loop must be None or an integer in 0..65535, got {loop!r}")
    _check_parent(path)

    H, W = shape[:2]
    if H > 65535 or W > 65535:
        raise ValueError(f"GIF frames are at most 65535 pixels a side, got {W}x{H}")
    out = [b"GIF89a", struct.pack("<HHBBB", W, H, 0x70, 0, 0)]   # no global colour table
    if loop is not None:
        out.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", int(loop)) + b"\x00")
    for f, d in zip(frames, durations):
        table, desc, lzw = _gif_frame(f)
        delay = max(2, int(round(float(d) * 100)))
        # Graphic control: disposal 1 (leave in place), no transparency.
        out.append(b"\x21\xf9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00")
        bits = (len(table) // 3).bit_length() - 2          # table holds 2**(bits+1) entries
        out.append(desc[:9] + bytes([0x80 | (desc[9] & 0x40) | bits]) + table + lzw)
    out.append(b"\x3b")
    _write_atomically(path, b"".join(out))


def save_frames(folder, frames, stem: str, duration: float, hold: float = 0.0,
                every: int = 1) -> int:
    """An animation in ``folder``: frame_000.png ... (one PNG per frame), STEM.gif (every
    ``every``-th frame and the last, each ``duration`` seconds, the last ``hold`` seconds
    more, looping) and STEM.png (the last frame). Removes the frame_*.png of an earlier,
    longer (or wider-numbered) animation, which would pass for this one's.
    -> the digits of the frame numbers."""
    folder = Path(folder)
    every = int(every)
    if every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    width = max(3, len(str(len(frames) - 1)))
    names = {f"frame_{t:0{width}d}.png" for t in range(len(frames))}
    shown = list(frames[every - 1::every])
    if len(frames) % every:
        shown.append(frames[-1])
    durations = [float(duration)] * len(shown)
    durations[-1] = min(durations[-1] + float(hold), GIF_MAX_DURATION)
    for t, frame in enumerate(frames):
        save_png(folder / f"frame_{t:0{width}d}.png", frame)
    save_gif(folder / f"{stem}.gif", shown, duration=durations, loop=0)
    save_png(folder / f"{stem}.png", frames[-1])
    for stale in folder.glob("frame_*.png"):
        if re.fullmatch(r"frame_\d+\.png", stale.name) and stale.name not in names:
            stale.unlink()
    return width


def save_text(path, text: str) -> None:
    """Write text (UTF-8) through a temporary file and os.replace, as the pictures."""
    path = os.fspath(path)
    _check_parent(path)
    _write_atomically(path, text.encode("utf-8"))


def load_image(path) -> np.ndarray:
    """Read a picture file as float32 (C, H, W) in [0, 1].

    Grey -> C=1, RGB -> C=3; alpha is dropped (RGBA -> 3, grey+alpha -> 1); palette
    images become RGB; 16-bit images are scaled by 65535; float images (e.g. TIFF) are
    kept when within [0, 1], else scaled by their range (min -> 0, max -> 1); an
    animation gives frame 0.
    A missing file raises ImageNotFoundError (a ValueError and a FileNotFoundError);
    anything unreadable raises ValueError "... is not an image".
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageNotFoundError(f"image file {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not an image")
    try:
        # Pillow reads the usual formats; trying every imageio plugin only adds noise.
        a = np.asarray(iio.imread(path, index=0, plugin="pillow"))
    except Exception as e:  # imageio/Pillow raise many types for undecodable data
        raise ValueError(f"{path} is not an image ({type(e).__name__}: {e})") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.size == 0:
        raise ValueError(f"{path} is not an image this loader understands (array shape {a.shape})")
    a = a[:, :, :1] if a.shape[2] == 2 else a[:, :, :3]       # drop alpha
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / np.float32(255)
    elif a.dtype.kind in "iu":    # 16-bit PNGs arrive as uint16 or int32
        a = np.clip(a.astype(np.float32) / np.float32(65535), 0, 1)
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{path} holds NaN or infinite pixel values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            # Float pictures have no fixed white (0-1, 0-255, physical units...): one
            # outside [0, 1] is scaled by its own range, so it shows rather than saturates.
            a = (a - np.float32(lo)) / np.float32(hi - lo) if hi > lo else np.zeros_like(a)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- colours

# Up to 10 series: distinct colours (the "tab10" set); more: a ramp from the first
# series to the last, which suits ordered series such as the KL of glimpse t.
_CATEGORICAL = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)], np.uint8)
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (235, 165, 0)],
                 np.float64)                    # viridis-like, ending in amber (yellow is unreadable on white)
_MAX_CATEGORICAL = 10


def series_colors(s: int) -> np.ndarray:
    """(Y, 3) uint8 colours for Y series (of a plot, or glimpses of a picture)."""
    return _series_colors(s)


def _series_colors(s: int) -> np.ndarray:
    """(Y, 3) uint8 colours for Y series."""
    if s <= _MAX_CATEGORICAL:
        return _CATEGORICAL[:s].copy()
    t = np.linspace(0.0, len(_RAMP) - 1, s)
    i = np.minimum(t.astype(int), len(_RAMP) - 2)
    f = (t - i)[:, None]
    return np.rint(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8)
