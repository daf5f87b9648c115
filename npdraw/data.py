"""Data sets for DRAW: download, verify, convert and load as flat float32 arrays.

Every loader returns a :class:`DataSplits` of three float32 matrices with values
in [0, 1], one image a row, each image flattened channels-first (C, H, W).

Dimension letters used in the shapes below:

    N  number of examples (images)
    C  channels (1 grey, 3 colour)
    H  image height in pixels
    W  image width in pixels
    D  = C*H*W, the length of one flattened image

Data sets (see docs/DATA.md for formats, splits and the mirror layout):

    bmnist         Larochelle's binarized MNIST (the DRAW paper's), 50k/10k/10k,
                   converted once into <data_dir>/binarized_mnist.h5
    mnist          grey-level MNIST from the IDX files, values / 255
    fashion-mnist  Fashion-MNIST from the IDX files, values / 255
    cifar10        CIFAR-10 binary version (cifar-10-binary.tar.gz)
    svhn           SVHN cropped digits (train_32x32.mat / test_32x32.mat, MAT v5)
    folder         a folder of same-sized PNG/JPEG images
    two-digit-mnist  two binarized-MNIST digits on a 60x60 canvas, made on the fly
                   (npdraw/synthetic.py; a fresh training set every epoch)

Where files come from, in this order: a copy already in the data folder, the mirror
(argument ``mirror`` or env ``NPDRAW_MIRROR``: a local folder, or an http://,
https:// or file:// base URL), else the canonical URL. Downloads are streamed into
a hidden temporary file inside the data folder and renamed only once complete
and verified, so an interrupted or bad download never leaves a file that looks
valid. No pickle is used anywhere: CIFAR-10 is read from its binary version.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import DATASETS  # the one list of names, shared with TrainConfig
from .progress import Progress

DEFAULT_DATA_DIR = "data"
ENV_DATA = "NPDRAW_DATA"
ENV_MIRROR = "NPDRAW_MIRROR"

_CHUNK = 1 << 16  # download chunk in bytes
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned
# A peer that trickles never trips the timeout: past the grace period, a download whose
# mean rate is below this is abandoned (binarized MNIST's train file would take hours).
MIN_DOWNLOAD_RATE = 10_000   # bytes per second, on average since the start
RATE_GRACE = 60.0            # seconds before the rate is judged
_SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file is missing, damaged or not in the expected format."""


@dataclass
class DataSplits:
    """Train/valid/test images, each a float32 (N, D) matrix with values in [0, 1]."""

    train: np.ndarray  # (N_train, D)
    valid: np.ndarray  # (N_valid, D)
    test: np.ndarray  # (N_test, D)
    shape: tuple  # (C, H, W); D = C*H*W
    # For data made on the fly (two-digit-mnist): fresh_train(rng, count) -> a new (count, D)
    # training set, which training draws every epoch; train is one such set.
    fresh_train: Optional[Callable] = None


# --------------------------------------------------------------------------- #
# Binarized MNIST: canonical source and checksums
# --------------------------------------------------------------------------- #

BMNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BMNIST_H5 = "binarized_mnist.h5"
BMNIST_SHAPE = (1, 28, 28)

# SHA-256 of the *uncompressed* .amat files. Module level so that tests can swap
# in the checksums of small fake files.
# The images in each .amat file: its size is 2 * 784 bytes a line.
BMNIST_ROWS = {"train": 50_000, "valid": 10_000, "test": 10_000}
# A temporary file (.part) older than this was left by a killed process; it is removed.
STALE_PART_SECONDS = 3600
BMNIST_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}

# --------------------------------------------------------------------------- #
# Other data sets: canonical sources. The MD5s are the publishers' and hold for
# the canonical downloads only (mirrors may recompress, e.g. Debian's package).
# --------------------------------------------------------------------------- #

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"

