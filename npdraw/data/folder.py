"""A folder of same-sized PNG/JPEG images as a data set, split by a fixed shuffle.

Dimension legend
    E  images (examples) in a set or a file
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened channels-first
"""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .sources import DataError, DataSplits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SEED = 0  # fixed shuffle seed of the folder data set's split


def _image_to_chw(img: np.ndarray, path: Path) -> np.ndarray:
    """imageio array (H, W) or (H, W, K) -> float32 (C, H, W) in [0, 1]."""
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey, grey + alpha
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):  # RGB, RGBA: drop alpha
        img = img[:, :, :3]
    elif img.ndim != 2:
        raise DataError(f"{path}: unsupported image array of shape {img.shape}")
    if img.dtype == np.bool_:
        out = img.astype(np.float32)
    elif np.issubdtype(img.dtype, np.integer):
        out = img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    else:
        out = img.astype(np.float32)
        if out.size and (out.min() < 0 or out.max() > 1):
            raise DataError(f"{path}: float pixels outside [0, 1]")
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def load_folder(folder: str) -> DataSplits:
    if not folder:
        raise DataError("dataset 'folder' needs folder=<path to a folder of PNG/JPEG images>")
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist")
    # Hidden files are skipped: e.g. macOS "._name.png" resource forks are not images.
    paths = sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"image folder {base} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(paths) < 3:
        raise DataError(f"image folder {base} holds {len(paths)} image(s); need at least 3 "
                        "(one each for train, valid and test)")
    images = []
    for p in paths:
        try:
            # Pillow reads every IMAGE_SUFFIXES format; letting imageio try its other
            # plugins on a damaged file ends in advice to install video decoders.
            img = np.asarray(iio.imread(p, index=0, plugin="pillow"))
        except Exception as e:  # imageio/Pillow raise many kinds for a bad file
            raise DataError(f"{p} is not an image (it cannot be decoded as "
                            f"{p.suffix.lstrip('.').upper()}: {type(e).__name__})") from None
        chw = _image_to_chw(img, p)
        if images and chw.shape != images[0].shape:
            first = "x".join(map(str, images[0].shape))
            raise DataError(f"image {p.name} is {'x'.join(map(str, chw.shape))} (CxHxW) but "
                            f"{paths[0].name} is {first}; all images must share one size "
                            "and channel count")
        images.append(chw)
    data = np.stack(images).reshape(len(images), -1)  # (E, D)
    order = np.random.default_rng(FOLDER_SEED).permutation(len(paths))
    n = len(paths)
    n_valid = n_test = max(1, n // 20)  # 5 % each, at least one
    data = data[order]
    a, b = n - n_valid - n_test, n - n_test
    return DataSplits(train=data[:a], valid=data[a:b], test=data[b:], shape=images[0].shape)
