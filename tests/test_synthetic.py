"""npdraw.synthetic: the labelled MNIST files, cluttered MNIST and two-digit MNIST, and
two-digit MNIST as a training data set (a fresh training set every epoch)."""
import gzip
import shutil

import numpy as np
import pytest

from npdraw.data import synthetic
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw.config import DrawConfig, TrainConfig
from npdraw.data import DataError, DataSplits, load_splits


# ----------------------------------------------------------------------------- labelled MNIST

@pytest.fixture(scope="module")
def labelled(labelled_mnist_mirror):
    return synthetic.load_labelled_mnist("unused-data-dir", str(labelled_mnist_mirror))


def test_labelled_mnist_splits(labelled):
    assert labelled.train_x.shape == (9000, 28, 28) and labelled.valid_x.shape == (1000, 28, 28)
    assert labelled.test_x.shape == (10000, 28, 28) and labelled.train_x.dtype == np.float32
    assert 0.0 <= labelled.train_x.min() and labelled.train_x.max() <= 1.0
    # npm10k's class counts (README), split between train and valid; t10k's counts
    both = np.bincount(np.concatenate([labelled.train_y, labelled.valid_y]), minlength=10)
    assert both.tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert np.bincount(labelled.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958,
                                                     1028, 974, 1009]
    # the file is ordered by class; the validation slice is drawn across all classes
    assert np.bincount(labelled.valid_y, minlength=10).min() > 50


def test_a_changed_labelled_file_fails_its_checksum(labelled_mnist_mirror, tmp_path):
    for path in labelled_mnist_mirror.glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="SHA-256"):
        synthetic.load_labelled_mnist(str(tmp_path / "data"), str(tmp_path))


def test_npm10k_without_a_mirror_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("NPDRAW_MIRROR", raising=False)
    with pytest.raises(DataError, match="no public download"):
        synthetic.load_labelled_mnist(str(tmp_path), "")


def _idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array: 00 00 08 ndim, big-endian uint32 dims, the data."""
    head = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return head + np.ascontiguousarray(array, np.uint8).tobytes()


def _standard_train_files(folder, count=60, gz=True):
    """Small train-images/train-labels IDX files (MNIST's names) in folder; returns them."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        raw = _idx(array)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_the_standard_mnist_training_files_are_a_training_set(labelled_mnist_mirror, tmp_path,
                                                             gz):
    # train-* in the data folder's labelled-mnist/, t10k from the (real) mirror
    images, labels = _standard_train_files(tmp_path / synthetic.LABELLED_SUBDIR, 60, gz)
    digits = synthetic.load_labelled_mnist(str(tmp_path), str(labelled_mnist_mirror),
                                           valid_size=10, train_set="mnist")
    assert digits.train_x.shape == (50, 28, 28) and digits.valid_x.shape == (10, 28, 28)
    assert digits.test_x.shape == (10000, 28, 28)
    order = np.random.default_rng(synthetic.VALID_SEED).permutation(60)
    np.testing.assert_array_equal(digits.train_x * 255, images[order[:50]].astype(np.float32))
    np.testing.assert_array_equal(digits.valid_y, labels[order[50:]])


def test_the_standard_training_files_from_a_mirror_folder(labelled_mnist_mirror, tmp_path):
    mirror = tmp_path / "mirror"
    for path in labelled_mnist_mirror.glob("t10k-*.gz"):
        (mirror / synthetic.LABELLED_SUBDIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, mirror / synthetic.LABELLED_SUBDIR / path.name)
    _standard_train_files(mirror, 30)
    digits = synthetic.load_labelled_mnist(str(tmp_path / "data"), str(mirror), valid_size=5,
                                           train_set="mnist")
    assert digits.train_x.shape[0] == 25 and np.bincount(digits.train_y).sum() == 25


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x01" + raw[1:], "bad IDX magic"),
    (lambda raw: raw[:-5], "truncated: dims"),
    (lambda raw: raw + b"\x00", "trailing bytes"),
    (lambda raw: raw[:8], "truncated IDX header"),
    (lambda raw: raw[:2], "too short for an IDX header"),
    # dims declared far beyond the file: refused by size, nothing allocated
    (lambda raw: raw[:4] + np.asarray([4_000_000_000] * 3, ">u4").tobytes() + raw[16:],
     "truncated: dims"),
])
def test_a_bad_standard_training_file_is_a_one_sentence_error(labelled_mnist_mirror, tmp_path,
                                                              damage, message):
    _standard_train_files(tmp_path / synthetic.LABELLED_SUBDIR, 20, gz=False)
    path = tmp_path / synthetic.LABELLED_SUBDIR / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        synthetic.load_labelled_mnist(str(tmp_path), str(labelled_mnist_mirror), valid_size=5,
                                      train_set="mnist")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_standard_training_labels_must_be_digits_and_match_the_images(labelled_mnist_mirror,
                                                                      tmp_path):
    folder = tmp_path / synthetic.LABELLED_SUBDIR
    _standard_train_files(folder, 20, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx(np.full(20, 12, np.uint8)))
    with pytest.raises(DataError, match="label 12 is not a digit"):
        synthetic.load_labelled_mnist(str(tmp_path), str(labelled_mnist_mirror), 5, "mnist")
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match=r"expected \(S, 28, 28\) images with S labels"):
        synthetic.load_labelled_mnist(str(tmp_path), str(labelled_mnist_mirror), 5, "mnist")
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros((20, 1), np.uint8)))
    with pytest.raises(DataError, match=r"expected unsigned-byte labels"):
        synthetic.load_labelled_mnist(str(tmp_path), str(labelled_mnist_mirror), 5, "mnist")


