"""Hardening (issue 14): full disks, a second writer, Ctrl-C and SIGTERM, file-system
errors, damaged weights, absurd sizes, and the two checks the suite lacked (clipping,
evaluate_bound's mean). Tiny models on real binarized MNIST; seconds in all."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
from click.testing import CliRunner

from npdraw import checkpoint as ckpt_lib
from npdraw import cli as cli_mod
from npdraw import cli_options
from npdraw import guards
from npdraw import images as images_lib
from npdraw import pictures
from npdraw import model as model_lib
from npdraw import train as train_lib
from npdraw import runs as runs_lib
from npdraw import evaluate as evaluate_lib
from npdraw.config import DrawConfig, TrainConfig
from npdraw.data import DataError, load_splits

REPO = Path(__file__).resolve().parents[1]
TINY = DrawConfig(T=3, read_n=2, write_n=3, enc_dim=16, dec_dim=16, z_dim=4)
TINY_ARGS = ["--niter", "3", "--attention", "2,3", "--enc-dim", "16", "--dec-dim", "16",
             "--z-dim", "4", "--bs", "50", "--subset", "200", "--eval-subset", "200",
             "--device", "cpu", "--no-progress", "--ranks", "1"]



def invoke(args, **kw):
    return CliRunner().invoke(cli_mod.cli, [str(a) for a in args], **kw)


@pytest.fixture
def data_args(bmnist_data_dir, bmnist_mirror):
    return ["--data-dir", bmnist_data_dir, "--mirror", bmnist_mirror]


def _tcfg(tmp_path, **kw):
    base = dict(epochs=1, batch_size=50, subset=200, eval_subset=200, seed=3, device="cpu",
                out=str(tmp_path), name="run")
    base.update(kw)
    return TrainConfig(**base)


def _train(tmp_path, bmnist, lines=None, **kw):
    return train_lib.train(TINY, _tcfg(tmp_path, **kw), log=(lines if lines is not None
                                                              else []).append,
                           data=bmnist, progress=False)


def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------- 1. full disk

def _fail_writes_of(monkeypatch, target_name, from_call, error_number=errno.ENOSPC):
    """checkpoint._write_file raises OSError(error_number) for ``target_name`` from its
    ``from_call``-th save on (counted per target), as a full disk does."""
    real, calls = ckpt_lib._write_file, {"n": 0}

    def write(path, data):
        if os.path.basename(path).startswith(f".{target_name}.tmp-"):
            calls["n"] += 1
            if calls["n"] >= from_call:
                with open(path, "wb") as fh:          # a partial file, as on a full disk
                    fh.write(bytes(data[:100]))
                raise OSError(error_number, os.strerror(error_number), path)
        real(path, data)

    monkeypatch.setattr(ckpt_lib, "_write_file", write)
    return calls


def test_full_disk_stops_with_a_sentence_and_keeps_the_previous_checkpoint(
        bmnist, tmp_path, monkeypatch):
    calls = _fail_writes_of(monkeypatch, "checkpoint.h5", 3)     # epoch 0, 1 fine; 2 fails
    lines = []
    with pytest.raises(runs_lib.WriteFailed) as info:
        _train(tmp_path, bmnist, lines, epochs=3)
    run = tmp_path / "run"
    assert calls["n"] == 3
    assert str(info.value) == (f"no space left on the device while saving the checkpoint "
                               f"{run / 'checkpoint.h5'} of epoch 2; the checkpoint of epoch 1 "
                               "is intact")
    assert lines[-1] == str(info.value)
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 1
    assert _temps(run) == []
    monkeypatch.undo()
    (run / ".checkpoint.h5.tmp-999999").write_bytes(b"left by a kill -9")
    # The log line of epoch 2 came before the failed save; a resume drops it and goes on.
    train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)),
                    log=[].append, data=bmnist, progress=False)
    assert [r["epoch"] for r in runs_lib.read_log(run)] == [1, 2]
    assert _temps(run) == []                   # the stale temporary file was removed


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    ckpt_lib.save_checkpoint(path, TINY, model_lib.init_params(TINY, 0), epoch=1)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt_lib, "free_bytes", lambda directory: 10_000)
    written = []
    monkeypatch.setattr(ckpt_lib, "_write_file", lambda p, d: written.append(p))
    with pytest.raises(ckpt_lib.DiskFullError, match=r"no space left on .* bytes needed, "
                                                     r"10,000 free"):
        ckpt_lib.save_checkpoint(path, TINY, model_lib.init_params(TINY, 1), epoch=2)
    assert written == [] and path.read_bytes() == before and _temps(tmp_path) == []


def test_full_disk_through_the_cli_is_one_error_line(data_args, tmp_path, monkeypatch):
    _fail_writes_of(monkeypatch, "checkpoint.h5", 1)
    result = invoke(["train", *TINY_ARGS, "--epochs", 2, "--name", "full", "--out", tmp_path,
                     *data_args])
    assert result.exit_code == 1, result.output
    assert (f"Error: no space left on the device while saving the checkpoint "
            f"{tmp_path / 'full' / 'checkpoint.h5'} of epoch 0; no epoch had been trained "
            "yet") in result.output
    assert "Traceback" not in result.output and _temps(tmp_path / "full") == []


def test_a_failed_log_line_is_undone(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    runs_lib.append_log(log, {"epoch": 1})
    real_open = open
    monkeypatch.setattr("builtins.open",                  # part of the line reaches the file
                        lambda *a, **k: _FullFile(real_open(*a, **k), keep=7))
    with pytest.raises(OSError):
        runs_lib.append_log(log, {"epoch": 2})
    monkeypatch.undo()
    assert log.read_text() == '{"epoch": 1}\n'


def test_a_full_disk_while_writing_the_sample_pictures(bmnist, tmp_path, monkeypatch):
    real, calls = images_lib.save_gif, {"n": 0}

    def save_gif(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:                                  # epoch 2's samples.gif
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(images_lib, "save_gif", save_gif)
    with pytest.raises(runs_lib.WriteFailed) as info:
        _train(tmp_path, bmnist, epochs=3)
    run = tmp_path / "run"
    assert str(info.value) == (
        f"cannot write the files of epoch 2: no space left on the device "
        f"({run / 'samples.gif'}); {run / 'checkpoint.h5'} holds the last completed epoch "
        "(epoch 1)")
    assert ckpt_lib.load_checkpoint(run / "checkpoint.h5").epoch == 1


def test_a_full_disk_while_converting_a_data_set(tmp_path, monkeypatch):
    from npdraw.data import bmnist

    def full(tmp, dest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bmnist, "publish", full)
    with pytest.raises(DataError, match=r"cannot write the converted data set .*x.h5: no "
                                        r"space left on the device"):
        bmnist._write_h5_atomically(tmp_path / "x.h5", {"a": np.zeros((3, 4), np.uint8)}, {})
    assert sorted(os.listdir(tmp_path)) == []


# A full disk's OSError from write() names no file (errno and text only): every message
# of one must still name the file (issue 25, "some out-of-space messages omit the file").

class _FullFile:
    """A file object whose writes fail as on a full disk, naming no file, after the first
    ``keep`` bytes of a write have reached the file."""

    def __init__(self, fh, keep: int = 0):
        self.fh, self.keep = fh, keep

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        if self.keep:
            self.fh.write(data[:self.keep])
            self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def _full_for(monkeypatch, module, names):
    """``open`` in ``module`` gives _FullFile for the files whose name starts with one of
    ``names`` (an atomic write's temporary starts with its file's name)."""
    real_open = open

    def fake(path, *args, **kwargs):
        fh = real_open(path, *args, **kwargs)
        return _FullFile(fh) if os.path.basename(os.fspath(path)).startswith(names) else fh
    monkeypatch.setattr(module, "open", fake, raising=False)


def test_a_full_disk_while_saving_best_h5_names_it(bmnist, tmp_path, monkeypatch):
    _fail_writes_of(monkeypatch, "best.h5", 1)
    with pytest.raises(runs_lib.WriteFailed) as info:
        _train(tmp_path, bmnist, epochs=2)
    assert f"no space left on the device while saving {tmp_path / 'run' / 'best.h5'} " \
           "of epoch 1" in str(info.value)


def test_a_full_disk_while_appending_to_the_log_names_it(bmnist, tmp_path, monkeypatch):
    import builtins
    _full_for(monkeypatch, builtins, ("log.jsonl",))
    with pytest.raises(runs_lib.WriteFailed) as info:
        _train(tmp_path, bmnist, epochs=2)
    assert str(info.value).startswith(
        "cannot write the files of epoch 1: no space left on the device "
        f"({tmp_path / 'run' / 'log.jsonl'})"), str(info.value)


@pytest.mark.parametrize("name", ["config.json", "samples"])
def test_a_full_disk_while_writing_config_or_pictures_names_the_file(name, bmnist, tmp_path,
                                                                     monkeypatch):
    _full_for(monkeypatch, images_lib, (name,))
    with pytest.raises(runs_lib.WriteFailed) as info:
        _train(tmp_path, bmnist, epochs=2)
    message = str(info.value)
    assert "no space left on the device" in message and ".tmp-" not in message, message
    if name == "config.json":
        assert message.startswith(f"cannot write {tmp_path / 'run' / 'config.json'}: ")
    else:
        assert re.search(re.escape(f"({tmp_path / 'run'}{os.sep}samples") + r"\.(png|gif)\)",
                         message), message


def test_a_full_disk_while_writing_samples_through_the_cli_names_the_file(
        tiny_run, tmp_path, monkeypatch):
    _full_for(monkeypatch, images_lib, ("frame_",))
    result = invoke(["sample", tiny_run, "--rows", 1, "--cols", 1, "--out", tmp_path / "s"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: cannot write the samples into {tmp_path / 's'}: "
                                    f"no space left on the device ({tmp_path / 's'}{os.sep}"
                                    "frame_"), result.output


def test_a_full_disk_while_exporting_names_the_file(tiny_run, tmp_path, monkeypatch, data_args):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt_lib, "_write_file", full)
    out = tmp_path / "model.h5"
    result = invoke(["export", tiny_run, out, *data_args])
    assert result.exit_code == 1, result.output
    assert "no space left" in result.output and str(out) in result.output, result.output
    assert "Traceback" not in result.output


def test_a_full_disk_while_downloading_names_the_folder(tmp_path, monkeypatch):
    from npdraw.data import sources
    (tmp_path / "src.bin").write_bytes(b"x" * 1000)
    real_fdopen = os.fdopen
    monkeypatch.setattr(sources.os, "fdopen", lambda *a, **k: _FullFile(real_fdopen(*a, **k)))
    with pytest.raises(DataError) as info:
        sources._stream_to_temp((tmp_path / "src.bin").as_uri(), tmp_path / "cache", False)
    assert str(info.value) == (f"cannot save the download of {(tmp_path / 'src.bin').as_uri()}"
                               f" in {tmp_path / 'cache'}: no space left on the device; "
                               "nothing was saved")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_full_disk_under_tensorboard_names_its_folder(tmp_path, monkeypatch):
    from npdraw import monitor
    board = monitor.TensorBoardLog(tmp_path)
    try:
        def full():
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(board.writer, "flush", full)
        with pytest.raises(OSError) as info:
            board.epoch({"epoch": 1, "train_bound": 90.0})
        assert guards.os_error_sentence(info.value, "write the files of epoch 1") == (
            f"cannot write the files of epoch 1: no space left on the device "
            f"({tmp_path / 'tensorboard'})")
    finally:
        monkeypatch.undo()
        board.close()


# ----------------------------------------------------------------------------- 2. second writer

_HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from npdraw.guards import RunLock
lock = RunLock()
lock.acquire(sys.argv[2])
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_stops_at_once_naming_the_folder_and_the_process(
        bmnist, data_args, tmp_path):
    run = _train(tmp_path, bmnist)
    log_before = (run / "log.jsonl").read_text()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(REPO), str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke(["train", "--resume", run, "--epochs", 3, "--no-progress",
                         "--device", "cpu", "--ranks", 1, *data_args])
        assert result.exit_code == 1, result.output
        assert f"Error: the run folder {run} is in use by another training process " \
               f"(pid {holder.pid})" in result.output
        assert (run / "log.jsonl").read_text() == log_before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # The lock went with the process that held it.
    result = invoke(["train", "--resume", run, "--epochs", 2, "--no-progress", "--device",
                     "cpu", "--ranks", 1, *data_args])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in runs_lib.read_log(run)] == [1, 2]


def test_the_lock_is_released_after_a_failed_run(bmnist, tmp_path, monkeypatch):
    def nan_loss(params, cfg, x, eps):
        return float("nan"), None, None

    monkeypatch.setattr(model_lib, "loss_and_grads", nan_loss)
    with pytest.raises(runs_lib.NonFiniteLossError):
        _train(tmp_path, bmnist)
    with guards.RunLock() as lock:            # free again
        lock.acquire(tmp_path / "run")


def test_the_log_refuses_duplicated_or_out_of_order_epochs(tmp_path):
    rows = [{"epoch": 1}, {"epoch": 2}, {"epoch": 2}, {"epoch": 3}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 3: epoch 2 follows epoch 2; .*duplicated or "
                                         r"out-of-order"):
        runs_lib.read_log(tmp_path)
    result = invoke(["plot", tmp_path])
    assert result.exit_code == 2 and "line 3: epoch 2 follows epoch 2" in result.output


# ----------------------------------------------------------------------------- 3. signals

def test_sigint_inside_a_weakref_callback_still_stops_training(bmnist, tmp_path, monkeypatch):
    """Python runs the SIGINT handler where the main thread is; inside a weakref callback
    a KeyboardInterrupt is printed and dropped. The stop flag does not depend on that."""
    real, calls = model_lib.loss_and_grads, {"n": 0}

    class Anything:
        pass

    def interrupted_in_callback(params, cfg, x, eps):
        calls["n"] += 1
        if calls["n"] == 200 // 50 + 2:                     # epoch 2, step 2
            victim = Anything()
            ref = weakref.ref(victim, lambda _: os.kill(os.getpid(), signal.SIGINT))
            del victim                                        # the callback runs here
            assert ref() is None
        return real(params, cfg, x, eps)

    monkeypatch.setattr(model_lib, "loss_and_grads", interrupted_in_callback)
    lines = []
    with pytest.raises(runs_lib.TrainingInterrupted) as info:
        _train(tmp_path, bmnist, lines, epochs=3)
    assert info.value.signum == signal.SIGINT
    assert calls["n"] == 200 // 50 + 2                         # stopped before the next step
    assert "interrupted in epoch 2" in lines[-1] and "(epoch 1)" in lines[-1]
    assert ckpt_lib.load_checkpoint(tmp_path / "run" / "checkpoint.h5").epoch == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored


def test_a_second_signal_stops_at_once():
    with guards.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM                  # noted, nothing raised
        with pytest.raises(guards.StopRequested):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):                             # the handler runs here
                pass
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ----------------------------------------------------------------------------- 4. file system

def test_train_out_problems_are_sentences(data_args, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = invoke(["train", *TINY_ARGS, "--out", afile, *data_args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: cannot create the run folder under --out {afile}: {afile} is a file" \
           in result.output
    result = invoke(["train", *TINY_ARGS, "--out", afile / "sub", *data_args])
    assert result.exit_code == 1
    assert f"Error: cannot create the --out folder {afile / 'sub'}: not a directory" \
           in result.output

    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):           # CI runs as root: permissions do not apply
        if tmp_path / "ro" in (self, *self.parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = invoke(["train", *TINY_ARGS, "--out", tmp_path / "ro", *data_args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: cannot create the --out folder {tmp_path / 'ro'}: permission denied" \
           in result.output


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", ".."])
def test_a_run_name_is_one_folder_name(name, tmp_path):
    result = invoke(["train", "--name", name, "--out", tmp_path / "runs"])
    assert result.exit_code == 1 and "Error: name must be a single folder name" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tiny_run(bmnist, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tiny"), bmnist)


def _deny_writes(monkeypatch):
    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    monkeypatch.setattr(images_lib, "save_png", denied)
    monkeypatch.setattr(images_lib, "save_gif", denied)
    monkeypatch.setattr(pictures, "_write_bytes", denied)


def test_read_only_outputs_of_sample_plot_and_attention_demo(tiny_run, tmp_path, monkeypatch):
    picture = tmp_path / "p.png"
    iio.imwrite(picture, np.zeros((8, 8), np.uint8))
    _deny_writes(monkeypatch)
    for args, wanted in (
            (["sample", tiny_run, "--out", tmp_path / "s", "--device", "cpu"],
             f"cannot write the samples into {tmp_path / 's'}: permission denied"),
            (["plot", tiny_run], f"cannot write the plots in {tiny_run}: permission denied "
                                 f"({tiny_run / 'learning_curves.png'})"),
            (["attention-demo", picture, "--out", tmp_path / "a"],
             f"cannot write the attention pictures into {tmp_path / 'a'}: permission denied")):
        result = invoke(args)
        assert result.exit_code == 1, (args, result.output)
        assert f"Error: {wanted}" in result.output, result.output
        assert "Traceback" not in result.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = invoke(["sample", tiny_run, "--out", afile, "--device", "cpu"])
    assert result.exit_code == 2 and "is a file" in result.output     # click's check


# ----------------------------------------------------------------------------- 5. damaged weights

def test_non_finite_weights_are_refused_naming_file_and_array(tiny_run, tmp_path):
    ckpt = ckpt_lib.load_checkpoint(tiny_run / "checkpoint.h5")
    params = dict(ckpt.params)
    params["dec_W"] = params["dec_W"].copy()
    params["dec_W"][0, 0] = np.nan
    path = tmp_path / "nan.h5"
    ckpt_lib.save_checkpoint(path, ckpt.cfg, params, epoch=1)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"nan.h5: array params/dec_W holds 1 "
                                                       r"NaN or infinite value"):
        ckpt_lib.load_checkpoint(path)
    for command in (["evaluate", path, "--device", "cpu"], ["sample", path, "--out",
                                                             tmp_path / "s"]):
        result = invoke(command)
        assert result.exit_code == 2 and "params/dec_W holds 1 NaN" in result.output, result.output
    assert not (tmp_path / "s").exists()


def test_random_bytes_in_a_weight_array_are_found_by_the_checksum(tiny_run, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("checkpoint.h5", "log.jsonl", "config.json"):
        (run / name).write_bytes((tiny_run / name).read_bytes())
    with h5py.File(run / "checkpoint.h5", "r") as f:
        ds = f["params/enc_W"]
        offset, size = ds.id.get_chunk_info(0).byte_offset, ds.nbytes
    raw = bytearray((run / "checkpoint.h5").read_bytes())
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, 64).astype(np.float32).tobytes()
    raw[offset + size // 2: offset + size // 2 + len(noise)] = noise   # finite, plausible
    (run / "checkpoint.h5").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"checkpoint.h5: array params/enc_W is damaged"):
        train_lib.train(None, TrainConfig(epochs=2, device="cpu", resume=str(run)),
                        log=[].append, data=None, progress=False)


@pytest.mark.parametrize("option", ["--cx", "--cy", "--stride", "--sigma"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_attention_demo_refuses_non_finite_windows(option, value, tmp_path):
    picture = tmp_path / "p.png"
    iio.imwrite(picture, np.zeros((8, 8), np.uint8))
    result = invoke(["attention-demo", picture, option, value, "--out", tmp_path / "o"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 6. sizes

@pytest.fixture
def sixteen_gb(monkeypatch):
    monkeypatch.setattr(guards, "total_memory", lambda: 16 * 10**9)


def test_absurd_sizes_are_refused_with_the_estimate_and_the_limit(
        tiny_run, tmp_path, data_args, sixteen_gb):
    picture = tmp_path / "p.png"
    iio.imwrite(picture, np.zeros((28, 28), np.uint8))
    limit = "limit of 12.0 GB (75% of this machine's 16.0 GB)"
    for args in (["sample", tiny_run, "--rows", 1000, "--cols", 1000, "--out", tmp_path / "s"],
                 ["sample", tiny_run, "--scale", 10000, "--out", tmp_path / "s"],
                 ["attention-demo", picture, "--n", 10000, "--out", tmp_path / "a"],
                 ["train", "--attention", "1000,1000", "--device", "cpu", "--no-progress",
                  "--out", tmp_path / "r", *data_args]):       # T=64, 256 units, B=100
        result = invoke(args)
        assert result.exit_code == 1, (args, result.output)
        assert "would need about" in result.output and limit in result.output, result.output
    assert not any((tmp_path / d).exists() for d in ("s", "a")) and not any(
        (tmp_path / "r").glob("*/*.h5"))
    # A checkpoint that claims T = 10^7: refused by sample and evaluate.
    ckpt = ckpt_lib.load_checkpoint(tiny_run / "checkpoint.h5")
    huge = DrawConfig(**{**ckpt.cfg.to_dict(), "T": 10**7})
    path = tmp_path / "huge.h5"
    ckpt_lib.save_checkpoint(path, huge, ckpt.params, epoch=1)
    for args in (["sample", path, "--out", tmp_path / "s"], ["evaluate", path, *data_args],
                 ["export", path, tmp_path / "out.h5", *data_args]):    # issue 25, item 7
        result = invoke(args)
        assert result.exit_code == 1 and limit in result.output, result.output
    assert not (tmp_path / "out.h5").exists()


def test_fps_must_fit_a_gif(tiny_run, tmp_path):
    result = invoke(["sample", tiny_run, "--fps", "1e-300", "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "Invalid value for '--fps'" in result.output
    frame = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="from 0 to 655.35"):
        images_lib.save_gif(tmp_path / "a.gif", [frame], duration=1e300)
    images_lib.save_gif(tmp_path / "a.gif", [frame], duration=655.35)     # the longest
    assert (tmp_path / "a.gif").is_file()


@pytest.mark.parametrize("cfg", [
    TINY,
    DrawConfig(T=8, enc_dim=64, dec_dim=64, z_dim=10, attention=False),
    DrawConfig(T=4, read_n=12, write_n=20, enc_dim=32, dec_dim=32, z_dim=5),
    DrawConfig(T=6, height=10, width=14, channels=3, read_n=2, write_n=3, enc_dim=8,
               dec_dim=8, z_dim=2)])
def test_memory_estimates_bound_the_measured_peaks(cfg):
    """model_bytes is an upper bound of what NumPy allocates (tracemalloc sees NumPy's
    allocations), and not a wild one."""
    batch = 20
    params = model_lib.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch, cfg.D)).astype(np.float32)
    eps = rng.standard_normal((cfg.T, batch, cfg.z_dim)).astype(np.float32)
    for training, run in ((True, lambda: model_lib.loss_and_grads(params, cfg, x, eps)),
                          (False, lambda: model_lib.loss_only(params, cfg, x, eps, True)),
                          (False, lambda: model_lib.generate(params, cfg, eps))):
        tracemalloc.start()
        try:
            run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        estimate = evaluate_lib.model_bytes(cfg, batch, 4, training)
        assert peak <= estimate <= 8 * peak + 10**6, (training, peak, estimate)


# Runs its arguments as a child and reports the child's peak RSS (ru_maxrss). Measured from
# an intermediate process, since Linux carries a process's peak across exec: a child of
# pytest itself would report pytest's size.
_PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
sys.stderr.write(f"peak_rss {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n")
sys.exit(code)
"""


