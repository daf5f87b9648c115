"""SVHN cropped digits (train_32x32.mat / test_32x32.mat), read by npdraw's own MATLAB v5
reader (read_mat_v5; no SciPy).

Dimension legend
    E  images (examples) in a set or a file
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened channels-first
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .sources import (SVHN_URL, DataError, DataSplits, hint_delete, locate, split_train,
                      to_float)


_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8",
             12: "i8", 13: "u8"}
_MX_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4",
               14: "i8", 15: "u8"}


def _mat_tag(buf, off: int, bo: str, label: str) -> tuple:
    """Data element at ``off`` -> (type, payload memoryview, offset of the next element).

    Handles the small-element format (type and size packed in one uint32, payload
    of at most 4 bytes in the tag itself); normal payloads are padded to 8 bytes.
    """
    if off + 8 > len(buf):
        raise DataError(f"{label}: truncated MAT data element at offset {off}")
    (word,) = struct.unpack_from(bo + "I", buf, off)
    if word >> 16:
        mtype, nbytes = word & 0xFFFF, word >> 16
        if nbytes > 4:
            raise DataError(f"{label}: bad small data element at offset {off}")
        return mtype, buf[off + 4:off + 4 + nbytes], off + 8
    (nbytes,) = struct.unpack_from(bo + "I", buf, off + 4)
    end = off + 8 + nbytes
    if end > len(buf):
        raise DataError(f"{label}: MAT data element at offset {off} claims {nbytes} bytes, "
                        f"only {len(buf) - off - 8} left (truncated file?)")
    return word, buf[off + 8:end], off + 8 + ((nbytes + 7) // 8) * 8


def _mat_matrix(body, bo: str, label: str, wanted) -> tuple:
    """miMATRIX payload -> (name, array or None). Only numeric, real arrays are decoded.

    The array comes back in MATLAB's shape (column-major data reshaped order="F").
    """
    mtype, flags, off = _mat_tag(body, 0, bo, label)
    if mtype != 6 or len(flags) < 8:
        raise DataError(f"{label}: matrix without array flags")
    (flag_word,) = struct.unpack_from(bo + "I", flags, 0)
    mclass, is_complex = flag_word & 0xFF, bool(flag_word & 0x0800)
    mtype, dims_raw, off = _mat_tag(body, off, bo, label)
    if mtype != 5 or len(dims_raw) % 4 or len(dims_raw) == 0:
        raise DataError(f"{label}: matrix without int32 dimensions")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=bo + "i4"))
    if min(dims) < 0:
        raise DataError(f"{label}: negative matrix dimensions {dims}")
    mtype, name_raw, off = _mat_tag(body, off, bo, label)
    name = bytes(name_raw).decode("ascii", "replace")
    if name not in wanted or mclass not in _MX_CLASSES:
        return name, None
    if is_complex:
        raise DataError(f"{label}: variable {name!r} is complex; expected real numbers")
    mtype, data, off = _mat_tag(body, off, bo, label)
    if mtype not in _MI_TYPES:
        raise DataError(f"{label}: variable {name!r} has unsupported data type {mtype}")
    stored = np.dtype(bo + _MI_TYPES[mtype])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) != count * stored.itemsize:
        raise DataError(f"{label}: variable {name!r} of dims {dims} needs "
                        f"{count * stored.itemsize} bytes, has {len(data)}")
    arr = np.frombuffer(data, dtype=stored)
    # MATLAB may store values in a narrower type than their class (e.g. double
    # labels as uint8); the class is what the variable is.
    target = np.dtype(_MX_CLASSES[mclass])
    if arr.dtype != target:
        arr = arr.astype(target)
    return name, arr.reshape(dims, order="F")


def read_mat_v5(path: Path, wanted=("X", "y")) -> dict:
    """Numeric variables named in ``wanted`` from a MATLAB v5 .mat file (MATLAB's shapes).

    Layout: a 128-byte header (text, subsystem offset, version, endian mark 'IM'
    or 'MI'), then data elements: miMATRIX (14), possibly zlib-wrapped in
    miCOMPRESSED (15). Other variables are skipped without being decoded.
    """
    label = str(path)
    raw = Path(path).read_bytes()
    if len(raw) < 128:
        raise DataError(f"{label}: {len(raw)} bytes, too short for a MAT file header")
    if b"MATLAB 7.3" in raw[:128] or raw[512:520] == b"\x89HDF\r\n\x1a\n":
        raise DataError(f"{label} is a MATLAB 7.3 (HDF5) file; expected MAT v5 "
                        "(the canonical SVHN files are v5)")
    mark = raw[126:128]
    if mark not in (b"IM", b"MI"):
        raise DataError(f"{label}: not a MATLAB v5 .mat file (endian mark {mark!r})")
    bo = "<" if mark == b"IM" else ">"
    buf = memoryview(raw)
    found = {}
    off = 128
    while off + 8 <= len(buf) and len(found) < len(wanted):
        mtype, payload, nxt = _mat_tag(buf, off, bo, label)
        if mtype == _MI_COMPRESSED:
            nxt = off + 8 + len(payload)  # compressed elements are not padded
            element = _inflate_if_wanted(payload, bo, label, wanted)
            if element is not None:
                inner_type, body, _ = _mat_tag(element, 0, bo, label)
                if inner_type == _MI_MATRIX:
                    name, arr = _mat_matrix(body, bo, label, wanted)
                    if arr is not None:
                        found[name] = arr
        elif mtype == _MI_MATRIX:
            name, arr = _mat_matrix(payload, bo, label, wanted)
            if arr is not None:
                found[name] = arr
        off = nxt
    return found


def _inflate_if_wanted(payload, bo: str, label: str, wanted) -> Optional[memoryview]:
    """Decompress a miCOMPRESSED payload, or None when its variable is not wanted.

    The variable name sits in the first few hundred bytes, so unwanted variables
    cost only a partial decompression.
    """
    d = zlib.decompressobj()
    try:
        head = d.decompress(payload, 1024)
        if len(head) >= 8 and struct.unpack_from(bo + "I", head, 0)[0] == _MI_MATRIX:
            body = memoryview(head)[8:]  # possibly cut short: only the name is needed
            try:
                name, _ = _mat_matrix(body, bo, label, wanted=())
            except DataError:
                name = None  # header longer than 1 KiB: decode fully below
            if name is not None and name not in wanted:
                return None
        rest = d.decompress(d.unconsumed_tail) + d.flush()
    except zlib.error as e:
        raise DataError(f"{label}: damaged compressed data element ({e})") from None
    return memoryview(head + rest)


SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _svhn_images(split: str, root: Path, mirror: str, progress: bool) -> np.ndarray:
    """uint8 (E, 3, 32, 32) view of one SVHN file (X is (32, 32, 3, E) in MATLAB)."""
    cache = root / "svhn"
    name = SVHN_FILES[split]
    path, _ = locate([name], "svhn", cache, cache, mirror, SVHN_URL, [name], progress, keep=True)
    try:
        arrays = read_mat_v5(path)
        if "X" not in arrays:
            raise DataError(f"{path}: no numeric variable 'X'; expected the SVHN "
                            "cropped-digits file")
        x = arrays["X"]
        if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 (H, W, 3, N)")
        y = arrays.get("y")
        if y is not None and y.size != x.shape[3]:
            raise DataError(f"{path}: {x.shape[3]} images but {y.size} labels")
    except DataError as e:
        raise hint_delete(path, cache, e) from None
    return x.transpose(3, 2, 0, 1)  # (H, W, C, E) -> (E, C, H, W)


def load_svhn(root: Path, mirror: str, progress: bool) -> DataSplits:
    train = _svhn_images("train", root, mirror, progress)
    test = _svhn_images("test", root, mirror, progress)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"svhn: train images are {train.shape[1:]}, test images {test.shape[1:]}")
    return split_train("svhn", to_float(train), to_float(test), train.shape[1:])
