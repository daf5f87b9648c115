"""HDF5 checkpoints: exact round trip, atomic writes, clear errors on bad files."""
import os

import h5py
import numpy as np
import pytest

import npdraw.checkpoint as ckmod
from npdraw.checkpoint import (Checkpoint, CheckpointError, check_compatible, load_checkpoint,
                               save_checkpoint)
from npdraw.config import DrawConfig, TrainConfig
from npdraw.optim import adam_init, adam_step


def _params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {"enc_W": rng.standard_normal((7, 5)).astype(dtype),
            "enc_b": rng.standard_normal(5).astype(dtype),
            "dec_W": rng.standard_normal((3, 4)).astype(dtype),
            "scalar": np.asarray(rng.standard_normal(), dtype=dtype)}


def _save_full(path, dtype=np.float32, epoch=3):
    cfg = DrawConfig(height=8, width=9, channels=3, T=5, read_n=3, write_n=4,
                     enc_dim=7, dec_dim=6, z_dim=2, attention=False)
    params = _params(dtype)
    state = adam_init(params)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    params, state, _ = adam_step(params, grads, state, 1e-3)
    gen = np.random.default_rng(1234)
    gen.standard_normal(17)  # advance so the state is not the seeded one
    train_cfg = TrainConfig(epochs=9, lr=3e-4).to_dict()
    extra = {"history": [{"epoch": 1, "train": 91.5}], "best": 88.25}
    save_checkpoint(path, cfg, params, state, epoch=epoch, rng_state=gen.bit_generator.state,
                    train_cfg=train_cfg, extra=extra)
    return cfg, params, state, gen, train_cfg, extra


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip(tmp_path, dtype):
    path = tmp_path / "model.h5"
    cfg, params, state, gen, train_cfg, extra = _save_full(path, dtype)
    ck = load_checkpoint(path)
    assert isinstance(ck, Checkpoint)
    assert ck.cfg == cfg
    assert list(ck.params) == list(params)  # insertion order kept
    for k, v in params.items():
        assert isinstance(ck.params[k], np.ndarray)
        assert ck.params[k].dtype == v.dtype and ck.params[k].shape == v.shape
        assert ck.params[k].tobytes() == v.tobytes()
        assert ck.opt_state["m"][k].tobytes() == state["m"][k].tobytes()
        assert ck.opt_state["v"][k].tobytes() == state["v"][k].tobytes()
    assert ck.opt_state["step"] == 1
    assert ck.epoch == 3
    assert ck.train_cfg == train_cfg
    assert TrainConfig.from_dict(ck.train_cfg) == TrainConfig(epochs=9, lr=3e-4)
    assert ck.extra == extra

    # The 128-bit PCG64 state comes back exactly, and a Generator continues identically.
    assert ck.rng_state == gen.bit_generator.state
    restored = np.random.default_rng()
    restored.bit_generator.state = ck.rng_state
    assert np.array_equal(restored.standard_normal(50), gen.standard_normal(50))


def test_minimal_checkpoint_and_layout(tmp_path):
    path = tmp_path / "m.h5"
    save_checkpoint(path, DrawConfig(), {"w": np.arange(6, dtype=np.float64).reshape(2, 3)})
    ck = load_checkpoint(str(path))
    assert ck.opt_state is None and ck.rng_state is None and ck.train_cfg is None
    assert ck.extra == {} and ck.epoch == 0 and ck.cfg == DrawConfig()
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "npdraw-checkpoint"
        assert int(f.attrs["format_version"]) == 1
        assert bool(f["config"].attrs["attention"]) is True
        assert int(f["config"].attrs["T"]) == 64
        assert f["params/w"].shape == (2, 3)


def test_mt19937_state_with_array_round_trips(tmp_path):
    bg = np.random.MT19937(5)
    gen = np.random.Generator(bg)
    gen.random(3)
    path = tmp_path / "mt.h5"
    save_checkpoint(path, DrawConfig(), {"w": np.zeros(1)}, rng_state=bg.state)
    ck = load_checkpoint(path)
    other = np.random.Generator(np.random.MT19937())
    other.bit_generator.state = ck.rng_state
    assert np.array_equal(other.random(20), gen.random(20))


def test_overwrite_leaves_no_temp(tmp_path):
    path = tmp_path / "a.h5"
    save_checkpoint(path, DrawConfig(), {"w": np.zeros(2)}, epoch=1)
    save_checkpoint(path, DrawConfig(), {"w": np.ones(2)}, epoch=2)
    assert load_checkpoint(path).epoch == 2
    assert sorted(os.listdir(tmp_path)) == ["a.h5"]


def test_failure_mid_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.h5"
    _save_full(path)
    before = path.read_bytes()

    calls = {"n": 0}
    real = ckmod._write_arrays

    def exploding(group, arrays):
        calls["n"] += 1
        if calls["n"] == 2:  # after params are written, while writing the optimizer
            raise RuntimeError("simulated crash mid-write")
        real(group, arrays)

    monkeypatch.setattr(ckmod, "_write_arrays", exploding)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _save_full(path, epoch=99)
    assert calls["n"] == 2
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.h5"]
    assert load_checkpoint(path).epoch == 3


