"""CIFAR-10 from its binary version (cifar-10-binary.tar.gz, read in memory, or its
extracted batch files): no pickle is used.

Dimension legend
    E  images (examples) in a set or a file
    D  C*H*W, one image flattened channels-first (3 x 32 x 32 here)
"""
from __future__ import annotations

import tarfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from .sources import (CIFAR10_URL, DataError, DataSplits, check_mirror, hint_delete, is_url,
                      locate, split_train, to_float)


CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes of 32x32


def _parse_cifar_batch(raw: bytes, label: str) -> np.ndarray:
    """Records of 1 label byte + 3072 pixel bytes -> uint8 (E, 3, 32, 32)."""
    if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
        raise DataError(f"{label}: {len(raw)} bytes is not a whole number of "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 records (truncated?)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32)


def _cifar_from_tar(path: Path) -> dict:
    """Batch file name -> bytes, read from the archive in memory (nothing extracted)."""
    wanted = set(CIFAR10_TRAIN + CIFAR10_TEST)
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e} (damaged or truncated archive?)") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; expected the CIFAR-10 binary "
                        f"version ({CIFAR10_ARCHIVE})")
    return found


def _cifar_from_folder(folder: Path) -> Optional[dict]:
    """The batch files of an extracted archive, or None when they are not all there."""
    for d in (folder, folder / "cifar-10-batches-bin", folder / "cifar10" / "cifar-10-batches-bin"):
        paths = [d / n for n in CIFAR10_TRAIN + CIFAR10_TEST]
        if all(p.is_file() for p in paths):
            return {p.name: p.read_bytes() for p in paths}
    return None


def load_cifar10(root: Path, mirror: str, progress: bool) -> DataSplits:
    cache = root / "cifar10"
    batches = _cifar_from_folder(cache)
    if batches is None and mirror and not is_url(mirror):
        check_mirror(mirror)
        batches = _cifar_from_folder(Path(mirror).expanduser())
    if batches is None:
        path, _ = locate([CIFAR10_ARCHIVE], "cifar10", cache, cache, mirror, CIFAR10_URL,
                          [CIFAR10_ARCHIVE], progress, keep=True)
        try:
            batches = _cifar_from_tar(path)
        except DataError as e:
            raise hint_delete(path, cache, e) from None
    train = np.concatenate([_parse_cifar_batch(batches[n], n) for n in CIFAR10_TRAIN])
    test = _parse_cifar_batch(batches[CIFAR10_TEST[0]], CIFAR10_TEST[0])
    return split_train("cifar10", to_float(train), to_float(test), (3, 32, 32))
