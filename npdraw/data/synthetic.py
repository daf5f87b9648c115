"""Data made on the fly from MNIST digits: cluttered MNIST (paper section 4.1, the recipe of
Mnih et al. 2014) and two-digit MNIST (paper section 4.2); and the labelled grey MNIST
files they are made from.

Dimension legend
    E  images (examples) made
    U  source digits, the images clutter or digits are cut from
    H, W  canvas height and width (100 x 100 cluttered, 60 x 60 two-digit); a digit's side is 28
    D  = H*W, one image flattened
    Q  clutter crop side (8)

Labelled MNIST (``load_labelled_mnist``): two sets of 28 x 28 grey digits with labels, in
IDX files: the 10,000 canonical test digits (t10k) and 10,000 other MNIST digits (npm10k,
disjoint from t10k, stored ordered by class). The files come from the data folder's
``labelled-mnist`` subfolder, else a mirror folder or URL (like every data set, see
docs/DATA.md); t10k also from MNIST's canonical URL. Every file's uncompressed SHA-256 is
checked. npm10k is the default training set and t10k the test set: 10,000 training digits
where the paper had 60,000. ``train_set="mnist"`` trains on MNIST's standard 60,000 instead
(train-images/train-labels IDX files, the same places, plus MNIST's canonical URL; checked by
their structure).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import TRAIN_SETS, ClassifierConfig, ClassifyConfig
from .idx import parse_idx
from .sources import (MNIST_URL, DataError, DataSplits, locate, read_maybe_gzip,
                      resolve_data_dir, resolve_mirror)

DIGIT = 28
LABELLED_SUBDIR = "labelled-mnist"
# uncompressed SHA-256 of each IDX file
LABELLED_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "npm10k-images-idx3-ubyte": "4e3355b0dd14bc12e53353f1d2789806361e6ef7350c92a8c5e778a74ea77696",
    "npm10k-labels-idx1-ubyte": "364de413ea4102745aa4d08a168e3501716cb789ace0f8b3033481882a00e25f",
}
VALID_SEED = 0     # fixed permutation that picks the validation digits out of npm10k
VALID_CLUTTER_SEED = 1
TEST_CLUTTER_SEED = 2
TWO_DIGIT_SEEDS = {"valid": 3, "test": 4}


@dataclass
class LabelledDigits:
    """Grey digits as float32 (E, 28, 28) in [0, 1] with int64 labels (E,)."""
    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# The standard MNIST training files (the paper's 60,000 digits): checked by their structure
# (and by the publishers' MD5 when downloaded from the canonical URL), not by a SHA-256 here.
MNIST_TRAIN_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def _labelled_file(stem: str, root: Path, mirror: str) -> np.ndarray:
    """One IDX file of labelled-mnist/ (data folder, mirror, or MNIST's canonical URL)."""
    cache = root / LABELLED_SUBDIR
    public = stem.startswith(("t10k", "train-"))
    canonical_names = [stem + ".gz"] if public else []
    if not canonical_names and not mirror and not any(
            (cache / n).is_file() for n in (stem, stem + ".gz")):
        raise DataError(f"{stem} has no public download: put {stem}.gz into {cache} or give "
                        "a mirror folder that holds it (--mirror)")
    path, _ = locate([stem, stem + ".gz"], LABELLED_SUBDIR, cache, cache, mirror, MNIST_URL,
                      canonical_names, progress=False, keep=True)
    raw = read_maybe_gzip(path)
    if stem in LABELLED_SHA256:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != LABELLED_SHA256[stem]:
            raise DataError(f"{path}: SHA-256 of the uncompressed file is {digest}, expected "
                            f"{LABELLED_SHA256[stem]} (damaged or a different file)")
    array = parse_idx(raw, str(path))
    rank = 3 if "-images-" in stem else 1
    if array.dtype != np.uint8 or array.ndim != rank:
        kind = "images (S, H, W)" if rank == 3 else "labels (S,)"
        raise DataError(f"{path}: expected unsigned-byte {kind}, got {array.dtype} with dims "
                        f"{array.shape}")
    if rank == 1 and array.size and array.max() > 9:
        raise DataError(f"{path}: label {int(array.max())} is not a digit 0-9")
    return array


def _labelled_set(name: str, images_stem: str, labels_stem: str, root: Path, mirror: str):
    images = _labelled_file(images_stem, root, mirror)
    labels = _labelled_file(labels_stem, root, mirror)
    if images.shape[1:] != (DIGIT, DIGIT) or labels.shape != images.shape[:1]:
        raise DataError(f"{name}: expected (S, 28, 28) images with S labels, got "
                        f"{images.shape} and {labels.shape}")
    return images.astype(np.float32) / np.float32(255), labels.astype(np.int64)


def load_labelled_mnist(data_dir: str = "data", mirror: str = "", valid_size: int = 1000,
                        train_set: str = "npm10k") -> LabelledDigits:
    """The training digits, less a validation slice of ``valid_size`` digits picked by a
    fixed permutation (npm10k is ordered by class), and t10k (test).

    train_set: "npm10k" (the project's 10,000 digits, the default) or "mnist" (MNIST's
    standard train-images-idx3-ubyte and train-labels-idx1-ubyte, 60,000 digits: the
    paper's setting), looked for where npm10k is."""
    if train_set not in TRAIN_SETS:
        raise DataError(f"unknown training set {train_set!r}; valid names: "
                        f"{', '.join(TRAIN_SETS)}")
    root = resolve_data_dir(data_dir)
    mirror = resolve_mirror(mirror)
    stems = (MNIST_TRAIN_STEMS if train_set == "mnist"
             else ("npm10k-images-idx3-ubyte", "npm10k-labels-idx1-ubyte"))
    train_x, train_y = _labelled_set(train_set, *stems, root, mirror)
    test = _labelled_set("t10k", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", root,
                         mirror)
    if not 0 < valid_size < train_x.shape[0]:
        raise DataError(f"valid_size must lie in 1..{train_x.shape[0] - 1}, got {valid_size}")
    order = np.random.default_rng(VALID_SEED).permutation(train_x.shape[0])
    train_idx, valid_idx = order[:-valid_size], order[-valid_size:]
    return LabelledDigits(train_x[train_idx], train_y[train_idx], train_x[valid_idx],
                          train_y[valid_idx], *test)


# ---------------------------------------------------------------- composing canvases

_PASTE_CHUNK = 2048   # images per flat index array (2048 x 784 int64: 13 MB)


def _paste(canvas, pieces, top, left, clip_low):
    """Add pieces (E, h, w) into canvas (E, H, W) at per-image offsets top, left (E,),
    and clip the sums to [0, 1] (or only to 1 when clip_low is False). In place:
    canvas is this module's own array.

    Through flat indices into the canvas, a chunk of images at a time: a 1-D fancy
    index is several times faster than the broadcast 3-D one, and clipping only the
    pixels written spares a pass over the whole canvas per piece."""
    E, h, w = pieces.shape
    H, W = canvas.shape[1:]
    flat = canvas.reshape(-1)
    within = (np.arange(h)[:, None] * W + np.arange(w)[None, :]).reshape(-1)      # (h*w,)
    for start in range(0, E, _PASTE_CHUNK):
        stop = min(start + _PASTE_CHUNK, E)
        corner = np.arange(start, stop) * (H * W) + top[start:stop] * W + left[start:stop]
        index = (corner[:, None] + within[None, :]).reshape(-1)   # distinct within a chunk
        summed = flat[index] + pieces[start:stop].reshape(-1)
        np.minimum(summed, 1.0, out=summed)
        if clip_low:
            np.maximum(summed, 0.0, out=summed)
        flat[index] = summed


def clutter(digits, sources, rng: np.random.Generator, size: int = 100,
            distractors: int = 8, crop: int = 8) -> np.ndarray:
    """Cluttered MNIST: each digit on a size x size black canvas among distractors.

    digits: (E, 28, 28) in [0, 1]   sources: (U, 28, 28), the digits clutter is cut from
    -> (E, size*size) float32. Per image (Mnih et al. 2014): ``distractors`` times, a
    crop x crop piece at a random offset of a random source digit, added at a uniformly
    random position and clipped to 1; then the digit at a uniformly random position,
    added and clipped to [0, 1].
    """
    E = digits.shape[0]
    if size < DIGIT:
        raise ValueError(f"the canvas must be at least {DIGIT} pixels wide, got {size}")
    canvas = np.zeros((E, size, size), np.float32)
    inside = np.arange(crop)
    for _ in range(distractors):
        source = rng.integers(0, sources.shape[0], E)
        top, left = rng.integers(0, DIGIT - crop + 1, (2, E))
        pieces = sources[source[:, None, None], top[:, None, None] + inside[None, :, None],
                         left[:, None, None] + inside[None, None, :]]
        y, x = rng.integers(0, size - crop + 1, (2, E))
        _paste(canvas, pieces, y, x, clip_low=False)
    y, x = rng.integers(0, size - DIGIT + 1, (2, E))
    _paste(canvas, np.asarray(digits, np.float32), y, x, clip_low=True)
    return canvas.reshape(E, size * size)


def two_digits(sources, count: int, rng: np.random.Generator, size: int = 60) -> np.ndarray:
    """Two-digit MNIST (paper section 4.2): two random digits of sources (U, 28, 28 or
    U, 784) at uniformly random places on a size x size black canvas, summed and clipped
    to 1 -> (count, size*size) float32."""
    sources = np.asarray(sources, np.float32).reshape(-1, DIGIT, DIGIT)
    if size < DIGIT:
        raise ValueError(f"the canvas must be at least {DIGIT} pixels wide, got {size}")
    canvas = np.zeros((count, size, size), np.float32)
    for _ in range(2):
        pick = rng.integers(0, sources.shape[0], count)
        y, x = rng.integers(0, size - DIGIT + 1, (2, count))
        _paste(canvas, sources[pick], y, x, clip_low=True)
    return canvas.reshape(count, size * size)


TWO_DIGIT_SIZE = 60


def two_digit_splits(bmnist: DataSplits) -> DataSplits:
    """Two-digit MNIST from binarized MNIST's splits: fixed, seeded valid and test sets (as
    many images as those splits hold digits) and ``fresh_train(rng, count)``, which makes
    a new training set (default: as many images as training digits) every epoch."""
    train_digits = bmnist.train

    def fresh_train(rng: np.random.Generator, count: int = 0) -> np.ndarray:
        return two_digits(train_digits, count or train_digits.shape[0], rng, TWO_DIGIT_SIZE)

    fixed = {split: two_digits(getattr(bmnist, split), getattr(bmnist, split).shape[0],
                               np.random.default_rng(seed), TWO_DIGIT_SIZE)
             for split, seed in TWO_DIGIT_SEEDS.items()}
    return DataSplits(train=fresh_train(np.random.default_rng(5)), valid=fixed["valid"],
                      test=fixed["test"], shape=(1, TWO_DIGIT_SIZE, TWO_DIGIT_SIZE),
                      fresh_train=fresh_train)


def cluttered_splits(digits: LabelledDigits, size: int = 100,
                     distractors: int = 8, crop: int = 8):
    """The fixed validation and test sets of cluttered MNIST: each digit cluttered once, with
    clutter from its own split, seeded -> ((valid_x, valid_y), (test_x, test_y))."""
    out = []
    for x, y, seed in ((digits.valid_x, digits.valid_y, VALID_CLUTTER_SEED),
                       (digits.test_x, digits.test_y, TEST_CLUTTER_SEED)):
        out.append((clutter(x, x, np.random.default_rng(seed), size, distractors, crop), y))
    return tuple(out)


def cluttered_eval_sets(ccfg: ClassifyConfig, cfg: ClassifierConfig, digits):
    """The fixed cluttered validation and test sets, of the first eval_subset digits of each
    split (all with 0) -> ((valid_x, valid_y), (test_x, test_y)), float32 (E, H*W)."""
    if ccfg.eval_subset:
        digits = LabelledDigits(
            digits.train_x, digits.train_y, digits.valid_x[:ccfg.eval_subset],
            digits.valid_y[:ccfg.eval_subset], digits.test_x[:ccfg.eval_subset],
            digits.test_y[:ccfg.eval_subset])
    return cluttered_splits(digits, cfg.height, ccfg.distractors, ccfg.crop)