def test_an_unknown_training_set_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown training set 'mnist60'"):
        synthetic.load_labelled_mnist(str(tmp_path), "", train_set="mnist60")


# ----------------------------------------------------------------------------- cluttered

def test_clutter_places_the_digit_and_the_pieces():
    rng = np.random.default_rng(0)
    digits = np.zeros((5, 28, 28), np.float32)
    digits[:, 10:14, 10:14] = 0.5
    plain = synthetic.clutter(digits, digits, rng, size=50, distractors=0)
    assert plain.shape == (5, 2500)
    np.testing.assert_allclose(plain.sum(axis=1), 8.0)       # the digit, whole, nowhere clipped
    ones = np.ones((3, 28, 28), np.float32)
    pieces = synthetic.clutter(np.zeros((200, 28, 28), np.float32), ones, rng, size=40,
                               distractors=3, crop=5)
    lit = (pieces > 0).sum(axis=1)
    assert pieces.max() == 1.0 and lit.min() >= 25 and lit.max() <= 75   # 3 clipped 5x5 pieces
    assert (lit < 75).any() and (lit == 75).any()                         # some overlap, some not


def test_clutter_is_seeded_and_stays_in_the_unit_interval(labelled):
    def make(seed):
        return synthetic.clutter(labelled.valid_x[:20], labelled.valid_x, np.random.default_rng(seed))
    a, b, c = make(1), make(1), make(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (20, 10000) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    # each image holds at least its own digit's ink (clipping only removes overlaps above 1)
    assert (a.sum(axis=1) >= 0.9 * labelled.valid_x[:20].reshape(20, -1).sum(axis=1)).all()


# ----------------------------------------------------------------------------- two digits

def test_two_digits_sum_two_binary_digits():
    rng = np.random.default_rng(0)
    sources = (np.random.default_rng(1).random((10, 784)) < 0.2).astype(np.float32)
    out = synthetic.two_digits(sources, 50, rng)
    assert out.shape == (50, 3600) and set(np.unique(out)) <= {0.0, 1.0}
    ink = sources.sum(axis=1)
    assert (out.sum(axis=1) <= 2 * ink.max()).all() and (out.sum(axis=1) >= ink.min()).all()


def test_two_digit_mnist_is_a_data_set(bmnist_data_dir, bmnist_mirror):
    data = load_splits("two-digit-mnist", data_dir=str(bmnist_data_dir), mirror=str(bmnist_mirror),
                       progress=False)
    assert data.shape == (1, 60, 60) and data.fresh_train is not None
    assert data.train.shape == (50000, 3600) and data.test.shape == (10000, 3600)
    # two binarized digits: about twice a digit's ink (some 100 pixels each)
    assert 150 < data.test.sum(axis=1).mean() < 250


def test_two_digit_valid_and_test_are_fixed_and_training_is_fresh(small_bmnist, small_two_digit):
    again = synthetic.two_digit_splits(small_bmnist)
    np.testing.assert_array_equal(small_two_digit.test, again.test)
    np.testing.assert_array_equal(small_two_digit.valid, again.valid)
    epoch_1 = small_two_digit.fresh_train(np.random.default_rng(11), 100)
    epoch_2 = small_two_digit.fresh_train(np.random.default_rng(12), 100)
    assert epoch_1.shape == (100, 3600) and not np.array_equal(epoch_1, epoch_2)
    assert not np.array_equal(small_two_digit.valid[:100], small_two_digit.test[:100])


@pytest.fixture(scope="module")
def small_bmnist(bmnist_data_dir, bmnist_mirror):
    """The first few thousand binarized digits: two-digit MNIST from them is quick to make."""
    b = load_splits("bmnist", data_dir=str(bmnist_data_dir), mirror=str(bmnist_mirror),
                    progress=False)
    return DataSplits(b.train[:3000], b.valid[:300], b.test[:300], b.shape)


@pytest.fixture(scope="module")
def small_two_digit(small_bmnist):
    return synthetic.two_digit_splits(small_bmnist)


def test_a_tiny_model_learns_two_digit_mnist(small_two_digit, tmp_path, monkeypatch):
    """The paper's two-digit model (attention, 60x60), tiny: the bound falls clearly."""
    cfg = DrawConfig(height=60, width=60, T=4, read_n=5, write_n=5, enc_dim=32, dec_dim=32,
                     z_dim=8)
    draws = []
    fresh = small_two_digit.fresh_train
    monkeypatch.setattr(small_two_digit, "fresh_train",
                        lambda rng, n: draws.append(n) or fresh(rng, n))
    tcfg = TrainConfig(dataset="two-digit-mnist", epochs=4, batch_size=50, subset=500,
                       eval_subset=200, seed=0, device="cpu", out=str(tmp_path),
                       name="two", lr=1e-2)
    run = train_lib.train(cfg, tcfg, log=lambda s: None, data=small_two_digit, progress=False)
    log = runs_lib.read_log(run)
    assert draws == [500] * 4                             # a new training set every epoch
    # measured: 623 -> 603 nats over the 4 epochs
    assert log[-1]["valid_bound"] < log[0]["valid_bound"] - 10.0


def test_paste_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    canvas = rng.random((5000, 40, 40)).astype(np.float32)
    pieces = (rng.random((5000, 9, 9)) - 0.3).astype(np.float32)
    top, left = rng.integers(0, 32, (2, 5000))
    expected = canvas.copy()
    for m in range(5000):
        region = expected[m, top[m]:top[m] + 9, left[m]:left[m] + 9]
        region += pieces[m]
        np.clip(region, 0.0, 1.0, out=region)
    synthetic._paste(canvas, pieces, top, left, clip_low=True)
    np.testing.assert_array_equal(canvas, expected)