def test_failure_at_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.h5"
    _save_full(path)
    before = path.read_bytes()

    def bad_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckmod.os, "replace", bad_replace)
    with pytest.raises(CheckpointError, match="ck.h5"):
        _save_full(path, epoch=7)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.h5"]


def test_truncated_file(tmp_path):
    path = tmp_path / "t.h5"
    _save_full(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 1000):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="t.h5"):
            load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="junk.h5.*not an HDF5 file"):
        load_checkpoint(path)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.h5"):
        load_checkpoint(empty)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.h5.*does not exist"):
        load_checkpoint(tmp_path / "nope.h5")


def test_wrong_or_missing_format(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CheckpointError, match="other.h5.*format"):
        load_checkpoint(other)
    with h5py.File(other, "a") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(CheckpointError, match="something-else"):
        load_checkpoint(other)


def test_missing_group(tmp_path):
    path = tmp_path / "g.h5"
    save_checkpoint(path, DrawConfig(), {"w": np.zeros(2)})
    with h5py.File(path, "a") as f:
        del f["params"]
        del f.attrs["digest"]            # as a file saved before the digest
    with pytest.raises(CheckpointError, match="g.h5.*'params' is missing"):
        load_checkpoint(path)


def test_a_moving_average_that_does_not_match_the_parameters(tmp_path):
    params = {"w": np.zeros((2, 3)), "b": np.zeros(3)}
    path = tmp_path / "e.h5"
    with pytest.raises(CheckpointError, match=r"moving average \(ema\) lacks parameter 'b'"):
        save_checkpoint(path, DrawConfig(), params, ema={"w": np.zeros((2, 3))})
    with pytest.raises(CheckpointError, match=r"'w' has shape \(3, 2\) in the moving"):
        save_checkpoint(path, DrawConfig(), params, ema={"w": np.zeros((3, 2)), "b": params["b"]})
    assert not path.exists()
    save_checkpoint(path, DrawConfig(), params, ema=params)
    assert load_checkpoint(path).ema.keys() == params.keys()
    with h5py.File(path, "a") as f:                   # a file whose average has an extra array
        f["ema"].create_dataset("c", data=np.zeros(1))
        del f.attrs["digest"]            # as a file saved before the digest
    with pytest.raises(CheckpointError, match=r"e\.h5 has parameter 'c'.*model does not have"):
        load_checkpoint(path)


def test_newer_version_rejected(tmp_path):
    path = tmp_path / "v.h5"
    save_checkpoint(path, DrawConfig(), {"w": np.zeros(2)})
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(path)


def test_bad_inputs_to_save(tmp_path):
    path = tmp_path / "x.h5"
    with pytest.raises(CheckpointError, match="invalid name"):
        save_checkpoint(path, DrawConfig(), {"a/b": np.zeros(2)})
    with pytest.raises(CheckpointError, match="extra"):
        save_checkpoint(path, DrawConfig(), {"w": np.zeros(2)}, extra={"f": object()})
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "dir.h5", DrawConfig(), {"w": np.zeros(2)})
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_check_compatible():
    a = {"enc_W": np.zeros((3, 4)), "b": np.zeros(4)}
    check_compatible(a, {"enc_W": np.ones((3, 4)), "b": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"'enc_W'.*\(3, 4\).*\(3, 5\)"):
        check_compatible(a, {"enc_W": np.zeros((3, 5)), "b": np.zeros(4)})
    with pytest.raises(CheckpointError, match="lacks parameter 'c'"):
        check_compatible(a, {"enc_W": np.zeros((3, 4)), "b": np.zeros(4), "c": np.zeros(1)})
    with pytest.raises(CheckpointError, match="'b'.*model does not have"):
        check_compatible(a, {"enc_W": np.zeros((3, 4))})
    assert issubclass(CheckpointError, ValueError)


def test_a_save_removes_the_temporary_files_of_killed_saves_only(tmp_path):
    """kill -9 in the middle of a save (export, a checkpoint) leaves `.NAME.tmp-PID`
    behind (issue 25): the next save of NAME removes those of dead processes and leaves a
    live process's (another writer, mid-save) and other names' alone."""
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                    # reaped: its PID runs nothing now
    stale = tmp_path / f".model.h5.tmp-{dead.pid}"
    live = tmp_path / f".model.h5.tmp-{os.getppid()}"
    other = tmp_path / f".other.h5.tmp-{dead.pid}"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    save_checkpoint(tmp_path / "model.h5", DrawConfig(), {"w": np.zeros(3)})
    assert not stale.exists() and live.exists() and other.exists()
    assert load_checkpoint(tmp_path / "model.h5").params["w"].shape == (3,)
