"""What every data set shares: the splits it gives (DataSplits) and its error (DataError);
where its files come from (``locate``: the data folder, else the mirror, else the canonical
URL); downloads with their bounds (timeout, least mean rate) and the publishers' checksums;
reading a file that may be gzipped, with a size bound; and the validation split cut from
the end of the training file.

Dimension legend
    E  images (examples) in a set or a file
    C, H, W  channels, image height, image width
    D  C*H*W, one image flattened channels-first

Downloads are streamed into a hidden temporary file inside the data folder and renamed only
once complete and verified, so an interrupted or bad download never leaves a file that
looks valid.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..guards import os_error_sentence
from ..progress import Progress

DEFAULT_DATA_DIR = "data"
ENV_DATA = "NPDRAW_DATA"
ENV_MIRROR = "NPDRAW_MIRROR"

_CHUNK = 1 << 16  # download chunk in bytes
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned
# A peer that trickles never trips the timeout: past the grace period, a download whose
# mean rate is below this is abandoned (binarized MNIST's train file would take hours).
MIN_DOWNLOAD_RATE = 10_000   # bytes per second, on average since the start
RATE_GRACE = 60.0            # seconds before the rate is judged
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file is missing, damaged or not in the expected format."""


@dataclass
class DataSplits:
    """Train/valid/test images, each a float32 (E, D) matrix with values in [0, 1]."""

    train: np.ndarray  # (E_train, D)
    valid: np.ndarray  # (E_valid, D)
    test: np.ndarray  # (E_test, D)
    shape: tuple  # (C, H, W); D = C*H*W
    # For data made on the fly (two-digit-mnist): fresh_train(rng, count) -> a new (count, D)
    # training set, which training draws every epoch; train is one such set.
    fresh_train: Optional[Callable] = None


# A temporary file (.part) older than this was left by a killed process; it is removed.
STALE_PART_SECONDS = 3600

# --------------------------------------------------------------------------- #
# Canonical sources of the data sets downloaded by URL. The MD5s are the publishers' and hold for
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


# --------------------------------------------------------------------------- #
# Downloading
# --------------------------------------------------------------------------- #

class _NotFound(Exception):
    """The URL answered, but has no such file: the next candidate may."""


def _write_part(out, chunk, url: str, directory: Path) -> None:
    """Write ``chunk`` to the download's temporary file (None: flush it); a full disk is a
    DataError naming the folder (its OSError names no file)."""
    try:
        out.write(chunk) if chunk is not None else out.flush()
    except OSError as err:
        raise DataError(os_error_sentence(err, f"save the download of {url} in {directory}")
                        + "; nothing was saved") from None


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
                        _write_part(out, chunk, url, directory)
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
            _write_part(out, None, url, directory)
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


def publish(tmp: Path, dest: Path) -> None:
    """Rename a finished temp file into place with normal permissions (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, dest)


def is_url(mirror: str) -> bool:
    return mirror.lower().startswith(("http://", "https://", "file://"))


def check_mirror(mirror: str) -> None:
    if "://" in mirror and not is_url(mirror):
        raise DataError(f"mirror {mirror!r}: only http://, https://, file:// URLs or a local "
                        "folder are supported")
    if not is_url(mirror) and Path(mirror).expanduser().exists() \
            and not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror {mirror} is a file; the mirror must be a folder or a URL "
                        f"(from the mirror argument or {ENV_MIRROR})")
    if not is_url(mirror) and not Path(mirror).expanduser().is_dir():
        raise DataError(f"mirror folder {mirror} does not exist (from the mirror argument or "
                        f"{ENV_MIRROR})")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(names: list, subdir: str, cache: Optional[Path], work_dir: Path, mirror: str,
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
        check_mirror(mirror)
    if mirror and not is_url(mirror):
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
            publish(tmp, dest)
            return dest, False
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    raise DataError("source file not found; tried: " + "; ".join(missing))


def read_maybe_gzip(path: Path, max_bytes: Optional[int] = None) -> bytes:
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


def remove_stale_parts(root: Path, prefix: str) -> None:
    """Remove ``prefix*.part`` files in ``root`` left by a killed download or conversion
    (older than STALE_PART_SECONDS, so that a running one keeps its file)."""
    now = time.time()
    for part in root.glob(f"{prefix}*.part"):
        try:
            if now - part.stat().st_mtime > STALE_PART_SECONDS:
                part.unlink()
        except OSError:
            pass


def hint_delete(path: Path, cache: Path, error: DataError) -> DataError:
    """Add 'delete it' to an error about a file that sits in our cache folder."""
    if path.parent == cache:
        return DataError(f"{error}; delete {path} to fetch it again")
    return error


def _n_valid(dataset: str, n_train_file: int) -> int:
    if n_train_file < 2:
        raise DataError(f"{dataset}: the training file holds {n_train_file} image(s); need at "
                        "least 2 (train and valid are both cut from it)")
    return max(1, min(VALID_SIZE[dataset], n_train_file // 6))


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (E, C, H, W) (any strides) -> float32 (E, D) in [0, 1]."""
    n = images.shape[0]
    out = np.empty(images.shape, dtype=np.float32)
    np.divide(images, np.float32(255), out=out)
    return out.reshape(n, -1)


def split_train(dataset: str, train: np.ndarray, test: np.ndarray, shape: tuple) -> DataSplits:
    """train (E, D) -> last _n_valid rows are the validation split."""
    nv = _n_valid(dataset, train.shape[0])
    cut = train.shape[0] - nv
    return DataSplits(train=train[:cut], valid=train[cut:], test=test, shape=tuple(shape))