CANONICAL_MD5 = {
    MNIST_URL + "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    MNIST_URL + "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    MNIST_URL + "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    MNIST_URL + "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    FASHION_URL + "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    FASHION_URL + "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    CIFAR10_URL + "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    SVHN_URL + "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    SVHN_URL + "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}

# Validation images taken from the end of the training file. A training file with
# fewer than 6*V images (small or hand-made copies) gives its last sixth instead
# (at least one image).
VALID_SIZE = {"mnist": 10000, "fashion-mnist": 10000, "cifar10": 5000, "svhn": 5000}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SEED = 0  # fixed shuffle seed of the folder data set's split


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #

def spread_subset(total: int, count: int, seed: int) -> np.ndarray:
    """``count`` sorted indices into a split of ``total`` images, spread over all of it:
    one drawn at random from each of ``count`` equal stretches, with ``seed``. A file
    sorted by label (binarized MNIST's test set is) then gives every label its share,
    where its first images would be mostly zeros. count >= total: every index."""
    total, count = int(total), int(count)
    if count >= total:
        return np.arange(total)
    if count < 1:
        raise ValueError(f"a subset needs at least one image, got {count}")
    rng = np.random.default_rng([int(seed), 0x5B5E7])
    starts = (np.arange(count) * total) // count
    ends = (np.arange(1, count + 1) * total) // count
    return starts + (rng.random(count) * (ends - starts)).astype(np.int64)


def resolve_data_dir(data_dir: str = DEFAULT_DATA_DIR) -> Path:
    """The data folder: ``data_dir``, except that env NPDRAW_DATA replaces the default "data".

    A relative path is relative to the current working directory.
    """
    data_dir = str(data_dir) if data_dir is not None else ""
    if data_dir in ("", DEFAULT_DATA_DIR):
        env = os.environ.get(ENV_DATA, "").strip()
        if env:
            return Path(env).expanduser()
        data_dir = DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def resolve_mirror(mirror: str = "") -> str:
    """``mirror`` if given, else env NPDRAW_MIRROR, else "" (meaning the canonical URLs)."""
    mirror = str(mirror).strip() if mirror else ""
    if mirror:
        return mirror
    return os.environ.get(ENV_MIRROR, "").strip()


def load_splits(dataset: str, data_dir: str = DEFAULT_DATA_DIR, mirror: str = "",
                folder: str = "", progress: bool = True) -> DataSplits:
    """Load a data set as float32 (N, D) train/valid/test matrices in [0, 1].

    dataset:  one of DATASETS.
    data_dir: where downloads, conversions and caches go (see resolve_data_dir).
    mirror:   local folder or base URL to fetch source files from (see resolve_mirror).
    folder:   the image folder, for dataset "folder" only.
    progress: print a download progress bar to stderr.
    """
    name = str(dataset).strip().lower()
    if name not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    if name == "folder":
        return _load_folder(folder)
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} exists but is not a folder")
    mirror = resolve_mirror(mirror)
    if name == "bmnist":
        return _load_bmnist(root, mirror, progress)
    if name == "two-digit-mnist":
        from .synthetic import two_digit_splits
        return two_digit_splits(_load_bmnist(root, mirror, progress))
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, root, mirror, progress)
    if name == "cifar10":
        return _load_cifar10(root, mirror, progress)
    return _load_svhn(root, mirror, progress)


# --------------------------------------------------------------------------- #
# Downloading
# --------------------------------------------------------------------------- #

class _NotFound(Exception):
    """The URL answered, but has no such file: the next candidate may."""


