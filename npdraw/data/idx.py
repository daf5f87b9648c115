"""Grey-level MNIST and Fashion-MNIST from their IDX files (values / 255), and the IDX
format itself (parse_idx).

Dimension legend
    E  images (examples) in a set or a file
    H, W  image height, image width
    D  C*H*W, one image flattened channels-first (C = 1 here)
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .sources import (FASHION_URL, MNIST_URL, DataError, DataSplits, hint_delete, locate,
                      read_maybe_gzip, split_train, to_float)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, label: str = "IDX data") -> np.ndarray:
    """IDX bytes (big-endian header: 0, 0, type code, ndim, then ndim uint32 sizes) -> array."""
    if len(raw) < 4:
        raise DataError(f"{label}: only {len(raw)} bytes, too short for an IDX header")
    zero, code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"{label}: bad IDX magic {raw[:4].hex()} (expected 0000 then a "
                        "type code 08/09/0b/0c/0d/0e and the number of dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{label}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[code])
    expected = dtype.itemsize
    for d in dims:  # Python integers: declared dims cannot overflow, only fail to match
        expected *= d
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{label}: IDX data {what}: dims {dims} need {expected} bytes, "
                        f"got {got}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _load_idx_images(dataset: str, stem: str, root: Path, mirror: str, progress: bool,
                     canonical: str) -> np.ndarray:
    """uint8 (E, H, W) images of one IDX file."""
    cache = root / dataset
    names = [stem, stem + ".gz"]
    path, _ = locate(names, dataset, cache, cache, mirror, canonical, [stem + ".gz"],
                      progress, keep=True)
    try:
        arr = parse_idx(read_maybe_gzip(path), str(path))
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise DataError(f"{path}: expected unsigned-byte images (N, H, W), "
                            f"got {arr.dtype} with dims {arr.shape}")
    except DataError as e:
        raise hint_delete(path, cache, e) from None
    return arr


def load_idx_dataset(dataset: str, root: Path, mirror: str, progress: bool) -> DataSplits:
    canonical = MNIST_URL if dataset == "mnist" else FASHION_URL
    train = _load_idx_images(dataset, "train-images-idx3-ubyte", root, mirror, progress, canonical)
    test = _load_idx_images(dataset, "t10k-images-idx3-ubyte", root, mirror, progress, canonical)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{dataset}: train images are {train.shape[1:]} but test images are "
                        f"{test.shape[1:]}")
    shape = (1,) + train.shape[1:]
    return split_train(dataset, to_float(train[:, None]), to_float(test[:, None]), shape)