@pytest.mark.parametrize("attention", [(2, 5), (150, 150)])
def test_the_memory_check_bounds_the_peak_rss_of_a_training_run(attention, bmnist, data_args,
                                                                tmp_path):
    """Issue 25, item 9: the estimate was below the measured peak RSS (0.58 GB against
    1.21 GB at --attention 200,200), so a request over the limit could pass the check.
    What the check compares with the limit, guards.peak_bytes, must be above the peak."""
    read_n, write_n = attention
    result = subprocess.run([str(a) for a in (
        sys.executable, "-c", _PEAK_RSS, sys.executable, REPO / "cli.py", "train", "--niter", 3,
         "--enc-dim", 8, "--dec-dim", 8, "--z-dim", 4, "--subset", 300, "--eval-subset", 200,
         "--attention", f"{read_n},{write_n}", "--epochs", 1, "--ranks", 1, "--device", "cpu",
         "--no-progress", "--out", tmp_path, *data_args)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak = int(result.stderr.split("peak_rss ")[1].split()[0])
    peak *= 1 if sys.platform == "darwin" else 1024           # bytes there, KiB on Linux
    cfg = DrawConfig(T=3, read_n=read_n, write_n=write_n, enc_dim=8, dec_dim=8, z_dim=4)
    data = sum(a.nbytes for a in (bmnist.train, bmnist.valid, bmnist.test))
    bound = guards.peak_bytes(evaluate_lib.model_bytes(cfg, 100, 4, training=True), data)
    assert peak <= bound <= 2.5 * peak, (peak, bound)


def test_long_evaluations_show_progress(tiny_run, data_args):
    result = invoke(["evaluate", tiny_run, "--k", 3, "--subset", 20, "--bs", 10,
                     "--device", "cpu", "--ranks", 1, *data_args])
    assert result.exit_code == 0, result.output
    assert "evaluating 20 images, K=3" in result.output and "6/6" in result.output


# ----------------------------------------------------------------------------- 7. smaller things

def test_sample_removes_frames_of_an_earlier_longer_animation(tiny_run, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    for t in range(10):
        (out / f"frame_{t:03d}.png").write_bytes(b"old")
    (out / "frame_notes.png").write_bytes(b"mine")         # not a frame name: kept
    result = invoke(["sample", tiny_run, "--out", out, "--rows", 2, "--cols", 2])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["frame_000.png", "frame_001.png", "frame_002.png", "frame_notes.png",
                     "samples.gif", "samples.png"]


def test_a_float_tiff_of_0_to_255_is_scaled_by_its_range(tmp_path):
    values = np.array([[0, 64], [128, 255]], np.float32)
    path = tmp_path / "f.tif"
    iio.imwrite(path, values, plugin="pillow")
    image = images_lib.load_image(path)
    np.testing.assert_allclose(image[0], values / 255, rtol=0, atol=1e-7)


def test_a_text_file_named_png_in_a_folder_data_set(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"p{i}.png", np.zeros((4, 4), np.uint8))
    (folder / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"notes.png is not an image") as info:
        load_splits("folder", folder=str(folder), progress=False)
    assert "pyav" not in str(info.value)


def test_a_mirror_that_is_a_file(tmp_path):
    mirror = tmp_path / "mirror.gz"
    mirror.write_bytes(b"x")
    with pytest.raises(DataError, match=r"mirror .*mirror.gz is a file"):
        load_splits("bmnist", data_dir=str(tmp_path / "d"), mirror=str(mirror), progress=False)


def test_a_cut_off_last_log_line_is_dropped_and_real_damage_names_its_line(tmp_path):
    good = "".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 41))
    (tmp_path / "log.jsonl").write_text(good + '{"epoch": 41, "train_bo')
    notes = []
    rows = runs_lib.read_log(tmp_path, warn=notes.append)
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    assert len(notes) == 1 and "cut-off last line 41" in notes[0]
    result = invoke(["plot", tmp_path])
    assert result.exit_code == 0 and "cut-off last line 41" in result.output
    lines = good.splitlines(keepends=True)
    lines[39] = '{"epoch": 40, "tra\n'                       # damage, not a cut-off end
    (tmp_path / "log.jsonl").write_text("".join(lines))
    with pytest.raises(ValueError, match=r"log.jsonl, line 40: not valid JSON"):
        runs_lib.read_log(tmp_path)


# ----------------------------------------------------------------------------- 8. a check

def test_evaluate_bound_is_the_mean_over_examples_when_batches_do_not_divide_n(bmnist):
    params = train_lib.init_model(TINY, 0, bmnist.train[:100])
    x = np.asarray(bmnist.valid[:7], np.float32)
    got = evaluate_lib.evaluate_bound(params, TINY, x, 3, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    per_example = []
    for start in (0, 3, 6):                              # the same noise, batch by batch
        xb = x[start:start + 3]
        eps = rng.standard_normal((TINY.T, xb.shape[0], TINY.z_dim), dtype=np.float32)
        per_example.append(model_lib.loss_only(params, TINY, xb, eps)[0].astype(np.float64))
    want = np.concatenate(per_example)
    assert want.shape == (7,)
    assert got == pytest.approx(want.mean(), rel=1e-12)
    assert abs(got - want.sum() / 9) > 1.0               # the batches x size divisor is off


def test_iwae_equals_the_bound_when_every_importance_weight_is_equal(bmnist):
    """q equal to the prior (q_W = q_b = 0: mu 0, sigma 1) and a decoder that ignores z
    (its z rows of dec_W zero): log w = log p(x|z) is the same for every z, so the IWAE
    estimate is the bound for any K; removing its '- log K' breaks this (issue 25)."""
    params = train_lib.init_model(TINY, 0, bmnist.train[:100])
    params["q_W"][...] = 0
    params["q_b"][...] = 0
    params["dec_W"][:TINY.z_dim] = 0
    x = np.asarray(bmnist.valid[:20], np.float32)
    for K in (1, 3, 10):
        iwae, bound = evaluate_lib.evaluate_iwae_and_bound(params, TINY, x, K, 8,
                                                        np.random.default_rng(K))
        assert iwae == pytest.approx(bound, rel=1e-5, abs=1e-4), K


def test_an_out_that_is_a_dangling_link_is_named_as_one(tmp_path):
    """A dangling symlink as --out was called "a file" (issue 25): the sentence names the
    link and its missing target; a plain file is still called a file."""
    import click
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    plain = tmp_path / "plain"
    plain.write_text("")
    for path, what in ((link, f"a link to {tmp_path / 'gone'}, which does not exist"),
                       (plain, "a file")):
        with pytest.raises(ValueError) as err:
            runs_lib.unique_run_dir(path, "run")
        assert str(err.value) == (f"cannot create the run folder under --out {path}: "
                                  f"{path} is {what}, not a folder")
        with pytest.raises(click.ClickException) as err:
            cli_options.output_folder(path, "the samples")
        assert err.value.message == (f"cannot write the samples into {path}: it is {what}, "
                                     "not a folder")
