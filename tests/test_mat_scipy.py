"""npdraw's own MAT v5 reader (data.read_mat_v5) against SciPy's: files written by
scipy.io.savemat read back the same through both. SciPy is a test dependency only
(pyproject's [test] extra); npdraw itself never imports it."""
import numpy as np
import pytest
import scipy.io

from npdraw.data import load_splits, read_mat_v5

RNG = np.random.default_rng(11)

# name -> array: SVHN's variables, then other classes, shapes and sizes
VARIABLES = {
    "X": RNG.integers(0, 256, (32, 32, 3, 9), dtype=np.uint8),       # SVHN's images
    "y": RNG.integers(1, 11, (9, 1)).astype(np.uint8),                 # SVHN's labels
    "yd": RNG.integers(1, 11, (9, 1)).astype(np.float64),              # labels as double
    "f8": RNG.standard_normal((5, 7)),
    "f4": RNG.standard_normal((3, 4, 2)).astype(np.float32),
    "i1": RNG.integers(-128, 128, (6, 2), dtype=np.int8),
    "i2": RNG.integers(-30000, 30000, (4, 5), dtype=np.int16),
    "u2": RNG.integers(0, 65535, (2, 3, 4, 5), dtype=np.uint16),
    "i4": RNG.integers(-2**31, 2**31 - 1, (3, 3), dtype=np.int32),
    "u4": RNG.integers(0, 2**32 - 1, (1, 8), dtype=np.uint32),
    "i8": RNG.integers(-2**62, 2**62, (2, 2), dtype=np.int64),
    "u8": RNG.integers(0, 2**63, (2, 1), dtype=np.uint64),
    "scalar": np.array([[7.5]]),                                       # a small data element
    "tiny": np.array([[3]], dtype=np.uint8),
    "long_variable_name_for_the_header": np.arange(12, dtype=np.int16).reshape(3, 4),
}
OTHERS = {"note": "not numeric", "cell": np.array([np.arange(3), "x"], dtype=object),
          "st": {"a": np.arange(2)}}


@pytest.fixture(params=[False, True], ids=["plain", "compressed"])
def saved(request, tmp_path):
    path = tmp_path / "vars.mat"
    scipy.io.savemat(path, {**OTHERS, **VARIABLES}, format="5",
                     do_compression=request.param)
    return path


def test_every_numeric_variable_reads_as_scipy_reads_it(saved):
    ours = read_mat_v5(saved, wanted=tuple(VARIABLES))
    theirs = scipy.io.loadmat(saved)
    assert sorted(ours) == sorted(VARIABLES)
    for name, expected in VARIABLES.items():
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape == expected.shape, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)


def test_only_the_wanted_variables_are_returned(saved):
    ours = read_mat_v5(saved, wanted=("i2", "note", "cell", "missing"))
    assert list(ours) == ["i2"]           # strings and cells are not decoded


@pytest.mark.parametrize("oned_as", ["row", "column"])
def test_vectors_keep_scipys_orientation(tmp_path, oned_as):
    path = tmp_path / "v.mat"
    scipy.io.savemat(path, {"v": np.arange(5, dtype=np.float32)}, oned_as=oned_as)
    assert read_mat_v5(path, ("v",))["v"].shape == scipy.io.loadmat(path)["v"].shape


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_files_written_by_scipy(tmp_path, compress):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    sets = {}
    for name, n in (("train_32x32.mat", 12), ("test_32x32.mat", 4)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        scipy.io.savemat(mirror / name, {"X": x, "y": RNG.integers(1, 11, (n, 1)).astype(float)},
                         do_compression=compress)
        sets[name] = scipy.io.loadmat(mirror / name)["X"].transpose(3, 2, 0, 1)   # (N, C, H, W)
    s = load_splits("svhn", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)
    train = sets["train_32x32.mat"].reshape(12, -1).astype(np.float32) / 255
    np.testing.assert_array_equal(np.concatenate([s.train, s.valid]), train)
    np.testing.assert_array_equal(s.test, sets["test_32x32.mat"].reshape(4, -1) / np.float32(255))
    assert s.shape == (3, 32, 32) and s.valid.shape == (2, 3072)