def _stream_to_temp(url: str, directory: Path, progress: bool) -> Path:
    """Download ``url`` into a new hidden temporary file in ``directory``.

    Raises _NotFound for a missing file (HTTP 4xx, file:// without the file) and
    DataError for anything else, e.g. a body shorter than its Content-Length.
    The temporary file is removed on every failure.
    """
    name = url.rsplit("/", 1)[-1] or "download"
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500:
                    raise _NotFound(f"HTTP {e.code} {e.reason}") from None
                raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, FileNotFoundError):
                    raise _NotFound("no such file") from None
                raise DataError(
                    f"cannot reach {url}: {e.reason}. Without internet access, point "
                    f"{ENV_MIRROR} or the mirror option at a local copy; see docs/DATA.md"
                ) from None
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.strip().isdigit() else None
                bar = Progress(name, total, progress, amount=lambda n: f"{n / 1e6:.1f} MB")
                read = getattr(response, "read1", response.read)   # what has arrived
                start = time.monotonic()
                try:
                    while True:
                        chunk = read(_CHUNK)
                        if not chunk:
                            break
                        out.write(chunk)
                        bar.update(bar.done + len(chunk))
                        elapsed = time.monotonic() - start
                        if elapsed > RATE_GRACE and bar.done < MIN_DOWNLOAD_RATE * elapsed:
                            raise DataError(
                                f"download of {url} is too slow ({bar.done:,} bytes in "
                                f"{elapsed:.0f} s, under {MIN_DOWNLOAD_RATE:,} bytes/s); "
                                f"nothing was saved: run again, or point {ENV_MIRROR} or "
                                "the mirror option at a local copy")
                finally:
                    bar.close()
            # urllib returns b"" (no exception) when the peer closes early, so the
            # byte count is the only reliable sign of a cut-short download.
            if total is not None and bar.done != total:
                raise DataError(f"download of {url} was cut short: got {bar.done} of {total} "
                                "bytes; nothing was saved, run again to retry")
        return tmp
    except (http.client.HTTPException, OSError) as e:  # IncompleteRead, resets, timeouts
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed ({type(e).__name__}: {e}); "
                        "nothing was saved, run again to retry") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(tmp: Path, dest: Path) -> None:
    """Rename a finished temp file into place with normal permissions (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, dest)


def _is_url(mirror: str) -> bool:
    return mirror.lower().startswith(("http://", "https://", "file://"))


def _check_mirror(mirror: str) -> None:
    if "://" in mirror and not _is_url(mirror):
        raise DataError(f"mirror {mirror!r}: only http://, https://, file:// URLs or a local "
                        "folder are supported")
    if not _is_url(mirror) and Path(mirror).expanduser().exists() \
            and not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror {mirror} is a file; the mirror must be a folder or a URL "
                        f"(from the mirror argument or {ENV_MIRROR})")
    if not _is_url(mirror) and not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror folder {mirror} does not exist (from the mirror argument or "
                        f"{ENV_MIRROR})")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _locate(names: list, subdir: str, cache: Optional[Path], work_dir: Path, mirror: str,
            canonical: str, canonical_names: list, progress: bool, keep: bool) -> tuple:
    """Find one source file, trying each of ``names`` (alternatives: plain, .gz).

    Order: ``cache`` folder, then the mirror (folder: its top and its ``subdir``;
    URL: the same two places), else ``canonical`` + ``canonical_names``.
    Returns (path, is_temporary). Downloads land in ``work_dir``: with ``keep``
    renamed to their file name there (a cache for next time), else left as a
    temporary file that the caller deletes.
    """
    if cache is not None:
        for n in names:
            if (cache / n).is_file():
                return cache / n, False
    if mirror:
        _check_mirror(mirror)
    if mirror and not _is_url(mirror):
        base = Path(mirror).expanduser()
        tried = [base / n for n in names] + [base / subdir / n for n in names]
        for p in tried:
            if p.is_file():
                return p, False
        raise DataError(f"mirror folder {base} has none of: "
                        f"{', '.join(str(p) for p in tried)}")
    if mirror:
        base = mirror if mirror.endswith("/") else mirror + "/"
        urls = [base + n for n in names] + [f"{base}{subdir}/{n}" for n in names]
    else:
        urls = [canonical + n for n in canonical_names]
    missing = []
    for url in urls:
        try:
            tmp = _stream_to_temp(url, work_dir, progress)
        except _NotFound as e:
            missing.append(f"{url} ({e})")
            continue
        try:
            expected = CANONICAL_MD5.get(url)
            if expected is not None:
                actual = _md5(tmp)
                if actual != expected:
                    raise DataError(f"checksum mismatch for {url}: expected md5 {expected}, "
                                    f"got {actual}; the download was deleted")
            if not keep:
                return tmp, True
            dest = work_dir / url.rsplit("/", 1)[-1]
            _publish(tmp, dest)
            return dest, False
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    raise DataError("source file not found; tried: " + "; ".join(missing))


def _read_maybe_gzip(path: Path, max_bytes: Optional[int] = None) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic. With
    ``max_bytes`` (the format's known size) a file holding more, once decompressed, is
    refused after reading at most max_bytes + 1 bytes (a gzip bomb is never read whole)."""
    limit = -1 if max_bytes is None else max_bytes + 1
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            f.seek(0)
            if magic == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    raw = g.read(limit)
            else:
                raw = f.read(limit)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e} (damaged or truncated gzip?)") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise DataError(f"{path} holds more than {max_bytes:,} bytes (decompressed), the size "
                        "of the file it should be; it is not that file")
    return raw


