"""Tests of npdraw.data: the real downloader over loopback HTTP, the offline mirror,
and each source format written here by hand in its canonical layout.

Shapes: N examples, C channels, H height, W width, D = C*H*W.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

from npdraw import data
from npdraw.data import bmnist, idx, sources
from npdraw.data import DATASETS, DataError, DataSplits, load_splits, parse_idx, read_mat_v5


# --------------------------------------------------------------------------- #
# loopback HTTP server
# --------------------------------------------------------------------------- #

class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes`` (name -> (body, declared length)) or files of ``server.root``."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        name = self.path.lstrip("/")
        srv.requests.append(name)
        if name in srv.routes:
            body, length = srv.routes[name]
        elif srv.root is not None and "/" not in name and (srv.root / name).is_file():
            body = (srv.root / name).read_bytes()
            length = len(body)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        # A declared length above len(body) models a connection dropped mid-file:
        # HTTP/1.0 closes the socket when the handler returns.
        if name in srv.trickle:  # 100 bytes every 0.1 s: slow, yet never silent
            for i in range(0, len(body), 100):
                if srv.release.is_set():
                    return
                self.wfile.write(body[i:i + 100])
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(body)
        if name in srv.stall:  # a peer that goes silent mid-file
            self.wfile.flush()
            srv.release.wait(timeout=5)

    def log_message(self, *args):
        pass


class _Server:
    def __init__(self, root: Path | None = None, routes: dict | None = None, stall=(),
                 trickle=()):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.root = root
        self.httpd.stall = set(stall)
        self.httpd.trickle = set(trickle)
        self.httpd.release = threading.Event()
        self.httpd.routes = {k: (v, len(v)) if isinstance(v, bytes) else v
                             for k, v in (routes or {}).items()}
        self.httpd.requests = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def stop(self):
        self.httpd.release.set()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(root=None, routes=None, stall=(), trickle=()) -> _Server:
        servers.append(_Server(root, routes, stall, trickle))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- #
# bmnist
# --------------------------------------------------------------------------- #

BMNIST_SHAPES = ((50000, 784), (10000, 784), (10000, 784))


def _fake_amat(n: int, seed: int) -> tuple:
    """n random binary 28x28 images -> (uint8 (n, 784), .amat text bytes)."""
    x = np.random.default_rng(seed).integers(0, 2, size=(n, 784), dtype=np.uint8)
    text = "".join(" ".join(map(str, row)) + "\n" for row in x).encode()
    return x, text


@pytest.fixture
def fake_bmnist(monkeypatch):
    """Small fake .amat files whose checksums replace the real ones."""
    files, arrays = {}, {}
    for i, (split, n) in enumerate((("train", 6), ("valid", 3), ("test", 4))):
        arrays[split], files[split] = _fake_amat(n, seed=i)
        monkeypatch.setitem(data.BMNIST_SHA256, split, hashlib.sha256(files[split]).hexdigest())
    return files, arrays


def test_bmnist_full_download_over_http_then_offline(bmnist_mirror, serve, tmp_path, capsys):
    server = serve(root=bmnist_mirror)
    data_dir = tmp_path / "data"
    s = load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=True)

    assert isinstance(s, DataSplits)
    assert s.shape == (1, 28, 28)
    assert (s.train.shape, s.valid.shape, s.test.shape) == BMNIST_SHAPES
    assert s.train.dtype == np.float32
    for arr in (s.train, s.valid, s.test):
        assert set(np.unique(arr).tolist()) == {0.0, 1.0}
    # .amat first, then .amat.gz, as the mirror protocol says
    assert server.requests[:2] == ["binarized_mnist_train.amat", "binarized_mnist_train.amat.gz"]
    assert "binarized_mnist_train.amat.gz" in capsys.readouterr().err  # the progress bar
    # Only the HDF5 file remains: no temporary downloads.
    assert _listing(data_dir) == ["binarized_mnist.h5"]
    with h5py.File(data_dir / "binarized_mnist.h5", "r") as f:
        assert {k: f[k].shape for k in f} == {"train": (50000, 784), "valid": (10000, 784),
                                              "test": (10000, 784)}
        assert all(f[k].dtype == np.uint8 for k in f)
        assert f["test"].compression == "gzip"
    # The parse agrees with the text: as many ones as '1' characters in the file.
    raw_test = gzip.decompress((bmnist_mirror / "binarized_mnist_test.amat.gz").read_bytes())
    assert int(s.test.sum()) == raw_test.count(b"1")
    first = np.array(raw_test.split(b"\n", 1)[0].split(), dtype=np.float32)
    np.testing.assert_array_equal(s.test[0], first)

    # Second load: no network at all (server gone), straight from the HDF5 file.
    server.stop()
    again = load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    np.testing.assert_array_equal(again.train, s.train)
    np.testing.assert_array_equal(again.test, s.test)


def test_bmnist_local_mirror_folder_via_env(bmnist_mirror, tmp_path, monkeypatch):
    before = _listing(bmnist_mirror)
    monkeypatch.setenv("NPDRAW_MIRROR", str(bmnist_mirror))
    monkeypatch.setenv("NPDRAW_DATA", str(tmp_path / "envdata"))
    s = load_splits("bmnist", progress=False)
    assert (s.train.shape, s.valid.shape, s.test.shape) == BMNIST_SHAPES
    assert (tmp_path / "envdata" / "binarized_mnist.h5").is_file()
    assert _listing(bmnist_mirror) == before  # nothing copied into the mirror
    assert 0.05 < float(s.train.mean()) < 0.25  # MNIST digits: mostly background


def test_bmnist_download_cut_short_leaves_nothing(serve, tmp_path):
    body = b"0 1 " * 1000
    server = serve(routes={"binarized_mnist_train.amat": (body, len(body) + 5000)})
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=r"cut short: got 4000 of 9000 bytes") as e:
        load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert "binarized_mnist_train.amat" in str(e.value)
    assert _listing(data_dir) == []


def test_bmnist_download_stalled_leaves_nothing(serve, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 0.3)
    body = b"0 1 " * 1000
    name = "binarized_mnist_train.amat"
    server = serve(routes={name: (body, len(body) + 5000)}, stall={name})
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=r"download of .*_train\.amat failed \(.*timed out"):
        load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert _listing(data_dir) == []


def test_bmnist_download_that_trickles_is_abandoned_and_leaves_nothing(serve, tmp_path,
                                                                       monkeypatch):
    """1 kB/s never trips the timeout (issue 25: still downloading after 150 s): past the
    grace period, a mean rate below the floor ends it in one sentence."""
    monkeypatch.setattr(sources, "RATE_GRACE", 0.5)
    body = b"0 1 " * 2000
    name = "binarized_mnist_train.amat"
    server = serve(routes={name: body}, trickle={name})
    data_dir = tmp_path / "data"
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"download of .*_train\.amat is too slow \(.* bytes in "
                                        r"\d+ s, under 10,000 bytes/s\); nothing was saved"):
        load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert time.monotonic() - t0 < 5            # the 8,000 bytes would take 8 s
    assert _listing(data_dir) == []


def test_bmnist_wrong_checksum_leaves_nothing(serve, tmp_path):
    _, text = _fake_amat(3, seed=5)
    server = serve(routes={"binarized_mnist_train.amat": text})
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as e:
        load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    msg = str(e.value)
    assert "checksum mismatch for binarized_mnist_train.amat" in msg
    assert data.BMNIST_SHA256["train"] in msg
    assert hashlib.sha256(text).hexdigest() in msg
    assert _listing(data_dir) == []


def test_bmnist_small_fake_files_and_corrupt_h5(fake_bmnist, serve, tmp_path):
    files, arrays = fake_bmnist
    server = serve(routes={f"binarized_mnist_{k}.amat": v for k, v in files.items()})
    data_dir = tmp_path / "data"
    s = load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(s, split), arrays[split].astype(np.float32))
    assert not any(r.endswith(".gz") for r in server.requests)  # plain .amat was found first

    h5 = data_dir / "binarized_mnist.h5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])  # truncate
    with pytest.raises(DataError, match="delete") as e:
        load_splits("bmnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert "binarized_mnist.h5" in str(e.value)


def test_bmnist_file_url_mirror_with_gz(fake_bmnist, tmp_path):
    files, arrays = fake_bmnist
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split, text in files.items():
        (mirror / f"binarized_mnist_{split}.amat.gz").write_bytes(gzip.compress(text))
    s = load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=mirror.as_uri(), progress=False)
    np.testing.assert_array_equal(s.valid, arrays["valid"].astype(np.float32))
    assert _listing(tmp_path / "d") == ["binarized_mnist.h5"]


def test_bmnist_missing_sources_name_what_was_looked_for(tmp_path, serve):
    with pytest.raises(ValueError, match="mirror folder .*nope.* does not exist"):
        load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"binarized_mnist_train\.amat\.gz"):
        load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=str(empty))
    server = serve(routes={})
    with pytest.raises(ValueError, match=r"not found; tried: .*binarized_mnist_train\.amat "):
        load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=server.url, progress=False)
    assert _listing(tmp_path / "d") == []


def test_amat_parser_rejects_bad_text():
    with pytest.raises(DataError, match="has 3 values, expected 784"):
        bmnist._parse_amat(b"0 1 0\n", "x.amat")
    with pytest.raises(DataError, match="unexpected byte"):
        bmnist._parse_amat(b"0 2 0\n", "x.amat")


# --------------------------------------------------------------------------- #
# names and environment
# --------------------------------------------------------------------------- #

def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as e:
        load_splits("imagenet", data_dir=str(tmp_path))
    assert "imagenet" in str(e.value)
    assert all(name in str(e.value) for name in DATASETS)


def test_resolve_data_dir_and_mirror(monkeypatch):
    monkeypatch.delenv("NPDRAW_DATA", raising=False)
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    assert data.resolve_data_dir("data") == Path("data")
    assert data.resolve_mirror("") == ""
    monkeypatch.setenv("NPDRAW_DATA", "elsewhere")
    monkeypatch.setenv("NPDRAW_MIRROR", "http://127.0.0.1:9/m/")
    assert data.resolve_data_dir("data") == Path("elsewhere")
    assert data.resolve_data_dir("mine") == Path("mine")  # an explicit folder wins
    assert data.resolve_mirror("") == "http://127.0.0.1:9/m/"
    assert data.resolve_mirror("local") == "local"


# --------------------------------------------------------------------------- #
# IDX (mnist, fashion-mnist)
# --------------------------------------------------------------------------- #

def _idx_images(x: np.ndarray) -> bytes:
    """uint8 (N, H, W) -> IDX bytes."""
    return struct.pack(">BBBB3I", 0, 0, 0x08, 3, *x.shape) + x.tobytes()


def _pattern_images(n: int, h: int, w: int, offset: int) -> np.ndarray:
    """uint8 (n, h, w): image k has value 10*r + c + offset + k at row r, column c."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([10 * r + c + offset + k for k in range(n)]).astype(np.uint8)


