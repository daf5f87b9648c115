"""Integrity of what loads (issue 25): the checkpoint digest, hostile declared sizes,
the RNG state, bad train configs. Tiny files; seconds in all."""
import json

import h5py
import numpy as np
import pytest

from npdraw import checkpoint as ckpt_lib
from npdraw import guards
from npdraw import model as model_lib
from npdraw import optim
from npdraw.config import DrawConfig, TrainConfig

TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)


def _save(path, **kw):
    params = model_lib.init_params(TINY, 0)
    state = optim.adam_init(params)
    state["step"] = 7
    rng = np.random.default_rng(5)
    args = dict(opt_state=state, epoch=4, rng_state=rng.bit_generator.state,
                train_cfg=TrainConfig(epochs=9), extra={"best_valid": 91.25}, ema=params)
    args.update(kw)
    ckpt_lib.save_checkpoint(path, TINY, params, **args)
    return ckpt_lib.load_checkpoint(path)


def _same(a, b) -> bool:
    def arrays(x, y):
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
            and x[k].tobytes() == y[k].tobytes() for k in x)
    return (a.cfg == b.cfg and arrays(a.params, b.params) and arrays(a.ema, b.ema)
            and arrays(a.opt_state["m"], b.opt_state["m"])
            and arrays(a.opt_state["v"], b.opt_state["v"])
            and a.opt_state["step"] == b.opt_state["step"] and a.epoch == b.epoch
            and json.dumps(a.rng_state, default=str) == json.dumps(b.rng_state, default=str)
            and a.train_cfg == b.train_cfg and a.extra == b.extra)


def test_a_saved_checkpoint_carries_a_digest_that_load_verifies(tmp_path):
    back = _save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert list(f.attrs)[-1] == "digest" and f.attrs["digest"] == back.digest
    assert len(back.digest) == 64


@pytest.mark.parametrize("change", ["param", "beta", "step", "best", "rng", "name"])
def test_a_change_to_what_loads_is_refused_with_one_sentence(tmp_path, change):
    path = tmp_path / "m.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        if change == "param":
            f["params/enc_W"][...] = 0
        elif change == "beta":
            cfg = json.loads(f.attrs["train_config"])
            f.attrs["train_config"] = json.dumps({**cfg, "beta1": 0.8})
        elif change == "step":
            f["optimizer"].attrs["step"] = 8
        elif change == "best":
            f.attrs["extra"] = json.dumps({"best_valid": 81.25})
        elif change == "rng":
            state = json.loads(f.attrs["rng_state"])
            state["state"]["state"] += 1
            f.attrs["rng_state"] = json.dumps(state)
        else:
            f.move("ema/c0", "ema/c1")
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path} does not match its sha256 digest: the file "
                               "was changed or damaged after it was saved")


def test_every_flipped_byte_is_refused_or_loads_the_same_content(tmp_path):
    path = tmp_path / "m.h5"
    original = _save(path)
    data = path.read_bytes()
    # Every Nth byte (as the probe of issue 25 did), and every byte of the JSON values
    # and of the names that HDF5 keeps outside the checksummed data.
    offsets = set(range(0, len(data), max(1, len(data) // 200)))
    for text in (b"beta1", b"best_valid", b'"state"', b"epoch", b"step", b"enc_W"):
        at = data.find(text)
        assert at >= 0, text
        offsets.update(range(at, at + 12))
    refused = 0
    for offset in sorted(offsets):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF if offset % 2 else 0x01
        path.write_bytes(bytes(damaged))
        try:
            back = ckpt_lib.load_checkpoint(path)
        except ckpt_lib.CheckpointError as err:
            assert "\n" not in str(err) and str(path) in str(err), (offset, str(err))
            refused += 1
            continue
        assert _same(back, original), f"byte {offset} changed what loads without an error"
    assert refused > 0


def test_files_without_a_digest_still_load_and_say_so(tmp_path):
    path = tmp_path / "old.h5"
    original = _save(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["digest"]
    back = ckpt_lib.load_checkpoint(path)
    assert back.digest is None and _same(back, original)


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("where", ["params/c0", "optimizer/m/c0", "optimizer/v/enc_W",
                                   "ema/c0", "params/unknown"])
def test_a_huge_declared_dataset_is_refused_before_reading(tmp_path, where):
    path = tmp_path / "m.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        if where in f:
            del f[where]
        f.create_dataset(where, shape=(10**9,), dtype="f4", chunks=(1 << 16,))
    assert path.stat().st_size < 10**6                     # small on disk, 4 GB declared
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path}: array {where} is declared with "
                                      "shape (1000000000,), but ")


def test_a_config_claiming_a_huge_model_is_refused_before_reading(tmp_path, monkeypatch):
    """The declared shapes are checked against the config, so a config claiming a huge
    model (datasets declared to match it, chunks never written: a small file) was read
    whole: the arrays the config implies are checked against the memory first."""
    path = tmp_path / "m.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        f["config"].attrs["enc_dim"] = 10**5
        del f.attrs["digest"]                    # as a hand-made file without a digest
    monkeypatch.setattr(guards, "total_memory", lambda: 16 * 10**9)
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path}: reading its ")
    assert "would need about" in str(info.value) and "limit of 12.0 GB" in str(info.value)


# ----------------------------------------------------------------------------- RNG, configs

def _rewrite_attr(path, key, value):
    with h5py.File(path, "r+") as f:
        f.attrs[key] = json.dumps(value)
        del f.attrs["digest"]                    # as a hand-made file without a digest


@pytest.mark.parametrize("name", ["mtrand", "seed", "default_rng"])
def test_the_rng_state_must_name_a_known_bit_generator(tmp_path, name):
    path = tmp_path / "m.h5"
    _save(path)
    _rewrite_attr(path, "rng_state", {"bit_generator": name, "state": {}})
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        ckpt_lib.load_checkpoint(path)
    assert str(info.value) == (f"checkpoint {path}: rng_state names bit generator {name!r}; "
                               "only PCG64, PCG64DXSM, Philox, SFC64, MT19937 are accepted")


@pytest.mark.parametrize("value", [None, [1, 2]])
def test_a_train_config_field_that_is_null_or_a_list_is_one_sentence(tmp_path, value):
    from npdraw import runs as runs_lib
    path = tmp_path / "m.h5"
    _save(path)
    _rewrite_attr(path, "train_config", {**TrainConfig().to_dict(), "batch_size": value})
    with pytest.raises(ValueError) as info:
        runs_lib.load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path}: train_config is not a valid "
                                      "TrainConfig (")
    assert "\n" not in str(info.value)