def _remove_stale_parts(root: Path, prefix: str) -> None:
    """Remove ``prefix*.part`` files in ``root`` left by a killed download or conversion
    (older than STALE_PART_SECONDS, so that a running one keeps its file)."""
    now = time.time()
    for part in root.glob(f"{prefix}*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
        except OSError:
            pass


def _hint_delete(path: Path, cache: Path, error: DataError) -> DataError:
    """Add 'delete it' to an error about a file that sits in our cache folder."""
    if path.parent == cache:
        return DataError(f"{error}; delete {path} to fetch it again")
    return error


def _n_valid(dataset: str, n_train_file: int) -> int:
    if n_train_file < 2:
        raise DataError(f"{dataset}: the training file holds {n_train_file} image(s); need at "
                        "least 2 (train and valid are both cut from it)")
    return max(1, min(VALID_SIZE[dataset], n_train_file // 6))


def _to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) (any strides) -> float32 (N, D) in [0, 1]."""
    n = images.shape[0]
    out = np.empty(images.shape, dtype=np.float32)
    np.divide(images, np.float32(255), out=out)
    return out.reshape(n, -1)


def _split_train(dataset: str, train: np.ndarray, test: np.ndarray, shape: tuple) -> DataSplits:
    """train (N, D) -> last _n_valid rows are the validation split."""
    nv = _n_valid(dataset, train.shape[0])
    cut = train.shape[0] - nv
    return DataSplits(train=train[:cut], valid=train[cut:], test=test, shape=tuple(shape))


# --------------------------------------------------------------------------- #
# bmnist
# --------------------------------------------------------------------------- #

def _parse_amat(raw: bytes, label: str, width: int = 784) -> np.ndarray:
    """Text .amat of single-character 0/1 values -> uint8 (N, width).

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


def _bmnist_split(split: str, root: Path, mirror: str, progress: bool) -> np.ndarray:
    """One split as uint8 (N, 784), read from data_dir, the mirror or downloaded."""
    base = f"binarized_mnist_{split}.amat"
    names = [base, base + ".gz"]
    path, temporary = _locate(names, "binarized_mnist", root, root, mirror, BMNIST_URL, names,
                              progress, keep=False)
    try:
        raw = _read_maybe_gzip(path, BMNIST_ROWS[split] * 2 * 784)   # "0 1 ... 0\n" lines
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
    """Write uint8 (N, D) arrays to an HDF5 file via a temp file + os.replace.

    The file is built in memory (a few MB, compressed) and written with plain writes, so
    a full disk is one OSError, never an HDF5 failure with half-open objects."""
    import io

    import h5py

    from .guards import os_error_sentence

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
        _publish(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise DataError(os_error_sentence(err, f"write the converted data set {path}")) \
                from None
        raise


def amat_sha256(images: np.ndarray) -> str:
    """The sha256 of the .amat text that holds uint8 (N, 784) 0/1 ``images`` ("0 1 ...
    0" lines with single spaces): the converted file is checked against BMNIST_SHA256,
    the digests of the source files (about 0.1 s for the training split)."""
    n, width = images.shape
    text = np.full((n, 2 * width), ord(" "), np.uint8)
    text[:, 0::2] = images + ord("0")
    text[:, -1] = ord("\n")
    return hashlib.sha256(text).hexdigest()


def _read_bmnist_h5(path: Path, splits=_SPLITS) -> dict:
    """The named splits of the converted file, uint8 (N, 784) each, checked."""
    import h5py

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


def _load_bmnist(root: Path, mirror: str, progress: bool) -> DataSplits:
    h5 = root / BMNIST_H5
    if not h5.exists():
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(root, ".binarized_mnist")
        # All three splits are fetched and verified before anything is written, so
        # an HDF5 file, once there, is always complete.
        arrays = {s: _bmnist_split(s, root, mirror, progress) for s in _SPLITS}
        _write_h5_atomically(h5, arrays, {
            "source": "binarized MNIST (Larochelle & Murray 2011), .amat",
            "shape": np.array(BMNIST_SHAPE),
            **{f"sha256_{s}": BMNIST_SHA256[s] for s in _SPLITS},
        })
    arrays = _read_bmnist_h5(h5)
    return DataSplits(*(arrays[s].astype(np.float32) for s in _SPLITS), shape=BMNIST_SHAPE)


def load_split(dataset: str, split: str, data_dir: str = DEFAULT_DATA_DIR, mirror: str = "",
               folder: str = "", progress: bool = True) -> tuple:
    """One split as float32 (N, D) in [0, 1], and the image shape (C, H, W).

    For binarized MNIST only that split is read: from the converted file when it exists,
    else from its own source file (checked against its sha256, nothing converted), so
    scoring a shipped model needs the test file alone. Other data sets: load_splits."""
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(_SPLITS)}")
    if str(dataset).strip().lower() != "bmnist":
        data = load_splits(dataset, data_dir, mirror, folder, progress)
        return getattr(data, split), data.shape
    root = resolve_data_dir(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data folder {root} exists but is not a folder")
    h5 = root / BMNIST_H5
    if h5.exists():
        images = _read_bmnist_h5(h5, (split,))[split]
    else:
        root.mkdir(parents=True, exist_ok=True)
        images = _bmnist_split(split, root, resolve_mirror(mirror), progress)
    return images.astype(np.float32), BMNIST_SHAPE


# --------------------------------------------------------------------------- #
# mnist / fashion-mnist (IDX)
# --------------------------------------------------------------------------- #

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
    """uint8 (N, H, W) images of one IDX file."""
    cache = root / dataset
    names = [stem, stem + ".gz"]
    path, _ = _locate(names, dataset, cache, cache, mirror, canonical, [stem + ".gz"],
                      progress, keep=True)
    try:
        arr = parse_idx(_read_maybe_gzip(path), str(path))
        if arr.ndim != 3 or arr.dtype != np.uint8:
            raise DataError(f"{path}: expected unsigned-byte images (N, H, W), "
                            f"got {arr.dtype} with dims {arr.shape}")
    except DataError as e:
        raise _hint_delete(path, cache, e) from None
    return arr


def _load_idx_dataset(dataset: str, root: Path, mirror: str, progress: bool) -> DataSplits:
    canonical = MNIST_URL if dataset == "mnist" else FASHION_URL
    train = _load_idx_images(dataset, "train-images-idx3-ubyte", root, mirror, progress, canonical)
    test = _load_idx_images(dataset, "t10k-images-idx3-ubyte", root, mirror, progress, canonical)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"{dataset}: train images are {train.shape[1:]} but test images are "
                        f"{test.shape[1:]}")
    shape = (1,) + train.shape[1:]
    return _split_train(dataset, _to_float(train[:, None]), _to_float(test[:, None]), shape)


# --------------------------------------------------------------------------- #
# cifar10 (binary version)
# --------------------------------------------------------------------------- #

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST = ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + R, G, B planes of 32x32


def _parse_cifar_batch(raw: bytes, label: str) -> np.ndarray:
    """Records of 1 label byte + 3072 pixel bytes -> uint8 (N, 3, 32, 32)."""
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


def _load_cifar10(root: Path, mirror: str, progress: bool) -> DataSplits:
    cache = root / "cifar10"
    batches = _cifar_from_folder(cache)
    if batches is None and mirror and not _is_url(mirror):
        _check_mirror(mirror)
        batches = _cifar_from_folder(Path(mirror).expanduser())
    if batches is None:
        path, _ = _locate([CIFAR10_ARCHIVE], "cifar10", cache, cache, mirror, CIFAR10_URL,
                          [CIFAR10_ARCHIVE], progress, keep=True)
        try:
            batches = _cifar_from_tar(path)
        except DataError as e:
            raise _hint_delete(path, cache, e) from None
    train = np.concatenate([_parse_cifar_batch(batches[n], n) for n in CIFAR10_TRAIN])
    test = _parse_cifar_batch(batches[CIFAR10_TEST[0]], CIFAR10_TEST[0])
    return _split_train("cifar10", _to_float(train), _to_float(test), (3, 32, 32))


# --------------------------------------------------------------------------- #
# svhn (MATLAB v5 .mat)
# --------------------------------------------------------------------------- #

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
    """uint8 (N, 3, 32, 32) view of one SVHN file (X is (32, 32, 3, N) in MATLAB)."""
    cache = root / "svhn"
    name = SVHN_FILES[split]
    path, _ = _locate([name], "svhn", cache, cache, mirror, SVHN_URL, [name], progress, keep=True)
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
        raise _hint_delete(path, cache, e) from None
    return x.transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)


def _load_svhn(root: Path, mirror: str, progress: bool) -> DataSplits:
    train = _svhn_images("train", root, mirror, progress)
    test = _svhn_images("test", root, mirror, progress)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"svhn: train images are {train.shape[1:]}, test images {test.shape[1:]}")
    return _split_train("svhn", _to_float(train), _to_float(test), train.shape[1:])


# --------------------------------------------------------------------------- #
# folder of images
# --------------------------------------------------------------------------- #

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


def _load_folder(folder: str) -> DataSplits:
    import imageio.v3 as iio

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
    data = np.stack(images).reshape(len(images), -1)  # (N, D)
    order = np.random.default_rng(FOLDER_SEED).permutation(len(paths))
    n = len(paths)
    n_valid = n_test = max(1, n // 20)  # 5 % each, at least one
    data = data[order]
    a, b = n - n_valid - n_test, n - n_test
    return DataSplits(train=data[:a], valid=data[a:b], test=data[b:], shape=images[0].shape)