@pytest.mark.parametrize("dataset,layout", [("mnist", "flat"), ("fashion-mnist", "subdir")])
def test_idx_from_mirror_folder(tmp_path, dataset, layout):
    train, test = _pattern_images(12, 5, 7, 0), _pattern_images(3, 5, 7, 100)
    mirror = tmp_path / "mirror"
    folder = mirror / dataset if layout == "subdir" else mirror
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(train)))
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_images(test))

    s = load_splits(dataset, data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)
    assert s.shape == (1, 5, 7)
    # 12 training images: the last sixth (2) is the validation split.
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((10, 35), (2, 35), (3, 35))
    assert s.train.dtype == np.float32 and 0 <= s.train.min() and s.test.max() <= 1
    np.testing.assert_allclose(s.train[3].reshape(5, 7), train[3] / 255, rtol=1e-6)
    np.testing.assert_allclose(s.valid[-1].reshape(5, 7), train[11] / 255, rtol=1e-6)
    assert s.test[0].reshape(5, 7)[2, 4] == pytest.approx((100 + 24) / 255)  # row 2, column 4


def test_idx_download_is_cached(tmp_path, serve):
    train, test = _pattern_images(12, 4, 4, 0), _pattern_images(2, 4, 4, 50)
    server = serve(routes={"train-images-idx3-ubyte.gz": gzip.compress(_idx_images(train)),
                           "t10k-images-idx3-ubyte.gz": gzip.compress(_idx_images(test))})
    data_dir = tmp_path / "d"
    s = load_splits("mnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert _listing(data_dir / "mnist") == ["t10k-images-idx3-ubyte.gz",
                                            "train-images-idx3-ubyte.gz"]
    server.stop()
    again = load_splits("mnist", data_dir=str(data_dir), mirror=server.url, progress=False)
    np.testing.assert_array_equal(again.test, s.test)


