"""Larochelle's binarized MNIST (the DRAW paper's data), 50k/10k/10k: the .amat source
files, checked by their SHA-256, converted once into <data_dir>/binarized_mnist.h5 (checked
again on every read); one split alone can be read without converting.

Dimension legend
    E  images (examples) in a set or a file
    D  C*H*W, one image flattened channels-first (784 here)
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from ..guards import os_error_sentence
from .sources import (SPLITS, DataError, DataSplits, locate, publish, read_maybe_gzip,
                      remove_stale_parts)


# --------------------------------------------------------------------------- #
# Binarized MNIST: canonical source and checksums
# --------------------------------------------------------------------------- #

BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BMNIST_H5 = "binarized_mnist.h5"
BMNIST_SHAPE = (1, 28, 28)

# The images in each .amat file: its size is 2 * 784 bytes a line.
BMNIST_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
# SHA-256 of the *uncompressed* .amat files. Module level so that tests can swap
# in the checksums of small fake files.
BMNIST_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}

# --------------------------------------------------------------------------- #
# reading, checking and converting
# --------------------------------------------------------------------------- #

def _parse_amat(raw: bytes, label: str, width: int = 784) -> np.ndarray:
    """Text .amat of single-character 0/1 values -> uint8 (E, width).

    Vectorised over the bytes: the training file has 39M values, far too many
    for a Python-level split.
    """
    b = np.frombuffer(raw, dtype=np.uint8)
    kind = np.zeros(256, dtype=np.uint8)  # 0 bad, 1 digit, 2 blank, 3 newline
    kind[[ord("0"), ord("1")]] = 1
    kind[[ord(" "), ord("\t"), ord("\r")]] = 2
    kind[ord("\n")] = 3
    k = kind[b]
    bad = np.flatnonzero(k == 0)
    if bad.size:
        pos = int(bad[0])
        raise DataError(f"{label}: unexpected byte {raw[pos:pos + 1]!r} at offset {pos}; "
                        "expected 0/1 values separated by spaces")
    digit = k == 1
    if np.any(digit[1:] & digit[:-1]):
        raise DataError(f"{label}: found a multi-digit value; expected single 0/1 values")
    starts = np.concatenate([[0], np.flatnonzero(k == 3) + 1])
    starts = starts[starts < b.size]
    counts = np.add.reduceat(digit, starts, dtype=np.int64) if b.size else np.zeros(0, np.int64)
    counts = counts[counts > 0]  # blank lines carry nothing
    wrong = np.flatnonzero(counts != width)
    if wrong.size:
        raise DataError(f"{label}: image {int(wrong[0]) + 1} has {int(counts[wrong[0]])} "
                        f"values, expected {width}")
    if counts.size == 0:
        raise DataError(f"{label}: no images in the file")
    return (b[digit] - ord("0")).reshape(-1, width)


def bmnist_split(split: str, root: Path, mirror: str, progress: bool) -> np.ndarray:
    """One split as uint8 (E, 784), read from data_dir, the mirror or downloaded."""
    base = f"binarized_mnist_{split}.amat"
    names = [base, base + ".gz"]
    path, temporary = locate(names, "binarized_mnist", root, root, mirror, BMNIST_URL, names,
                              progress, keep=False)
    try:
        raw = read_maybe_gzip(path, BMNIST_ROWS[split] * 2 * 784)   # "0 1 ... 0\n" lines
        expected = BMNIST_SHA256[split]
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected:
            where = "the download was deleted" if temporary else f"file {path}"
            raise DataError(f"checksum mismatch for {base} ({where}): expected sha256 "
                            f"{expected}, got {actual}")
        return _parse_amat(raw, str(path))
    finally:
        if temporary:
            path.unlink(missing_ok=True)


def _write_h5_atomically(path: Path, arrays: dict, attrs: dict) -> None:
    """Write uint8 (E, D) arrays to an HDF5 file via a temp file + os.replace.

    The file is built in memory (a few MB, compressed) and written with plain writes, so
    a full disk is one OSError, never an HDF5 failure with half-open objects."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for key, arr in arrays.items():
            f.create_dataset(key, data=arr, compression="gzip", compression_opts=4,
                             chunks=(min(1000, max(1, arr.shape[0])), arr.shape[1]))
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part",
                                        dir=path.parent)
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
        publish(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DataError(os_error_sentence(err, f"write the converted data set {path}")) \
                from None
        raise


def amat_sha256(images: np.ndarray) -> str:
    """The sha256 of the .amat text that holds uint8 (E, 784) 0/1 ``images`` ("0 1 ...
    0" lines with single spaces): the converted file is checked against BMNIST_SHA256,
    the digests of the source files (about 0.1 s for the training split)."""
    n, width = images.shape
    text = np.full((n, 2 * width), ord(" "), np.uint8)
    text[:, 0::2] = images + ord("0")
    text[:, -1] = ord("\n")
    return hashlib.sha256(text).hexdigest()


def read_bmnist_h5(path: Path, splits=SPLITS) -> dict:
    """The named splits of the converted file, uint8 (E, 784) each, checked."""
    advice = f"delete {path} and run again to rebuild it from the source files"
    digests = {}   # split -> the sha256 of its source file, as the file records it
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for split in splits:
                if split not in f:
                    raise DataError(f"{path} has no dataset {split!r}; {advice}")
                ds = f[split]
                if ds.ndim != 2 or ds.shape[1] != 784 or ds.dtype != np.uint8:
                    raise DataError(f"{path}: dataset {split!r} is {ds.dtype} {ds.shape}, "
                                    f"expected uint8 (N, 784); {advice}")
                arrays[split] = ds[...]
                stored = f.attrs.get(f"sha256_{split}", BMNIST_SHA256[split])
                digests[split] = (stored.decode("ascii", "replace")
                                  if isinstance(stored, bytes) else str(stored))
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"{path} is unreadable ({e}); it is damaged or incomplete: "
                        f"{advice}") from None
    for split, arr in arrays.items():
        if arr.size and arr.max() > 1:
            raise DataError(f"{path}: dataset {split!r} has values above 1; {advice}")
        if amat_sha256(arr) != digests[split]:
            raise DataError(f"{path}: dataset {split!r} does not match the sha256 of its "
                            f"source file (binarized_mnist_{split}.amat); it is damaged: "
                            f"{advice}")
    return arrays


def load_bmnist(root: Path, mirror: str, progress: bool) -> DataSplits:
    h5 = root / BMNIST_H5
    if not h5.exists():
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_parts(root, ".binarized_mnist")
        # All three splits are fetched and verified before anything is written, so
        # an HDF5 file, once there, is always complete.
        arrays = {s: bmnist_split(s, root, mirror, progress) for s in SPLITS}
        _write_h5_atomically(h5, arrays, {
            "source": "binarized MNIST (Larochelle & Murray 2011), .amat",
            "shape": np.array(BMNIST_SHAPE),
            **{f"sha256_{s}": BMNIST_SHA256[s] for s in SPLITS},
        })
    arrays = read_bmnist_h5(h5)
    return DataSplits(*(arrays[s].astype(np.float32) for s in SPLITS), shape=BMNIST_SHAPE)