def test_a_checkpoint_without_c0_is_one_sentence(tmp_path):
    from npdraw import runs as runs_lib
    path = tmp_path / "m.h5"
    _save(path, opt_state=None, ema=None)
    with h5py.File(path, "r+") as f:
        del f["params/c0"]
        del f.attrs["digest"]
    with pytest.raises(ValueError) as info:
        runs_lib.load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} lacks parameter 'c0' (model shape (784,))"


# ----------------------------------------------------------------------------- data file

def test_a_damaged_converted_data_file_says_delete_it(bmnist_data_dir, bmnist_mirror, tmp_path):
    import shutil

    from npdraw.data import DataError, load_splits
    shutil.copy(bmnist_data_dir / "binarized_mnist.h5", tmp_path / "binarized_mnist.h5")
    h5 = tmp_path / "binarized_mnist.h5"
    with h5py.File(h5, "r+") as f:                   # a flipped chunk: 0/1 values swapped
        f["valid"][:1000] = 1 - f["valid"][:1000]
    with pytest.raises(DataError) as info:
        load_splits("bmnist", data_dir=str(tmp_path), mirror=str(bmnist_mirror),
                    progress=False)
    assert str(info.value) == (f"{h5}: dataset 'valid' does not match the sha256 of its "
                               "source file (binarized_mnist_valid.amat); it is damaged: "
                               f"delete {h5} and run again to rebuild it from the source "
                               "files")


def test_a_log_line_nested_too_deeply_is_one_sentence(tmp_path):
    from npdraw import runs as runs_lib
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n' + "[" * 100_000 + "]" * 100_000
                                        + "\n")
    with pytest.raises(ValueError) as info:
        runs_lib.read_log(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'log.jsonl'}, line 2: nested too deeply to be "
                               "an epoch record")


# ----------------------------------------------------------------------------- gzip bombs

def test_an_over_long_gzip_source_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import gzip
    import os

    from npdraw import data
    monkeypatch.setitem(data.BMNIST_ROWS, "train", 5)      # a 5-line "train" file
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    line = b" ".join([b"0"] * 784) + b"\n"
    (mirror / "binarized_mnist_train.amat.gz").write_bytes(gzip.compress(line * 2000))
    read = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read",
                        lambda self, size=-1: read.append(size) or real_read(self, size))
    stale = tmp_path / "d" / ".binarized_mnist.h5.x1.part"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a kill -9")
    os.utime(stale, (1e9, 1e9))
    with pytest.raises(data.DataError) as info:
        data.load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=str(mirror),
                         progress=False)
    path = mirror / "binarized_mnist_train.amat.gz"
    assert str(info.value) == (f"{path} holds more than 7,840 bytes (decompressed), the size "
                               "of the file it should be; it is not that file")
    assert read == [7841] and not stale.exists()


@pytest.mark.parametrize("name", ["mtrand", "seed"])
def test_resume_never_calls_a_name_that_is_not_a_bit_generator(name):
    from npdraw import runs as runs_lib
    with pytest.raises(ValueError, match=f"checkpoint RNG '{name}' is unknown"):
        runs_lib.rng_from_state({"bit_generator": name, "state": {}})