def test_idx_canonical_download_checks_md5(tmp_path, serve, monkeypatch):
    train_gz = gzip.compress(_idx_images(_pattern_images(12, 4, 4, 0)))
    test_gz = gzip.compress(_idx_images(_pattern_images(2, 4, 4, 50)))
    server = serve(routes={"train-images-idx3-ubyte.gz": train_gz,
                           "t10k-images-idx3-ubyte.gz": test_gz})
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    monkeypatch.setattr(idx, "MNIST_URL", server.url)  # the "canonical" site, on loopback
    train_url = server.url + "train-images-idx3-ubyte.gz"
    test_url = server.url + "t10k-images-idx3-ubyte.gz"
    monkeypatch.setitem(data.CANONICAL_MD5, train_url, hashlib.md5(train_gz).hexdigest())
    monkeypatch.setitem(data.CANONICAL_MD5, test_url, "0" * 32)
    data_dir = tmp_path / "d"
    with pytest.raises(DataError, match=r"checksum mismatch for .*t10k-images-idx3-ubyte\.gz: "
                                        r"expected md5 0{32}, got [0-9a-f]{32}"):
        load_splits("mnist", data_dir=str(data_dir), progress=False)
    # The verified train file is kept, the bad test file is gone; only .gz names were asked for.
    assert _listing(data_dir / "mnist") == ["train-images-idx3-ubyte.gz"]
    assert server.requests == ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]


