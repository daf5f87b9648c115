"""The figures of a run (``cli.py plot``), drawn by matplotlib from RUN/log.jsonl, and the
pictures of ``cli.py attention-demo`` (one attention window read from an image and
written back).

Each figure is written as a PNG and, beside it, a PDF of the same name (vector, for
papers). plot_run returns the matplotlib figures it drew, so that tests can read the
lines' data back. The Agg backend is used: no display is needed.

Dimension legend
    C, H, W  channels, image height, image width
    N  the attention window's size (an N x N glimpse)
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from . import images as images_lib  # noqa: E402
from . import reference  # noqa: E402

# Binarized MNIST, negative log-likelihood in nats: DRAW's paper (Gregor et al. 2015,
# table 2) and the best public reimplementation we know of.
BMNIST_REFERENCES = ((80.97, "DRAW paper: 80.97"), (81.9, "best public: 81.9"))
VECTOR_SUFFIX = ".pdf"
_SPLITS = (("train_bound", "train"), ("valid_bound", "valid"), ("test_bound", "test"))


def _write_bytes(path: Path, data: bytes) -> None:
    images_lib._write_atomically(str(path), data)      # never half a picture on disk


def save_figure(fig, path) -> list:
    """Write ``fig`` to ``path`` (PNG) and to the PDF beside it, each atomically; returns
    both paths. An OSError names the file that could not be written."""
    path = Path(path)
    paths = [path, path.with_suffix(VECTOR_SUFFIX)]
    try:
        for p in paths:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=p.suffix[1:], dpi=120)
            try:
                _write_bytes(p, buffer.getvalue())
            except OSError as err:
                raise OSError(err.errno, err.strerror or str(err), str(p)) from None
    finally:
        plt.close(fig)
    return paths


def _finite(xs, rows, key, scale=1.0):
    pts = [(x, scale * float(r[key])) for x, r in zip(xs, rows)
           if r.get(key) is not None and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_dataset(run_dir) -> str:
    """The dataset a run trained on, from RUN/config.json ("" when it cannot be read)."""
    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text())["train"]["dataset"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def select_epochs(rows: list, from_epoch: int):
    """(the rows from epoch ``from_epoch`` on, {epoch: hours since the run's start}).

    The hours count from the run's start, whichever epochs are drawn. Raises ValueError
    when no epoch is left."""
    hours, total = {}, 0.0
    for r in rows:
        total += float(r.get("wall_s") or 0.0)
        hours[int(r["epoch"])] = total / 3600.0
    shown = [r for r in rows if int(r["epoch"]) >= from_epoch]
    if not shown:
        raise ValueError(f"the log's last epoch is {int(rows[-1]['epoch'])}: there is nothing "
                         f"from epoch {from_epoch} on to plot")
    return shown, hours


def _plain_number(value, _position) -> str:
    """A log axis' tick as a plain number (80, 100, 200), for the mantissas 1, 1.5, 2, 3,
    5 and 8 only, so that the labels do not collide."""
    if not value > 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (1, 1.5, 2, 3, 5, 8)) else ""


def bound_curves(rows: list, xs: list, xlabel: str, dataset: str = "", title: str = ""):
    """The bounds per epoch (or hour): the whole range on a log axis, and beside it a
    zoom on the later half of the run with the paper's figures for binarized MNIST."""
    ema = any(r.get("ema") for r in rows)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    zoomed, zoom_from, shown = [], None, []
    for key, label in _SPLITS:
        x, y = _finite(xs, rows, key)
        if not x:
            continue
        if ema and key != "train_bound":
            label += " (moving average of the parameters)"
        elif key == "train_bound":
            label += " (running mean over the epoch)"
        for ax in (full, zoom):
            ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
        zoomed += y[len(y) // 2:]
        shown += y
        later = x[len(x) // 2]
        zoom_from = later if zoom_from is None else min(zoom_from, later)
    refs = BMNIST_REFERENCES if dataset == "bmnist" else ()
    for value, label in refs:
        for ax in (full, zoom):
            ax.axhline(value, color="grey", linestyle="--" if value < 81 else ":",
                       linewidth=1, label=label)
    # A log axis shows the early fall and the late tail at once; over less than a factor
    # of 1.5 (a late stretch of a run) it has no labelled tick, so the axis stays linear.
    log_axis = bool(shown) and min(shown) > 0 and max(shown) / min(shown) >= 1.5
    if log_axis:
        full.set_yscale("log")
        full.yaxis.set_major_formatter(ticker.FuncFormatter(_plain_number))
        full.yaxis.set_minor_formatter(ticker.FuncFormatter(_plain_number))
    if zoomed:
        zoom.set_xlim(left=zoom_from)
        lo = min(zoomed + [v for v, _ in refs])
        hi = max(zoomed)
        pad = max(0.05 * (hi - lo), 0.25)
        zoom.set_ylim(lo - pad, hi + pad)
    full.set_title("whole run (log axis)" if log_axis else "whole run")
    zoom.set_title("zoom: the later half")
    for ax in (full, zoom):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("negative log-likelihood bound (nats per image)")
        ax.grid(True, alpha=0.3)
    if full.get_legend_handles_labels()[0]:
        full.legend(fontsize="small")
    else:
        full.text(0.5, 0.5, "no bound in the log", ha="center", transform=full.transAxes)
    fig.suptitle(title or f"NLL bound per {xlabel.rstrip('s')}")
    return fig


def kl_heat_map(rows: list, epochs: list):
    """The KL of each glimpse (from the log's "kl" lists): glimpse by epoch, in nats."""
    kl = [r.get("kl") or [] for r in rows]
    n = max((len(k) for k in kl), default=0)
    grid = np.full((max(n, 1), len(rows)), np.nan)
    for j, k in enumerate(kl):
        grid[:len(k), j] = k
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    lo, hi = epochs[0] - 0.5, epochs[-1] + 0.5
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                      extent=(lo, hi, 0.5, max(n, 1) + 0.5))
    fig.colorbar(image, ax=ax, label="KL (nats per image)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("glimpse t")
    ax.set_title("KL of each glimpse per epoch")
    return fig


def optimizer_curves(rows: list, epochs: list):
    """The learning rate, the mean gradient norm |g| and the mean step norm |step|."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("lr", "learning rate"),
                                       ("grad_norm", "|g| (mean gradient norm, before clipping)"),
                                       ("step_norm", "|step| (mean Adam step norm)"))):
        x, y = _finite(epochs, rows, key)
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
        if y and min(y) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize="medium")
        ax.grid(True, alpha=0.3)
    fig.suptitle("optimizer per epoch")
    return fig


def error_curves(rows: list, epochs: list):
    """A classifier run's error per epoch (cli.py classify), in percent."""
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for key, label in (("train_error", "train"), ("valid_error", "valid"),
                       ("test_error", "test")):
        x, y = _finite(epochs, rows, key, scale=100.0)
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("% wrong")
    ax.set_title("Cluttered MNIST error per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def plot_run(rows: list, out, from_epoch: int = 1, dataset: str = "") -> dict:
    """Draw a run's figures from its log records into the folder ``out``.

    A DRAW run: learning_curves (per epoch), learning_curves_hours, kl_per_glimpse and
    optimizer; a classifier run: error_curves. Each as .png and .pdf. Returns
    {png path: figure} (the figures are closed, their data still readable)."""
    rows, hours = select_epochs(rows, from_epoch)
    out = Path(out)
    epochs = [int(r["epoch"]) for r in rows]
    if "valid_error" in rows[0]:
        figures = {"error_curves.png": error_curves(rows, epochs)}
    else:
        figures = {
            "learning_curves.png": bound_curves(rows, epochs, "epoch", dataset),
            "learning_curves_hours.png": bound_curves(
                rows, [hours[e] for e in epochs], "hours", dataset,
                title="NLL bound against the hours of training and evaluation"),
            "kl_per_glimpse.png": kl_heat_map(rows, epochs),
            "optimizer.png": optimizer_curves(rows, epochs),
        }
    written = {}
    for name, fig in figures.items():
        save_figure(fig, out / name)
        written[out / name] = fig
    return written


# ----------------------------------------------------------------------------- attention-demo

def attention_demo_bytes(c: int, h: int, w: int, n: int) -> int:
    """Estimated peak bytes of attention_demo: float64 filterbanks (N, H) and (N, W), the
    glimpse and its enlarged view (C, N*v, N*v) with v = max(1, round(max(H, W)/N)),
    the write, coverage and picture copies (C, H, W), each a few times over."""
    view = max(1, int(round(max(h, w) / n)))
    return 8 * (4 * c * n * (h + w) + 8 * max(c, 3) * (n * view) ** 2 + 12 * c * h * w)


def attention_window(h: int, w: int, n: int, cx=None, cy=None, stride=None, sigma=None):
    """(cx, cy, stride, sigma) of an N x N window on an H x W image, each None filled in:
    the image's centre (1-based pixels), filters spanning 90% of its longer side, and
    sigma = stride / 2."""
    cx = (w + 1) / 2.0 if cx is None else cx
    cy = (h + 1) / 2.0 if cy is None else cy
    if stride is None:
        stride = 0.9 * (max(h, w) - 1) / max(n - 1, 1)
        stride = stride if stride > 0 else 1.0
    if sigma is None:
        sigma = stride / 2.0
    return cx, cy, stride, sigma


def _rgb_picture(chw) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, 3) uint8: grey repeated to RGB, other than
    1 or 3 channels their mean; rounded by images.to_uint8 (half up), as every picture."""
    img = np.asarray(chw, dtype=np.float64)
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    elif img.shape[0] != 3:
        img = np.repeat(img.mean(axis=0, keepdims=True), 3, axis=0)
    return images_lib.to_uint8(img.transpose(1, 2, 0))


def attention_demo(image, n: int, cx=None, cy=None, stride=None, sigma=None) -> dict:
    """Read an N x N glimpse from ``image`` (C, H, W) floats in [0, 1] with the attention
    filterbank (gamma 1) and write it back.

    Returns {"window": (cx, cy, stride, sigma) as attention_window fills them in,
    "view": v, how many times "read" is enlarged, and the (H', W', 3) uint8 pictures
    "original" (H, W), "read" (the glimpse, N*v x N*v) and "write" (H, W): the glimpse
    written back and divided by the write of an all-ones patch}."""
    image = np.asarray(image, dtype=np.float64)
    _, h, w = image.shape
    cx, cy, stride, sigma = attention_window(h, w, n, cx, cy, stride, sigma)
    one = lambda v: np.array([float(v)], dtype=np.float64)  # noqa: E731
    Fx, _ = reference.filterbank_forward(one(cx), one(stride), one(sigma ** 2), n, w)
    Fy, _ = reference.filterbank_forward(one(cy), one(stride), one(sigma ** 2), n, h)
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
    view = max(1, int(round(max(h, w) / n)))
    enlarged = np.repeat(np.repeat(glimpse, view, axis=1), view, axis=2)
    return {"window": (cx, cy, stride, sigma), "view": view,
            "original": _rgb_picture(image), "read": _rgb_picture(enlarged),
            "write": _rgb_picture(upsampled)}