def test_idx_truncated_and_bad_magic(tmp_path):
    good = _idx_images(_pattern_images(12, 5, 7, 0))
    with pytest.raises(ValueError, match=r"truncated: dims \(12, 5, 7\) need 420 bytes, got 400"):
        parse_idx(good[:-20], "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match="bad IDX magic 00000103"):
        parse_idx(b"\x00\x00\x01\x03" + good[4:], "x")

    mirror = tmp_path / "m"
    mirror.mkdir()
    (mirror / "train-images-idx3-ubyte").write_bytes(good[:-20])
    (mirror / "t10k-images-idx3-ubyte").write_bytes(good)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: IDX data truncated"):
        load_splits("mnist", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)


# --------------------------------------------------------------------------- #
# CIFAR-10 (binary version)
# --------------------------------------------------------------------------- #

def _cifar_batch(n: int, first: int) -> bytes:
    """n records: label 9, R = first + k, G = 4 * row, B = 4 * column."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    out = []
    for k in range(n):
        planes = np.stack([np.full((32, 32), first + k), 4 * r, 4 * c]).astype(np.uint8)
        out.append(b"\x09" + planes.tobytes())
    return b"".join(out)


def _cifar_tar(batches: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _cifar_batches() -> dict:
    batches = {f"data_batch_{i}.bin": _cifar_batch(2, 10 * i) for i in range(1, 6)}
    batches["test_batch.bin"] = _cifar_batch(3, 200)
    return batches


def test_cifar10_binary_archive(tmp_path, serve):
    archive = _cifar_tar(_cifar_batches())
    server = serve(routes={"cifar-10-binary.tar.gz": archive})
    data_dir = tmp_path / "d"
    s = load_splits("cifar10", data_dir=str(data_dir), mirror=server.url, progress=False)
    assert s.shape == (3, 32, 32)
    # 10 training images: the last sixth (1) is the validation split.
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((9, 3072), (1, 3072), (3, 3072))
    x = s.train.reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(x[:, 0, 5, 5], np.array([10, 11, 20, 21, 30, 31, 40, 41, 50]) / 255,
                               rtol=1e-6)  # red plane first, batches in order, labels dropped
    np.testing.assert_allclose(x[:, 1, :, 3], np.broadcast_to(4 * np.arange(32) / 255, (9, 32)),
                               rtol=1e-6)  # green varies down the rows
    np.testing.assert_allclose(x[:, 2, 3, :], np.broadcast_to(4 * np.arange(32) / 255, (9, 32)),
                               rtol=1e-6)  # blue varies along the columns
    assert s.valid.reshape(3, 32, 32)[0, 0, 0] == pytest.approx(51 / 255)
    assert s.test.reshape(-1, 3, 32, 32)[2, 0, 0, 0] == pytest.approx(202 / 255)
    assert (data_dir / "cifar10" / "cifar-10-binary.tar.gz").is_file()  # cached
    server.stop()
    again = load_splits("cifar10", data_dir=str(data_dir), mirror=server.url, progress=False)
    np.testing.assert_array_equal(again.train, s.train)


def test_cifar10_damaged_batch(tmp_path):
    batches = _cifar_batches()
    batches["data_batch_3.bin"] = batches["data_batch_3.bin"][:-100]
    mirror = tmp_path / "m"
    mirror.mkdir()
    (mirror / "cifar-10-binary.tar.gz").write_bytes(_cifar_tar(batches))
    with pytest.raises(ValueError, match="data_batch_3.bin: .*not a whole number of 3073-byte"):
        load_splits("cifar10", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)
    del batches["test_batch.bin"]
    (mirror / "cifar-10-binary.tar.gz").write_bytes(_cifar_tar(batches))
    with pytest.raises(ValueError, match="lacks test_batch.bin"):
        load_splits("cifar10", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)


# --------------------------------------------------------------------------- #
# SVHN (MAT v5, written by hand)
# --------------------------------------------------------------------------- #

def _mat_el(mtype: int, payload: bytes, bo: str, small_ok: bool = True) -> bytes:
    """One MAT v5 data element; payloads of up to 4 bytes use the small format."""
    if small_ok and len(payload) <= 4:
        return struct.pack(bo + "I", (len(payload) << 16) | mtype) + payload.ljust(4, b"\0")
    pad = b"\0" * (-len(payload) % 8)
    return struct.pack(bo + "II", mtype, len(payload)) + payload + pad


def _mat_var(name: str, arr: np.ndarray, mclass: int, mtype: int, dtype: str, bo: str,
             compress: bool) -> bytes:
    """A miMATRIX element (optionally inside miCOMPRESSED) holding a real numeric array."""
    body = (_mat_el(6, struct.pack(bo + "II", mclass, 0), bo)
            + _mat_el(5, np.asarray(arr.shape, bo + "i4").tobytes(), bo)
            + _mat_el(1, name.encode(), bo)
            + _mat_el(mtype, np.asarray(arr, bo + dtype).tobytes(order="F"), bo))
    element = struct.pack(bo + "II", 14, len(body)) + body
    if compress:
        z = zlib.compress(element)
        element = struct.pack(bo + "II", 15, len(z)) + z
    return element


def _mat_file(variables: list, bo: str = "<") -> bytes:
    text = b"MATLAB 5.0 MAT-file, written by hand for the npdraw tests"
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack(bo + "H", 0x0100)
    return header + (b"IM" if bo == "<" else b"MI") + b"".join(variables)


def _svhn_mat(n: int, first: int, compress: bool, bo: str = "<") -> bytes:
    """X uint8 (32, 32, 3, n): R = 5 * row, G = 5 * column, B = first + image index."""
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    x = np.empty((32, 32, 3, n), dtype=np.uint8)
    x[:, :, 0, :] = (5 * r)[..., None]
    x[:, :, 1, :] = (5 * c)[..., None]
    x[:, :, 2, :] = first + np.arange(n)
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.float64)
    note = np.frombuffer("skip me".encode("utf-16-le"), dtype="<u2").reshape(1, -1)
    return _mat_file([
        _mat_var("note", note, 4, 4, "u2", bo, compress),  # char array: skipped
        _mat_var("X", x, 9, 2, "u1", bo, compress),  # uint8 class stored as miUINT8
        # double labels stored compactly as miUINT8 when compressed (as MATLAB does)
        _mat_var("y", y, 6, 2 if compress else 9, "u1" if compress else "f8", bo, compress),
    ], bo)


@pytest.mark.parametrize("train_compressed,bo", [(False, "<"), (True, "<"), (True, ">")])
def test_svhn_mat_v5(tmp_path, train_compressed, bo):
    mirror = tmp_path / "m"
    mirror.mkdir()
    (mirror / "train_32x32.mat").write_bytes(_svhn_mat(7, 0, train_compressed, bo))
    (mirror / "test_32x32.mat").write_bytes(_svhn_mat(3, 100, not train_compressed, bo))
    s = load_splits("svhn", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)
    assert s.shape == (3, 32, 32)
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((6, 3072), (1, 3072), (3, 3072))
    x = s.train.reshape(-1, 3, 32, 32)
    ramp = 5 * np.arange(32) / 255
    np.testing.assert_allclose(x[:, 0, :, 7], np.broadcast_to(ramp, (6, 32)), rtol=1e-6)  # rows
    np.testing.assert_allclose(x[:, 1, 7, :], np.broadcast_to(ramp, (6, 32)), rtol=1e-6)  # columns
    np.testing.assert_allclose(x[:, 2, 0, 0], np.arange(6) / 255, rtol=1e-6)  # image order
    assert s.valid.reshape(3, 32, 32)[2, 9, 9] == pytest.approx(6 / 255)
    assert s.test.reshape(-1, 3, 32, 32)[2, 2, 31, 31] == pytest.approx(102 / 255)


def test_mat_reader_values_and_errors(tmp_path):
    path = tmp_path / "a.mat"
    path.write_bytes(_svhn_mat(4, 0, compress=True))
    got = read_mat_v5(path)
    assert sorted(got) == ["X", "y"]
    assert got["X"].shape == (32, 32, 3, 4) and got["y"].dtype == np.float64
    np.testing.assert_array_equal(got["y"].ravel(), [1, 2, 3, 4])

    raw = _svhn_mat(4, 0, compress=False)
    path.write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(ValueError, match="truncated"):
        read_mat_v5(path)
    path.write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="not a MATLAB v5 .mat file"):
        read_mat_v5(path)


# --------------------------------------------------------------------------- #
# folder of images
# --------------------------------------------------------------------------- #

def test_folder_grey_split_is_deterministic(tmp_path):
    for k in range(20):
        img = np.full((6, 8), 10 * k, dtype=np.uint8)
        img[1, 2] = 255
        iio.imwrite(tmp_path / f"img{k:02d}.png", img)
    s = load_splits("folder", folder=str(tmp_path))
    assert s.shape == (1, 6, 8)
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((18, 48), (1, 48), (1, 48))
    firsts = np.concatenate([s.train[:, 0], s.valid[:, 0], s.test[:, 0]])
    np.testing.assert_allclose(np.sort(firsts), 10 * np.arange(20) / 255, rtol=1e-6)
    assert np.all(s.train.reshape(-1, 6, 8)[:, 1, 2] == 1.0)
    again = load_splits("folder", folder=str(tmp_path))
    np.testing.assert_array_equal(again.valid, s.valid)
    np.testing.assert_array_equal(again.test, s.test)


@pytest.mark.parametrize("alpha", [False, True])
def test_folder_colour_channels_first(tmp_path, alpha):
    r = np.arange(5)[:, None] * 20 * np.ones((1, 9))
    for k in range(3):
        img = np.zeros((5, 9, 4 if alpha else 3), dtype=np.uint8)
        img[..., 0] = 255
        img[..., 1] = r
        img[..., 2] = 7 * k
        if alpha:
            img[..., 3] = 128
        iio.imwrite(tmp_path / f"c{k}.png", img)
    s = load_splits("folder", folder=str(tmp_path))
    assert s.shape == (3, 5, 9)
    x = np.concatenate([s.train, s.valid, s.test]).reshape(-1, 3, 5, 9)
    assert np.all(x[:, 0] == 1.0)
    np.testing.assert_allclose(x[:, 1], np.broadcast_to(r / 255, (3, 5, 9)), rtol=1e-6)
    np.testing.assert_allclose(np.sort(x[:, 2, 0, 0]), np.array([0, 7, 14]) / 255, rtol=1e-6)


def test_folder_jpeg(tmp_path):
    for k in range(3):
        iio.imwrite(tmp_path / f"p{k}.jpg", np.full((16, 16, 3), 40 * k, dtype=np.uint8))
    s = load_splits("folder", folder=str(tmp_path))
    assert s.shape == (3, 16, 16) and s.train.shape == (1, 768)
    assert 0 <= s.train.min() and s.test.max() <= 1


def test_folder_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_splits("folder", folder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no images"):
        load_splits("folder", folder=str(tmp_path))
    with pytest.raises(ValueError, match="needs folder="):
        load_splits("folder")
    iio.imwrite(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    iio.imwrite(tmp_path / "b.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="need at least 3"):
        load_splits("folder", folder=str(tmp_path))
    iio.imwrite(tmp_path / "c.png", np.zeros((5, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"c.png is 1x5x4 .* a.png is 1x4x4; all images"):
        load_splits("folder", folder=str(tmp_path))


def test_spread_subset_takes_one_image_from_each_stretch_and_follows_the_seed():
    spread_subset = data.spread_subset
    picked = spread_subset(10000, 1000, seed=0)
    assert len(set(picked.tolist())) == 1000 and (np.diff(picked) > 0).all()
    # one index in each tenth-of-a-percent stretch: a file sorted by label gives each
    # label its share, where the first 1000 would all be zeros and ones
    assert np.array_equal(picked // 10, np.arange(1000))
    assert np.array_equal(picked, spread_subset(10000, 1000, seed=0))
    assert not np.array_equal(picked, spread_subset(10000, 1000, seed=1))
    assert not np.array_equal(picked % 10, np.zeros(1000))     # not simply every tenth
    assert np.array_equal(spread_subset(5, 9, seed=3), np.arange(5))
    uneven = spread_subset(10, 3, seed=2)
    assert uneven[0] < 3 <= uneven[1] < 6 <= uneven[2] < 10


def test_one_split_needs_only_its_own_file_and_matches_the_converted_one(
        bmnist_mirror, bmnist_data_dir, bmnist, tmp_path):
    """Scoring a shipped model on a fresh clone needs the test file alone (issue 23): a
    mirror holding only it gives the test split, and nothing is converted or left behind;
    with the converted file present, that split is read from it."""
    from npdraw import data as data_lib
    only_test = tmp_path / "mirror"
    only_test.mkdir()
    (only_test / "binarized_mnist_test.amat.gz").symlink_to(
        (bmnist_mirror / "binarized_mnist_test.amat.gz").resolve())
    fresh = tmp_path / "data"
    x, shape = data_lib.load_split("bmnist", "test", str(fresh), str(only_test), progress=False)
    assert shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_array_equal(x, bmnist.test)
    assert sorted(p.name for p in fresh.iterdir()) == []       # no conversion, no temp file
    with pytest.raises(DataError, match="binarized_mnist_valid"):
        data_lib.load_split("bmnist", "valid", str(fresh), str(only_test), progress=False)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        data_lib.load_split("bmnist", "dev", str(fresh), str(only_test), progress=False)
    valid, _ = data_lib.load_split("bmnist", "valid", str(bmnist_data_dir), "", progress=False)
    np.testing.assert_array_equal(valid, bmnist.valid)           # from the converted file
